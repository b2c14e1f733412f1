//! The push job queue, sans-IO: time comes in as `now_ms`, deliveries go out through `poll`,
//! and sink answers come back through `on_outcome`.
//!
//! ```text
//!  on_message(user, chat, targets) ─► job per (user, chat, device) ── collapse ──┐
//!                                        (a waiting job just counts one more)    │
//!  poll(now) ─► Delivery{id, target, notification(count, badge)} ◄── due ◄───────┘
//!  on_outcome(id, Delivered)    ─► done (or the messages that came meanwhile go next)
//!  on_outcome(id, Retry)        ─► due = now + backoff(attempts) with jitter, or, after
//!                                  `attempts_max`, Action::DeadLetter
//!  on_outcome(id, InvalidToken) ─► Action::RemoveToken
//!  on_outcome(id, Permanent)    ─► Action::DeadLetter
//! ```
//!
//! Call order: any number of `on_message`/`on_read`/`cancel_user`, then `poll` until `None`,
//! then sleep until `next_due_ms` or the next input; `on_outcome` once per delivery handed out.

use crate::model::{Notification, Outcome, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Queued jobs (one per user, chat and device). Memory ~300 B each. Over it, new jobs are
/// dropped (counted): pushes are best-effort, the messages themselves are durable.
pub const PUSH_JOBS_MAX: usize = 100_000;
/// Deliveries handed to sinks and not yet answered.
pub const PUSH_IN_FLIGHT_MAX: usize = 256;
/// Attempts per job before it goes to the dead-letter log.
pub const PUSH_ATTEMPTS_MAX: u32 = 6;
/// First retry delay; doubles per attempt up to `PUSH_BACKOFF_MAX_MS`.
pub const PUSH_BACKOFF_BASE_MS: u64 = 1_000;
pub const PUSH_BACKOFF_MAX_MS: u64 = 5 * 60 * 1_000;
/// A new job waits this long before its first attempt, so a burst becomes one notification.
pub const PUSH_COLLAPSE_DELAY_MS: u64 = 250;
/// Users and chats per user whose unread counts are tracked for badges.
pub const UNREAD_USERS_MAX: usize = 1_000_000;
pub const UNREAD_CHATS_PER_USER_MAX: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLimits {
    pub jobs_max: usize,
    pub in_flight_max: usize,
    pub attempts_max: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub collapse_delay_ms: u64,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            jobs_max: PUSH_JOBS_MAX,
            in_flight_max: PUSH_IN_FLIGHT_MAX,
            attempts_max: PUSH_ATTEMPTS_MAX,
            backoff_base_ms: PUSH_BACKOFF_BASE_MS,
            backoff_max_ms: PUSH_BACKOFF_MAX_MS,
            collapse_delay_ms: PUSH_COLLAPSE_DELAY_MS,
        }
    }
}

/// A message became durable for `user`, who has no online device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageEvent {
    pub user: u64,
    pub chat: u64,
    pub sender: u64,
    pub sender_name: Option<String>,
    pub seq: u64,
    /// Unread messages of `user` in `chat` (after this one), as the chat owner knows them.
    pub unread_in_chat: u32,
}

/// A job that could not be delivered, as stored in the dead-letter log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub at_unix_ms: u64,
    pub target: Target,
    pub notification: Notification,
    pub attempts: u32,
    pub error: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub id: u64,
    pub target: Target,
    pub notification: Notification,
    /// 1 for the first attempt.
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    RemoveToken(Target),
    DeadLetter(DeadLetter),
}

type Key = (u64, u64, u32); // user, chat, device

#[derive(Clone, Debug)]
struct Collapsed {
    events: u32,
    sender: Option<u64>,
    sender_name: Option<String>,
    last_seq: u64,
}

impl Collapsed {
    fn new(ev: &MessageEvent) -> Self {
        Collapsed {
            events: 1,
            sender: Some(ev.sender),
            sender_name: ev.sender_name.clone(),
            last_seq: ev.seq,
        }
    }

    fn add(&mut self, ev: &MessageEvent) {
        self.events = self.events.saturating_add(1);
        if self.sender != Some(ev.sender) {
            self.sender = None;
            self.sender_name = None;
        } else if ev.sender_name.is_some() {
            self.sender_name = ev.sender_name.clone();
        }
        self.last_seq = self.last_seq.max(ev.seq);
    }

    fn merge(&mut self, other: Collapsed) {
        self.events = self.events.saturating_add(other.events);
        if self.sender != other.sender {
            self.sender = None;
            self.sender_name = None;
        }
        self.last_seq = self.last_seq.max(other.last_seq);
    }
}

