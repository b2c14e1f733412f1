//! Durable accounts, sans-IO: users, their phone numbers, devices, profiles, token revocations
//! and E2E keys, per shard, rebuilt by replaying `Record::Account` records.
//!
//! ```text
//!  phone ──home_shard──► shard s ──► Accounts (by_phone, users, revocations, keys)
//!  user id = local * shards + s + 1 ──user_shard──► the same shard s
//! ```
//!
//! Sharding: a phone's home shard is `splitmix64(digits ^ salt) % shards`. The user created for
//! it gets an id that encodes that shard (`local * shards + shard + 1`, `local` counting up per
//! shard), so both "who owns +1415…" and "what are user 7's devices" are answered by one shard
//! without an index. Ids are unique (disjoint residues per shard) and crash-safe: `next_local`
//! is recovered as one past the highest `Created` record, and an id is returned to a client only
//! after its `Created` record is durable (an id staged but lost in a crash was never seen).
//! Users created by the `token` CLI (ids not allocated here) have no account: their API calls
//! get 404, their WebSocket works as before.

use std::collections::HashMap;
use switchboard_api::accounts::{
    is_valid_device_name, AccountStore, Device, Login, Phone, StoreError,
};
use switchboard_api::keys::{KeyDirectory, KeyUpload};
use switchboard_storage::{AccountRecord, Record};
use switchboard_wire::{splitmix64, DeviceId, UserId};

/// Most accounts one shard holds; registering more gets 503. Each costs ~300 bytes plus its
/// devices' keys (up to ~7 KiB each), so the default bounds a shard's account memory to a few GiB
/// at the very worst.
pub const ACCOUNTS_PER_SHARD_MAX: usize = 1_000_000;
/// Most revocations one shard keeps (entries are pruned once every token they name has
/// expired). A logout past it gets 503 rather than forgetting a revocation.
pub const REVOCATIONS_PER_SHARD_MAX: usize = 100_000;
/// Longest display name, bytes.
pub const DISPLAY_NAME_BYTES_MAX: usize = 64;
/// Longest "about" text, bytes.
pub const ABOUT_BYTES_MAX: usize = 256;
/// Longest avatar media id, bytes (media ids are 22 characters).
pub const AVATAR_MEDIA_ID_BYTES_MAX: usize = 64;

const _: () = assert!(ABOUT_BYTES_MAX <= switchboard_storage::ACCOUNT_TEXT_BYTES_MAX);

const PHONE_SALT: u64 = 0x7068_6f6e_6520_7368; // "phone sh"

/// The shard that owns `phone` and the user created for it.
pub fn phone_shard(phone: &Phone, shards: u32) -> u32 {
    let digits: u64 = phone.as_str()[1..].parse().unwrap_or(0);
    (splitmix64(digits ^ PHONE_SALT) % shards as u64) as u32
}

