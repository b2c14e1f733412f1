//! The correctness checker of `run`: every message carries a unique id (its index in this
//! worker's message table) and its scheduled send time in the payload; the checker follows each
//! one from send to ack to every expected delivery to the delivered receipt. Pure state, no I/O:
//! times come in as arguments.
//!
//! ```text
//!  on_send ─► MsgRec{sched, expected deliveries} ─► on_ack(seq) ─► receipt queue (chat, reader)
//!  on_push(conn, chat, seq, id) ─► per (conn, chat): new | duplicate | order violation, holes
//!  on_receipt(chat, reader, up_to) ─► receipted
//!  finish ─► lost = acked deliveries never seen; gaps = holes left; unacked; missing receipts
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};

use switchboard_wire::{ChatId, UserId};

/// Seqs remembered per (connection, chat) as missing below the highest one seen. Live delivery
/// is in order, so holes are rare and short; past this the extra missing seqs are only counted
/// (as gaps that can never be filled).
pub const HOLES_PER_CHAT_MAX: usize = 4096;

const FLAG_MEASURED: u8 = 1;
const FLAG_RECEIPTED: u8 = 2;

/// Where one message is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsgState {
    /// Written to the socket, no answer yet.
    Pending,
    /// `SendAck` received.
    Acked,
    /// The server answered with an `Error` frame.
    Errored,
    /// Never reached the socket (connection down, client buffer full).
    Unsent,
}

/// One message: 32 bytes, kept until the end of the run.
#[derive(Clone, Copy, Debug)]
pub struct MsgRec {
    pub sched_ns: u64,
    pub seq: u64,
    pub sender_conn: u32,
    /// Deliveries expected: every device of every member except the sending device.
    pub expected: u16,
    /// Distinct devices that received it.
    pub delivered: u16,
    pub state: MsgState,
    flags: u8,
}

impl MsgRec {
    pub fn measured(&self) -> bool {
        self.flags & FLAG_MEASURED != 0
    }
}

/// What a connection has seen of one chat.
#[derive(Clone, Debug, Default)]
struct RecvChat {
    /// Highest seq held (pushed or own ack).
    high: u64,
    /// Highest seq pushed by the server.
    pushed_max: u64,
    /// Seqs below `high` not held yet.
    holes: BTreeSet<u64>,
    /// Missing seqs that did not fit in `holes`.
    holes_overflow: u64,
}

impl RecvChat {
    /// Marks `seq` held; `true` if it was not held before.
    fn hold(&mut self, seq: u64) -> bool {
        if seq > self.high {
            let missing = seq - self.high - 1;
            let room = (HOLES_PER_CHAT_MAX - self.holes.len()) as u64;
            let fit = missing.min(room);
            self.holes.extend(self.high + 1..self.high + 1 + fit);
            self.holes_overflow += missing - fit;
            self.high = seq;
            true
        } else {
            self.holes.remove(&seq)
        }
    }
}

/// Outcome of a pushed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// First time this connection holds it; `e2e_ns` = now − scheduled; `measured`: scheduled
    /// after the warm-up.
    New {
        e2e_ns: u64,
        measured: bool,
    },
    Duplicate,
    /// The payload did not name a message of this run.
    Foreign,
}

/// Latencies an ack produced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// now − scheduled, for a first ack.
    pub ack_ns: Option<u64>,
    /// The message was scheduled after the warm-up.
    pub measured: bool,
    /// The receipt was already in (it overtook the ack).
    pub receipt_ns: Option<u64>,
    pub duplicate: bool,
    pub unknown: bool,
}

#[derive(Clone, Debug, Default)]
struct ReceiptQueue {
    /// seq → message index, acked and not yet receipted.
    pending: BTreeMap<u64, u32>,
    /// Highest `to_seq` of any receipt so far.
    up_to: u64,
}

/// Event counts; all but the `*_total` ones must end at 0 for a clean run (see [`Verdict`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub unsent: u64,
    pub acked: u64,
    pub errored: u64,
    pub deliveries: u64,
    pub duplicates: u64,
    pub order_violations: u64,
    pub foreign: u64,
    pub duplicate_acks: u64,
    pub unknown_acks: u64,
    pub receipts: u64,
    pub receipted: u64,
}