struct Job {
    target: Target,
    what: Collapsed,
    /// Messages that arrived while an attempt was in flight.
    more: Option<Collapsed>,
    attempts: u32,
    due_ms: u64,
    /// `Some(id)` while a delivery is out.
    flight: Option<u64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: u64,
    pub collapsed: u64,
    pub dropped_full: u64,
    pub delivered: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub tokens_removed: u64,
}

pub struct PushQueue {
    limits: QueueLimits,
    jobs: BTreeMap<Key, Job>,
    /// (due, key) of every job that is not in flight.
    timers: BTreeSet<(u64, Key)>,
    in_flight: HashMap<u64, Key>,
    next_id: u64,
    unread: HashMap<u64, HashMap<u64, u32>>,
    rng: StdRng,
    pub stats: QueueStats,
}

impl PushQueue {
    pub fn new(limits: QueueLimits, seed: u64) -> Self {
        assert!(limits.attempts_max >= 1 && limits.in_flight_max >= 1);
        assert!(limits.backoff_base_ms >= 1 && limits.backoff_base_ms <= limits.backoff_max_ms);
        PushQueue {
            limits,
            jobs: BTreeMap::new(),
            timers: BTreeSet::new(),
            in_flight: HashMap::new(),
            next_id: 1,
            unread: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
            stats: QueueStats::default(),
        }
    }

    /// Queues (or collapses into an existing job) one notification per target. The caller has
    /// already skipped muted chats. Returns how many targets were dropped for lack of room.
    pub fn on_message(&mut self, now_ms: u64, ev: &MessageEvent, targets: &[Target]) -> usize {
        self.set_unread(ev.user, ev.chat, ev.unread_in_chat);
        let mut dropped = 0;
        for t in targets {
            debug_assert_eq!(t.user, ev.user);
            let key = (ev.user, ev.chat, t.device);
            match self.jobs.get_mut(&key) {
                Some(job) if job.target == *t => {
                    self.stats.collapsed += 1;
                    if job.flight.is_some() {
                        match &mut job.more {
                            Some(m) => m.add(ev),
                            None => job.more = Some(Collapsed::new(ev)),
                        }
                    } else {
                        job.what.add(ev);
                    }
                }
                Some(job) => {
                    // The device registered a new token: the new one takes the job over.
                    job.target = t.clone();
                    job.what.add(ev);
                }
                None => {
                    if self.jobs.len() >= self.limits.jobs_max {
                        self.stats.dropped_full += 1;
                        dropped += 1;
                        continue;
                    }
                    let due = now_ms + self.limits.collapse_delay_ms;
                    self.jobs.insert(
                        key,
                        Job {
                            target: t.clone(),
                            what: Collapsed::new(ev),
                            more: None,
                            attempts: 0,
                            due_ms: due,
                            flight: None,
                        },
                    );
                    self.timers.insert((due, key));
                    self.stats.queued += 1;
                }
            }
        }
        dropped
    }

