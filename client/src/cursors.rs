//! Per-chat receive cursors: which sequence numbers this device has, and whether the server ever
//! sent one twice or skipped one. Pure state, no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use switchboard_wire::limits::SYNC_CURSORS_MAX;
use switchboard_wire::{ChatId, Message, Seq};

/// Most sequence numbers remembered per chat above a hole (received out of order). Bounds the
/// memory one misbehaving chat can take (about 40 bytes each in a `BTreeSet`, so ~40 KiB per chat
/// worst case). When full, the highest seq is forgotten: a later re-delivery of it then
/// reports [`Observed::Gap`] instead of [`Observed::Duplicate`], which still fails a test that
/// asserts "no anomalies".
pub const OUT_OF_ORDER_SEQS_PER_CHAT_MAX: usize = 1024;

/// What [`Cursors::observe`] concluded about one received message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The next seq of its chat (or one that fills a hole).
    New,
    /// A seq this device already had.
    Duplicate,
    /// A seq beyond the next expected one: `expected..got` are missing (for now).
    Gap { expected: Seq, got: Seq },
}

#[derive(Clone, Debug, Default)]
struct ChatCursor {
    /// Highest seq such that every seq in `1..=contiguous` has been received.
    contiguous: u64,
    /// Seqs received above `contiguous + 1`, waiting for the hole below them to fill.
    above: BTreeSet<u64>,
}

impl ChatCursor {
    fn has(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.above.contains(&seq)
    }

    /// Records `seq` as held. Returns what it was before.
    fn insert(&mut self, seq: u64) -> Observed {
        if self.has(seq) {
            return Observed::Duplicate;
        }
        // `has` returned false, so `seq > contiguous` and `contiguous < u64::MAX`.
        let expected = self.contiguous + 1;
        if seq == expected {
            self.contiguous = seq;
            self.absorb();
            return Observed::New;
        }
        debug_assert!(seq > expected);
        // When full, keep the lowest seqs: they are the ones the hole's filling makes contiguous.
        if self.above.len() < OUT_OF_ORDER_SEQS_PER_CHAT_MAX {
            self.above.insert(seq);
        } else if self.above.last().is_some_and(|&last| seq < last) {
            self.above.pop_last();
            self.above.insert(seq);
        }
        // A seq that lands above an existing hole but below other early arrivals is still a gap:
        // `expected` is what the contiguous prefix is waiting for.
        Observed::Gap {
            expected: Seq(expected),
            got: Seq(seq),
        }
    }

