//! The push thread: one OS thread with a current-thread tokio runtime that owns the registry,
//! the queue, the dead-letter log and the sinks. The engine's glommio cores talk to it only
//! through [`PushHandle`]: a bounded channel that is never waited on by a reactor (`try_send`;
//! full → the push is dropped and counted), plus oneshot replies for registrations, which an
//! HTTP handler awaits (tokio's channels are runtime-agnostic futures).
//!
//! ```text
//!  PushHandle::notify/read/online ──try_send──┐
//!  PushHandle::set_token/…  ──try_send + oneshot┤ bounded (commands_max)
//!                                              ▼
//!  loop { select! { command → registry / queue,
//!                   outcome → queue.on_outcome → remove token | dead-letter,
//!                   timer   → (wake) }
//!         while queue.poll(now) → spawn sink request (≤ in_flight_max) }
//! ```

use crate::config::PushConfig;
use crate::dlq::DeadLetterLog;
use crate::model::{Outcome, Platform};
use crate::queue::{Action, DeadLetter, Delivery, MessageEvent, PushQueue};
use crate::registry::{Registry, RegistryError};
use crate::sinks::Sinks;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where the push state lives under the server's data directory.
pub fn push_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("push")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The command channel is full or the push thread is gone: answer 503.
    Busy,
    InvalidToken,
    Full,
    Storage(String),
}

impl std::fmt::Display for PushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushError::Busy => write!(f, "push service busy"),
            PushError::InvalidToken => write!(f, "invalid push token"),
            PushError::Full => write!(f, "too many push tokens"),
            PushError::Storage(e) => write!(f, "push storage: {e}"),
        }
    }
}

impl From<RegistryError> for PushError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::InvalidToken => PushError::InvalidToken,
            RegistryError::Full => PushError::Full,
            RegistryError::Storage(s) => PushError::Storage(s),
        }
    }
}

type Reply = oneshot::Sender<Result<(), PushError>>;

enum Command {
    Message(MessageEvent),
    Read {
        user: u64,
        chat: u64,
        unread: u32,
    },
    Online {
        user: u64,
    },
    SetToken {
        user: u64,
        device: u32,
        platform: Platform,
        token: String,
        reply: Reply,
    },
    RemoveToken {
        user: u64,
        device: u32,
        reply: Reply,
    },
    Mute {
        user: u64,
        chat: u64,
        until_unix_s: u64,
        reply: Reply,
    },
}

/// Counters, readable from any thread (metrics, tests).
#[derive(Default, Debug)]
pub struct PushStats {
    pub events: AtomicU64,
    pub dropped_busy: AtomicU64,
    pub muted: AtomicU64,
    pub no_token: AtomicU64,
    pub attempts: AtomicU64,
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub tokens_removed: AtomicU64,
    pub storage_errors: AtomicU64,
}

impl PushStats {
    /// Prometheus text for `/metrics` (one process-wide push thread, so no `core` label).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let rows: [(&str, &str, &AtomicU64); 10] = [
            (
                "events",
                "messages for offline users seen by the push thread",
                &self.events,
            ),
            (
                "dropped_busy",
                "push events dropped because the push channel was full",
                &self.dropped_busy,
            ),
            (
                "muted",
                "push events skipped because the chat was muted",
                &self.muted,
            ),
            (
                "no_token",
                "push events for users with no push token",
                &self.no_token,
            ),
            ("attempts", "requests made to push services", &self.attempts),
            (
                "delivered",
                "notifications accepted by a push service",
                &self.delivered,
            ),
            ("retried", "attempts that will be retried", &self.retried),
            (
                "dead_lettered",
                "jobs written to the dead-letter log",
                &self.dead_lettered,
            ),
            (
                "tokens_removed",
                "tokens removed after an invalid-token answer",
                &self.tokens_removed,
            ),
            (
                "storage_errors",
                "failed writes of the push registry or dead-letter log",
                &self.storage_errors,
            ),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP switchboard_push_{name}_total {help}\n# TYPE switchboard_push_{name}_total counter\nswitchboard_push_{name}_total {}",
                v.load(Relaxed)
            );
        }
    }
}

#[derive(Clone)]
pub struct PushHandle {
    tx: mpsc::Sender<Command>,
    pub stats: Arc<PushStats>,
}

