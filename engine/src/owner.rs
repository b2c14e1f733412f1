//! The chat owner's decisions, sans-IO: validate a request against the shard's state, assign the
//! next seq, stage the records that must become durable and the effects that may only run after
//! they are durable (acks, deliveries, receipts). The committer (`shard.rs`) does the I/O.
//!
//! Call order: `on_send` / `on_cursor` any number of times, then `take_batch`, make the batch's
//! records durable, `committed(&batch)`, then run the batch's effects in order.

use crate::msg::{ConnRef, Origin};
use std::collections::VecDeque;
use switchboard_storage::{ChatKind, CursorKind, Record, ShardState, StoredMessage};
use switchboard_wire::{
    ChatId, ClientMsgId, ContentKind, ErrorCode, ErrorFrame, Message, MsgId, Receipt, ReceiptKind,
    SendAck, SendReq, Seq, ServerFrame, UserId,
};

/// Something to do once the records staged before it are durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A frame for one connection (ack or error).
    Reply {
        to: ConnRef,
        frame: ServerFrame,
        completes_send: bool,
    },
    /// A new message for every online device of `members`, except the connection that sent it.
    Fanout {
        msg: Message,
        members: Vec<UserId>,
        skip: ConnRef,
    },
    /// A receipt for every online device of `to_users`.
    Receipt {
        receipt: Receipt,
        to_users: Vec<UserId>,
    },
}

/// Records and the effects that wait for them.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub effects: Vec<Effect>,
}

/// Server message ids: 42 bits of milliseconds since 2020-01-01, 10 bits of shard, 12 bits of
/// counter. Unique across shards and restarts as long as the clock does not step back further than
/// the highest id already issued (we continue from that id if it does).
#[derive(Debug)]
pub struct MsgIdGen {
    shard_bits: u64,
    last_ms: u64,
    counter: u64,
}

const EPOCH_2020_MS: u64 = 1_577_836_800_000;

impl MsgIdGen {
    pub fn new(shard: u32, highest_issued: MsgId) -> MsgIdGen {
        MsgIdGen {
            shard_bits: (shard as u64 & 0x3ff) << 12,
            last_ms: highest_issued.0 >> 22,
            counter: 0xfff,
        }
    }
    pub fn next(&mut self, now_ms: u64) -> MsgId {
        let ms = now_ms.saturating_sub(EPOCH_2020_MS) & ((1 << 42) - 1);
        if ms > self.last_ms {
            self.last_ms = ms;
            self.counter = 0;
        } else if self.counter < 0xfff {
            self.counter += 1;
        } else {
            // 4096 ids in one millisecond (or the clock went back): borrow the next millisecond.
            self.last_ms += 1;
            self.counter = 0;
        }
        MsgId((self.last_ms << 22) | self.shard_bits | self.counter)
    }
}

pub struct Owner {
    pub state: ShardState,
    ids: MsgIdGen,
    /// Staged work in arrival order: each item's records, then its effects.
    pending: VecDeque<Batch>,
    pending_records: usize,
    pending_records_max: usize,
}

fn error(
    to: ConnRef,
    code: ErrorCode,
    text: &str,
    client_msg_id: Option<ClientMsgId>,
    completes_send: bool,
) -> Effect {
    Effect::Reply {
        to,
        frame: ServerFrame::Error(ErrorFrame {
            code,
            text: text.to_string(),
            client_msg_id,
            request_id: 0,
        }),
        completes_send,
    }
}