/// The shard that owns `user`'s account (inverse of the id allocation).
pub fn user_shard(user: UserId, shards: u32) -> u32 {
    (user.0.wrapping_sub(1) % shards as u64) as u32
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Profile {
    pub display_name: String,
    pub about: String,
    pub avatar_media_id: String,
}

#[derive(Clone, Debug)]
struct Account {
    phone: Phone,
    devices: Vec<Device>,
    next_device: u32,
    profile: Profile,
}

/// One shard's accounts.
pub struct Accounts {
    shard: u32,
    shards: u32,
    by_phone: HashMap<Phone, UserId>,
    users: HashMap<UserId, Account>,
    next_local: u64,
    /// (user, device) → tokens expiring at or before this are revoked.
    pub revocations: HashMap<(UserId, DeviceId), u64>,
    pub keys: KeyDirectory,
    /// Registered devices a user may have (config `devices_per_user_max`).
    devices_max: usize,
}

impl Accounts {
    pub fn new(shard: u32, shards: u32, devices_max: usize) -> Accounts {
        assert!(shard < shards);
        Accounts {
            shard,
            shards,
            by_phone: HashMap::new(),
            users: HashMap::new(),
            next_local: 0,
            revocations: HashMap::new(),
            keys: KeyDirectory::new(),
            devices_max,
        }
    }

    /// Replays (or applies a just-staged) record. Records are trusted: they were checked before
    /// they were written, and CRC-checked when read.
    pub fn apply(&mut self, record: &Record) {
        let Record::Account(a) = record else {
            return;
        };
        match a {
            AccountRecord::Created { user, phone, .. } => {
                // A record that passed its CRC but names no valid phone or user 0 cannot come
                // from this code; skip it rather than panic on bytes from disk.
                let (Some(phone), Some(id)) = (Phone::parse(phone), user.0.checked_sub(1)) else {
                    return;
                };
                let local = id / self.shards as u64;
                self.next_local = self.next_local.max(local.saturating_add(1));
                self.by_phone.insert(phone.clone(), *user);
                self.users.entry(*user).or_insert(Account {
                    phone,
                    devices: Vec::new(),
                    next_device: 1,
                    profile: Profile::default(),
                });
            }
            AccountRecord::Device {
                user, device, name, ..
            } => {
                if let Some(a) = self.users.get_mut(user) {
                    a.next_device = a.next_device.max(device.0.saturating_add(1));
                    a.devices.push(Device {
                        id: *device,
                        name: name.clone(),
                    });
                }
            }
            AccountRecord::Revoke {
                user,
                device,
                through_s,
                removed,
            } => {
                let e = self.revocations.entry((*user, *device)).or_insert(0);
                *e = (*e).max(*through_s);
                if *removed {
                    if let Some(a) = self.users.get_mut(user) {
                        a.devices.retain(|d| d.id != *device);
                    }
                    self.keys.remove_device(*user, *device);
                }
            }
            AccountRecord::Profile {
                user,
                display_name,
                about,
                avatar_media_id,
            } => {
                if let Some(a) = self.users.get_mut(user) {
                    a.profile = Profile {
                        display_name: display_name.clone(),
                        about: about.clone(),
                        avatar_media_id: avatar_media_id.clone(),
                    };
                }
            }
            AccountRecord::Keys { user, device, keys } => {
                if let Ok(upload) = KeyUpload::from_json(keys) {
                    let _ = self.keys.put(*user, *device, upload);
                }
            }
            AccountRecord::PrekeyTaken { user, device } => {
                let _ = self.keys.fetch(*user, *device);
            }
        }
    }

    /// Drops revocations whose tokens have all expired.
    pub fn prune_revocations(&mut self, now_s: u64) {
        self.revocations.retain(|_, through| *through > now_s);
    }

    pub fn phone_of(&self, user: UserId) -> Option<&Phone> {
        self.users.get(&user).map(|a| &a.phone)
    }

    pub fn user_by_phone(&self, phone: &Phone) -> Option<UserId> {
        self.by_phone.get(phone).copied()
    }

    pub fn profile(&self, user: UserId) -> Option<&Profile> {
        self.users.get(&user).map(|a| &a.profile)
    }

    pub fn devices(&self, user: UserId) -> Option<&[Device]> {
        self.users.get(&user).map(|a| a.devices.as_slice())
    }

    pub fn has_device(&self, user: UserId, device: DeviceId) -> bool {
        self.devices(user)
            .is_some_and(|ds| ds.iter().any(|d| d.id == device))
    }

    /// Finds or creates the user of `phone` and adds a device; returns the records to make
    /// durable (already applied here).
    pub fn login(
        &mut self,
        phone: &Phone,
        device_name: &str,
        now_ms: u64,
    ) -> Result<(Login, Vec<Record>), StoreError> {
        debug_assert!(is_valid_device_name(device_name));
        debug_assert_eq!(phone_shard(phone, self.shards), self.shard);
        let mut records = Vec::new();
        let existing = self.by_phone.get(phone).copied();
        let user = match existing {
            Some(u) => {
                if self.users[&u].devices.len() >= self.devices_max {
                    return Err(StoreError::DevicesFull);
                }
                u
            }
            None => {
                if self.users.len() >= ACCOUNTS_PER_SHARD_MAX {
                    return Err(StoreError::Unavailable("account shard full".into()));
                }
                let user = UserId(self.next_local * self.shards as u64 + self.shard as u64 + 1);
                records.push(Record::Account(AccountRecord::Created {
                    user,
                    phone: phone.as_str().to_owned(),
                    created_ms: now_ms,
                }));
                user
            }
        };
        for r in &records {
            self.apply(r);
        }
        let device = DeviceId(self.users[&user].next_device);
        if device.0 == u32::MAX {
            // Four billion logins on one account: refuse rather than reuse an id.
            return Err(StoreError::Unavailable("device ids exhausted".into()));
        }
        let r = Record::Account(AccountRecord::Device {
            user,
            device,
            name: device_name.to_owned(),
            created_ms: now_ms,
        });
        self.apply(&r);
        records.push(r);
        Ok((
            Login {
                user_id: user,
                device_id: device,
                new_user: existing.is_none(),
            },
            records,
        ))
    }
}

/// [`AccountStore`] over one shard's [`Accounts`] for `Otp::verify`: a login is applied at once
/// and its records collected for the committer.
pub struct Staging<'a> {
    pub accounts: &'a mut Accounts,
    pub now_ms: u64,
    pub records: Vec<Record>,
}