impl PushHandle {
    fn try_send(&self, c: Command) -> bool {
        let ok = self.tx.try_send(c).is_ok();
        if !ok {
            self.stats.dropped_busy.fetch_add(1, Relaxed);
        }
        ok
    }

    /// A message became durable for `ev.user`, who has no online device. Never waits.
    pub fn notify(&self, ev: MessageEvent) -> bool {
        self.try_send(Command::Message(ev))
    }

    /// The user's unread count in `chat` is now `unread` (0: read up to the end). Never waits.
    pub fn read(&self, user: u64, chat: u64, unread: u32) -> bool {
        self.try_send(Command::Read { user, chat, unread })
    }

    /// A device of the user connected: waiting pushes are dropped. Never waits.
    pub fn online(&self, user: u64) -> bool {
        self.try_send(Command::Online { user })
    }

    async fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<(), PushError> {
        let (reply, rx) = oneshot::channel();
        if !self.try_send(make(reply)) {
            return Err(PushError::Busy);
        }
        rx.await.unwrap_or(Err(PushError::Busy))
    }

    /// Registers the device's push token; resolves once it is durable.
    pub async fn set_token(
        &self,
        user: u64,
        device: u32,
        platform: Platform,
        token: String,
    ) -> Result<(), PushError> {
        self.call(|reply| Command::SetToken {
            user,
            device,
            platform,
            token,
            reply,
        })
        .await
    }

    /// Forgets the device's push token (logout, device removal, `DELETE /v1/push/tokens`).
    pub async fn remove_token(&self, user: u64, device: u32) -> Result<(), PushError> {
        self.call(|reply| Command::RemoveToken {
            user,
            device,
            reply,
        })
        .await
    }

    /// Mutes `chat` for `user` until `until_unix_s` (0 unmutes).
    pub async fn mute(&self, user: u64, chat: u64, until_unix_s: u64) -> Result<(), PushError> {
        self.call(|reply| Command::Mute {
            user,
            chat,
            until_unix_s,
            reply,
        })
        .await
    }
}

pub struct PushService;

impl PushService {
    /// Opens the durable state under `<data_dir>/push/` and starts the push thread.
    pub fn start(
        cfg: PushConfig,
        data_dir: &Path,
    ) -> Result<(PushHandle, std::thread::JoinHandle<()>), String> {
        cfg.validate()?;
        let dir = push_dir(data_dir);
        let registry = Registry::open(&dir, unix_ms() / 1000).map_err(|e| e.to_string())?;
        let (dlq, _) = DeadLetterLog::open(&dir).map_err(|e| e.to_string())?;
        let sinks = Arc::new(Sinks::new(&cfg)?);
        let (tx, rx) = mpsc::channel(cfg.commands_max);
        let stats = Arc::new(PushStats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("switchboard-push".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for push");
                rt.block_on(run(cfg, registry, dlq, sinks, rx, st));
            })
            .map_err(|e| format!("push thread: {e}"))?;
        Ok((PushHandle { tx, stats }, thread))
    }
}

async fn run(
    cfg: PushConfig,
    mut registry: Registry,
    mut dlq: DeadLetterLog,
    sinks: Arc<Sinks>,
    mut rx: mpsc::Receiver<Command>,
    stats: Arc<PushStats>,
) {
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;
    let mut queue = PushQueue::new(cfg.queue_limits(), unix_ms());
    // Every delivery sends exactly one outcome and at most `in_flight_max` are out.
    let (done_tx, mut done_rx) = mpsc::channel::<(Delivery, Outcome)>(cfg.in_flight_max);
    loop {
        while let Some(d) = queue.poll(now_ms()) {
            stats.attempts.fetch_add(1, Relaxed);
            let (sinks, done) = (sinks.clone(), done_tx.clone());
            tokio::spawn(async move {
                let outcome = sinks
                    .send(unix_ms() / 1000, &d.target, &d.notification)
                    .await;
                let _ = done.send((d, outcome)).await;
            });
        }
        let due = queue.next_due_ms();
        let sleep = tokio::time::sleep(Duration::from_millis(
            due.map_or(3_600_000, |d| d.saturating_sub(now_ms())),
        ));
        tokio::select! {
            cmd = rx.recv() => match cmd {
                None => break,
                Some(c) => command(c, &mut registry, &mut queue, &stats, now_ms()),
            },
            Some((d, outcome)) = done_rx.recv() => {
                match &outcome {
                    Outcome::Delivered => stats.delivered.fetch_add(1, Relaxed),
                    Outcome::Retry { .. } => stats.retried.fetch_add(1, Relaxed),
                    _ => 0,
                };
                match queue.on_outcome(now_ms(), unix_ms(), &d, outcome) {
                    None => {}
                    Some(Action::RemoveToken(t)) => {
                        stats.tokens_removed.fetch_add(1, Relaxed);
                        if registry.remove_token(t.user, t.device, Some(&t.token)).is_err() {
                            stats.storage_errors.fetch_add(1, Relaxed);
                        }
                    }
                    Some(Action::DeadLetter(dl)) => {
                        stats.dead_lettered.fetch_add(1, Relaxed);
                        if dlq.append(&dl).is_err() {
                            stats.storage_errors.fetch_add(1, Relaxed);
                        }
                    }
                }
            },
            _ = sleep => {}
        }
    }
}

