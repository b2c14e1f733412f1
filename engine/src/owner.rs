//! The chat owner's decisions, sans-IO: validate a request against the shard's state, assign the
//! next seq, stage the records that must become durable and the effects that may only run after
//! they are durable (acks, deliveries, receipts). The committer (`shard.rs`) does the I/O.
//!
//! Call order: `on_*` any number of times, then `take_batch`, make the batch's records durable,
//! `committed(&batch)`, then run the batch's effects in order.

use crate::msg::{Action, ConnRef, Origin};
use std::collections::{HashMap, VecDeque};
use switchboard_storage::{
    ChatKind, ChatMeta, CursorKind, Record, ShardState, StoredMessage, CONTENT_KIND_DELETED,
    CONTENT_KIND_EVENT, MESSAGE_FLAG_FORWARDED,
};
use switchboard_wire::{
    encode_event, ChatEvent, ChatId, ClientMsgId, ContentKind, CreateGroupReq, ErrorCode,
    ErrorFrame, EventKind, GroupInfo, GroupOp, GroupUpdateReq, MemberRole, Message, MsgId, Receipt,
    ReceiptKind, ReceiptList, SendAck, SendReq, Seq, ServerFrame, UserId,
};

/// Something to do once the records staged before it are durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A frame for one connection (ack, error, group info, receipt list).
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
    /// A frame (receipt, typing notice) for every online device of `to_users` except `skip`.
    Broadcast {
        frame: ServerFrame,
        to_users: Vec<UserId>,
        skip: Option<ConnRef>,
    },
    /// Purge the stored content of these messages (a delete for everyone, and the edits that
    /// carried the message's newer content). Runs after the `Deleted` event is durable.
    Purge { chat: ChatId, seqs: Vec<Seq> },
    /// The answer to an HTTP API call (after its account records are durable).
    ApiReply {
        to: crate::calls::CallRef,
        reply: crate::api_http::Reply,
    },
    /// Tell `device`'s live connections that its one-time prekeys ran low.
    PrekeysLow {
        user: UserId,
        device: switchboard_wire::DeviceId,
        remaining: u32,
    },
    /// A durable token revocation, for every core (`CoreMsg::Revoked`).
    Revoke {
        user: UserId,
        device: switchboard_wire::DeviceId,
        through_s: u64,
        removed: bool,
    },
}

/// What the owner needs to know about the target of an edit, delete or reaction (read from the
/// store by the shard before `on_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetInfo {
    pub seq: Seq,
    pub sender: UserId,
    pub timestamp_ms: u64,
    pub content_kind: u8,
}

/// Owner-side limits (from the server config).
#[derive(Clone, Copy, Debug)]
pub struct OwnerLimits {
    /// Staged records before new work is refused with `Overloaded`.
    pub pending_records_max: usize,
    /// Largest group, members.
    pub group_members_max: usize,
    /// Typing notices are dropped in groups larger than this.
    pub typing_group_members_max: usize,
    /// At most one forwarded "typing" per user and chat per this many ms (stops always pass).
    pub typing_throttle_ms: u64,
    /// Authors may edit for this long after sending, ms.
    pub edit_window_ms: u64,
    /// Authors may delete for everyone for this long after sending, ms.
    pub delete_window_ms: u64,
}

impl Default for OwnerLimits {
    fn default() -> Self {
        OwnerLimits {
            pending_records_max: 16_384,
            group_members_max: 1024,
            typing_group_members_max: 20,
            typing_throttle_ms: 2000,
            edit_window_ms: 15 * 60 * 1000,
            delete_window_ms: 48 * 3600 * 1000,
        }
    }
}

/// Records and the effects that wait for them.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub effects: Vec<Effect>,
    /// When its oldest item was staged (`None` for an empty batch): the start of the
    /// `commit_wait_us` the shard reports for it.
    pub staged_at: Option<std::time::Instant>,
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
    limits: OwnerLimits,
    /// Last typing state forwarded per (chat, user), with its time.
    typing: HashMap<(ChatId, UserId), (u64, bool)>,
}

fn error_frame(
    code: ErrorCode,
    text: &str,
    client_msg_id: Option<ClientMsgId>,
    request_id: u32,
) -> ServerFrame {
    ServerFrame::Error(ErrorFrame {
        code,
        text: text.to_string(),
        client_msg_id,
        request_id,
    })
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
        frame: error_frame(code, text, client_msg_id, 0),
        completes_send,
    }
}

/// Who gets a staged message and what comes with it.
struct Fanout {
    /// Records staged just before the message (the chat's creation).
    extra: Vec<Record>,
    /// Users whose devices get the message (the sending connection excepted).
    recipients: Vec<UserId>,
    /// The answer to the sender instead of the usual `SendAck`.
    ack_frame: Option<ServerFrame>,
}

/// A new message (or event) to stage: everything but the seq, msg id and time.
struct NewMessage {
    client_msg_id: ClientMsgId,
    reply_to: Seq,
    content_kind: u8,
    flags: u8,
    payload: Vec<u8>,
    /// Media objects the message refers to: one `MediaGrant` record each, in the same batch.
    media_ids: Vec<String>,
}

/// The pressure marks for `pending_records_max` staged records: (on at, off at or below). The
/// limit stays 4× the on mark because what other cores already sent through the mesh is staged
/// after the mark is passed (at 80K msgs/s offered on the development VM, marks at a half let
/// 17.6K of 800K sends reach the limit; at a quarter or an eighth, 0 to 2.8K per run).
pub fn pressure_marks(pending_records_max: usize) -> (usize, usize) {
    let on = (pending_records_max / 4).max(1);
    (on, on / 2)
}

