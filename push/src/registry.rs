//! Durable push registration state: each device's push token and each user's chat mutes.
//!
//! ```text
//!  set_token / remove_token / remove_device / mute ─► validate ─► append record (fdatasync) ─► apply
//!  open ─► AppendLog::open (torn tail cut) ─► replay records ─► compact if the log is mostly garbage
//! ```
//!
//! Records are JSON bodies in an [`AppendLog`](crate::log::AppendLog) at
//! `<data>/push/registry.log`. A change is applied in memory only after it is durable, so a
//! registration answered `204` survives a crash. When the log holds many more records than live
//! entries it is rewritten as a snapshot (atomic rename).

use crate::log::{AppendLog, LogError};
use crate::model::{valid_token, Platform, Target};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Devices with a push token per user (matches the server's devices-per-user limit with room for
/// a replaced device whose removal has not arrived yet).
pub const TOKENS_PER_USER_MAX: usize = 8;
/// Chats one user may have muted at once (past this, the oldest-ending mute is dropped).
pub const MUTES_PER_USER_MAX: usize = 1024;
/// Users with any registration state. Memory: ~200 B per token, ~40 B per mute.
pub const REGISTRY_USERS_MAX: usize = 1_000_000;
/// Compact when the log has this many records more than there are live entries.
pub const REGISTRY_GARBAGE_RECORDS_MAX: usize = 10_000;

#[derive(Debug, PartialEq, Eq)]
pub enum RegistryError {
    InvalidToken,
    /// Registry full (users or tokens per user).
    Full,
    Storage(String),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::InvalidToken => write!(f, "invalid push token"),
            RegistryError::Full => write!(f, "push registry full"),
            RegistryError::Storage(e) => write!(f, "push registry storage: {e}"),
        }
    }
}

