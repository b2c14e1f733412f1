//! Presence, sans-IO: who subscribed to whom, what each viewer may see, and coalescing.
//!
//! A user's presence lives on their *home core* (the core owning shard
//! `splitmix64(user ^ salt) % shards`): the durable last-seen time and privacy settings in that
//! shard's log, the subscriptions in memory here. Online status needs no state of its own: every
//! core's directory replica knows whether a user has a device connected.
//!
//! ```text
//!  Subscribe ─► owner of the 1:1 chat (viewer, target): contact? blocked? ─► home of target:
//!  store the subscription, send the current Presence ─► later changes, at most one per
//!  `PRESENCE_COALESCE_MS` per user
//! ```

use crate::msg::ConnRef;
use std::collections::{HashMap, HashSet};
use switchboard_wire::{Presence, UserId};

/// Presence changes of one user are sent at most this often; later changes within the interval
/// are folded into one update at its end.
pub const PRESENCE_COALESCE_MS: u64 = 1000;

/// Visibility levels as stored (`Record::UserMeta`): who may see a field.
pub const VISIBLE_EVERYONE: u8 = 0;
pub const VISIBLE_CONTACTS: u8 = 1;
pub const VISIBLE_NOBODY: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subscription {
    pub conn: ConnRef,
    pub viewer: UserId,
    /// A 1:1 chat exists between viewer and target.
    pub contact: bool,
    /// Either of them blocked the other.
    pub blocked: bool,
}

/// What a user's presence looks like to one viewer.
pub fn view(
    user: UserId,
    online: bool,
    last_seen_ms: u64,
    last_seen_vis: u8,
    online_vis: u8,
    sub: &Subscription,
) -> Presence {
    let allowed = |vis: u8| {
        !sub.blocked && (vis == VISIBLE_EVERYONE || (vis == VISIBLE_CONTACTS && sub.contact))
    };
    let (show_online, show_seen) = (allowed(online_vis), allowed(last_seen_vis));
    Presence {
        user,
        online: show_online && online,
        last_seen_ms: if show_seen && !online {
            last_seen_ms
        } else {
            0
        },
        hidden: !show_online && !show_seen,
    }
}

/// The subscriptions homed on one core, and the coalescing state.
#[derive(Default)]
pub struct PresenceHub {
    subs: HashMap<UserId, Vec<Subscription>>,
    by_conn: HashMap<ConnRef, HashSet<UserId>>,
    last_sent_ms: HashMap<UserId, u64>,
    dirty: HashSet<UserId>,
}

impl PresenceHub {
    pub fn subscribe(&mut self, target: UserId, sub: Subscription) {
        let list = self.subs.entry(target).or_default();
        list.retain(|s| s.conn != sub.conn);
        list.push(sub);
        self.by_conn.entry(sub.conn).or_default().insert(target);
    }