impl Owner {
    pub fn new(shard: u32, state: ShardState, highest_msg_id: MsgId, limits: OwnerLimits) -> Owner {
        Owner {
            state,
            ids: MsgIdGen::new(shard, highest_msg_id),
            pending: VecDeque::new(),
            pending_records: 0,
            limits,
            typing: HashMap::new(),
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
        self.pending.push_back(Batch {
            records,
            effects,
            staged_at: Some(std::time::Instant::now()),
        });
    }

    /// Stages records of another kind than chats (accounts) with the effects that wait for them.
    /// `state.apply` ignores records it does not own.
    pub fn stage(&mut self, records: Vec<Record>, effects: Vec<Effect>) {
        self.push(records, effects);
    }

    fn reply_only(&mut self, effect: Effect) {
        self.push(Vec::new(), vec![effect]);
    }

    pub fn overloaded(&self) -> bool {
        self.pending_records >= self.limits.pending_records_max
    }

    /// Whether the shard is under pressure, given whether it was (`pressure_marks`): on once the
    /// staged records reach a quarter of `pending_records_max`, off again only at an eighth or
    /// below. While it is on, connections that send to the shard stop being read (TCP
    /// back-pressure) instead of having their sends refused with `Overloaded` at the limit; the
    /// gap between the marks keeps the state from flapping.
    pub fn pressure(&self, was: bool) -> bool {
        let (on, off) = pressure_marks(self.limits.pending_records_max);
        if was {
            self.pending_records > off
        } else {
            self.pending_records >= on
        }
    }

    /// The answer to a retried `client_msg_id`, if it is one: the original ack, or an error when
    /// the id was used in another chat.
    fn retry_answer(&self, origin: Origin, chat: ChatId, id: ClientMsgId) -> Option<Effect> {
        let d = self.state.dedup(&origin.user, &id).copied()?;
        Some(if d.chat == chat {
            let ack = SendAck {
                client_msg_id: id,
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
            error(
                origin.conn,
                ErrorCode::ClientMsgIdReused,
                "client_msg_id already used for another chat",
                Some(id),
                true,
            )
        })
    }

    /// Stages one message at the chat's next seq (plus `extra` records before it) with its ack and
    /// its fan-out to `recipients`. The chat must exist (or be created by `extra`).
    fn stage_message(
        &mut self,
        now_ms: u64,
        origin: Origin,
        chat: ChatId,
        m: NewMessage,
        fanout: Fanout,
    ) -> Seq {
        let Fanout {
            extra,
            recipients,
            ack_frame,
        } = fanout;
        let next_seq = self.state.chat(&chat).map(|c| c.next_seq).unwrap_or(Seq(1));
        let before = self.state.chat(&chat).map(|c| c.all_members_cursors());
        let msg_id = self.ids.next(now_ms);
        let stored = StoredMessage {
            chat,
            seq: next_seq,
            msg_id,
            sender_user: origin.user,
            sender_device: origin.device,
            timestamp_ms: now_ms,
            client_msg_id: m.client_msg_id,
            reply_to: m.reply_to,
            content_kind: m.content_kind,
            flags: m.flags,
            payload: m.payload,
        };
        let ack_frame = ack_frame.unwrap_or(ServerFrame::SendAck(SendAck {
            client_msg_id: m.client_msg_id,
            chat,
            seq: next_seq,
            msg_id,
            timestamp_ms: now_ms,
            duplicate: false,
        }));
        let msg = message_frame(&stored);
        let mut records = extra;
        records.push(Record::Message(stored));
        // After the message, in the same batch: durable together, and the grant's seq exists.
        records.extend(m.media_ids.into_iter().map(|media_id| Record::MediaGrant {
            chat,
            seq: next_seq,
            media_id,
        }));
        let mut effects = vec![
            Effect::Reply {
                to: origin.conn,
                frame: ack_frame,
                completes_send: true,
            },
            Effect::Fanout {
                msg,
                members: recipients,
                skip: origin.conn,
            },
        ];
        self.push(records, Vec::new());
        // A send raises the sender's own cursors, which may complete an aggregate receipt.
        if let Some(before) = before {
            effects.extend(self.aggregate_receipts(chat, before, None));
        }
        self.pending.back_mut().expect("just pushed").effects = effects;
        next_seq
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
        if let Some(answer) = self.retry_answer(origin, chat, req.client_msg_id) {
            return self.reply_only(answer);
        }
        if self.overloaded() {
            return self.reply_only(reply(
                ErrorCode::Overloaded,
                "server busy: retry with the same client_msg_id",
            ));
        }
        let mut extra = Vec::new();
        let members = match (self.state.chat(&chat), peer) {
            (Some(meta), _) => {
                if !meta.is_member(origin.user) {
                    return self
                        .reply_only(reply(ErrorCode::NotMember, "not a member of this chat"));
                }
                if let Some(p) = peer {
                    if !meta.is_member(p) {
                        // Two different pairs hashed to one chat id: refuse rather than misdeliver.
                        return self.reply_only(reply(ErrorCode::Internal, "chat id collision"));
                    }
                }
                if !meta.blocked_by.is_empty() {
                    let text = if meta.blocked_by.contains(&origin.user) {
                        "you blocked this user: unblock to send"
                    } else {
                        "the recipient has blocked you"
                    };
                    return self.reply_only(reply(ErrorCode::Blocked, text));
                }
                if let Some(g) = &meta.group {
                    if g.admins_only && meta.role(origin.user) == Some(MemberRole::Member) {
                        return self.reply_only(reply(
                            ErrorCode::NotAllowed,
                            "only admins may send in this group",
                        ));
                    }
                }
                meta.members.clone()
            }
            (None, Some(p)) => {
                let members = vec![origin.user, p];
                extra.push(Record::ChatCreated {
                    chat,
                    kind: ChatKind::Direct,
                    members: members.clone(),
                    created_ms: now_ms,
                });
                members
            }
            (None, None) => return self.reply_only(reply(ErrorCode::UnknownChat, "no such chat")),
        };
        let next_seq = self.state.chat(&chat).map(|m| m.next_seq).unwrap_or(Seq(1));
        if req.reply_to.0 >= next_seq.0 {
            return self.reply_only(reply(
                ErrorCode::InvalidArgument,
                "reply_to names a message that does not exist",
            ));
        }
        let m = NewMessage {
            client_msg_id: req.client_msg_id,
            reply_to: req.reply_to,
            content_kind: req.content_kind.0,
            flags: if req.forwarded {
                MESSAGE_FLAG_FORWARDED
            } else {
                0
            },
            payload: req.payload,
            media_ids: req.media_ids,
        };
        self.stage_message(
            now_ms,
            origin,
            chat,
            m,
            Fanout {
                extra,
                recipients: members,
                ack_frame: None,
            },
        );
    }

    /// A `CreateGroup`; `chat` is `ChatId::group(origin.user, req.client_msg_id)`.
    pub fn on_create_group(
        &mut self,
        now_ms: u64,
        origin: Origin,
        chat: ChatId,
        req: CreateGroupReq,
    ) {
        let request_id = req.request_id;
        let reply = |code, text| Effect::Reply {
            to: origin.conn,
            frame: error_frame(code, text, Some(req.client_msg_id), request_id),
            completes_send: true,
        };
        if let Some(meta) = self.state.chat(&chat) {
            // A retry (or, vanishingly rarely, a hash collision with someone else's group).
            let effect = if meta.visible_range(origin.user).is_some()
                && self
                    .state
                    .dedup(&origin.user, &req.client_msg_id)
                    .is_none_or(|d| d.chat == chat)
            {
                Effect::Reply {
                    to: origin.conn,
                    frame: ServerFrame::GroupInfo(group_info(chat, meta, request_id)),
                    completes_send: true,
                }
            } else {
                reply(
                    ErrorCode::Internal,
                    "group id collision: retry with another client_msg_id",
                )
            };
            return self.reply_only(effect);
        }
        if self.overloaded() {
            return self.reply_only(reply(
                ErrorCode::Overloaded,
                "server busy: retry with the same client_msg_id",
            ));
        }
        let mut members = vec![origin.user];
        for u in &req.members {
            if !members.contains(u) {
                members.push(*u);
            }
        }
        if members.len() > self.limits.group_members_max {
            return self.reply_only(reply(
                ErrorCode::GroupFull,
                "too many members for one group",
            ));
        }
        let mut ev = ChatEvent::new(EventKind::GroupCreated);
        ev.users = members[1..].to_vec();
        ev.name = Some(req.name.clone());
        ev.description = Some(req.description.clone());
        ev.avatar_media_id = Some(req.avatar_media_id.clone());
        ev.admins_only = req.admins_only;
        let created = Record::ChatCreated {
            chat,
            kind: ChatKind::Group,
            members: members.clone(),
            created_ms: now_ms,
        };
        let m = NewMessage {
            client_msg_id: req.client_msg_id,
            reply_to: Seq(0),
            content_kind: CONTENT_KIND_EVENT,
            flags: 0,
            payload: encode_event(&ev),
            media_ids: Vec::new(),
        };
        // The answer is the group as it will be once the creation is durable.
        let info = GroupInfo {
            request_id,
            chat,
            name: req.name,
            description: req.description,
            avatar_media_id: req.avatar_media_id,
            members: members
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    (
                        *u,
                        if i == 0 {
                            MemberRole::Owner
                        } else {
                            MemberRole::Member
                        },
                    )
                })
                .collect(),
            admins_only: req.admins_only,
            created_ms: now_ms,
            last_seq: Seq(1),
        };
        let fanout = Fanout {
            extra: vec![created],
            recipients: members,
            ack_frame: Some(ServerFrame::GroupInfo(info)),
        };
        self.stage_message(now_ms, origin, chat, m, fanout);
    }