impl Owner {
    pub fn new(
        shard: u32,
        state: ShardState,
        highest_msg_id: MsgId,
        pending_records_max: usize,
    ) -> Owner {
        Owner {
            state,
            ids: MsgIdGen::new(shard, highest_msg_id),
            pending: VecDeque::new(),
            pending_records: 0,
            pending_records_max,
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn push(&mut self, records: Vec<Record>, effects: Vec<Effect>) {
        for r in &records {
            self.state.apply(r);
        }
        self.pending_records += records.len();
        self.pending.push_back(Batch { records, effects });
    }

    /// A `Send` for `chat` (derived by the connection's core; `peer` is set for a 1:1 target).
    pub fn on_send(
        &mut self,
        now_ms: u64,
        origin: Origin,
        chat: ChatId,
        peer: Option<UserId>,
        req: SendReq,
    ) {
        let id = Some(req.client_msg_id);
        let reply = |code, text| error(origin.conn, code, text, id, true);
        if let Some(d) = self.state.dedup(&origin.user, &req.client_msg_id).copied() {
            let effect = if d.chat == chat {
                let ack = SendAck {
                    client_msg_id: req.client_msg_id,
                    chat,
                    seq: d.seq,
                    msg_id: d.msg_id,
                    timestamp_ms: d.timestamp_ms,
                    duplicate: true,
                };
                Effect::Reply {
                    to: origin.conn,
                    frame: ServerFrame::SendAck(ack),
                    completes_send: true,
                }
            } else {
                reply(
                    ErrorCode::ClientMsgIdReused,
                    "client_msg_id already used for another chat",
                )
            };
            return self.push(Vec::new(), vec![effect]);
        }
        if self.pending_records >= self.pending_records_max {
            return self.push(
                Vec::new(),
                vec![reply(
                    ErrorCode::Overloaded,
                    "server busy: retry with the same client_msg_id",
                )],
            );
        }
        let mut records = Vec::with_capacity(2);
        let members = match (self.state.chat(&chat), peer) {
            (Some(meta), _) => {
                if !meta.is_member(origin.user) {
                    return self.push(
                        Vec::new(),
                        vec![reply(ErrorCode::NotMember, "not a member of this chat")],
                    );
                }
                if let Some(p) = peer {
                    if !meta.is_member(p) {
                        // Two different pairs hashed to one chat id: refuse rather than misdeliver.
                        return self.push(
                            Vec::new(),
                            vec![reply(ErrorCode::Internal, "chat id collision")],
                        );
                    }
                }
                meta.members.clone()
            }
            (None, Some(p)) => {
                let members = vec![origin.user, p];
                records.push(Record::ChatCreated {
                    chat,
                    kind: ChatKind::Direct,
                    members: members.clone(),
                    created_ms: now_ms,
                });
                members
            }
            (None, None) => {
                return self.push(
                    Vec::new(),
                    vec![reply(ErrorCode::UnknownChat, "no such chat")],
                )
            }
        };
        let next_seq = self.state.chat(&chat).map(|m| m.next_seq).unwrap_or(Seq(1));
        if req.reply_to.0 >= next_seq.0 {
            return self.push(
                Vec::new(),
                vec![reply(
                    ErrorCode::InvalidArgument,
                    "reply_to names a message that does not exist",
                )],
            );
        }
        let msg_id = self.ids.next(now_ms);
        let stored = StoredMessage {
            chat,
            seq: next_seq,
            msg_id,
            sender_user: origin.user,
            sender_device: origin.device,
            timestamp_ms: now_ms,
            client_msg_id: req.client_msg_id,
            reply_to: req.reply_to,
            content_kind: req.content_kind.0,
            payload: req.payload,
        };
        let ack = SendAck {
            client_msg_id: req.client_msg_id,
            chat,
            seq: next_seq,
            msg_id,
            timestamp_ms: now_ms,
            duplicate: false,
        };
        let msg = message_frame(&stored);
        records.push(Record::Message(stored));
        let effects = vec![
            Effect::Reply {
                to: origin.conn,
                frame: ServerFrame::SendAck(ack),
                completes_send: true,
            },
            Effect::Fanout {
                msg,
                members,
                skip: origin.conn,
            },
        ];
        self.push(records, effects);
    }

    /// A `Delivered` or `Read` from a device.
    pub fn on_cursor(&mut self, origin: Origin, chat: ChatId, kind: CursorKind, up_to: Seq) {
        let Some(meta) = self.state.chat(&chat) else {
            return self.push(
                Vec::new(),
                vec![error(
                    origin.conn,
                    ErrorCode::UnknownChat,
                    "no such chat",
                    None,
                    false,
                )],
            );
        };
        if !meta.is_member(origin.user) {
            return self.push(
                Vec::new(),
                vec![error(
                    origin.conn,
                    ErrorCode::NotMember,
                    "not a member of this chat",
                    None,
                    false,
                )],
            );
        }
        if up_to.0 >= meta.next_seq.0 {
            return self.push(
                Vec::new(),
                vec![error(
                    origin.conn,
                    ErrorCode::InvalidArgument,
                    "cursor beyond the last message",
                    None,
                    false,
                )],
            );
        }
        let others: Vec<UserId> = meta
            .members
            .iter()
            .copied()
            .filter(|u| *u != origin.user)
            .collect();
        let (delivered, read) = self.state.cursors(chat, origin.user, origin.device);
        let old = match kind {
            CursorKind::Delivered => delivered,
            CursorKind::Read => read,
        };
        if up_to <= old {
            return; // Already there: cursors never move back, nothing to store or tell.
        }
        let record = Record::Cursor {
            chat,
            user: origin.user,
            device: origin.device,
            kind,
            seq: up_to,
        };
        let receipt = Receipt {
            chat,
            from: Seq(old.0 + 1),
            to: up_to,
            user: origin.user,
            kind: match kind {
                CursorKind::Delivered => ReceiptKind::Delivered,
                CursorKind::Read => ReceiptKind::Read,
            },
        };
        self.push(
            vec![record],
            vec![Effect::Receipt {
                receipt,
                to_users: others,
            }],
        );
    }

    /// Takes staged work for one group commit: whole items, up to about `records_max` records.
    pub fn take_batch(&mut self, records_max: usize) -> Batch {
        let mut out = Batch::default();
        while let Some(item) = self.pending.front() {
            if !out.records.is_empty() && out.records.len() + item.records.len() > records_max {
                break;
            }
            let item = self.pending.pop_front().expect("front exists");
            self.pending_records -= item.records.len();
            out.records.extend(item.records);
            out.effects.extend(item.effects);
        }
        out
    }

    /// The batch's records are durable.
    pub fn committed(&mut self, batch: &Batch) {
        for r in &batch.records {
            if let Record::Message(m) = r {
                self.state.mark_durable(m.chat, m.seq);
            }
        }
    }
}

/// The wire form of a stored message.
pub fn message_frame(m: &StoredMessage) -> Message {
    Message {
        chat: m.chat,
        seq: m.seq,
        msg_id: m.msg_id,
        sender_user: m.sender_user,
        sender_device: m.sender_device,
        timestamp_ms: m.timestamp_ms,
        payload: m.payload.clone(),
        reply_to: m.reply_to,
        content_kind: ContentKind(m.content_kind),
        client_msg_id: m.client_msg_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_wire::{DeviceId, Target};

    const A: UserId = UserId(1);
    const B: UserId = UserId(2);
    const C: UserId = UserId(3);

    fn origin(user: UserId) -> Origin {
        Origin {
            conn: ConnRef {
                core: 0,
                conn: user.0 * 10,
            },
            user,
            device: DeviceId(1),
        }
    }

    fn send(id: u64, peer: UserId, reply_to: u64) -> SendReq {
        SendReq {
            client_msg_id: ClientMsgId::from_halves(0, id),
            target: Target::Peer(peer),
            payload: vec![id as u8; 3],
            reply_to: Seq(reply_to),
            content_kind: ContentKind::Text,
        }
    }

    fn owner() -> Owner {
        Owner::new(0, ShardState::new(100), MsgId(0), 10)
    }

    fn acks(batch: &Batch) -> Vec<(u64, bool)> {
        batch
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Reply {
                    frame: ServerFrame::SendAck(a),
                    ..
                } => Some((a.seq.0, a.duplicate)),
                _ => None,
            })
            .collect()
    }

    fn errors(batch: &Batch) -> Vec<ErrorCode> {
        batch
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::Reply {
                    frame: ServerFrame::Error(f),
                    ..
                } => Some(f.code),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn sends_get_gap_free_seqs_and_create_the_chat_once() {
        let mut o = owner();
        let chat = ChatId::direct(A, B);
        o.on_send(1_700_000_000_000, origin(A), chat, Some(B), send(1, B, 0));
        o.on_send(1_700_000_000_000, origin(B), chat, Some(A), send(1, A, 1));
        o.on_send(1_700_000_000_001, origin(A), chat, Some(B), send(2, B, 0));
        let b = o.take_batch(100);
        assert_eq!(b.records.len(), 4, "one ChatCreated + three messages");
        assert!(matches!(b.records[0], Record::ChatCreated { .. }));
        assert_eq!(acks(&b), vec![(1, false), (2, false), (3, false)]);
        assert_eq!(o.state.chat(&chat).unwrap().durable_seq, Seq(0));
        o.committed(&b);
        assert_eq!(o.state.chat(&chat).unwrap().durable_seq, Seq(3));
        let fanouts = b
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::Fanout { .. }))
            .count();
        assert_eq!(fanouts, 3);
    }