fn command(
    c: Command,
    registry: &mut Registry,
    queue: &mut PushQueue,
    stats: &PushStats,
    now_ms: u64,
) {
    let now_s = unix_ms() / 1000;
    match c {
        Command::Message(ev) => {
            stats.events.fetch_add(1, Relaxed);
            if registry.is_muted(ev.user, ev.chat, now_s) {
                stats.muted.fetch_add(1, Relaxed);
                return;
            }
            let targets = registry.targets(ev.user);
            if targets.is_empty() {
                stats.no_token.fetch_add(1, Relaxed);
                return;
            }
            queue.on_message(now_ms, &ev, &targets);
        }
        Command::Read { user, chat, unread } => queue.on_read(user, chat, unread),
        Command::Online { user } => queue.cancel_user(user),
        Command::SetToken {
            user,
            device,
            platform,
            token,
            reply,
        } => {
            let _ = reply.send(
                registry
                    .set_token(user, device, platform, &token)
                    .map_err(Into::into),
            );
        }
        Command::RemoveToken {
            user,
            device,
            reply,
        } => {
            let _ = reply.send(
                registry
                    .remove_token(user, device, None)
                    .map(|_| ())
                    .map_err(Into::into),
            );
        }
        Command::Mute {
            user,
            chat,
            until_unix_s,
            reply,
        } => {
            let _ = reply.send(registry.mute(user, chat, until_unix_s).map_err(Into::into));
        }
    }
    if registry.maybe_compact(now_s).is_err() {
        stats.storage_errors.fetch_add(1, Relaxed);
    }
}

/// What `switchboard push dlq replay` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub delivered: usize,
    pub tokens_removed: usize,
    pub failed: usize,
}

/// Sends every dead letter once more through the configured sinks (needs the server stopped:
/// it takes the dead-letter and registry locks). Delivered ones and dead tokens leave the log;
/// the others stay, with the new error and one more attempt.
pub fn replay(cfg: &PushConfig, data_dir: &Path) -> Result<ReplayReport, String> {
    let dir = push_dir(data_dir);
    let (mut dlq, entries) = DeadLetterLog::open(&dir).map_err(|e| e.to_string())?;
    let mut registry = Registry::open(&dir, unix_ms() / 1000).map_err(|e| e.to_string())?;
    let sinks = Sinks::new(cfg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut report = ReplayReport::default();
    let mut keep: Vec<DeadLetter> = Vec::new();
    for mut dl in entries {
        let outcome = rt.block_on(sinks.send(unix_ms() / 1000, &dl.target, &dl.notification));
        match outcome {
            Outcome::Delivered => report.delivered += 1,
            Outcome::InvalidToken => {
                report.tokens_removed += 1;
                registry
                    .remove_token(dl.target.user, dl.target.device, Some(&dl.target.token))
                    .map_err(|e| e.to_string())?;
            }
            Outcome::Retry { error, .. } | Outcome::Permanent { error } => {
                report.failed += 1;
                dl.attempts += 1;
                dl.error = error;
                dl.at_unix_ms = unix_ms();
                keep.push(dl);
            }
        }
    }
    dlq.replace(&keep).map_err(|e| e.to_string())?;
    Ok(report)
}