    /// The user's unread count in `chat` changed (a read, or a new message). 0 forgets the chat
    /// and drops its waiting jobs (the user has seen it).
    pub fn on_read(&mut self, user: u64, chat: u64, unread: u32) {
        self.set_unread(user, chat, unread);
        if unread == 0 {
            let keys: Vec<Key> = self
                .jobs
                .range((user, chat, 0)..=(user, chat, u32::MAX))
                .filter(|(_, j)| j.flight.is_none())
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                self.remove_waiting(k);
            }
        }
    }

    /// The user came online: waiting jobs are pointless now (the devices sync).
    pub fn cancel_user(&mut self, user: u64) {
        let keys: Vec<Key> = self
            .jobs
            .range((user, 0, 0)..=(user, u64::MAX, u32::MAX))
            .filter(|(_, j)| j.flight.is_none())
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            self.remove_waiting(k);
        }
    }

    fn remove_waiting(&mut self, key: Key) {
        if let Some(job) = self.jobs.remove(&key) {
            self.timers.remove(&(job.due_ms, key));
        }
    }

    fn set_unread(&mut self, user: u64, chat: u64, unread: u32) {
        if unread == 0 {
            if let Some(m) = self.unread.get_mut(&user) {
                m.remove(&chat);
                if m.is_empty() {
                    self.unread.remove(&user);
                }
            }
            return;
        }
        if !self.unread.contains_key(&user) && self.unread.len() >= UNREAD_USERS_MAX {
            return;
        }
        let m = self.unread.entry(user).or_default();
        if m.len() < UNREAD_CHATS_PER_USER_MAX || m.contains_key(&chat) {
            m.insert(chat, unread);
        }
    }

    /// Unread messages of `user` over the chats tracked.
    pub fn badge(&self, user: u64) -> u32 {
        self.unread
            .get(&user)
            .map(|m| m.values().fold(0u32, |a, b| a.saturating_add(*b)))
            .unwrap_or(0)
    }

    /// The next delivery that is due, if a flight slot is free.
    pub fn poll(&mut self, now_ms: u64) -> Option<Delivery> {
        if self.in_flight.len() >= self.limits.in_flight_max {
            return None;
        }
        let (due, key) = *self.timers.first()?;
        if due > now_ms {
            return None;
        }
        self.timers.remove(&(due, key));
        let id = self.next_id;
        self.next_id += 1;
        let badge = self.badge(key.0);
        let chat_unread = self
            .unread
            .get(&key.0)
            .and_then(|m| m.get(&key.1))
            .copied()
            .unwrap_or(0);
        let job = self.jobs.get_mut(&key).expect("timer without job");
        job.flight = Some(id);
        job.attempts += 1;
        self.in_flight.insert(id, key);
        let w = &job.what;
        let count = w.events.max(chat_unread);
        let (title, body) = Notification::texts(key.1, count, w.sender, w.sender_name.as_deref());
        Some(Delivery {
            id,
            target: job.target.clone(),
            attempt: job.attempts,
            notification: Notification {
                chat: key.1,
                count,
                sender: w.sender,
                sender_name: w.sender_name.clone(),
                last_seq: w.last_seq,
                badge: badge.max(count),
                title,
                body,
                collapse_id: format!("chat-{}", key.1),
            },
        })
    }

    /// When the next job falls due (`None`: nothing waiting).
    pub fn next_due_ms(&self) -> Option<u64> {
        if self.in_flight.len() >= self.limits.in_flight_max {
            return None; // woken by an outcome instead
        }
        self.timers.first().map(|(d, _)| *d)
    }

    pub fn jobs_len(&self) -> usize {
        self.jobs.len()
    }

    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// Backoff before attempt `attempts + 1`: base·2^(attempts−1), capped, with "equal jitter"
    /// (half fixed, half random) so retries of many jobs failing together spread out.
    pub fn backoff_ms(&mut self, attempts: u32) -> u64 {
        let exp = attempts.saturating_sub(1).min(32);
        let full = self
            .limits
            .backoff_base_ms
            .saturating_mul(1u64 << exp)
            .min(self.limits.backoff_max_ms);
        full / 2 + self.rng.gen_range(0..=full - full / 2)
    }

    /// The sink's answer to delivery `id`, sent at `delivery`.
    pub fn on_outcome(
        &mut self,
        now_ms: u64,
        now_unix_ms: u64,
        delivery: &Delivery,
        outcome: Outcome,
    ) -> Option<Action> {
        let key = self.in_flight.remove(&delivery.id)?;
        let job = self.jobs.get_mut(&key).expect("in flight without job");
        debug_assert_eq!(job.flight, Some(delivery.id));
        job.flight = None;
        let dead = |job: &Job, error: String| DeadLetter {
            at_unix_ms: now_unix_ms,
            target: delivery.target.clone(),
            notification: delivery.notification.clone(),
            attempts: job.attempts,
            error,
        };
        let action = match outcome {
            Outcome::Delivered => {
                self.stats.delivered += 1;
                match job.more.take() {
                    Some(more) => {
                        job.what = more;
                        job.attempts = 0;
                        job.due_ms = now_ms + self.limits.collapse_delay_ms;
                        self.timers.insert((job.due_ms, key));
                    }
                    None => {
                        self.jobs.remove(&key);
                    }
                }
                return None;
            }
            Outcome::InvalidToken => {
                self.stats.tokens_removed += 1;
                let job = self.jobs.remove(&key).expect("job");
                // Messages that came meanwhile go nowhere: the token is dead.
                drop(job);
                Some(Action::RemoveToken(delivery.target.clone()))
            }
            Outcome::Permanent { error } => {
                self.stats.dead_lettered += 1;
                let a = Some(Action::DeadLetter(dead(job, error)));
                self.requeue_more_or_remove(now_ms, key);
                a
            }
            Outcome::Retry {
                error,
                retry_after_ms,
            } => {
                let attempts = job.attempts;
                if attempts >= self.limits.attempts_max {
                    self.stats.dead_lettered += 1;
                    let a = Some(Action::DeadLetter(dead(job, error)));
                    self.requeue_more_or_remove(now_ms, key);
                    a
                } else {
                    self.stats.retried += 1;
                    let wait = self
                        .backoff_ms(attempts)
                        .max(retry_after_ms.unwrap_or(0).min(self.limits.backoff_max_ms));
                    let job = self.jobs.get_mut(&key).expect("job");
                    if let Some(more) = job.more.take() {
                        job.what.merge(more);
                    }
                    job.due_ms = now_ms + wait;
                    self.timers.insert((job.due_ms, key));
                    None
                }
            }
        };
        action
    }

    fn requeue_more_or_remove(&mut self, now_ms: u64, key: Key) {
        let job = self.jobs.get_mut(&key).expect("job");
        match job.more.take() {
            Some(more) => {
                job.what = more;
                job.attempts = 0;
                job.due_ms = now_ms + self.limits.collapse_delay_ms;
                self.timers.insert((job.due_ms, key));
            }
            None => {
                self.jobs.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Platform;

    fn target(user: u64, device: u32) -> Target {
        Target {
            user,
            device,
            platform: Platform::Webhook,
            token: format!("tok-{user}-{device}"),
        }
    }

    fn ev(user: u64, chat: u64, sender: u64, seq: u64, unread: u32) -> MessageEvent {
        MessageEvent {
            user,
            chat,
            sender,
            sender_name: (sender == 7).then(|| "Alice".to_owned()),
            seq,
            unread_in_chat: unread,
        }
    }

    fn retry() -> Outcome {
        Outcome::Retry {
            error: "503".into(),
            retry_after_ms: None,
        }
    }

    #[test]
    fn a_burst_collapses_into_one_notification_with_badge() {
        let mut q = PushQueue::new(QueueLimits::default(), 1);
        let t = [target(1, 1)];
        for seq in 1..=3 {
            q.on_message(0, &ev(1, 10, 7, seq, seq as u32), &t);
        }
        q.on_message(0, &ev(1, 11, 8, 1, 2), &t);
        assert_eq!(q.jobs_len(), 2);
        assert_eq!(q.poll(PUSH_COLLAPSE_DELAY_MS - 1), None);
        let d = q.poll(PUSH_COLLAPSE_DELAY_MS).unwrap();
        assert_eq!(d.notification.chat, 10);
        assert_eq!(d.notification.count, 3);
        assert_eq!(d.notification.badge, 5);
        assert_eq!(d.notification.body, "3 new messages from Alice");
        assert_eq!(d.notification.title, "Alice");
        assert_eq!(d.notification.collapse_id, "chat-10");
        assert_eq!(d.notification.last_seq, 3);
        let d2 = q.poll(PUSH_COLLAPSE_DELAY_MS).unwrap();
        assert_eq!(
            d2.notification.body,
            "2 new messages from user 8 in chat 11"
        );
        assert_eq!(q.poll(PUSH_COLLAPSE_DELAY_MS), None);
        assert_eq!(q.on_outcome(300, 0, &d, Outcome::Delivered), None);
        assert_eq!(q.on_outcome(300, 0, &d2, Outcome::Delivered), None);
        assert_eq!(q.jobs_len(), 0);
        assert_eq!(q.stats.collapsed, 2);
    }

    #[test]
    fn mixed_senders_and_messages_during_flight() {
        let mut q = PushQueue::new(QueueLimits::default(), 1);
        let t = [target(1, 1)];
        q.on_message(0, &ev(1, 10, 7, 1, 0), &t);
        q.on_message(0, &ev(1, 10, 8, 2, 0), &t);
        let d = q.poll(1_000).unwrap();
        assert_eq!(d.notification.sender, None);
        assert_eq!(d.notification.body, "2 new messages in chat 10");
        // One more while in flight: sent after, on its own.
        q.on_message(1_000, &ev(1, 10, 7, 3, 0), &t);
        assert_eq!(q.poll(5_000), None);
        q.on_outcome(1_010, 0, &d, Outcome::Delivered);
        let d = q.poll(1_010 + PUSH_COLLAPSE_DELAY_MS).unwrap();
        assert_eq!(d.notification.count, 1);
        assert_eq!(d.notification.body, "1 new message from Alice");
        assert_eq!(d.notification.last_seq, 3);
    }

    #[test]
    fn backoff_grows_with_jitter_then_dead_letter() {
        let limits = QueueLimits::default();
        let mut q = PushQueue::new(limits, 42);
        let t = [target(1, 1)];
        q.on_message(0, &ev(1, 10, 7, 1, 1), &t);
        let mut now = PUSH_COLLAPSE_DELAY_MS;
        let mut waits = Vec::new();
        for attempt in 1..=limits.attempts_max {
            let d = q.poll(now).unwrap();
            assert_eq!(d.attempt, attempt);
            let action = q.on_outcome(now, 99, &d, retry());
            if attempt == limits.attempts_max {
                match action {
                    Some(Action::DeadLetter(dl)) => {
                        assert_eq!(dl.attempts, attempt);
                        assert_eq!(dl.at_unix_ms, 99);
                        assert_eq!(dl.target, t[0]);
                        assert_eq!(dl.notification.count, 1);
                    }
                    other => panic!("{other:?}"),
                }
                break;
            }
            assert_eq!(action, None);
            let due = q.next_due_ms().unwrap();
            let wait = due - now;
            let full = (PUSH_BACKOFF_BASE_MS << (attempt - 1)).min(PUSH_BACKOFF_MAX_MS);
            assert!(
                wait >= full / 2 && wait <= full,
                "attempt {attempt}: {wait}"
            );
            assert_eq!(q.poll(due - 1), None);
            waits.push(wait);
            now = due;
        }
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        assert_eq!(q.jobs_len(), 0);
        assert_eq!(q.stats.dead_lettered, 1);
        // Jitter: another seed, other delays.
        let mut a = PushQueue::new(limits, 1);
        let mut b = PushQueue::new(limits, 2);
        let da: Vec<u64> = (0..8).map(|_| a.backoff_ms(5)).collect();
        let db: Vec<u64> = (0..8).map(|_| b.backoff_ms(5)).collect();
        assert_ne!(da, db);
        assert!(a.backoff_ms(40) <= PUSH_BACKOFF_MAX_MS);
    }

    #[test]
    fn retry_after_is_honoured_and_invalid_token_removes() {
        let mut q = PushQueue::new(QueueLimits::default(), 3);
        let t = [target(1, 1), target(1, 2)];
        q.on_message(0, &ev(1, 10, 7, 1, 1), &t);
        let d1 = q.poll(1_000).unwrap();
        let d2 = q.poll(1_000).unwrap();
        let r = Outcome::Retry {
            error: "429".into(),
            retry_after_ms: Some(30_000),
        };
        assert_eq!(q.on_outcome(1_000, 0, &d1, r), None);
        assert_eq!(q.next_due_ms(), Some(31_000));
        assert_eq!(
            q.on_outcome(1_000, 0, &d2, Outcome::InvalidToken),
            Some(Action::RemoveToken(t[1].clone()))
        );
        assert_eq!(q.jobs_len(), 1);
        // A permanent failure goes straight to the dead letters.
        let d1 = q.poll(31_000).unwrap();
        let a = q.on_outcome(
            31_000,
            0,
            &d1,
            Outcome::Permanent {
                error: "400".into(),
            },
        );
        assert!(matches!(a, Some(Action::DeadLetter(dl)) if dl.error == "400" && dl.attempts == 2));
        assert_eq!(q.jobs_len(), 0);
        // An answer for an unknown delivery is ignored.
        assert_eq!(q.on_outcome(0, 0, &d1, Outcome::Delivered), None);
    }

    #[test]
    fn bounded_jobs_and_flights_reads_and_online() {
        let limits = QueueLimits {
            jobs_max: 3,
            in_flight_max: 2,
            ..QueueLimits::default()
        };
        let mut q = PushQueue::new(limits, 1);
        for chat in 0..5 {
            q.on_message(0, &ev(1, chat, 7, 1, 1), &[target(1, 1)]);
        }
        assert_eq!(q.jobs_len(), 3);
        assert_eq!(q.stats.dropped_full, 2);
        let a = q.poll(1_000).unwrap();
        let _b = q.poll(1_000).unwrap();
        assert_eq!(q.poll(1_000), None, "in-flight limit");
        assert_eq!(q.next_due_ms(), None);
        q.on_outcome(1_000, 0, &a, Outcome::Delivered);
        assert!(q.next_due_ms().is_some());
        // A read of chat 2 drops its waiting job and its unread count.
        // (The badge counts the chats whose jobs were dropped too: they are unread.)
        assert_eq!(q.badge(1), 5);
        q.on_read(1, 2, 0);
        assert_eq!(q.badge(1), 4);
        assert_eq!(q.poll(1_000), None);
        assert_eq!(q.jobs_len(), 1);
        // Coming online drops waiting jobs but not the one in flight.
        q.on_message(2_000, &ev(1, 9, 7, 1, 1), &[target(1, 1)]);
        q.cancel_user(1);
        assert_eq!(q.jobs_len(), 1);
        assert_eq!(q.in_flight_len(), 1);
    }
}