    /// A `GroupUpdate`: permission checks, then the change as an event in the chat's sequence.
    pub fn on_group_update(&mut self, now_ms: u64, origin: Origin, req: GroupUpdateReq) {
        let chat = req.chat;
        let id = Some(req.client_msg_id);
        let reply = |code, text| error(origin.conn, code, text, id, true);
        if let Some(answer) = self.retry_answer(origin, chat, req.client_msg_id) {
            return self.reply_only(answer);
        }
        if self.overloaded() {
            return self.reply_only(reply(
                ErrorCode::Overloaded,
                "server busy: retry with the same client_msg_id",
            ));
        }
        let Some(meta) = self.state.chat(&chat).filter(|m| m.kind == ChatKind::Group) else {
            return self.reply_only(reply(ErrorCode::UnknownChat, "no such group"));
        };
        let Some(role) = meta.role(origin.user) else {
            return self.reply_only(reply(ErrorCode::NotMember, "not a member of this group"));
        };
        let is_admin = role != MemberRole::Member;
        if req.op != GroupOp::Leave && !is_admin {
            return self.reply_only(reply(
                ErrorCode::NotAllowed,
                "only admins may change the group",
            ));
        }
        let before: Vec<UserId> = meta.members.clone();
        let mut ev;
        let mut recipients = before.clone();
        match req.op {
            GroupOp::AddMembers => {
                ev = ChatEvent::new(EventKind::MembersAdded);
                for u in &req.users {
                    if !meta.is_member(*u) && !ev.users.contains(u) {
                        ev.users.push(*u);
                    }
                }
                if ev.users.is_empty() {
                    return self.reply_only(reply(
                        ErrorCode::InvalidArgument,
                        "every user named is already a member",
                    ));
                }
                if before.len() + ev.users.len() > self.limits.group_members_max {
                    return self.reply_only(reply(
                        ErrorCode::GroupFull,
                        "the group would exceed its member limit",
                    ));
                }
                recipients.extend(ev.users.iter().copied());
            }
            GroupOp::RemoveMembers => {
                ev = ChatEvent::new(EventKind::MembersRemoved);
                for u in &req.users {
                    if meta.is_member(*u) && !ev.users.contains(u) {
                        if meta.role(*u) == Some(MemberRole::Owner) {
                            return self.reply_only(reply(
                                ErrorCode::NotAllowed,
                                "the owner cannot be removed",
                            ));
                        }
                        if meta.role(*u) == Some(MemberRole::Admin) && role != MemberRole::Owner {
                            return self.reply_only(reply(
                                ErrorCode::NotAllowed,
                                "only the owner may remove admins",
                            ));
                        }
                        ev.users.push(*u);
                    }
                }
                if ev.users.is_empty() {
                    return self.reply_only(reply(
                        ErrorCode::InvalidArgument,
                        "no user named is a member",
                    ));
                }
            }
            GroupOp::Promote | GroupOp::Demote => {
                let promote = req.op == GroupOp::Promote;
                if !promote && role != MemberRole::Owner {
                    return self.reply_only(reply(
                        ErrorCode::NotAllowed,
                        "only the owner may demote admins",
                    ));
                }
                ev = ChatEvent::new(EventKind::RolesChanged);
                ev.role = if promote {
                    MemberRole::Admin
                } else {
                    MemberRole::Member
                };
                for u in &req.users {
                    let r = meta.role(*u);
                    let changes = matches!(
                        (promote, r),
                        (true, Some(MemberRole::Member)) | (false, Some(MemberRole::Admin))
                    );
                    if changes && !ev.users.contains(u) {
                        ev.users.push(*u);
                    }
                }
                if ev.users.is_empty() {
                    return self
                        .reply_only(reply(ErrorCode::InvalidArgument, "no role would change"));
                }
            }
            GroupOp::SetInfo => {
                ev = ChatEvent::new(EventKind::InfoChanged);
                ev.name = req.name;
                ev.description = req.description;
                ev.avatar_media_id = req.avatar_media_id;
                if ev.name.is_none() && ev.description.is_none() && ev.avatar_media_id.is_none() {
                    return self.reply_only(reply(ErrorCode::InvalidArgument, "nothing to change"));
                }
            }
            GroupOp::SetAdminsOnly => {
                ev = ChatEvent::new(EventKind::AdminsOnlyChanged);
                ev.admins_only = req.admins_only;
            }
            GroupOp::Leave => {
                ev = ChatEvent::new(EventKind::MemberLeft);
            }
            _ => {
                return self
                    .reply_only(reply(ErrorCode::InvalidArgument, "unknown group operation"))
            }
        }
        self.stage_event(now_ms, origin, chat, req.client_msg_id, &ev, recipients);
    }

