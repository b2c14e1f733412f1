//! Owned, validated frames: what the rest of the server and the client library work with. The
//! codec (`crate::codec`) turns bytes into these after FlatBuffers verification and checks of
//! every field, and back.

use crate::ids::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};

pub use crate::fb::{ContentKind, ErrorCode, ReceiptKind};

/// Frames a client sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Send(SendReq),
    Delivered {
        chat: ChatId,
        up_to: Seq,
    },
    Read {
        chat: ChatId,
        up_to: Seq,
    },
    Sync {
        request_id: u32,
        cursors: Vec<(ChatId, Seq)>,
    },
    History {
        request_id: u32,
        chat: ChatId,
        before: Seq,
        limit: u32,
    },
    Ping {
        nonce: u64,
    },
    /// Create a group; answered with [`ServerFrame::GroupInfo`] of the same `request_id`.
    CreateGroup(CreateGroupReq),
    /// Change a group; answered like a `Send`, with a `SendAck` for its `client_msg_id`.
    GroupUpdate(GroupUpdateReq),
    /// Ask for a group's info; answered with [`ServerFrame::GroupInfo`] of the same `request_id`.
    GetGroupInfo {
        request_id: u32,
        chat: ChatId,
    },
    /// Replace the content of one's own message `target`; answered with a `SendAck`.
    Edit {
        client_msg_id: ClientMsgId,
        chat: ChatId,
        target: Seq,
        payload: Vec<u8>,
    },
    /// Delete one's own message `target` for everyone; answered with a `SendAck`.
    Delete {
        client_msg_id: ClientMsgId,
        chat: ChatId,
        target: Seq,
    },
    /// Set (non-empty) or remove (empty) one's reaction to message `target`; answered with a
    /// `SendAck`.
    React {
        client_msg_id: ClientMsgId,
        chat: ChatId,
        target: Seq,
        reaction: String,
    },
    /// Typing started (`true`) or stopped. Ephemeral: not stored, not answered.
    Typing {
        chat: ChatId,
        typing: bool,
    },
    /// Who has received and read message `seq` of `chat`; answered with
    /// [`ServerFrame::ReceiptList`] of the same `request_id`.
    GetReceipts {
        request_id: u32,
        chat: ChatId,
        seq: Seq,
    },
    /// Block (`blocked: true`) or unblock `user`: a blocked user's 1:1 messages are refused with
    /// `Blocked`, and neither side sees the other's presence or typing. Answered with
    /// [`ServerFrame::Done`] of the same `request_id`.
    Block {
        request_id: u32,
        user: UserId,
        blocked: bool,
    },
    /// Replace this connection's presence subscriptions with `users` (empty: none; duplicates
    /// are allowed, the server removes them). Answered with [`ServerFrame::Done`] of the same
    /// `request_id`, then a [`ServerFrame::Presence`] for each user, then one per change.
    Subscribe {
        request_id: u32,
        users: Vec<UserId>,
    },
    /// Who may see this user's last-seen time and online status. Answered with
    /// [`ServerFrame::Done`] of the same `request_id`.
    SetPrivacy {
        request_id: u32,
        last_seen: Visibility,
        online: Visibility,
    },
}