/// The end-of-run judgement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub counts: Counts,
    /// Deliveries of acked messages that never arrived.
    pub lost: u64,
    /// Seqs missing below the highest one a connection saw in a chat.
    pub gaps: u64,
    /// Sent, never answered.
    pub unacked: u64,
    /// Delivered although the server never acked it (or answered with an error).
    pub delivered_unacked: u64,
    /// Acked messages whose delivered receipt never came (only when receipts are on).
    pub receipts_missing: u64,
}

impl Verdict {
    /// Anomalies that fail the run.
    pub fn anomalies(&self) -> u64 {
        let c = &self.counts;
        self.lost
            + self.gaps
            + self.unacked
            + self.delivered_unacked
            + self.receipts_missing
            + c.duplicates
            + c.order_violations
            + c.foreign
            + c.duplicate_acks
            + c.unknown_acks
    }
}

#[derive(Default)]
pub struct Checker {
    msgs: Vec<MsgRec>,
    recv: HashMap<(u32, ChatId), RecvChat>,
    receipts: HashMap<(ChatId, UserId), ReceiptQueue>,
    /// Highest message id per (sender connection, receiving connection), unsequenced targets.
    last_id: HashMap<(u32, u32), u64>,
    receipts_on: bool,
    counts: Counts,
    /// Sum of `expected` over messages that may still be delivered.
    deliveries_expected: u64,
}

impl Checker {
    pub fn new(receipts_on: bool) -> Checker {
        Checker {
            receipts_on,
            ..Checker::default()
        }
    }

    /// A checker whose record vector holds `sends` messages without growing.
    pub fn with_capacity(receipts_on: bool, sends: usize) -> Checker {
        Checker {
            msgs: Vec::with_capacity(sends),
            ..Checker::new(receipts_on)
        }
    }

    #[cfg(test)]
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Messages tracked (sent) so far.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Records a message about to be written; returns its id.
    pub fn on_send(
        &mut self,
        sched_ns: u64,
        sender_conn: u32,
        expected: u16,
        measured: bool,
    ) -> u64 {
        let id = self.msgs.len() as u64;
        self.msgs.push(MsgRec {
            sched_ns,
            seq: 0,
            sender_conn,
            expected,
            delivered: 0,
            state: MsgState::Pending,
            flags: if measured { FLAG_MEASURED } else { 0 },
        });
        self.counts.sent += 1;
        self.deliveries_expected += u64::from(expected);
        id
    }

    /// The message never reached the socket.
    pub fn on_unsent(&mut self, id: u64) {
        let r = &mut self.msgs[id as usize];
        debug_assert_eq!(r.state, MsgState::Pending);
        r.state = MsgState::Unsent;
        self.counts.sent -= 1;
        self.counts.unsent += 1;
        self.deliveries_expected -= u64::from(r.expected);
    }

    pub fn get(&self, id: u64) -> Option<&MsgRec> {
        self.msgs.get(id as usize)
    }

    /// A `SendAck` for message `id` placed it at (`chat`, `seq`); `reader` is the user whose
    /// delivered receipt the sender waits for (the peer of a 1:1 chat).
    pub fn on_ack(
        &mut self,
        id: u64,
        chat: ChatId,
        seq: u64,
        reader: UserId,
        now_ns: u64,
    ) -> AckOutcome {
        let mut out = AckOutcome::default();
        let Some(r) = self.msgs.get_mut(id as usize) else {
            self.counts.unknown_acks += 1;
            out.unknown = true;
            return out;
        };
        if r.state != MsgState::Pending {
            self.counts.duplicate_acks += 1;
            out.duplicate = true;
            return out;
        }
        r.state = MsgState::Acked;
        r.seq = seq;
        self.counts.acked += 1;
        let measured = r.measured();
        let lat = now_ns.saturating_sub(r.sched_ns);
        out.ack_ns = Some(lat);
        out.measured = measured;
        let sender_conn = r.sender_conn;
        // The sender holds its own message: that seq is no hole for it.
        self.recv.entry((sender_conn, chat)).or_default().hold(seq);
        if self.receipts_on {
            let q = self.receipts.entry((chat, reader)).or_default();
            if seq <= q.up_to {
                let r = &mut self.msgs[id as usize];
                r.flags |= FLAG_RECEIPTED;
                self.counts.receipted += 1;
                if measured {
                    out.receipt_ns = Some(lat);
                }
            } else {
                q.pending.insert(seq, id as u32);
            }
        }
        out
    }

