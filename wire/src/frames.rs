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
    /// Non-zero when the error answers a `Sync` or `History`.
    pub request_id: u32,
}