    pub fn unsubscribe(&mut self, target: UserId, conn: ConnRef) {
        if let Some(list) = self.subs.get_mut(&target) {
            list.retain(|s| s.conn != conn);
            if list.is_empty() {
                self.forget(target);
            }
        }
        if let Some(set) = self.by_conn.get_mut(&conn) {
            set.remove(&target);
            if set.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
    }

    /// A connection closed: drop everything it subscribed to.
    pub fn drop_conn(&mut self, conn: ConnRef) {
        for target in self.by_conn.remove(&conn).unwrap_or_default() {
            if let Some(list) = self.subs.get_mut(&target) {
                list.retain(|s| s.conn != conn);
                if list.is_empty() {
                    self.forget(target);
                }
            }
        }
    }

    /// `target` has no subscribers left: drop its coalescing state too, so that the hub holds
    /// entries only for users somebody watches (a pending update would go to nobody).
    fn forget(&mut self, target: UserId) {
        self.subs.remove(&target);
        self.last_sent_ms.remove(&target);
        self.dirty.remove(&target);
    }

    pub fn subscribers(&self, target: UserId) -> &[Subscription] {
        self.subs.get(&target).map(Vec::as_slice).unwrap_or(&[])
    }

    /// `target` changed. True: notify now. False: it was notified less than the coalescing
    /// interval ago (or nobody listens); `due` returns it later.
    pub fn changed(&mut self, target: UserId, now_ms: u64) -> bool {
        if !self.subs.contains_key(&target) {
            return false;
        }
        match self.last_sent_ms.get(&target) {
            Some(at) if now_ms < at + PRESENCE_COALESCE_MS => {
                self.dirty.insert(target);
                false
            }
            _ => {
                self.last_sent_ms.insert(target, now_ms);
                true
            }
        }
    }

    /// Users whose coalesced update is due now.
    pub fn due(&mut self, now_ms: u64) -> Vec<UserId> {
        let ready: Vec<UserId> = self
            .dirty
            .iter()
            .copied()
            .filter(|u| {
                self.last_sent_ms
                    .get(u)
                    .is_none_or(|at| now_ms >= at + PRESENCE_COALESCE_MS)
            })
            .collect();
        for u in &ready {
            self.dirty.remove(u);
            self.last_sent_ms.insert(*u, now_ms);
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(conn: u64, contact: bool, blocked: bool) -> Subscription {
        Subscription {
            conn: ConnRef { core: 0, conn },
            viewer: UserId(conn),
            contact,
            blocked,
        }
    }

    #[test]
    fn privacy_and_blocks_decide_what_a_viewer_sees() {
        let u = UserId(1);
        let check = |online, seen_vis, online_vis, s: Subscription| {
            let p = view(u, online, 500, seen_vis, online_vis, &s);
            (p.online, p.last_seen_ms, p.hidden)
        };
        assert_eq!(
            check(
                true,
                VISIBLE_EVERYONE,
                VISIBLE_EVERYONE,
                sub(1, false, false)
            ),
            (true, 0, false)
        );
        assert_eq!(
            check(
                false,
                VISIBLE_EVERYONE,
                VISIBLE_EVERYONE,
                sub(1, false, false)
            ),
            (false, 500, false)
        );
        assert_eq!(
            check(
                false,
                VISIBLE_CONTACTS,
                VISIBLE_EVERYONE,
                sub(1, false, false)
            ),
            (false, 0, false)
        );
        assert_eq!(
            check(
                false,
                VISIBLE_CONTACTS,
                VISIBLE_CONTACTS,
                sub(1, true, false)
            ),
            (false, 500, false)
        );
        assert_eq!(
            check(true, VISIBLE_NOBODY, VISIBLE_NOBODY, sub(1, true, false)),
            (false, 0, true)
        );
        assert_eq!(
            check(true, VISIBLE_EVERYONE, VISIBLE_EVERYONE, sub(1, true, true)),
            (false, 0, true)
        );
    }

    #[test]
    fn changes_are_coalesced_per_user() {
        let mut h = PresenceHub::default();
        let t = UserId(9);
        assert!(!h.changed(t, 0), "nobody subscribed");
        h.subscribe(t, sub(1, true, false));
        assert!(h.changed(t, 1000));
        assert!(!h.changed(t, 1200));
        assert!(!h.changed(t, 1500));
        assert!(h.due(1800).is_empty());
        assert_eq!(h.due(2000), vec![t]);
        assert!(h.due(2500).is_empty());
        h.drop_conn(ConnRef { core: 0, conn: 1 });
        assert!(h.subscribers(t).is_empty());
    }

    /// Watchers come and go for good (connections close): the hub must not keep a coalescing
    /// entry per user ever watched. It did: `drop_conn` removed the subscription list but left
    /// `last_sent_ms` (and a pending `dirty` mark, sent later to nobody) behind.
    #[test]
    fn a_closed_watcher_leaves_no_state_behind() {
        let mut h = PresenceHub::default();
        for i in 0..10_000u64 {
            let (target, conn) = (UserId(1_000_000 + i), ConnRef { core: 0, conn: i });
            h.subscribe(target, sub(i, true, false));
            assert!(h.changed(target, 1000));
            assert!(!h.changed(target, 1100), "coalesced: now dirty");
            if i % 2 == 0 {
                h.drop_conn(conn);
            } else {
                h.unsubscribe(target, conn);
            }
        }
        assert!(h.subs.is_empty() && h.by_conn.is_empty());
        assert!(
            h.last_sent_ms.is_empty(),
            "{} stale entries",
            h.last_sent_ms.len()
        );
        assert!(h.dirty.is_empty(), "{} stale dirty marks", h.dirty.len());
        assert!(
            h.due(5000).is_empty(),
            "an update due for a user nobody watches"
        );

        // A user with two watchers keeps its state until the last one goes.
        let t = UserId(7);
        h.subscribe(t, sub(1, true, false));
        h.subscribe(t, sub(2, true, false));
        assert!(h.changed(t, 10_000));
        assert!(!h.changed(t, 10_100));
        h.drop_conn(ConnRef { core: 0, conn: 1 });
        assert_eq!(
            h.due(11_000),
            vec![t],
            "the other watcher still gets the update"
        );
        h.drop_conn(ConnRef { core: 0, conn: 2 });
        assert!(h.last_sent_ms.is_empty() && h.dirty.is_empty() && h.subs.is_empty());
    }
}