impl From<LogError> for RegistryError {
    fn from(e: LogError) -> Self {
        RegistryError::Storage(e.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Token {
        user: u64,
        device: u32,
        platform: Platform,
        token: String,
    },
    /// Removes the device's token only if it is still `token` (a sink's late "invalid token"
    /// must not remove a token the device registered since).
    Untoken {
        user: u64,
        device: u32,
        token: Option<String>,
    },
    Mute {
        user: u64,
        chat: u64,
        until_unix_s: u64,
    },
}

#[derive(Default)]
struct UserState {
    tokens: Vec<(u32, Platform, String)>,
    mutes: HashMap<u64, u64>,
}

pub struct Registry {
    log: AppendLog,
    users: HashMap<u64, UserState>,
    records: usize,
    /// Live entries (tokens + mutes), kept up to date so the compaction check is O(1).
    live: usize,
    garbage_records_max: usize,
}

impl Registry {
    /// Opens `<dir>/registry.log` (creating `dir`).
    pub fn open(dir: &Path, now_unix_s: u64) -> Result<Registry, RegistryError> {
        std::fs::create_dir_all(dir).map_err(|e| RegistryError::Storage(e.to_string()))?;
        let (log, bodies) = AppendLog::open(&dir.join("registry.log"))?;
        let mut reg = Registry {
            log,
            users: HashMap::new(),
            records: bodies.len(),
            live: 0,
            garbage_records_max: REGISTRY_GARBAGE_RECORDS_MAX,
        };
        for body in &bodies {
            let rec: Record = serde_json::from_slice(body).map_err(|e| {
                RegistryError::Storage(format!("registry record does not parse: {e}"))
            })?;
            reg.apply(rec);
        }
        reg.maybe_compact(now_unix_s)?;
        Ok(reg)
    }

    /// Registers (or replaces) the device's token. Durable when it returns `Ok`.
    pub fn set_token(
        &mut self,
        user: u64,
        device: u32,
        platform: Platform,
        token: &str,
    ) -> Result<(), RegistryError> {
        if !valid_token(platform, token) {
            return Err(RegistryError::InvalidToken);
        }
        match self.users.get(&user) {
            None if self.users.len() >= REGISTRY_USERS_MAX => return Err(RegistryError::Full),
            Some(u)
                if u.tokens.len() >= TOKENS_PER_USER_MAX
                    && !u.tokens.iter().any(|(d, _, _)| *d == device) =>
            {
                return Err(RegistryError::Full)
            }
            Some(u)
                if u.tokens
                    .iter()
                    .any(|(d, p, t)| *d == device && *p == platform && t == token) =>
            {
                return Ok(()); // already registered
            }
            _ => {}
        }
        self.write(Record::Token {
            user,
            device,
            platform,
            token: token.to_owned(),
        })
    }

    /// Removes the device's token (if `token` is given, only if it is still that one). Returns
    /// whether something was removed.
    pub fn remove_token(
        &mut self,
        user: u64,
        device: u32,
        token: Option<&str>,
    ) -> Result<bool, RegistryError> {
        let present = self.users.get(&user).is_some_and(|u| {
            u.tokens
                .iter()
                .any(|(d, _, t)| *d == device && token.is_none_or(|tok| tok == t))
        });
        if !present {
            return Ok(false);
        }
        self.write(Record::Untoken {
            user,
            device,
            token: token.map(str::to_owned),
        })?;
        Ok(true)
    }

    /// Mutes `chat` for `user` until `until_unix_s` (0 unmutes).
    pub fn mute(&mut self, user: u64, chat: u64, until_unix_s: u64) -> Result<(), RegistryError> {
        if self.users.get(&user).and_then(|u| u.mutes.get(&chat)) == Some(&until_unix_s)
            || (until_unix_s == 0 && self.muted_until(user, chat).is_none())
        {
            return Ok(());
        }
        if !self.users.contains_key(&user) && self.users.len() >= REGISTRY_USERS_MAX {
            return Err(RegistryError::Full);
        }
        self.write(Record::Mute {
            user,
            chat,
            until_unix_s,
        })
    }

    pub fn targets(&self, user: u64) -> Vec<Target> {
        self.users
            .get(&user)
            .map(|u| {
                u.tokens
                    .iter()
                    .map(|(device, platform, token)| Target {
                        user,
                        device: *device,
                        platform: *platform,
                        token: token.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn muted_until(&self, user: u64, chat: u64) -> Option<u64> {
        self.users.get(&user)?.mutes.get(&chat).copied()
    }

    pub fn is_muted(&self, user: u64, chat: u64, now_unix_s: u64) -> bool {
        self.muted_until(user, chat).is_some_and(|t| t > now_unix_s)
    }

    fn write(&mut self, rec: Record) -> Result<(), RegistryError> {
        let body = serde_json::to_vec(&rec).expect("records serialize");
        self.log.append(&[&body])?;
        self.records += 1;
        self.apply(rec);
        Ok(())
    }

    fn apply(&mut self, rec: Record) {
        match rec {
            Record::Token {
                user,
                device,
                platform,
                token,
            } => {
                let u = self.users.entry(user).or_default();
                let before = u.tokens.len();
                u.tokens.retain(|(d, _, _)| *d != device);
                self.live -= before - u.tokens.len();
                u.tokens.push((device, platform, token));
                self.live += 1;
            }
            Record::Untoken {
                user,
                device,
                token,
            } => {
                if let Some(u) = self.users.get_mut(&user) {
                    let before = u.tokens.len();
                    u.tokens.retain(|(d, _, t)| {
                        !(*d == device && token.as_ref().is_none_or(|tok| tok == t))
                    });
                    self.live -= before - u.tokens.len();
                }
                self.forget_if_empty(user);
            }
            Record::Mute {
                user,
                chat,
                until_unix_s,
            } => {
                let u = self.users.entry(user).or_default();
                let before = u.mutes.len();
                if until_unix_s == 0 {
                    u.mutes.remove(&chat);
                } else {
                    if u.mutes.len() >= MUTES_PER_USER_MAX && !u.mutes.contains_key(&chat) {
                        let oldest = u.mutes.iter().min_by_key(|(_, t)| **t).map(|(c, _)| *c);
                        if let Some(c) = oldest {
                            u.mutes.remove(&c);
                        }
                    }
                    u.mutes.insert(chat, until_unix_s);
                }
                self.live = self.live + u.mutes.len() - before;
                self.forget_if_empty(user);
            }
        }
        debug_assert_eq!(self.live, self.count_live());
    }

    fn forget_if_empty(&mut self, user: u64) {
        if self
            .users
            .get(&user)
            .is_some_and(|u| u.tokens.is_empty() && u.mutes.is_empty())
        {
            self.users.remove(&user);
        }
    }

    fn count_live(&self) -> usize {
        self.users
            .values()
            .map(|u| u.tokens.len() + u.mutes.len())
            .sum()
    }

    /// Rewrites the log as a snapshot of the live state (dropping expired mutes) when it holds
    /// more than `REGISTRY_GARBAGE_RECORDS_MAX` dead records.
    pub fn maybe_compact(&mut self, now_unix_s: u64) -> Result<bool, RegistryError> {
        if self.records <= self.live + self.garbage_records_max {
            return Ok(false);
        }
        self.compact(now_unix_s)?;
        Ok(true)
    }

    pub fn compact(&mut self, now_unix_s: u64) -> Result<(), RegistryError> {
        for u in self.users.values_mut() {
            u.mutes.retain(|_, until| *until > now_unix_s);
        }
        self.users
            .retain(|_, u| !(u.tokens.is_empty() && u.mutes.is_empty()));
        self.live = self.count_live();
        let mut bodies = Vec::with_capacity(self.live);
        for (user, u) in &self.users {
            for (device, platform, token) in &u.tokens {
                bodies.push(Record::Token {
                    user: *user,
                    device: *device,
                    platform: *platform,
                    token: token.clone(),
                });
            }
            for (chat, until) in &u.mutes {
                bodies.push(Record::Mute {
                    user: *user,
                    chat: *chat,
                    until_unix_s: *until,
                });
            }
        }
        let bodies: Vec<Vec<u8>> = bodies
            .iter()
            .map(|r| serde_json::to_vec(r).expect("records serialize"))
            .collect();
        self.log.rewrite(&bodies)?;
        self.records = bodies.len();
        Ok(())
    }

    pub fn log_records(&self) -> usize {
        self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn tokens_and_mutes_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Registry::open(dir.path(), NOW).unwrap();
            r.set_token(1, 1, Platform::Fcm, "tok-a").unwrap();
            r.set_token(1, 2, Platform::Apns, "abcdef01").unwrap();
            r.set_token(1, 1, Platform::Webhook, "tok-b").unwrap(); // replaces device 1
            r.set_token(2, 1, Platform::Fcm, "tok-c").unwrap();
            r.mute(1, 77, NOW + 60).unwrap();
            r.mute(1, 78, NOW + 60).unwrap();
            r.mute(1, 78, 0).unwrap();
            assert_eq!(
                r.set_token(1, 3, Platform::Apns, "not hex"),
                Err(RegistryError::InvalidToken)
            );
            assert_eq!(
                r.set_token(1, 3, Platform::Fcm, ""),
                Err(RegistryError::InvalidToken)
            );
            // A stale "invalid token" for an old token removes nothing.
            assert_eq!(r.remove_token(1, 1, Some("tok-a")), Ok(false));
            assert_eq!(r.remove_token(2, 1, Some("tok-c")), Ok(true));
        }
        let r = Registry::open(dir.path(), NOW).unwrap();
        let mut t = r.targets(1);
        t.sort_by_key(|t| t.device);
        assert_eq!(
            t,
            vec![
                Target {
                    user: 1,
                    device: 1,
                    platform: Platform::Webhook,
                    token: "tok-b".into()
                },
                Target {
                    user: 1,
                    device: 2,
                    platform: Platform::Apns,
                    token: "abcdef01".into()
                },
            ]
        );
        assert!(r.targets(2).is_empty());
        assert!(r.is_muted(1, 77, NOW));
        assert!(!r.is_muted(1, 77, NOW + 60));
        assert!(!r.is_muted(1, 78, NOW));
    }

    #[test]
    fn torn_tail_loses_only_the_unacknowledged_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.log");
        {
            let mut r = Registry::open(dir.path(), NOW).unwrap();
            r.set_token(1, 1, Platform::Fcm, "first").unwrap();
        }
        let one = std::fs::metadata(&path).unwrap().len();
        {
            let mut r = Registry::open(dir.path(), NOW).unwrap();
            r.set_token(1, 2, Platform::Fcm, "second").unwrap();
        }
        let full = std::fs::read(&path).unwrap();
        for cut in one as usize..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let mut r = Registry::open(dir.path(), NOW).unwrap();
            assert_eq!(r.targets(1).len(), 1, "cut at {cut}");
            // And it goes on working after the repair.
            r.set_token(1, 3, Platform::Fcm, "third").unwrap();
            drop(r);
            let r = Registry::open(dir.path(), NOW).unwrap();
            assert_eq!(r.targets(1).len(), 2);
        }
    }

    #[test]
    fn compaction_keeps_live_state_and_drops_expired_mutes() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), NOW).unwrap();
        r.garbage_records_max = 50; // the real limit would take 10,000 fsyncs here
        for i in 0..60 {
            r.set_token(5, 1, Platform::Fcm, &format!("t{i}")).unwrap();
        }
        r.mute(5, 1, NOW + 10).unwrap();
        r.mute(5, 2, NOW + 1000).unwrap();
        assert!(r.maybe_compact(NOW + 20).unwrap());
        assert_eq!(r.log_records(), 2);
        assert!(!r.maybe_compact(NOW + 20).unwrap());
        drop(r);
        let r = Registry::open(dir.path(), NOW).unwrap();
        assert_eq!(r.targets(5)[0].token, "t59");
        assert_eq!(r.muted_until(5, 1), None);
        assert_eq!(r.muted_until(5, 2), Some(NOW + 1000));
        assert_eq!(r.log_records(), 2);
    }

    #[test]
    fn tokens_per_user_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), NOW).unwrap();
        for d in 0..TOKENS_PER_USER_MAX as u32 {
            r.set_token(1, d, Platform::Fcm, "t").unwrap();
        }
        assert_eq!(
            r.set_token(1, 99, Platform::Fcm, "t"),
            Err(RegistryError::Full)
        );
        // Replacing an existing device's token is fine.
        r.set_token(1, 0, Platform::Fcm, "u").unwrap();
    }
}