    #[test]
    fn retries_are_answered_with_the_original_ack_and_store_nothing() {
        let mut o = owner();
        let chat = ChatId::direct(A, B);
        o.on_send(1_700_000_000_000, origin(A), chat, Some(B), send(7, B, 0));
        // Retry while the first is still pending, and after it committed.
        o.on_send(1_700_000_000_005, origin(A), chat, Some(B), send(7, B, 0));
        let b = o.take_batch(100);
        o.committed(&b);
        o.on_send(1_700_000_000_009, origin(A), chat, Some(B), send(7, B, 0));
        let b2 = o.take_batch(100);
        assert_eq!(b.records.len(), 2);
        assert!(b2.records.is_empty());
        assert_eq!(acks(&b), vec![(1, false), (1, true)]);
        assert_eq!(acks(&b2), vec![(1, true)]);
        // The same id towards another chat is an error, not a silent ack.
        o.on_send(
            1_700_000_000_010,
            origin(A),
            ChatId::direct(A, C),
            Some(C),
            send(7, C, 0),
        );
        assert_eq!(
            errors(&o.take_batch(100)),
            vec![ErrorCode::ClientMsgIdReused]
        );
    }

    #[test]
    fn bad_requests_get_errors_and_store_nothing() {
        let mut o = owner();
        let chat = ChatId::direct(A, B);
        o.on_send(1, origin(A), chat, None, send(1, B, 0));
        o.on_send(1, origin(A), chat, Some(B), send(2, B, 5));
        let b = o.take_batch(100);
        assert!(b.records.is_empty());
        assert_eq!(
            errors(&b),
            vec![ErrorCode::UnknownChat, ErrorCode::InvalidArgument]
        );
        o.on_send(1, origin(A), chat, Some(B), send(3, B, 0));
        let b = o.take_batch(100);
        o.committed(&b);
        o.on_send(1, origin(C), chat, None, send(4, A, 0));
        o.on_cursor(origin(C), chat, CursorKind::Read, Seq(1));
        o.on_cursor(origin(B), chat, CursorKind::Read, Seq(9));
        let b = o.take_batch(100);
        assert!(b.records.is_empty());
        assert_eq!(
            errors(&b),
            vec![
                ErrorCode::NotMember,
                ErrorCode::NotMember,
                ErrorCode::InvalidArgument
            ]
        );
    }