    /// Moves `contiguous` up over early arrivals that are now adjacent.
    fn absorb(&mut self) {
        while self.contiguous < u64::MAX && self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

/// Per chat, the highest contiguous seq this device has received, plus counts of anomalies.
///
/// Feed it every `Message` the server pushes or syncs ([`Cursors::observe`]) and the seq of every
/// own message the server acknowledged ([`Cursors::record_own`]); ask it for the cursor list of a
/// `Sync` ([`Cursors::sync_cursors`]). History pages are not fed: they are old messages fetched on
/// purpose and do not move the live cursor.
///
/// The number of chats is not bounded: one entry (a few dozen bytes) per chat this device has
/// seen, which is what a real device stores too.
#[derive(Clone, Debug, Default)]
pub struct Cursors {
    chats: BTreeMap<ChatId, ChatCursor>,
    new: u64,
    duplicates: u64,
    gaps: u64,
    first_anomaly: Option<(ChatId, Observed)>,
}

impl Cursors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one received message and says whether it was new, a duplicate or beyond a hole.
    /// Every content kind counts, chat events and deletion tombstones included: each occupies a
    /// seq of its chat.
    pub fn observe(&mut self, message: &Message) -> Observed {
        let observed = self
            .chats
            .entry(message.chat)
            .or_default()
            .insert(message.seq.0);
        match observed {
            Observed::New => self.new += 1,
            Observed::Duplicate => self.duplicates += 1,
            Observed::Gap { .. } => self.gaps += 1,
        }
        if observed != Observed::New && self.first_anomaly.is_none() {
            self.first_anomaly = Some((message.chat, observed));
        }
        observed
    }

    /// Records that this device holds `seq` of `chat` because it sent that message itself (a
    /// `SendAck`). Not counted as new, duplicate or gap: a retried send is acknowledged again
    /// with the same seq, and an ack may overtake a push of a lower seq.
    ///
    /// This assumes the server does not also push a device's own message back to that device; if
    /// it does, that push is counted as a duplicate.
    pub fn record_own(&mut self, chat: ChatId, seq: Seq) {
        if seq.0 == 0 {
            return;
        }
        self.chats.entry(chat).or_default().insert(seq.0);
    }

    /// Sets the cursor of `chat` as if every seq up to `seq` had been received (e.g. a device that
    /// starts from a stored state). Forgets out-of-order seqs at or below it.
    pub fn set(&mut self, chat: ChatId, seq: Seq) {
        let c = self.chats.entry(chat).or_default();
        c.contiguous = seq.0;
        c.above.retain(|&s| s > seq.0);
        c.absorb();
    }

    /// The highest seq of `chat` with nothing missing below it (`Seq(0)`: none).
    pub fn get(&self, chat: ChatId) -> Seq {
        Seq(self.chats.get(&chat).map_or(0, |c| c.contiguous))
    }

    /// Whether `seq` of `chat` has been received.
    pub fn has(&self, chat: ChatId, seq: Seq) -> bool {
        self.chats.get(&chat).is_some_and(|c| c.has(seq.0))
    }

    /// The cursors of a `Sync`: every known chat with its contiguous seq, ordered by chat id.
    pub fn sync_cursors(&self) -> Vec<(ChatId, Seq)> {
        self.chats
            .iter()
            .map(|(chat, c)| (*chat, Seq(c.contiguous)))
            .collect()
    }

    /// [`Cursors::sync_cursors`] split into lists of at most `SYNC_CURSORS_MAX`, the most one
    /// `Sync` may carry. Always at least one (possibly empty) list.
    pub fn sync_cursor_chunks(&self) -> Vec<Vec<(ChatId, Seq)>> {
        let all = self.sync_cursors();
        if all.is_empty() {
            return vec![Vec::new()];
        }
        all.chunks(SYNC_CURSORS_MAX).map(<[_]>::to_vec).collect()
    }

    /// Chats that still have a hole: a seq above a missing one was received.
    pub fn chats_with_holes(&self) -> Vec<(ChatId, Seq)> {
        self.chats
            .iter()
            .filter(|(_, c)| !c.above.is_empty())
            .map(|(chat, c)| (*chat, Seq(c.contiguous + 1)))
            .collect()
    }

    /// No chat has a hole right now (gaps seen earlier may have been filled since).
    pub fn is_contiguous(&self) -> bool {
        self.chats.values().all(|c| c.above.is_empty())
    }

    /// Messages observed as [`Observed::New`].
    pub fn new_count(&self) -> u64 {
        self.new
    }

    /// Messages observed as [`Observed::Duplicate`].
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Messages observed as [`Observed::Gap`].
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// The first duplicate or gap observed, for a test's failure message.
    pub fn first_anomaly(&self) -> Option<(ChatId, Observed)> {
        self.first_anomaly
    }

    /// Number of chats with a cursor.
    pub fn chat_count(&self) -> usize {
        self.chats.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_wire::{ClientMsgId, ContentKind, DeviceId, MsgId, UserId};

    fn msg(chat: u64, seq: u64) -> Message {
        Message {
            chat: ChatId(chat),
            seq: Seq(seq),
            msg_id: MsgId(seq),
            sender_user: UserId(1),
            sender_device: DeviceId(1),
            timestamp_ms: 0,
            payload: Vec::new(),
            reply_to: Seq(0),
            content_kind: ContentKind::Text,
            client_msg_id: ClientMsgId::default(),
            forwarded: false,
        }
    }

    /// Feeds `(chat, seq)` pairs and checks each verdict; `Gap` is written as `G(expected)`.
    fn check(input: &[(u64, u64)], expect: &[&str]) {
        let mut c = Cursors::new();
        let got: Vec<String> = input
            .iter()
            .map(|&(chat, seq)| match c.observe(&msg(chat, seq)) {
                Observed::New => "N".to_string(),
                Observed::Duplicate => "D".to_string(),
                Observed::Gap { expected, got } => {
                    assert_eq!(got, Seq(seq));
                    format!("G{}", expected.0)
                }
            })
            .collect();
        assert_eq!(got, expect, "input {input:?}");
    }

    #[test]
    fn verdicts() {
        check(&[(1, 1), (1, 2), (1, 3)], &["N", "N", "N"]);
        check(&[(1, 1), (1, 1)], &["N", "D"]);
        check(&[(1, 2)], &["G1"]);
        check(
            &[(1, 1), (1, 3), (1, 2), (1, 3), (1, 4)],
            &["N", "G2", "N", "D", "N"],
        );
        check(
            &[(1, 1), (1, 4), (1, 3), (1, 4), (1, 2), (1, 5)],
            &["N", "G2", "G2", "D", "N", "N"],
        );
        // Chats are independent.
        check(
            &[(1, 1), (2, 1), (2, 2), (1, 2), (2, 2)],
            &["N", "N", "N", "N", "D"],
        );
        // Seq 0 is never a valid message seq; it counts as already held.
        check(&[(1, 0)], &["D"]);
    }

    #[test]
    fn counters_and_holes() {
        let mut c = Cursors::new();
        c.observe(&msg(7, 1));
        c.observe(&msg(7, 3));
        assert_eq!(c.get(ChatId(7)), Seq(1));
        assert!(!c.is_contiguous());
        assert_eq!(c.chats_with_holes(), vec![(ChatId(7), Seq(2))]);
        assert_eq!(
            c.first_anomaly(),
            Some((
                ChatId(7),
                Observed::Gap {
                    expected: Seq(2),
                    got: Seq(3)
                }
            ))
        );
        c.observe(&msg(7, 2));
        assert_eq!(c.get(ChatId(7)), Seq(3));
        assert!(c.is_contiguous());
        c.observe(&msg(7, 2));
        assert_eq!((c.new_count(), c.duplicates(), c.gaps()), (2, 1, 1));
        assert!(c.has(ChatId(7), Seq(3)));
        assert!(!c.has(ChatId(7), Seq(4)));
        assert!(!c.has(ChatId(8), Seq(1)));
    }

    #[test]
    fn own_messages_fill_without_counting() {
        let mut c = Cursors::new();
        c.observe(&msg(5, 1));
        c.record_own(ChatId(5), Seq(2));
        c.record_own(ChatId(5), Seq(2)); // a retried send acked again
        assert_eq!(c.observe(&msg(5, 3)), Observed::New);
        // An ack that overtakes the push of a lower seq.
        c.record_own(ChatId(5), Seq(5));
        assert_eq!(c.observe(&msg(5, 4)), Observed::New);
        assert_eq!(c.get(ChatId(5)), Seq(5));
        assert_eq!((c.duplicates(), c.gaps()), (0, 0));
        c.record_own(ChatId(5), Seq(0));
        assert_eq!(c.chat_count(), 1);
    }

    #[test]
    fn set_moves_the_cursor_and_absorbs_early_arrivals() {
        let mut c = Cursors::new();
        c.observe(&msg(1, 5));
        c.observe(&msg(1, 7));
        c.set(ChatId(1), Seq(4));
        assert_eq!(c.get(ChatId(1)), Seq(5));
        assert_eq!(c.chats_with_holes(), vec![(ChatId(1), Seq(6))]);
        c.set(ChatId(1), Seq(6));
        assert_eq!(c.get(ChatId(1)), Seq(7));
        assert!(c.is_contiguous());
    }

    #[test]
    fn out_of_order_memory_is_bounded() {
        let mut c = Cursors::new();
        let n = OUT_OF_ORDER_SEQS_PER_CHAT_MAX as u64;
        for seq in 2..=n + 10 {
            c.observe(&msg(1, seq));
        }
        assert_eq!(
            c.chats[&ChatId(1)].above.len(),
            OUT_OF_ORDER_SEQS_PER_CHAT_MAX
        );
        // Filling the hole recovers everything still remembered.
        assert_eq!(c.observe(&msg(1, 1)), Observed::New);
        assert_eq!(c.get(ChatId(1)), Seq(n + 1));
    }

    #[test]
    fn sync_cursors_are_ordered_and_chunked() {
        let mut c = Cursors::new();
        assert_eq!(c.sync_cursor_chunks(), vec![Vec::new()]);
        c.observe(&msg(9, 1));
        c.observe(&msg(3, 1));
        c.observe(&msg(3, 2));
        assert_eq!(
            c.sync_cursors(),
            vec![(ChatId(3), Seq(2)), (ChatId(9), Seq(1))]
        );
        for chat in 100..100 + SYNC_CURSORS_MAX as u64 {
            c.set(ChatId(chat), Seq(1));
        }
        let chunks = c.sync_cursor_chunks();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len(), SYNC_CURSORS_MAX);
        assert_eq!(chunks[1].len(), 2);
    }
}