    /// An `Error` frame answered message `id`.
    pub fn on_error(&mut self, id: u64) {
        if let Some(r) = self.msgs.get_mut(id as usize) {
            if r.state == MsgState::Pending {
                r.state = MsgState::Errored;
                self.counts.errored += 1;
                self.deliveries_expected -= u64::from(r.expected);
            }
        }
    }

    /// Connection `conn` received (`chat`, `seq`) whose payload names message `id`.
    pub fn on_push(
        &mut self,
        conn: u32,
        chat: ChatId,
        seq: u64,
        id: Option<u64>,
        now_ns: u64,
    ) -> Push {
        let Some(id) = id.filter(|&i| (i as usize) < self.msgs.len()) else {
            self.counts.foreign += 1;
            return Push::Foreign;
        };
        let rc = self.recv.entry((conn, chat)).or_default();
        let new = rc.hold(seq);
        if !new {
            self.counts.duplicates += 1;
            return Push::Duplicate;
        }
        if seq < rc.pushed_max {
            self.counts.order_violations += 1;
        }
        rc.pushed_max = rc.pushed_max.max(seq);
        let r = &mut self.msgs[id as usize];
        r.delivered = r.delivered.saturating_add(1);
        if r.delivered > r.expected {
            // Same message under another seq, or to a device that should not get it.
            self.counts.duplicates += 1;
            return Push::Duplicate;
        }
        self.counts.deliveries += 1;
        Push::New {
            e2e_ns: now_ns.saturating_sub(r.sched_ns),
            measured: r.measured(),
        }
    }

    /// A delivery without a per-chat seq (MQTT): duplicates are counted per message, order per
    /// (sender connection, receiving connection) by message id (ids grow in send order).
    pub fn on_push_unsequenced(&mut self, conn: u32, id: Option<u64>, now_ns: u64) -> Push {
        let Some(id) = id.filter(|&i| (i as usize) < self.msgs.len()) else {
            self.counts.foreign += 1;
            return Push::Foreign;
        };
        let r = &mut self.msgs[id as usize];
        if r.delivered >= r.expected {
            self.counts.duplicates += 1;
            return Push::Duplicate;
        }
        r.delivered += 1;
        let last = self.last_id.entry((r.sender_conn, conn)).or_insert(id);
        if id < *last {
            self.counts.order_violations += 1;
        }
        *last = (*last).max(id);
        self.counts.deliveries += 1;
        Push::New {
            e2e_ns: now_ns.saturating_sub(r.sched_ns),
            measured: r.measured(),
        }
    }

    /// Connection `conn` holds (`chat`, `seq`), a message the server made (a chat event such as
    /// `GroupCreated`): it fills holes but is never a duplicate or an order violation, because the
    /// load generator may learn of it twice (pushed, and from the `GroupInfo` answer).
    pub fn on_event(&mut self, conn: u32, chat: ChatId, seq: u64) {
        let rc = self.recv.entry((conn, chat)).or_default();
        rc.hold(seq);
        rc.pushed_max = rc.pushed_max.max(seq);
    }

    /// A delivered `Receipt`: `reader` has every message of `chat` up to `up_to`. Calls `lat` with
    /// now − scheduled for each measured message it receipts for the first time.
    pub fn on_receipt(
        &mut self,
        chat: ChatId,
        reader: UserId,
        up_to: u64,
        now_ns: u64,
        mut lat: impl FnMut(u64),
    ) {
        self.counts.receipts += 1;
        let q = self.receipts.entry((chat, reader)).or_default();
        q.up_to = q.up_to.max(up_to);
        while let Some(entry) = q.pending.first_entry() {
            if *entry.key() > up_to {
                break;
            }
            let id = entry.remove();
            let r = &mut self.msgs[id as usize];
            if r.flags & FLAG_RECEIPTED == 0 {
                r.flags |= FLAG_RECEIPTED;
                self.counts.receipted += 1;
                if r.measured() {
                    lat(now_ns.saturating_sub(r.sched_ns));
                }
            }
        }
    }