/// Where a `Send` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Chat(ChatId),
    /// The 1:1 chat with this user (created on first send).
    Peer(UserId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendReq {
    pub client_msg_id: ClientMsgId,
    pub target: Target,
    pub payload: Vec<u8>,
    /// `Seq(0)`: not a reply.
    pub reply_to: Seq,
    pub content_kind: ContentKind,
    pub forwarded: bool,
    /// Media objects the message refers to (unencrypted so the owner can grant access to the
    /// chat's members); at most `SEND_MEDIA_IDS_MAX`.
    pub media_ids: Vec<String>,
}

/// Frames the server sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    SendAck(SendAck),
    Message(Message),
    Receipt(Receipt),
    HistoryPage(HistoryPage),
    SyncDone {
        request_id: u32,
        messages: u32,
        more: bool,
    },
    Error(ErrorFrame),
    Pong {
        nonce: u64,
    },
    /// The answer to `CreateGroup` or `GetGroupInfo`.
    GroupInfo(GroupInfo),
    /// `user` started or stopped typing in `chat`.
    TypingNotice {
        chat: ChatId,
        user: UserId,
        typing: bool,
    },
    /// The answer to `GetReceipts`.
    ReceiptList(ReceiptList),
    /// A request without other results (`Block`, `Subscribe`, `SetPrivacy`) succeeded.
    Done {
        request_id: u32,
    },
    /// A subscribed user's presence: the current state after `Subscribe`'s `Done`, then changes.
    Presence(Presence),
    /// This device's one-time prekeys in the key directory ran low (v1.3): upload more.
    PrekeysLow {
        device: DeviceId,
        remaining: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendAck {
    pub client_msg_id: ClientMsgId,
    pub chat: ChatId,
    pub seq: Seq,
    pub msg_id: MsgId,
    pub timestamp_ms: u64,
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub chat: ChatId,
    pub seq: Seq,
    pub msg_id: MsgId,
    pub sender_user: UserId,
    pub sender_device: DeviceId,
    pub timestamp_ms: u64,
    pub payload: Vec<u8>,
    pub reply_to: Seq,
    pub content_kind: ContentKind,
    pub client_msg_id: ClientMsgId,
    pub forwarded: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub chat: ChatId,
    pub from: Seq,
    pub to: Seq,
    pub user: UserId,
    pub kind: ReceiptKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    pub request_id: u32,
    pub chat: ChatId,
    /// Newest first.
    pub messages: Vec<Message>,
    pub has_more: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub text: String,
    /// Set when the error answers a `Send`.
    pub client_msg_id: Option<ClientMsgId>,
    /// Non-zero when the error answers a request with a `request_id` (`Sync`, `History`,
    /// `CreateGroup`, `GetGroupInfo`, `GetReceipts`, `Block`, `Subscribe`, `SetPrivacy`).
    pub request_id: u32,
}

// ------------------------------------------------------------------ groups and message actions

pub use crate::fb::{EventKind, GroupOp, MemberRole};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateGroupReq {
    pub request_id: u32,
    pub client_msg_id: ClientMsgId,
    pub name: String,
    pub description: String,
    pub avatar_media_id: String,
    /// Initial members besides the creator (deduplicated by the server).
    pub members: Vec<UserId>,
    pub admins_only: bool,
}

/// A change to a group. The decoder keeps only the fields `op` uses: `users` is empty unless
/// `op` is `AddMembers`, `RemoveMembers`, `Promote` or `Demote`; the three strings are `None`
/// unless `op` is `SetInfo`; `admins_only` is false unless `op` is `SetAdminsOnly`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupUpdateReq {
    pub client_msg_id: ClientMsgId,
    pub chat: ChatId,
    pub op: GroupOp,
    pub users: Vec<UserId>,
    /// `SetInfo`: `None` leaves the field as it is.
    pub name: Option<String>,
    pub description: Option<String>,
    pub avatar_media_id: Option<String>,
    pub admins_only: bool,
}

impl GroupUpdateReq {
    /// An update of `chat` with `op` and every other field empty: fill in what `op` needs.
    pub fn new(client_msg_id: ClientMsgId, chat: ChatId, op: GroupOp) -> GroupUpdateReq {
        GroupUpdateReq {
            client_msg_id,
            chat,
            op,
            users: Vec::new(),
            name: None,
            description: None,
            avatar_media_id: None,
            admins_only: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    pub request_id: u32,
    pub chat: ChatId,
    pub name: String,
    pub description: String,
    pub avatar_media_id: String,
    pub members: Vec<(UserId, MemberRole)>,
    pub admins_only: bool,
    pub created_ms: u64,
    pub last_seq: Seq,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiptList {
    pub request_id: u32,
    pub chat: ChatId,
    pub seq: Seq,
    pub delivered: Vec<UserId>,
    pub read: Vec<UserId>,
    pub pending: Vec<UserId>,
}

/// The payload of a `Message` with `ContentKind::Event`: a change to the chat, in its sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatEvent {
    pub kind: EventKind,
    pub users: Vec<UserId>,
    pub role: MemberRole,
    pub name: Option<String>,
    pub description: Option<String>,
    pub avatar_media_id: Option<String>,
    pub admins_only: bool,
    pub target: Seq,
    pub payload: Vec<u8>,
    pub reaction: String,
}

impl ChatEvent {
    /// An event of `kind` with every other field empty.
    pub fn new(kind: EventKind) -> ChatEvent {
        ChatEvent {
            kind,
            users: Vec::new(),
            role: MemberRole::Member,
            name: None,
            description: None,
            avatar_media_id: None,
            admins_only: false,
            target: Seq(0),
            payload: Vec::new(),
            reaction: String::new(),
        }
    }
}

// ------------------------------------------------------------------ blocking and presence

pub use crate::fb::Visibility;

/// `user`'s presence as this connection's user may see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presence {
    pub user: UserId,
    pub online: bool,
    /// When the user was last online, Unix ms; 0 when hidden or unknown.
    pub last_seen_ms: u64,
    /// The user's privacy settings, or a block between the two users, hide (part of) their
    /// presence from this viewer; what is hidden reads as `online: false` / `last_seen_ms: 0`.
    pub hidden: bool,
}