    /// Stages a chat event as the chat's next message, answered with a `SendAck`.
    fn stage_event(
        &mut self,
        now_ms: u64,
        origin: Origin,
        chat: ChatId,
        id: ClientMsgId,
        ev: &ChatEvent,
        recipients: Vec<UserId>,
    ) {
        let m = NewMessage {
            client_msg_id: id,
            reply_to: Seq(0),
            content_kind: CONTENT_KIND_EVENT,
            flags: 0,
            payload: encode_event(ev),
            media_ids: Vec::new(),
        };
        let fanout = Fanout {
            extra: Vec::new(),
            recipients,
            ack_frame: None,
        };
        self.stage_message(now_ms, origin, chat, m, fanout);
    }

    /// `GetGroupInfo`: answered from the staged state (includes changes not yet durable; they
    /// are acknowledged before any later reply to this connection).
    pub fn on_group_info(&mut self, origin: Origin, request_id: u32, chat: ChatId) {
        let frame = match self.state.chat(&chat).filter(|m| m.kind == ChatKind::Group) {
            None => error_frame(ErrorCode::UnknownChat, "no such group", None, request_id),
            Some(m) if !m.is_member(origin.user) => error_frame(
                ErrorCode::NotMember,
                "not a member of this group",
                None,
                request_id,
            ),
            Some(m) => ServerFrame::GroupInfo(group_info(chat, m, request_id)),
        };
        self.reply_only(Effect::Reply {
            to: origin.conn,
            frame,
            completes_send: false,
        });
    }

    /// A `Delivered` or `Read` from a device.
    pub fn on_cursor(&mut self, origin: Origin, chat: ChatId, kind: CursorKind, up_to: Seq) {
        let err = |code, text| error(origin.conn, code, text, None, false);
        let Some(meta) = self.state.chat(&chat) else {
            return self.reply_only(err(ErrorCode::UnknownChat, "no such chat"));
        };
        if !meta.is_member(origin.user) {
            return self.reply_only(err(ErrorCode::NotMember, "not a member of this chat"));
        }
        if up_to.0 >= meta.next_seq.0 {
            return self.reply_only(err(
                ErrorCode::InvalidArgument,
                "cursor beyond the last message",
            ));
        }
        let group = meta.kind == ChatKind::Group;
        // Groups: only the aggregate is told (below), so the member list is not copied.
        let members = if group {
            Vec::new()
        } else {
            meta.members.clone()
        };
        let before_all = meta.all_members_cursors();
        let (delivered, read) = self.state.cursors(chat, origin.user, origin.device);
        let old = match kind {
            CursorKind::Delivered => delivered,
            CursorKind::Read => read,
        };
        if up_to <= old {
            return; // Already there: cursors never move back, nothing to store or tell.
        }
        let mut records = vec![Record::Cursor {
            chat,
            user: origin.user,
            device: origin.device,
            kind,
            seq: up_to,
        }];
        if kind == CursorKind::Read {
            // A read on one device is a read on all of them: move the other devices' read
            // cursors too (read implies delivered for each).
            for d in self.state.cursor_devices(chat, origin.user) {
                if *d != origin.device && self.state.cursors(chat, origin.user, *d).1 < up_to {
                    records.push(Record::Cursor {
                        chat,
                        user: origin.user,
                        device: *d,
                        kind,
                        seq: up_to,
                    });
                }
            }
        }
        self.push(records, Vec::new());
        let mut effects = Vec::new();
        if group {
            // Groups: one aggregated receipt ("delivered to / read by every member") when the
            // slowest member moves, instead of one receipt per member per message; a delivered
            // one goes to the authors of the messages it covers (see `aggregate_receipts`).
            effects.extend(self.aggregate_receipts(chat, before_all, Some(origin.conn)));
            // The reader's other devices learn the read position.
            if kind == CursorKind::Read {
                let receipt = Receipt {
                    chat,
                    from: Seq(old.0 + 1),
                    to: up_to,
                    user: origin.user,
                    kind: ReceiptKind::Read,
                };
                effects.push(Effect::Broadcast {
                    frame: ServerFrame::Receipt(receipt),
                    to_users: vec![origin.user],
                    skip: Some(origin.conn),
                });
            }
        } else {
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
            // The other member, and the reader's other devices (a read on one device is a read
            // on all of them).
            effects.push(Effect::Broadcast {
                frame: ServerFrame::Receipt(receipt),
                to_users: members,
                skip: Some(origin.conn),
            });
        }
        self.pending.back_mut().expect("just pushed").effects = effects;
    }