    #[test]
    fn overload_is_an_error_not_unbounded_memory() {
        let mut o = owner(); // pending_records_max = 10
        for i in 0..20 {
            o.on_send(
                1,
                origin(A),
                ChatId::direct(A, B),
                Some(B),
                send(100 + i, B, 0),
            );
        }
        let b = o.take_batch(1000);
        assert!(b.records.len() <= 11, "{}", b.records.len());
        assert!(errors(&b).iter().all(|c| *c == ErrorCode::Overloaded));
        assert!(!errors(&b).is_empty());
    }

    #[test]
    fn cursors_move_forward_and_produce_receipts() {
        let mut o = owner();
        let chat = ChatId::direct(A, B);
        for i in 0..3 {
            o.on_send(1, origin(A), chat, Some(B), send(i, B, 0));
        }
        let b = o.take_batch(100);
        o.committed(&b);
        o.on_cursor(origin(B), chat, CursorKind::Delivered, Seq(2));
        o.on_cursor(origin(B), chat, CursorKind::Delivered, Seq(1)); // backwards: ignored
        o.on_cursor(origin(B), chat, CursorKind::Read, Seq(3));
        let b = o.take_batch(100);
        assert_eq!(b.records.len(), 2);
        let receipts: Vec<_> = b
            .effects
            .iter()
            .map(|e| match e {
                Effect::Receipt { receipt, to_users } => {
                    (receipt.from.0, receipt.to.0, receipt.kind, to_users.clone())
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            receipts,
            vec![
                (1, 2, ReceiptKind::Delivered, vec![A]),
                (1, 3, ReceiptKind::Read, vec![A])
            ]
        );
    }

    #[test]
    fn batches_split_on_whole_items() {
        let mut o = owner();
        let chat = ChatId::direct(A, B);
        for i in 0..5 {
            o.on_send(1, origin(A), chat, Some(B), send(i, B, 0));
        }
        let first = o.take_batch(3);
        assert_eq!(first.records.len(), 3, "ChatCreated+msg, msg");
        let rest = o.take_batch(100);
        assert_eq!(rest.records.len(), 3);
        assert!(!o.has_pending());
    }

    #[test]
    fn msg_ids_are_unique_and_increasing() {
        let mut g = MsgIdGen::new(5, MsgId(0));
        let mut last = MsgId(0);
        for i in 0..10_000u64 {
            let id = g.next(1_700_000_000_000 + i / 5000);
            assert!(id > last);
            last = id;
        }
        // After a restart with the clock behind, ids continue above the highest issued.
        let mut g2 = MsgIdGen::new(5, last);
        assert!(g2.next(1_600_000_000_000) > last);
    }
}
