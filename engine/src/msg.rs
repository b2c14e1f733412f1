//! What cores say to each other. Every item crosses a bounded core-to-core channel inside a
//! batch (`Vec<CoreMsg>`); nothing here is shared mutable state.

use std::net::IpAddr;
use std::sync::Arc;
use switchboard_api::accounts::Phone;
use switchboard_api::keys::KeyUpload;
use switchboard_storage::CursorKind;
use switchboard_wire::{
    ChatId, ClientMsgId, CreateGroupReq, DeviceId, GroupUpdateReq, SendReq, Seq, UserId,
};

/// A message action. Each becomes a `ChatEvent` in the chat's sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Edit {
        client_msg_id: ClientMsgId,
        target: Seq,
        payload: Vec<u8>,
    },
    Delete {
        client_msg_id: ClientMsgId,
        target: Seq,
    },
    React {
        client_msg_id: ClientMsgId,
        target: Seq,
        reaction: String,
    },
}

impl Action {
    pub fn client_msg_id(&self) -> ClientMsgId {
        match self {
            Action::Edit { client_msg_id, .. }
            | Action::Delete { client_msg_id, .. }
            | Action::React { client_msg_id, .. } => *client_msg_id,
        }
    }
    pub fn target(&self) -> Seq {
        match self {
            Action::Edit { target, .. }
            | Action::Delete { target, .. }
            | Action::React { target, .. } => *target,
        }
    }
}

/// A connection: the core that owns it and its id there (never reused while the process lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// A request of the HTTP API for the core owning the state (see `accounts_svc.rs`). Inputs are
/// validated by the calling core; the owner checks them against its state.
#[derive(Debug)]
pub enum ApiReq {
    /// At the phone's home core: start a login (code + SMS).
    Register {
        phone: Phone,
        addr: IpAddr,
    },
    /// At the phone's home core: check the code, log the device in.
    Verify {
        phone: String,
        code: String,
        device_name: String,
        addr: IpAddr,
    },
    /// At the user's core: a new token; tokens expiring by `expires_s` are revoked.
    Refresh {
        user: UserId,
        device: DeviceId,
        expires_s: u64,
    },
    /// Logout or device removal: the device, its keys and its tokens go.
    RemoveDevice {
        user: UserId,
        device: DeviceId,
    },
    Devices {
        user: UserId,
    },
    GetProfile {
        user: UserId,
        with_phone: bool,
    },
    PutProfile {
        user: UserId,
        patch: crate::accounts_svc::ProfilePatch,
    },
    /// Which of these phones (all homed on the receiving core) have accounts.
    Lookup {
        phones: Vec<Phone>,
    },
    PutKeys {
        user: UserId,
        device: DeviceId,
        upload: KeyUpload,
    },
    /// Consumes one one-time prekey of (user, device).
    FetchKeys {
        user: UserId,
        device: DeviceId,
    },
    /// The device's own prekey count.
    KeyCount {
        user: UserId,
        device: DeviceId,
    },
    /// At the chat's owner core: may `user` fetch `media_id` because a message of `chat` named
    /// it? (`media_svc.rs`; 204 yes, 403 no.)
    MediaAccess {
        user: UserId,
        chat: ChatId,
        media_id: String,
    },
}

#[derive(Debug)]
pub enum CoreMsg {
    // ---- HTTP API calls (calls.rs)
    Api {
        from: crate::calls::CallRef,
        req: ApiReq,
    },
    ApiReply {
        id: u64,
        reply: crate::api_http::Reply,
    },
    /// A durable revocation, for every core's replica: tokens of (user, device) expiring at or
    /// before `through_s` are refused; `removed` also closes the device's connections.
    Revoked {
        user: UserId,
        device: DeviceId,
        through_s: u64,
        removed: bool,
    },
    /// The sending core has broadcast every revocation it recovered at start-up.
    RevocationsLoaded,
    /// Shard `shard`'s pressure ended (`Shard::run_pressure_announcer`): wake the connections
    /// throttled for it (`Core::throttle_if_pressed`, back-pressure instead of `Overloaded`).
    PressureOff {
        shard: u32,
    },
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
        /// Connect time, µs since the epoch: the newest connection of a device wins everywhere.
        epoch: u64,
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
    /// Block or unblock, for the owner of the 1:1 chat.
    Block {
        origin: Origin,
        request_id: u32,
        chat: ChatId,
        peer: UserId,
        blocked: bool,
    },
    /// A block changed (sent to every core's replicated block set).
    BlockState {
        blocker: UserId,
        blocked: UserId,
        on: bool,
    },
    /// Presence subscription, step 1, at the owner of the viewer's 1:1 chat with `target`:
    /// are they contacts, is either blocked?
    PresenceCheck {
        origin: Origin,
        target: UserId,
    },
    /// Presence subscription, step 2, at the target's home core.
    PresenceSub {
        origin: Origin,
        target: UserId,
        contact: bool,
        blocked: bool,
    },
    PresenceUnsub {
        conn: ConnRef,
        target: UserId,
    },
    /// New privacy settings, for the user's home core. Visibility: 0 everyone, 1 contacts, 2 nobody.
    SetPrivacy {
        origin: Origin,
        request_id: u32,
        last_seen: u8,
        online: u8,
    },
    /// An edit, delete or reaction for the chat's owner.
    Action {
        origin: Origin,
        chat: ChatId,
        action: Action,
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