    /// Receipts for `user: 0` ("every member") when the slowest member's cursors moved past
    /// `before`, then forgets the authors of the messages every member now has.
    ///
    /// Who is told: "delivered to every member" matters only to the authors of the messages it
    /// covers, so it goes to the current members among them (all their devices but `skip`) when
    /// the chat's `ReceiptAuthors` (kept by the shard state) still holds every message of the
    /// range; otherwise (a member was more than `RECEIPT_AUTHORS_MAX` messages behind) to every
    /// member, as before. "Read by every member" always goes to every member: the authors are
    /// kept only above the delivered minimum, and keeping them down to the read minimum would
    /// hold a full queue in most groups (someone has always not read yet).
    fn aggregate_receipts(
        &mut self,
        chat: ChatId,
        before: (Seq, Seq),
        skip: Option<ConnRef>,
    ) -> Vec<Effect> {
        let Some(meta) = self.state.chat(&chat).filter(|m| m.kind == ChatKind::Group) else {
            return Vec::new();
        };
        let after = meta.all_members_cursors();
        let mut out = Vec::new();
        for (kind, b, a) in [
            (ReceiptKind::Delivered, before.0, after.0),
            (ReceiptKind::Read, before.1, after.1),
        ] {
            if a > b && a.0 != u64::MAX {
                let from = Seq(b.0 + 1);
                let authors = if kind == ReceiptKind::Delivered {
                    meta.receipt_authors.authors(from, a)
                } else {
                    None
                };
                let to_users = match authors {
                    Some(mut authors) => {
                        authors.retain(|u| meta.is_member(*u));
                        authors
                    }
                    None => meta.members.clone(),
                };
                let receipt = Receipt {
                    chat,
                    from,
                    to: a,
                    user: UserId(0),
                    kind,
                };
                out.push(Effect::Broadcast {
                    frame: ServerFrame::Receipt(receipt),
                    to_users,
                    skip,
                });
            }
        }
        self.state.trim_receipt_authors(chat);
        out
    }

    /// `GetReceipts`: every other current member's state for message `seq`.
    pub fn on_get_receipts(&mut self, origin: Origin, request_id: u32, chat: ChatId, seq: Seq) {
        let frame = match self.state.chat(&chat) {
            None => error_frame(ErrorCode::UnknownChat, "no such chat", None, request_id),
            Some(m) if !m.is_member(origin.user) => error_frame(
                ErrorCode::NotMember,
                "not a member of this chat",
                None,
                request_id,
            ),
            Some(m) if seq.0 >= m.next_seq.0 => error_frame(
                ErrorCode::InvalidArgument,
                "no such message",
                None,
                request_id,
            ),
            Some(m) => {
                let mut list = ReceiptList {
                    request_id,
                    chat,
                    seq,
                    delivered: Vec::new(),
                    read: Vec::new(),
                    pending: Vec::new(),
                };
                for u in m.members.iter().filter(|u| **u != origin.user) {
                    if m.visible_range(*u).is_some_and(|(first, _)| first > seq) {
                        continue; // joined after the message
                    }
                    let (d, r) = m.member_cursors.get(u).copied().unwrap_or_default();
                    if r >= seq {
                        list.read.push(*u);
                    } else if d >= seq {
                        list.delivered.push(*u);
                    } else {
                        list.pending.push(*u);
                    }
                }
                ServerFrame::ReceiptList(list)
            }
        };
        self.reply_only(Effect::Reply {
            to: origin.conn,
            frame,
            completes_send: false,
        });
    }

    /// `Typing`: forwarded to the other members' devices, never stored. Dropped for large groups,
    /// for non-members, and when the same user repeats "typing" within the throttle interval.
    /// `blocked_by`: whether a user blocked the typer (blocks live in 1:1 chats, possibly on
    /// other shards; the core keeps a replicated set).
    pub fn on_typing(
        &mut self,
        now_ms: u64,
        origin: Origin,
        chat: ChatId,
        typing: bool,
        blocked_by: &dyn Fn(UserId) -> bool,
    ) {
        let Some(meta) = self.state.chat(&chat) else {
            return;
        };
        // Not for non-members, big groups, or across a block.
        if !meta.is_member(origin.user)
            || meta.members.len() > self.limits.typing_group_members_max
            || !meta.blocked_by.is_empty()
        {
            return;
        }
        let key = (chat, origin.user);
        if let Some((at, last)) = self.typing.get(&key) {
            if typing && *last && now_ms.saturating_sub(*at) < self.limits.typing_throttle_ms {
                return;
            }
            if !typing && !*last {
                return;
            }
        }
        // Bounded: one entry per (chat, member) that typed; forgotten on "stop".
        if typing {
            self.typing.insert(key, (now_ms, true));
        } else {
            self.typing.remove(&key);
        }
        let others: Vec<UserId> = meta
            .members
            .iter()
            .copied()
            .filter(|u| *u != origin.user && !blocked_by(*u))
            .collect();
        let frame = ServerFrame::TypingNotice {
            chat,
            user: origin.user,
            typing,
        };
        self.reply_only(Effect::Broadcast {
            frame,
            to_users: others,
            skip: Some(origin.conn),
        });
    }

