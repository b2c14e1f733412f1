//! What cores say to each other. Every item crosses a bounded core-to-core channel inside a
//! batch (`Vec<CoreMsg>`); nothing here is shared mutable state.

use std::sync::Arc;
use switchboard_storage::CursorKind;
use switchboard_wire::{ChatId, CreateGroupReq, DeviceId, GroupUpdateReq, SendReq, Seq, UserId};

/// A connection: the core that owns it and its id there (never reused while the process lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef {
    pub core: usize,
    pub conn: u64,
}

/// Who asked: the connection and the authenticated user and device behind it.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    pub conn: ConnRef,
    pub user: UserId,
    pub device: DeviceId,
}

/// An encoded server frame, encoded once and shared by every connection that gets it.
pub type Frame = Arc<[u8]>;

/// How a connection treats a frame pushed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// An answer to a request; `completes_send` frees one in-flight send slot.
    Reply { completes_send: bool },
    /// A live message of a chat.
    Live { chat: ChatId, seq: Seq },
    /// A message sent in answer to the connection's `Sync`.
    SyncMessage { chat: ChatId, seq: Seq },
}

#[derive(Debug)]
pub enum CoreMsg {
    // ---- to the chat's owner core
    Send {
        origin: Origin,
        chat: ChatId,
        peer: Option<UserId>,
        req: SendReq,
    },
    Cursor {
        origin: Origin,
        chat: ChatId,
        kind: CursorKind,
        up_to: Seq,
    },
    Sync {
        origin: Origin,
        request_id: u32,
        cursors: Arc<Vec<(ChatId, Seq)>>,
    },
    History {
        origin: Origin,
        request_id: u32,
        chat: ChatId,
        before: Seq,
        limit: u32,
    },
    CreateGroup {
        origin: Origin,
        chat: ChatId,
        req: CreateGroupReq,
    },
    GroupUpdate {
        origin: Origin,
        req: GroupUpdateReq,
    },
    GroupInfo {
        origin: Origin,
        request_id: u32,
        chat: ChatId,
    },
    Typing {
        origin: Origin,
        chat: ChatId,
        typing: bool,
    },
    GetReceipts {
        origin: Origin,
        request_id: u32,
        chat: ChatId,
        seq: Seq,
    },
    // ---- replicated directory of connected devices (sent to every core)
    Online {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
    },
    Offline {
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
    },
    // ---- to connections on the receiving core
    /// One live message for several local connections: fan-out sends one of these per core.
    Deliver {
        frame: Frame,
        chat: ChatId,
        seq: Seq,
        conns: Vec<u64>,
    },
    ToConn {
        conn: u64,
        frame: Frame,
        kind: FrameKind,
    },
    /// One frame (receipt, typing notice) for several local connections.
    Broadcast {
        frame: Frame,
        conns: Vec<u64>,
    },
    /// One shard finished its part of a `Sync`.
    SyncPart {
        conn: u64,
        request_id: u32,
        more: bool,
    },
}