impl AccountStore for Staging<'_> {
    fn user_by_phone(&self, phone: &Phone) -> Result<Option<UserId>, StoreError> {
        Ok(self.accounts.user_by_phone(phone))
    }
    fn phone_of(&self, user: UserId) -> Result<Option<Phone>, StoreError> {
        Ok(self.accounts.phone_of(user).cloned())
    }
    fn login(&mut self, phone: &Phone, device_name: &str) -> Result<Login, StoreError> {
        let (login, records) = self.accounts.login(phone, device_name, self.now_ms)?;
        self.records.extend(records);
        Ok(login)
    }
    fn devices(&self, user: UserId) -> Result<Vec<Device>, StoreError> {
        Ok(self
            .accounts
            .devices(user)
            .map(<[_]>::to_vec)
            .unwrap_or_default())
    }
    fn remove_device(&mut self, _user: UserId, _device: DeviceId) -> Result<bool, StoreError> {
        // Removal goes through a `Revoke { removed: true }` record (see `accounts_svc`).
        Err(StoreError::Unavailable(
            "remove devices with a revocation".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone(s: &str) -> Phone {
        Phone::parse(s).unwrap()
    }

    /// A phone of shard `shard` out of `shards`, found by counting up.
    fn phone_in(shard: u32, shards: u32, start: u64) -> Phone {
        (start..)
            .map(|n| phone(&format!("+1{n}")))
            .find(|p| phone_shard(p, shards) == shard)
            .unwrap()
    }

    #[test]
    fn ids_encode_the_shard_and_survive_replay() {
        let shards = 4;
        let mut a = Accounts::new(2, shards, 5);
        let mut log = Vec::new();
        let mut users = Vec::new();
        for i in 0..5 {
            let p = phone_in(2, shards, 4_155_550_000 + i * 1000);
            let (login, recs) = a.login(&p, "phone", 1).unwrap();
            assert!(login.new_user);
            assert_eq!(user_shard(login.user_id, shards), 2);
            assert_eq!(login.device_id, DeviceId(1));
            users.push((p, login.user_id));
            log.extend(recs);
        }
        let ids: std::collections::HashSet<_> = users.iter().map(|(_, u)| *u).collect();
        assert_eq!(ids.len(), 5, "unique ids");
        // A second device of the first user; device ids count up.
        let (l2, recs) = a.login(&users[0].0, "laptop", 2).unwrap();
        assert_eq!(
            (l2.user_id, l2.device_id, l2.new_user),
            (users[0].1, DeviceId(2), false)
        );
        log.extend(recs);
        // Remove device 1 and replay everything: same state, next ids continue.
        let revoke = Record::Account(AccountRecord::Revoke {
            user: users[0].1,
            device: DeviceId(1),
            through_s: 99,
            removed: true,
        });
        a.apply(&revoke);
        log.push(revoke);
        let mut b = Accounts::new(2, shards, 5);
        for r in &log {
            b.apply(r);
        }
        assert_eq!(b.devices(users[0].1).unwrap().len(), 1);
        assert!(b.has_device(users[0].1, DeviceId(2)) && !b.has_device(users[0].1, DeviceId(1)));
        assert_eq!(b.revocations.get(&(users[0].1, DeviceId(1))), Some(&99));
        let p = phone_in(2, shards, 4_255_550_000);
        let (fresh, _) = b.login(&p, "phone", 3).unwrap();
        assert!(!ids.contains(&fresh.user_id));
        assert_eq!(user_shard(fresh.user_id, shards), 2);
        // Device ids are never reused after a removal.
        let (l3, _) = b.login(&users[0].0, "tablet", 4).unwrap();
        assert_eq!(l3.device_id, DeviceId(3));
        b.prune_revocations(100);
        assert!(b.revocations.is_empty());
    }

    #[test]
    fn device_limit() {
        let mut a = Accounts::new(0, 1, 2);
        let p = phone("+14155550123");
        a.login(&p, "a", 0).unwrap();
        a.login(&p, "b", 0).unwrap();
        assert_eq!(a.login(&p, "c", 0).unwrap_err(), StoreError::DevicesFull);
    }
}