    /// An edit, delete or reaction; `target` is the stored target message (`None`: no such
    /// durable message).
    pub fn on_action(
        &mut self,
        now_ms: u64,
        origin: Origin,
        chat: ChatId,
        action: Action,
        target: Option<TargetInfo>,
    ) {
        let id = action.client_msg_id();
        let reply = |code, text| error(origin.conn, code, text, Some(id), true);
        if let Some(answer) = self.retry_answer(origin, chat, id) {
            return self.reply_only(answer);
        }
        if self.overloaded() {
            return self.reply_only(reply(
                ErrorCode::Overloaded,
                "server busy: retry with the same client_msg_id",
            ));
        }
        let Some(meta) = self.state.chat(&chat) else {
            return self.reply_only(reply(ErrorCode::UnknownChat, "no such chat"));
        };
        if !meta.is_member(origin.user) {
            return self.reply_only(reply(ErrorCode::NotMember, "not a member of this chat"));
        }
        let first_visible = meta.visible_range(origin.user).map_or(Seq(1), |r| r.0);
        let Some(t) = target.filter(|t| t.seq == action.target() && t.seq >= first_visible) else {
            return self.reply_only(reply(
                ErrorCode::InvalidArgument,
                "no such message (or not yet acknowledged)",
            ));
        };
        if t.content_kind == CONTENT_KIND_EVENT {
            return self.reply_only(reply(
                ErrorCode::InvalidArgument,
                "chat events cannot be edited, deleted or reacted to",
            ));
        }
        if t.content_kind == CONTENT_KIND_DELETED || self.state.is_deleted(chat, t.seq) {
            return self.reply_only(reply(ErrorCode::InvalidArgument, "the message was deleted"));
        }
        let age_ms = now_ms.saturating_sub(t.timestamp_ms);
        let mut purge = None;
        let ev = match action {
            Action::Edit { payload, .. } => {
                let window = self.limits.edit_window_ms;
                if let Some(text) = author_check(t, origin.user, age_ms, window, true) {
                    return self.reply_only(reply(ErrorCode::NotAllowed, text));
                }
                let mut ev = ChatEvent::new(EventKind::Edited);
                ev.payload = payload;
                ev
            }
            Action::Delete { .. } => {
                let window = self.limits.delete_window_ms;
                if let Some(text) = author_check(t, origin.user, age_ms, window, false) {
                    return self.reply_only(reply(ErrorCode::NotAllowed, text));
                }
                let mut seqs = vec![t.seq];
                seqs.extend_from_slice(self.state.edits_of(chat, t.seq));
                purge = Some(seqs);
                ChatEvent::new(EventKind::Deleted)
            }
            Action::React { reaction, .. } => {
                let mut ev = ChatEvent::new(EventKind::Reacted);
                ev.reaction = reaction;
                ev
            }
        };
        let mut ev = ev;
        ev.target = t.seq;
        let recipients = meta.members.clone();
        self.stage_event(now_ms, origin, chat, id, &ev, recipients);
        if let Some(seqs) = purge {
            // Only after the Deleted event is durable: a crash before the purge is completed at
            // the next start (see `Shard::open`), a crash during it by storage recovery.
            self.pending
                .back_mut()
                .expect("just staged")
                .effects
                .push(Effect::Purge { chat, seqs });
        }
    }

    /// Block or unblock `peer` in their 1:1 chat with the requester (created if needed, so the
    /// block has a home). Answered with `Done`.
    pub fn on_block(
        &mut self,
        now_ms: u64,
        origin: Origin,
        request_id: u32,
        chat: ChatId,
        peer: UserId,
        blocked: bool,
    ) {
        let done = Effect::Reply {
            to: origin.conn,
            frame: ServerFrame::Done { request_id },
            completes_send: false,
        };
        let mut records = Vec::new();
        match self.state.chat(&chat) {
            Some(meta) if !(meta.is_member(origin.user) && meta.is_member(peer)) => {
                let frame = error_frame(ErrorCode::Internal, "chat id collision", None, request_id);
                return self.reply_only(Effect::Reply {
                    to: origin.conn,
                    frame,
                    completes_send: false,
                });
            }
            Some(meta) if meta.blocked_by.contains(&origin.user) == blocked => {
                return self.reply_only(done)
            }
            Some(_) => {}
            None => records.push(Record::ChatCreated {
                chat,
                kind: ChatKind::Direct,
                members: vec![origin.user, peer],
                created_ms: now_ms,
            }),
        }
        records.push(Record::Block {
            chat,
            blocker: origin.user,
            blocked,
        });
        self.push(records, vec![done]);
    }

    /// Stages a user's presence state (home shard): last seen and visibilities.
    pub fn stage_user_meta(
        &mut self,
        user: UserId,
        last_seen_ms: u64,
        last_seen_vis: u8,
        online_vis: u8,
        effects: Vec<Effect>,
    ) {
        let record = Record::UserMeta {
            user,
            last_seen_ms,
            last_seen_visibility: last_seen_vis,
            online_visibility: online_vis,
        };
        self.push(vec![record], effects);
    }