    /// What the drain period still waits for: (answers, deliveries, receipts).
    pub fn outstanding(&self) -> (u64, u64, u64) {
        let c = &self.counts;
        let answers = c.sent.saturating_sub(c.acked + c.errored);
        let deliveries = self.deliveries_expected.saturating_sub(c.deliveries);
        let receipts = if self.receipts_on {
            c.acked.saturating_sub(c.receipted)
        } else {
            0
        };
        (answers, deliveries, receipts)
    }

    pub fn finish(&self) -> Verdict {
        let mut v = Verdict {
            counts: self.counts.clone(),
            ..Verdict::default()
        };
        for r in &self.msgs {
            match r.state {
                MsgState::Acked => {
                    v.lost += u64::from(r.expected.saturating_sub(r.delivered));
                    if self.receipts_on && r.flags & FLAG_RECEIPTED == 0 && r.expected > 0 {
                        v.receipts_missing += 1;
                    }
                }
                MsgState::Pending => {
                    v.unacked += 1;
                    v.delivered_unacked += u64::from(r.delivered > 0);
                }
                MsgState::Errored | MsgState::Unsent => {
                    v.delivered_unacked += u64::from(r.delivered > 0);
                }
            }
        }
        v.gaps = self
            .recv
            .values()
            .map(|c| c.holes.len() as u64 + c.holes_overflow)
            .sum();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: ChatId = ChatId(9);
    const BOB: UserId = UserId(2);

    #[test]
    fn clean_flow() {
        let mut c = Checker::new(true);
        let a = c.on_send(100, 0, 1, true);
        let b = c.on_send(200, 0, 1, false);
        assert_eq!(c.outstanding(), (2, 2, 0));
        let out = c.on_ack(a, CHAT, 1, BOB, 1_100);
        assert_eq!((out.ack_ns, out.measured), (Some(1_000), true));
        assert!(
            !c.on_ack(b, CHAT, 2, BOB, 1_200).measured,
            "warm-up: not measured"
        );
        assert_eq!(
            c.on_push(1, CHAT, 1, Some(a), 2_100),
            Push::New {
                e2e_ns: 2_000,
                measured: true
            }
        );
        assert_eq!(
            c.on_push(1, CHAT, 2, Some(b), 2_200),
            Push::New {
                e2e_ns: 2_000,
                measured: false
            }
        );
        assert_eq!(c.outstanding(), (0, 0, 2));
        let mut lats = Vec::new();
        c.on_receipt(CHAT, BOB, 2, 3_100, |l| lats.push(l));
        assert_eq!(lats, vec![3_000]);
        assert_eq!(c.outstanding(), (0, 0, 0));
        let v = c.finish();
        assert_eq!(v.anomalies(), 0, "{v:?}");
        assert_eq!(v.counts.deliveries, 2);
    }

    #[test]
    fn lost_duplicate_order_gap_unacked() {
        let mut c = Checker::new(false);
        let ids: Vec<u64> = (0..4).map(|i| c.on_send(i, 0, 1, true)).collect();
        for (i, &id) in ids.iter().enumerate().take(3) {
            c.on_ack(id, CHAT, i as u64 + 1, BOB, 10);
        }
        // seq 2 arrives, then 1 (order violation), then 2 again (duplicate); 3 never comes.
        assert!(matches!(
            c.on_push(1, CHAT, 2, Some(ids[1]), 20),
            Push::New { .. }
        ));
        assert!(matches!(
            c.on_push(1, CHAT, 1, Some(ids[0]), 20),
            Push::New { .. }
        ));
        assert_eq!(c.on_push(1, CHAT, 2, Some(ids[1]), 20), Push::Duplicate);
        assert_eq!(c.on_push(1, CHAT, 7, Some(999), 20), Push::Foreign);
        let v = c.finish();
        assert_eq!(v.lost, 1, "seq 3 acked, never delivered");
        assert_eq!(v.counts.order_violations, 1);
        assert_eq!(v.counts.duplicates, 1);
        assert_eq!(v.counts.foreign, 1);
        assert_eq!(v.unacked, 1, "message 3 never answered");
        assert_eq!(v.gaps, 0);
        assert!(v.anomalies() > 0);
    }

    #[test]
    fn gaps_and_own_messages() {
        let mut c = Checker::new(false);
        // Conn 5 sends seq 2 itself; conn 5 receives seq 1 and seq 4 (3 missing → a gap).
        let own = c.on_send(0, 5, 1, true);
        c.on_ack(own, CHAT, 2, BOB, 1);
        let other = c.on_send(0, 6, 1, true);
        c.on_ack(other, CHAT, 1, BOB, 1);
        assert!(matches!(
            c.on_push(5, CHAT, 1, Some(other), 2),
            Push::New { .. }
        ));
        let third = c.on_send(0, 6, 1, true);
        c.on_ack(third, CHAT, 4, BOB, 1);
        assert!(matches!(
            c.on_push(5, CHAT, 4, Some(third), 3),
            Push::New { .. }
        ));
        let v = c.finish();
        // Conn 5 misses seq 3; conn 6 (holding 1 and 4 as its own) misses 2 and 3.
        assert_eq!(v.gaps, 3);
        assert_eq!(v.counts.order_violations, 0);
        // The recipient of `own` (conn 6) never got it.
        assert_eq!(v.lost, 1);
    }

    #[test]
    fn receipt_before_ack_errors_and_unsent() {
        let mut c = Checker::new(true);
        let a = c.on_send(0, 0, 2, true);
        c.on_receipt(CHAT, BOB, 5, 50, |_| panic!("nothing pending yet"));
        let out = c.on_ack(a, CHAT, 3, BOB, 60);
        assert_eq!(out.receipt_ns, Some(60));
        assert!(c.on_ack(a, CHAT, 3, BOB, 61).duplicate);
        assert!(c.on_ack(77, CHAT, 3, BOB, 61).unknown);
        let e = c.on_send(0, 0, 2, true);
        c.on_error(e);
        let u = c.on_send(0, 0, 2, true);
        c.on_unsent(u);
        assert_eq!(c.counts().errored, 1);
        assert_eq!(c.counts().unsent, 1);
        assert_eq!(c.counts().sent, 2);
        // `a` expects 2 deliveries and got none.
        assert_eq!(c.outstanding(), (0, 2, 0));
        let v = c.finish();
        assert_eq!(v.lost, 2);
        assert_eq!(v.counts.duplicate_acks, 1);
        assert_eq!(v.counts.unknown_acks, 1);
    }

    #[test]
    fn events_fill_holes_quietly() {
        let mut c = Checker::new(false);
        // Seq 1 is the group's creation event: both member devices hold it (conn 3 twice).
        c.on_event(3, CHAT, 1);
        c.on_event(3, CHAT, 1);
        c.on_event(0, CHAT, 1);
        let m = c.on_send(0, 0, 1, true);
        c.on_ack(m, CHAT, 2, BOB, 1);
        assert!(matches!(
            c.on_push(3, CHAT, 2, Some(m), 2),
            Push::New { .. }
        ));
        let v = c.finish();
        assert_eq!(v.anomalies(), 0, "{v:?}");
    }

    #[test]
    fn unsequenced_duplicates_and_order() {
        let mut c = Checker::new(false);
        let a = c.on_send(0, 0, 1, true);
        let b = c.on_send(0, 0, 1, true);
        c.on_ack(a, ChatId(0), 0, BOB, 1);
        c.on_ack(b, ChatId(0), 0, BOB, 1);
        assert!(matches!(
            c.on_push_unsequenced(1, Some(b), 5),
            Push::New { e2e_ns: 5, .. }
        ));
        assert!(matches!(
            c.on_push_unsequenced(1, Some(a), 5),
            Push::New { .. }
        ));
        assert_eq!(c.on_push_unsequenced(1, Some(a), 5), Push::Duplicate);
        assert_eq!(c.on_push_unsequenced(1, None, 5), Push::Foreign);
        let v = c.finish();
        assert_eq!(
            (v.counts.order_violations, v.counts.duplicates, v.lost),
            (1, 1, 0)
        );
    }

    #[test]
    fn holes_are_bounded() {
        let mut rc = RecvChat::default();
        assert!(rc.hold(HOLES_PER_CHAT_MAX as u64 + 11));
        assert_eq!(rc.holes.len(), HOLES_PER_CHAT_MAX);
        assert_eq!(rc.holes_overflow, 10);
        assert!(rc.hold(1));
        assert!(!rc.hold(1));
    }
}