    /// Takes staged work for one group commit: whole items, up to about `records_max` records.
    pub fn take_batch(&mut self, records_max: usize) -> Batch {
        let mut out = Batch::default();
        while let Some(item) = self.pending.front() {
            if !out.records.is_empty() && out.records.len() + item.records.len() > records_max {
                break;
            }
            let item = self.pending.pop_front().expect("front exists");
            // Items are taken in staging order: the first is the oldest.
            out.staged_at = out.staged_at.or(item.staged_at);
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

/// Why `user` may not edit or delete `t` now (`None`: they may): only its author, and only within
/// the window.
fn author_check(
    t: TargetInfo,
    user: UserId,
    age_ms: u64,
    window_ms: u64,
    edit: bool,
) -> Option<&'static str> {
    if t.sender != user {
        return Some(if edit {
            "only the author may edit a message"
        } else {
            "only the author may delete a message for everyone"
        });
    }
    (age_ms > window_ms).then_some(if edit {
        "the edit window has passed"
    } else {
        "the delete window has passed"
    })
}

fn group_info(chat: ChatId, m: &ChatMeta, request_id: u32) -> GroupInfo {
    let g = m.group.as_deref().cloned().unwrap_or_default();
    GroupInfo {
        request_id,
        chat,
        members: m
            .members
            .iter()
            .map(|u| (*u, g.roles.get(u).copied().unwrap_or(MemberRole::Member)))
            .collect(),
        name: g.name,
        description: g.description,
        avatar_media_id: g.avatar_media_id,
        admins_only: g.admins_only,
        created_ms: m.created_ms,
        last_seq: Seq(m.next_seq.0 - 1),
    }
}

/// The wire form of a stored message (a purged one keeps only its ids).
pub fn message_frame(m: &StoredMessage) -> Message {
    let deleted = m.content_kind == CONTENT_KIND_DELETED;
    Message {
        chat: m.chat,
        seq: m.seq,
        msg_id: m.msg_id,
        sender_user: m.sender_user,
        sender_device: m.sender_device,
        timestamp_ms: m.timestamp_ms,
        payload: if deleted {
            Vec::new()
        } else {
            m.payload.clone()
        },
        reply_to: m.reply_to,
        content_kind: ContentKind(m.content_kind),
        client_msg_id: m.client_msg_id,
        forwarded: m.flags & MESSAGE_FLAG_FORWARDED != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_storage::RECEIPT_AUTHORS_MAX;
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
            forwarded: false,
            media_ids: Vec::new(),
        }
    }

    fn owner() -> Owner {
        Owner::new(
            0,
            ShardState::new(100),
            MsgId(0),
            OwnerLimits {
                pending_records_max: 10,
                ..OwnerLimits::default()
            },
        )
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
    fn media_ids_become_grants_in_the_message_batch() {
        let mut o = owner();
        let chat = ChatId::direct(A, B);
        let mut req = send(1, B, 0);
        req.media_ids = vec!["photo1".into(), "photo2".into()];
        o.on_send(1_700_000_000_000, origin(A), chat, Some(B), req);
        let b = o.take_batch(100);
        let grants: Vec<(u64, &str)> = b
            .records
            .iter()
            .filter_map(|r| match r {
                Record::MediaGrant {
                    chat: c,
                    seq,
                    media_id,
                } if *c == chat => Some((seq.0, media_id.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(grants, vec![(1, "photo1"), (1, "photo2")]);
        // After the message record, in the same batch.
        assert!(matches!(b.records[1], Record::Message(_)));
        let meta = o.state.chat(&chat).unwrap();
        assert!(!meta.media_visible_to(B, "photo1"), "not durable yet");
        o.committed(&b);
        let meta = o.state.chat(&chat).unwrap();
        assert!(meta.media_visible_to(B, "photo1") && meta.media_visible_to(A, "photo2"));
        assert!(!meta.media_visible_to(UserId(99), "photo1"));
        // A refused send records no grant.
        let mut req = send(2, B, 0);
        req.media_ids = vec!["photo3".into()];
        o.on_send(1_700_000_000_001, origin(UserId(99)), chat, None, req);
        let b = o.take_batch(100);
        assert!(b.records.is_empty());
        assert!(!o.state.chat(&chat).unwrap().media.contains_key("photo3"));
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
    fn a_batch_carries_the_staging_time_of_its_oldest_item() {
        let mut o = owner();
        let chat = ChatId::direct(A, B);
        assert_eq!(o.take_batch(10).staged_at, None);
        o.on_send(1, origin(A), chat, Some(B), send(1, B, 0)); // 2 records
        let first = o.pending.front().and_then(|b| b.staged_at).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        o.on_send(1, origin(A), chat, Some(B), send(2, B, 0));
        let second = o.pending.back().and_then(|b| b.staged_at).unwrap();
        assert!(second > first);
        // Cut after the first item: each batch starts at its own oldest item, so work left
        // pending under sustained load is never timed from an older batch.
        let b = o.take_batch(2);
        assert_eq!((b.records.len(), b.staged_at), (2, Some(first)));
        let b = o.take_batch(2);
        assert_eq!((b.records.len(), b.staged_at), (1, Some(second)));
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
    fn pressure_turns_on_at_a_quarter_of_the_limit_and_off_at_an_eighth() {
        // pending_records_max = 20: on at 5 staged records, off at <= 2.
        let mut o = Owner::new(
            0,
            ShardState::new(100),
            MsgId(0),
            OwnerLimits {
                pending_records_max: 20,
                ..OwnerLimits::default()
            },
        );
        assert_eq!(pressure_marks(20), (5, 2));
        assert_eq!(pressure_marks(16_384), (4096, 2048));
        assert_eq!(pressure_marks(1), (1, 0));
        let chat = ChatId::direct(A, B);
        let mut on = false;
        let mut seen = Vec::new();
        // The first send stages ChatCreated + Message, each later one a Message.
        for i in 0..4 {
            o.on_send(1, origin(A), chat, Some(B), send(i, B, 0));
            on = o.pressure(on);
            seen.push((o.pending_records, on));
        }
        assert_eq!(seen, vec![(2, false), (3, false), (4, false), (5, true)]);
        // Draining (the first item is taken whole): still on above the low mark, off at it.
        let mut seen = Vec::new();
        for _ in 0..3 {
            let b = o.take_batch(1);
            o.committed(&b);
            on = o.pressure(on);
            seen.push((o.pending_records, on));
        }
        assert_eq!(seen, vec![(3, true), (2, false), (1, false)]);
        // Off again, it takes the high mark to turn it on.
        o.on_send(1, origin(A), chat, Some(B), send(10, B, 0));
        o.on_send(1, origin(A), chat, Some(B), send(11, B, 0));
        assert_eq!((o.pending_records, o.pressure(false)), (3, false));
        assert!(o.pressure(true), "3 > 2: a shard that was on stays on");
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
                Effect::Broadcast {
                    frame: ServerFrame::Receipt(receipt),
                    to_users,
                    ..
                } => (receipt.from.0, receipt.to.0, receipt.kind, to_users.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            receipts,
            vec![
                // Both members' devices except the reporting connection: the sender, and the
                // reader's other devices.
                (1, 2, ReceiptKind::Delivered, vec![A, B]),
                (1, 3, ReceiptKind::Read, vec![A, B])
            ]
        );
    }

    const D: UserId = UserId(4);

    /// A group's id and the `CreateGroup` of `creator` with `others`.
    fn create_req(creator: UserId, others: &[UserId]) -> (ChatId, CreateGroupReq) {
        let id = ClientMsgId::from_halves(creator.0, 999);
        let req = CreateGroupReq {
            request_id: 1,
            client_msg_id: id,
            name: "g".into(),
            description: String::new(),
            avatar_media_id: String::new(),
            members: others.to_vec(),
            admins_only: false,
        };
        (ChatId::group(creator, id), req)
    }

    /// Creates a group of `creator` and `others` (seq 1, by `creator`), committed.
    fn group(o: &mut Owner, creator: UserId, others: &[UserId]) -> ChatId {
        let (chat, req) = create_req(creator, others);
        o.on_create_group(1, origin(creator), chat, req);
        commit(o);
        chat
    }

    /// Takes and commits everything staged.
    fn commit(o: &mut Owner) -> Batch {
        let b = o.take_batch(usize::MAX);
        o.committed(&b);
        b
    }

    fn group_send(o: &mut Owner, from: UserId, chat: ChatId, id: u64) -> Batch {
        let mut req = send(id, from, 0);
        req.target = Target::Chat(chat);
        o.on_send(1, origin(from), chat, None, req);
        commit(o)
    }

    fn cursor(o: &mut Owner, user: UserId, chat: ChatId, kind: CursorKind, seq: u64) -> Batch {
        o.on_cursor(origin(user), chat, kind, Seq(seq));
        commit(o)
    }

    /// The aggregated receipts of a batch: (from, to, kind, users told).
    fn aggregates(b: &Batch) -> Vec<(u64, u64, ReceiptKind, Vec<UserId>)> {
        b.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Broadcast {
                    frame: ServerFrame::Receipt(r),
                    to_users,
                    ..
                } if r.user == UserId(0) => Some((r.from.0, r.to.0, r.kind, to_users.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn group_delivered_receipts_go_to_the_authors_only() {
        let mut o = owner();
        // Seq 1 (the creation) by A, seq 2 by B, seq 3 by A.
        let chat = group(&mut o, A, &[B, C, D]);
        assert!(aggregates(&group_send(&mut o, B, chat, 1)).is_empty());
        assert!(aggregates(&group_send(&mut o, A, chat, 2)).is_empty());
        // Own sends raised A to 3 and B to 2; C and D have nothing yet.
        assert!(aggregates(&cursor(&mut o, C, chat, CursorKind::Delivered, 3)).is_empty());
        let b = cursor(&mut o, D, chat, CursorKind::Delivered, 3);
        assert_eq!(
            aggregates(&b),
            vec![(1, 2, ReceiptKind::Delivered, vec![A, B])]
        );
        // The skip is the reporting connection, as before.
        assert!(matches!(
            &b.effects[..],
            [Effect::Broadcast { skip: Some(c), .. }] if *c == origin(D).conn
        ));
        let b = cursor(&mut o, B, chat, CursorKind::Delivered, 3);
        assert_eq!(
            aggregates(&b),
            vec![(3, 3, ReceiptKind::Delivered, vec![A])]
        );
        // A send that completes an aggregate: D is the last to have seq 4, by sending seq 5.
        group_send(&mut o, A, chat, 3); // seq 4
        cursor(&mut o, B, chat, CursorKind::Delivered, 4);
        cursor(&mut o, C, chat, CursorKind::Delivered, 4);
        let b = group_send(&mut o, D, chat, 4); // seq 5
        assert_eq!(
            aggregates(&b),
            vec![(4, 4, ReceiptKind::Delivered, vec![A])]
        );
        // Read aggregates still go to every member. D has seq 5 (its own), so C's read of it
        // completes both aggregates.
        for u in [A, B] {
            cursor(&mut o, u, chat, CursorKind::Read, 5);
        }
        let b = cursor(&mut o, C, chat, CursorKind::Read, 5);
        assert_eq!(
            aggregates(&b),
            vec![
                (5, 5, ReceiptKind::Delivered, vec![D]),
                (1, 5, ReceiptKind::Read, vec![A, B, C, D])
            ]
        );
        // An author who left is not told; events count as their author's messages.
        let req = GroupUpdateReq::new(ClientMsgId::from_halves(0, 50), chat, GroupOp::Leave);
        o.on_group_update(1, origin(B), req); // seq 6, by B
        commit(&mut o);
        group_send(&mut o, C, chat, 5); // seq 7
        cursor(&mut o, A, chat, CursorKind::Delivered, 7);
        let b = cursor(&mut o, D, chat, CursorKind::Delivered, 7);
        assert_eq!(
            aggregates(&b),
            vec![(6, 7, ReceiptKind::Delivered, vec![C])]
        );
        assert!(o.state.chat(&chat).unwrap().receipt_authors.is_empty());
    }

    #[test]
    fn group_delivered_receipts_fall_back_to_every_member_when_not_covered() {
        let mut o = owner();
        let chat = group(&mut o, A, &[B, C]);
        // C is behind by more messages than the authors are kept for.
        let n = RECEIPT_AUTHORS_MAX as u64 + 10;
        for i in 0..n {
            group_send(&mut o, A, chat, 100 + i);
        }
        let last = 1 + n;
        cursor(&mut o, B, chat, CursorKind::Delivered, last);
        let b = cursor(&mut o, C, chat, CursorKind::Delivered, last);
        assert_eq!(
            aggregates(&b),
            vec![(1, last, ReceiptKind::Delivered, vec![A, B, C])]
        );
        // Caught up: the next range is covered again.
        group_send(&mut o, B, chat, 1);
        cursor(&mut o, A, chat, CursorKind::Delivered, last + 1);
        let b = cursor(&mut o, C, chat, CursorKind::Delivered, last + 1);
        assert_eq!(
            aggregates(&b),
            vec![(last + 1, last + 1, ReceiptKind::Delivered, vec![B])]
        );
    }

    #[test]
    fn group_receipt_authors_are_rebuilt_after_a_restart() {
        let mut o = owner();
        let (chat, req) = create_req(A, &[B, C]);
        o.on_create_group(1, origin(A), chat, req);
        let mut log = commit(&mut o).records;
        for i in 0..3 {
            log.extend(group_send(&mut o, B, chat, 200 + i).records); // seqs 2..=4
        }
        let state = ShardState::recover(100, &log);
        let mut o = Owner::new(0, state, MsgId(0), OwnerLimits::default());
        cursor(&mut o, A, chat, CursorKind::Delivered, 4);
        let b = cursor(&mut o, C, chat, CursorKind::Delivered, 4);
        assert_eq!(
            aggregates(&b),
            vec![(1, 4, ReceiptKind::Delivered, vec![A, B])]
        );
    }

    #[test]
    fn group_receipt_authors_never_exceed_their_bound() {
        let mut o = owner();
        let chat = group(&mut o, A, &[B, C]);
        // C never reports: nothing is ever delivered to everyone.
        for i in 0..3 * RECEIPT_AUTHORS_MAX as u64 {
            group_send(&mut o, if i % 2 == 0 { A } else { B }, chat, 100 + i);
            let seq = i + 2;
            for u in [A, B] {
                cursor(&mut o, u, chat, CursorKind::Delivered, seq);
            }
            let held = o.state.chat(&chat).unwrap().receipt_authors.len();
            assert!(held <= RECEIPT_AUTHORS_MAX, "{held} after seq {seq}");
        }
        let held = o.state.chat(&chat).unwrap().receipt_authors.len();
        assert_eq!(held, RECEIPT_AUTHORS_MAX);
        // Once C has everything, the queue is emptied.
        let last = 1 + 3 * RECEIPT_AUTHORS_MAX as u64;
        let b = cursor(&mut o, C, chat, CursorKind::Delivered, last);
        assert_eq!(
            aggregates(&b),
            vec![(1, last, ReceiptKind::Delivered, vec![A, B, C])]
        );
        assert!(o.state.chat(&chat).unwrap().receipt_authors.is_empty());
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
