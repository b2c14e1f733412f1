//! The blocking client: one TCP connection, one WebSocket, one thread.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use switchboard_wire::limits::SERVER_FRAME_BYTES_MAX;
use switchboard_wire::{
    decode_server, ChatId, ClientFrame, ClientMsgId, ContentKind, CreateGroupReq, DecodeError,
    Encoder, GroupInfo, GroupUpdateReq, HistoryPage, Message, ReceiptList, SendAck, SendReq, Seq,
    ServerFrame, Target, UserId, Visibility,
};
use tungstenite::client::{ClientRequestBuilder, IntoClientRequest};
use tungstenite::handshake::HandshakeError;
use tungstenite::http::Uri;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Bytes, WebSocket};

use crate::cursors::Cursors;
use crate::error::ClientError;
use crate::msg_id::new_client_msg_id;

/// The WebSocket endpoint on the server.
pub const WS_PATH: &str = "/v1/ws";

/// Most server frames kept aside while a call waits for a specific answer (`send_and_wait_ack`,
/// `sync`, `history`, `ping_pong`, the group, message-action, blocking and presence calls); `recv`
/// returns them first. A frame is at most `SERVER_FRAME_BYTES_MAX` (512 KiB) but almost all are a
/// few hundred bytes, so the usual cost is well under 1 MiB. A client that never calls `recv` while being pushed messages hits this
/// limit and gets `ClientError::Protocol` (the frame that did not fit is dropped) instead of
/// growing without bound.
pub const STASH_FRAMES_MAX: usize = 4096;

/// Bytes read from the socket per `read` call. Small, because the load generator holds many
/// clients; a large frame just takes several reads.
pub const READ_BUFFER_BYTES: usize = 4096;

/// Shortest read timeout put on the socket: `set_read_timeout(Some(0))` is an error, and a
/// timeout of 0 must still poll once.
const READ_TIMEOUT_MIN: Duration = Duration::from_millis(1);

/// Close code reported when the server's Close frame carried no code (RFC 6455 7.1.5).
const CLOSE_CODE_NO_STATUS: u16 = 1005;

/// How to reach and authenticate to a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port` of the server's WebSocket listener. Default `"127.0.0.1:7070"`.
    pub addr: String,
    /// Bearer token. Empty: no token is sent at all (the server answers 401). Default empty.
    pub token: String,
    /// Send the token as `?token=` in the URL (what browsers must do) instead of an
    /// `Authorization: Bearer` header. Default `false`.
    pub token_in_query: bool,
    /// Limit on the TCP connect, per resolved address. Default 5 s.
    pub connect_timeout: Duration,
    /// Limit on the upgrade handshake, on each blocked socket write and on the close handshake.
    /// Reads are bounded by the timeout each call takes instead. Default 10 s.
    pub io_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addr: "127.0.0.1:7070".to_string(),
            token: String::new(),
            token_in_query: false,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }
}

impl ClientConfig {
    /// Defaults with this address and token.
    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            addr: addr.into(),
            token: token.into(),
            ..ClientConfig::default()
        }
    }

    /// Checks what can be checked without connecting: non-zero timeouts and an address and
    /// token that fit in a request line / header.
    pub fn validate(&self) -> Result<(), ClientError> {
        let invalid =
            |what: String| ClientError::Io(io::Error::new(io::ErrorKind::InvalidInput, what));
        if self.connect_timeout.is_zero() || self.io_timeout.is_zero() {
            return Err(invalid("timeouts must be non-zero".to_string()));
        }
        if self.addr.is_empty()
            || self
                .addr
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b == b'/')
        {
            return Err(invalid(format!("bad address {:?}", self.addr)));
        }
        if !self.token_in_query && self.token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
            return Err(invalid(
                "token must be visible ASCII to go in a header".to_string(),
            ));
        }
        Ok(())
    }

    fn uri(&self) -> Result<Uri, ClientError> {
        let mut uri = format!("ws://{}{}", self.addr, WS_PATH);
        if self.token_in_query && !self.token.is_empty() {
            uri.push_str("?token=");
            percent_encode_into(&self.token, &mut uri);
        }
        uri.parse::<Uri>().map_err(|e| {
            ClientError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad address {:?}: {e}", self.addr),
            ))
        })
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode_into(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Maps a tungstenite error, turning a socket timeout into `Timeout(what)`.
fn ws_error(e: tungstenite::Error, what: &'static str) -> ClientError {
    match e {
        tungstenite::Error::Io(ref io) if is_timeout(io) => ClientError::Timeout(what),
        e => e.into(),
    }
}

/// A blocking connection to a Switchboard server.
///
/// Every method returns within its timeout (reads) or `io_timeout` (writes). Server `Ping`
/// control frames are answered while reading. Frames that arrive while a method waits for a
/// specific answer are kept, in order, and returned by [`Client::recv`] first. Every `Message`
/// read from the socket and every `SendAck` go through [`Client::cursors`]; that includes chat
/// events (`ContentKind::Event`, decoded with `switchboard_wire::decode_event`) and tombstones
/// of deleted messages (`ContentKind::Deleted`), which occupy a seq like any other message.
pub struct Client {
    ws: WebSocket<TcpStream>,
    encoder: Encoder,
    cursors: Cursors,
    stash: VecDeque<ServerFrame>,
    next_request_id: u32,
    /// Set once the server has closed the WebSocket; every later call returns it.
    closed: Option<(u16, String)>,
    /// The read timeout currently on the socket, to skip redundant `setsockopt` calls.
    read_timeout: Option<Duration>,
    io_timeout: Duration,
    /// Valid frames of a type this version does not know, skipped.
    unknown_frames: u64,
}

// The load generator moves clients into worker threads.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Client>();
};

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("peer", &self.ws.get_ref().peer_addr().ok())
            .field("stashed_frames", &self.stash.len())
            .field("closed", &self.closed)
            .field("chats", &self.cursors.chat_count())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (`host:port`) with `token` in an `Authorization` header and default
    /// timeouts.
    pub fn connect(addr: &str, token: &str) -> Result<Client, ClientError> {
        Client::connect_with(&ClientConfig::new(addr, token))
    }

    /// Connects: TCP (trying each resolved address), then the WebSocket upgrade on `/v1/ws`.
    /// A non-101 answer becomes [`ClientError::Rejected`].
    pub fn connect_with(config: &ClientConfig) -> Result<Client, ClientError> {
        config.validate()?;
        let uri = config.uri()?;
        let addrs: Vec<SocketAddr> = config.addr.to_socket_addrs()?.collect();
        let mut last_error = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} resolved to no address", config.addr),
        );
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, config.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last_error = e,
            }
        }
        let stream = match stream {
            Some(s) => s,
            None if is_timeout(&last_error) => return Err(ClientError::Timeout("TCP connect")),
            None => return Err(ClientError::Io(last_error)),
        };
        // Frames are small and latency matters more than segment count.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(config.io_timeout))?;
        stream.set_write_timeout(Some(config.io_timeout))?;

        let mut request = ClientRequestBuilder::new(uri);
        if !config.token_in_query && !config.token.is_empty() {
            request = request.with_header("Authorization", format!("Bearer {}", config.token));
        }
        let request = request.into_client_request()?;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .max_message_size(Some(SERVER_FRAME_BYTES_MAX))
            .max_frame_size(Some(SERVER_FRAME_BYTES_MAX));
        let ws = match tungstenite::client::client_with_config(request, stream, Some(ws_config)) {
            Ok((ws, _response)) => ws,
            Err(HandshakeError::Interrupted(_)) => {
                return Err(ClientError::Timeout("upgrade response"))
            }
            Err(HandshakeError::Failure(e)) => return Err(ws_error(e, "upgrade response")),
        };
        Ok(Client {
            ws,
            encoder: Encoder::new(),
            cursors: Cursors::new(),
            stash: VecDeque::new(),
            next_request_id: 1,
            closed: None,
            read_timeout: Some(config.io_timeout),
            io_timeout: config.io_timeout,
            unknown_frames: 0,
        })
    }

    // ------------------------------------------------------------------ sending

    /// Encodes and sends one frame, and flushes.
    pub fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.check_open()?;
        let bytes = self.encoder.encode_client(frame);
        let message = tungstenite::Message::Binary(Bytes::copy_from_slice(bytes));
        self.ws
            .send(message)
            .map_err(|e| ws_error(e, "socket write"))
    }

    /// Sends `bytes` as one binary message, unchecked: for tests of malformed input.
    pub fn send_raw_binary(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.check_open()?;
        let message = tungstenite::Message::Binary(Bytes::copy_from_slice(bytes));
        self.ws
            .send(message)
            .map_err(|e| ws_error(e, "socket write"))
    }

    /// Sends `s` as one text message, which the server does not accept (it closes with 1003).
    pub fn send_raw_text(&mut self, s: &str) -> Result<(), ClientError> {
        self.check_open()?;
        self.ws
            .send(tungstenite::Message::text(s))
            .map_err(|e| ws_error(e, "socket write"))
    }

    /// Sends a text message to `target` with a fresh client message id, and returns the id.
    pub fn send_message(
        &mut self,
        target: Target,
        payload: &[u8],
    ) -> Result<ClientMsgId, ClientError> {
        let id = new_client_msg_id();
        self.send_message_with_id(id, target, payload)?;
        Ok(id)
    }

    /// Sends a text message with a chosen id: sending the same id again is an idempotent retry.
    pub fn send_message_with_id(
        &mut self,
        id: ClientMsgId,
        target: Target,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.send(&ClientFrame::Send(SendReq {
            client_msg_id: id,
            target,
            payload: payload.to_vec(),
            reply_to: Seq(0),
            content_kind: ContentKind::Text,
            forwarded: false,
            media_ids: Vec::new(),
        }))
    }

    /// Sends a message referring to media objects (uploaded through `POST /v1/media`): the
    /// chat's members may then get download URLs for them.
    pub fn send_with_media(
        &mut self,
        id: ClientMsgId,
        target: Target,
        payload: &[u8],
        media_ids: Vec<String>,
    ) -> Result<(), ClientError> {
        self.send(&ClientFrame::Send(SendReq {
            client_msg_id: id,
            target,
            payload: payload.to_vec(),
            reply_to: Seq(0),
            content_kind: ContentKind::Text,
            forwarded: false,
            media_ids,
        }))
    }

    /// Sends a message and waits for its `SendAck` (see [`Client::wait_ack`]).
    pub fn send_and_wait_ack(
        &mut self,
        target: Target,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<SendAck, ClientError> {
        let id = self.send_message(target, payload)?;
        self.wait_ack(id, timeout)
    }

    /// Waits for the `SendAck` of `id`; an `Error` frame for `id` becomes [`ClientError::Server`].
    /// Other frames are stashed for `recv`.
    pub fn wait_ack(&mut self, id: ClientMsgId, timeout: Duration) -> Result<SendAck, ClientError> {
        let frame = self.wait_for(timeout, "SendAck", |f| match f {
            ServerFrame::SendAck(ack) => ack.client_msg_id == id,
            ServerFrame::Error(e) => e.client_msg_id == Some(id),
            _ => false,
        })?;
        match frame {
            ServerFrame::SendAck(ack) => Ok(ack),
            ServerFrame::Error(e) => Err(ClientError::Server(e)),
            other => unreachable!("wait_for returned a frame its predicate rejects: {other:?}"),
        }
    }

    /// Tells the server this device has every message of `chat` up to `up_to`.
    pub fn mark_delivered(&mut self, chat: ChatId, up_to: Seq) -> Result<(), ClientError> {
        self.send(&ClientFrame::Delivered { chat, up_to })
    }

    /// Tells the server the user has read every message of `chat` up to `up_to`.
    pub fn mark_read(&mut self, chat: ChatId, up_to: Seq) -> Result<(), ClientError> {
        self.send(&ClientFrame::Read { chat, up_to })
    }

    /// Sends an application-level `Ping`; the `Pong` arrives through `recv`.
    pub fn ping(&mut self, nonce: u64) -> Result<(), ClientError> {
        self.send(&ClientFrame::Ping { nonce })
    }

    /// Sends a `Ping` and waits for its `Pong`. Since the server answers a connection's frames in
    /// order, this is also a barrier: everything sent before has been processed.
    pub fn ping_pong(&mut self, nonce: u64, timeout: Duration) -> Result<(), ClientError> {
        self.ping(nonce)?;
        self.wait_for(
            timeout,
            "Pong",
            |f| matches!(f, ServerFrame::Pong { nonce: n } if *n == nonce),
        )?;
        Ok(())
    }

    /// A fresh non-zero request id for a request answered by `request_id` (`Sync`, `History`,
    /// `Block`, ...): 0 means "none" in `Error` frames.
    pub fn new_request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.checked_add(1).unwrap_or(1);
        id
    }

    // ------------------------------------------------------------------ requests

    /// Fetches every message this device is missing, using its own [`Cursors`], and returns
    /// them in arrival order.
    ///
    /// Sends `Sync` and collects `Message`s until the matching `SyncDone`; repeats with the
    /// updated cursors while the server says `more`. Messages already stashed by earlier calls
    /// come first; live pushes arriving meanwhile are included too. `timeout` bounds the
    /// whole call. An `Error` for the request becomes [`ClientError::Server`].
    ///
    /// A device with more than `SYNC_CURSORS_MAX` chats syncs in several requests; the server
    /// resumes chats a request does not list from the stored delivered cursor, so such a device
    /// should `mark_delivered` to avoid re-deliveries (which the cursors count as duplicates).
    pub fn sync(&mut self, timeout: Duration) -> Result<Vec<Message>, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        let mut i = 0;
        while i < self.stash.len() {
            if matches!(self.stash[i], ServerFrame::Message(_)) {
                if let Some(ServerFrame::Message(m)) = self.stash.remove(i) {
                    messages.push(m);
                }
            } else {
                i += 1;
            }
        }
        loop {
            let mut more = false;
            for chunk in self.cursors.sync_cursor_chunks() {
                // Cursors may have moved while an earlier chunk of this round was answered.
                let cursors = chunk
                    .into_iter()
                    .map(|(chat, _)| (chat, self.cursors.get(chat)))
                    .collect();
                let request_id = self.new_request_id();
                self.send(&ClientFrame::Sync {
                    request_id,
                    cursors,
                })?;
                more |= self.collect_sync(request_id, deadline, &mut messages)?;
            }
            if !more {
                return Ok(messages);
            }
        }
    }

    /// Reads until the `SyncDone` of `request_id`; returns its `more`.
    fn collect_sync(
        &mut self,
        request_id: u32,
        deadline: Instant,
        messages: &mut Vec<Message>,
    ) -> Result<bool, ClientError> {
        loop {
            match self.read_frame(deadline)? {
                None => return Err(ClientError::Timeout("SyncDone")),
                Some(ServerFrame::Message(m)) => messages.push(m),
                Some(ServerFrame::SyncDone {
                    request_id: r,
                    more,
                    ..
                }) if r == request_id => return Ok(more),
                Some(ServerFrame::Error(e)) if e.request_id == request_id => {
                    return Err(ClientError::Server(e))
                }
                Some(other) => self.stash_frame(other, "SyncDone")?,
            }
        }
    }

    /// Fetches one page of `chat`, newest first, of messages with seq < `before` (`Seq(0)`: from
    /// the newest). History messages do not go through the cursors.
    pub fn history(
        &mut self,
        chat: ChatId,
        before: Seq,
        limit: u32,
        timeout: Duration,
    ) -> Result<HistoryPage, ClientError> {
        let request_id = self.new_request_id();
        self.send(&ClientFrame::History {
            request_id,
            chat,
            before,
            limit,
        })?;
        let frame = self.wait_for(timeout, "HistoryPage", |f| match f {
            ServerFrame::HistoryPage(p) => p.request_id == request_id,
            ServerFrame::Error(e) => e.request_id == request_id,
            _ => false,
        })?;
        match frame {
            ServerFrame::HistoryPage(page) => Ok(page),
            ServerFrame::Error(e) => Err(ClientError::Server(e)),
            other => unreachable!("wait_for returned a frame its predicate rejects: {other:?}"),
        }
    }

    // ------------------------------------------------------------------ groups and message actions

    /// Creates a group named `name`, with this user as owner and `members` besides, and waits for
    /// its [`GroupInfo`]. The description and avatar start empty; see
    /// [`Client::create_group_with`] for those and for retries.
    pub fn create_group(
        &mut self,
        name: &str,
        members: &[UserId],
        admins_only: bool,
        timeout: Duration,
    ) -> Result<GroupInfo, ClientError> {
        let req = CreateGroupReq {
            request_id: self.new_request_id(),
            client_msg_id: new_client_msg_id(),
            name: name.to_owned(),
            description: String::new(),
            avatar_media_id: String::new(),
            members: members.to_vec(),
            admins_only,
        };
        self.create_group_with(req, timeout)
    }

    /// Sends `req` and waits for the `GroupInfo` with its `request_id`; an `Error` with that
    /// request id (or `client_msg_id`) becomes [`ClientError::Server`]. Sending a request again
    /// with the same `client_msg_id` is an idempotent retry: the answer names the same group.
    ///
    /// The group's first message, the `GroupCreated` event at seq 1, is recorded in the cursors
    /// as this device's own, as a `SendAck` would: the server does not push it back to the
    /// connection that created the group.
    pub fn create_group_with(
        &mut self,
        req: CreateGroupReq,
        timeout: Duration,
    ) -> Result<GroupInfo, ClientError> {
        let (request_id, id) = (req.request_id, req.client_msg_id);
        self.send(&ClientFrame::CreateGroup(req))?;
        let frame = self.wait_answer(
            request_id,
            Some(id),
            timeout,
            "GroupInfo",
            |f| matches!(f, ServerFrame::GroupInfo(g) if g.request_id == request_id),
        )?;
        match frame {
            ServerFrame::GroupInfo(info) => {
                self.cursors.record_own(info.chat, Seq(1));
                Ok(info)
            }
            other => unreachable!("wait_answer returned a frame its predicate rejects: {other:?}"),
        }
    }

    /// Sends a group change and waits for its `SendAck` (see [`Client::wait_ack`]): the change is
    /// an event in the chat's sequence, at the acknowledged seq. Build `req` with
    /// [`GroupUpdateReq::new`] and a fresh id ([`crate::new_client_msg_id`]); resending the same
    /// id is an idempotent retry.
    pub fn group_update(
        &mut self,
        req: GroupUpdateReq,
        timeout: Duration,
    ) -> Result<SendAck, ClientError> {
        let id = req.client_msg_id;
        self.send(&ClientFrame::GroupUpdate(req))?;
        self.wait_ack(id, timeout)
    }

    /// Fetches a group's name, description, avatar, members and settings.
    pub fn group_info(
        &mut self,
        chat: ChatId,
        timeout: Duration,
    ) -> Result<GroupInfo, ClientError> {
        let request_id = self.new_request_id();
        self.send(&ClientFrame::GetGroupInfo { request_id, chat })?;
        let frame = self.wait_answer(
            request_id,
            None,
            timeout,
            "GroupInfo",
            |f| matches!(f, ServerFrame::GroupInfo(g) if g.request_id == request_id),
        )?;
        match frame {
            ServerFrame::GroupInfo(info) => Ok(info),
            other => unreachable!("wait_answer returned a frame its predicate rejects: {other:?}"),
        }
    }

    /// Replaces the content of this user's message `target` and waits for the `SendAck` of the
    /// `Edited` event.
    pub fn edit(
        &mut self,
        chat: ChatId,
        target: Seq,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<SendAck, ClientError> {
        let client_msg_id = new_client_msg_id();
        self.send(&ClientFrame::Edit {
            client_msg_id,
            chat,
            target,
            payload: payload.to_vec(),
        })?;
        self.wait_ack(client_msg_id, timeout)
    }

    /// Deletes this user's message `target` for everyone and waits for the `SendAck` of the
    /// `Deleted` event.
    pub fn delete(
        &mut self,
        chat: ChatId,
        target: Seq,
        timeout: Duration,
    ) -> Result<SendAck, ClientError> {
        let client_msg_id = new_client_msg_id();
        self.send(&ClientFrame::Delete {
            client_msg_id,
            chat,
            target,
        })?;
        self.wait_ack(client_msg_id, timeout)
    }

    /// Sets this user's reaction to message `target` (an empty `reaction` removes it) and waits
    /// for the `SendAck` of the `Reacted` event.
    pub fn react(
        &mut self,
        chat: ChatId,
        target: Seq,
        reaction: &str,
        timeout: Duration,
    ) -> Result<SendAck, ClientError> {
        let client_msg_id = new_client_msg_id();
        self.send(&ClientFrame::React {
            client_msg_id,
            chat,
            target,
            reaction: reaction.to_owned(),
        })?;
        self.wait_ack(client_msg_id, timeout)
    }

    /// Tells the chat's other members that this user started (`true`) or stopped typing.
    /// Ephemeral and unanswered; they receive a `TypingNotice`.
    pub fn typing(&mut self, chat: ChatId, on: bool) -> Result<(), ClientError> {
        self.send(&ClientFrame::Typing { chat, typing: on })
    }

    /// Fetches who has received and who has read message `seq` of `chat`.
    pub fn receipts(
        &mut self,
        chat: ChatId,
        seq: Seq,
        timeout: Duration,
    ) -> Result<ReceiptList, ClientError> {
        let request_id = self.new_request_id();
        self.send(&ClientFrame::GetReceipts {
            request_id,
            chat,
            seq,
        })?;
        let frame = self.wait_answer(
            request_id,
            None,
            timeout,
            "ReceiptList",
            |f| matches!(f, ServerFrame::ReceiptList(r) if r.request_id == request_id),
        )?;
        match frame {
            ServerFrame::ReceiptList(list) => Ok(list),
            other => unreachable!("wait_answer returned a frame its predicate rejects: {other:?}"),
        }
    }

    // ------------------------------------------------------------------ blocking and presence

    /// Blocks (`blocked: true`) or unblocks `user` and waits for the server's `Done`; an `Error`
    /// for the request becomes [`ClientError::Server`]. While blocked, `user`'s 1:1 messages to
    /// this user are refused with `ErrorCode::Blocked`, and neither sees the other's presence
    /// or typing.
    pub fn block(
        &mut self,
        user: UserId,
        blocked: bool,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let request_id = self.new_request_id();
        self.send(&ClientFrame::Block {
            request_id,
            user,
            blocked,
        })?;
        self.wait_done(request_id, timeout)
    }

    /// Replaces this connection's presence subscriptions with `users` (empty: none) and waits for
    /// the server's `Done`; an `Error` for the request (e.g. `TooManySubscriptions`) becomes
    /// [`ClientError::Server`]. The current [`switchboard_wire::Presence`] of each user, then
    /// every change (at most about one per second per user), arrive through [`Client::recv`].
    pub fn subscribe_presence(
        &mut self,
        users: &[UserId],
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let request_id = self.new_request_id();
        self.send(&ClientFrame::Subscribe {
            request_id,
            users: users.to_vec(),
        })?;
        self.wait_done(request_id, timeout)
    }

    /// Sets who may see this user's last-seen time and online status, and waits for the
    /// server's `Done`; an `Error` for the request becomes [`ClientError::Server`].
    pub fn set_privacy(
        &mut self,
        last_seen: Visibility,
        online: Visibility,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        let request_id = self.new_request_id();
        self.send(&ClientFrame::SetPrivacy {
            request_id,
            last_seen,
            online,
        })?;
        self.wait_done(request_id, timeout)
    }

    /// Waits for the `Done` of `request_id` (see [`Client::wait_answer`]).
    fn wait_done(&mut self, request_id: u32, timeout: Duration) -> Result<(), ClientError> {
        self.wait_answer(
            request_id,
            None,
            timeout,
            "Done",
            |f| matches!(f, ServerFrame::Done { request_id: r } if *r == request_id),
        )?;
        Ok(())
    }

    // ------------------------------------------------------------------ receiving

    /// The next server frame: a stashed one first, else one read within `timeout`. `Ok(None)`
    /// when nothing arrived in time (a timeout of zero polls once).
    ///
    /// A Close from the server becomes [`ClientError::Closed`] (after answering it), a binary
    /// message that does not decode becomes [`ClientError::Decode`] (the connection stays
    /// usable), a text message becomes [`ClientError::Protocol`]. A frame of a type this version
    /// does not know is skipped (see [`Client::unknown_frames`]).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<ServerFrame>, ClientError> {
        if let Some(frame) = self.stash.pop_front() {
            return Ok(Some(frame));
        }
        self.read_frame(Instant::now() + timeout)
    }

    /// Frames of a type this version does not know (from a newer server), skipped so far.
    pub fn unknown_frames(&self) -> u64 {
        self.unknown_frames
    }

    /// Frames stashed for `recv`.
    pub fn stashed(&self) -> usize {
        self.stash.len()
    }

    /// The receive cursors: what this device has, and how many duplicates and gaps it saw.
    pub fn cursors(&self) -> &Cursors {
        &self.cursors
    }

    /// The receive cursors, e.g. to start from a stored state before `sync`.
    pub fn cursors_mut(&mut self) -> &mut Cursors {
        &mut self.cursors
    }

    /// The close code and reason if the server has closed the connection.
    pub fn close_status(&self) -> Option<(u16, &str)> {
        self.closed
            .as_ref()
            .map(|(code, reason)| (*code, reason.as_str()))
    }

    /// This end's socket address.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        Ok(self.ws.get_ref().local_addr()?)
    }

    /// Closes with code 1000 and waits (up to `io_timeout`) for the server to answer and drop
    /// the connection. `Ok` if the server had already closed.
    pub fn close(mut self) -> Result<(), ClientError> {
        if self.closed.is_some() {
            return Ok(());
        }
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        match self.ws.close(Some(frame)) {
            Ok(()) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(ws_error(e, "close handshake")),
        }
        let deadline = Instant::now() + self.io_timeout;
        loop {
            self.set_read_timeout(deadline)?;
            match self.ws.read() {
                // Frames still in flight; the close handshake supersedes them.
                Ok(_) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(())
                }
                Err(e) => return Err(ws_error(e, "close handshake")),
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout("close handshake"));
            }
        }
    }

    // ------------------------------------------------------------------ internals

    fn check_open(&self) -> Result<(), ClientError> {
        match &self.closed {
            Some((code, reason)) => Err(ClientError::Closed {
                code: *code,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Puts a read timeout on the socket for what is left until `deadline`, rounded up to whole
    /// milliseconds so repeated calls with the same timeout skip the syscall.
    fn set_read_timeout(&mut self, deadline: Instant) -> Result<(), ClientError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let ms = remaining.as_nanos().div_ceil(1_000_000);
        let timeout =
            Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)).max(READ_TIMEOUT_MIN);
        if self.read_timeout != Some(timeout) {
            self.ws.get_ref().set_read_timeout(Some(timeout))?;
            self.read_timeout = Some(timeout);
        }
        Ok(())
    }

    /// Returns the first stashed frame `matches` accepts, else reads until one arrives, stashing
    /// the others.
    fn wait_for(
        &mut self,
        timeout: Duration,
        what: &'static str,
        matches: impl Fn(&ServerFrame) -> bool,
    ) -> Result<ServerFrame, ClientError> {
        if let Some(i) = self.stash.iter().position(&matches) {
            if let Some(frame) = self.stash.remove(i) {
                return Ok(frame);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_frame(deadline)? {
                None => return Err(ClientError::Timeout(what)),
                Some(frame) if matches(&frame) => return Ok(frame),
                Some(frame) => self.stash_frame(frame, what)?,
            }
        }
    }

    /// Waits for the frame `is_answer` accepts, or for an `Error` naming `request_id` (when
    /// non-zero: 0 means "none" in an `Error`) or `client_msg_id`, which becomes
    /// [`ClientError::Server`]. Returns only frames `is_answer` accepts.
    fn wait_answer(
        &mut self,
        request_id: u32,
        client_msg_id: Option<ClientMsgId>,
        timeout: Duration,
        what: &'static str,
        is_answer: impl Fn(&ServerFrame) -> bool,
    ) -> Result<ServerFrame, ClientError> {
        let frame = self.wait_for(timeout, what, |f| match f {
            ServerFrame::Error(e) => {
                (request_id != 0 && e.request_id == request_id)
                    || (client_msg_id.is_some() && e.client_msg_id == client_msg_id)
            }
            f => is_answer(f),
        })?;
        match frame {
            ServerFrame::Error(e) => Err(ClientError::Server(e)),
            frame => Ok(frame),
        }
    }

    fn stash_frame(&mut self, frame: ServerFrame, what: &'static str) -> Result<(), ClientError> {
        if self.stash.len() >= STASH_FRAMES_MAX {
            return Err(ClientError::Protocol(format!(
                "more than {STASH_FRAMES_MAX} other frames arrived while waiting for {what}; call recv more often"
            )));
        }
        self.stash.push_back(frame);
        Ok(())
    }

    /// Reads the next data frame from the socket, answering control frames on the way.
    /// `Ok(None)` once `deadline` has passed (after at least one attempt).
    fn read_frame(&mut self, deadline: Instant) -> Result<Option<ServerFrame>, ClientError> {
        self.check_open()?;
        loop {
            self.set_read_timeout(deadline)?;
            match self.ws.read() {
                Ok(tungstenite::Message::Binary(bytes)) => {
                    let frame = match decode_server(&bytes) {
                        Ok(frame) => frame,
                        // A newer server's frame type: the schema says clients ignore those.
                        Err(DecodeError::UnknownBody(_)) => {
                            self.unknown_frames += 1;
                            if Instant::now() >= deadline {
                                return Ok(None);
                            }
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    match &frame {
                        ServerFrame::Message(m) => {
                            self.cursors.observe(m);
                        }
                        ServerFrame::SendAck(ack) => self.cursors.record_own(ack.chat, ack.seq),
                        _ => {}
                    }
                    return Ok(Some(frame));
                }
                Ok(tungstenite::Message::Text(_)) => {
                    return Err(ClientError::Protocol(
                        "the server sent a text message".to_string(),
                    ));
                }
                Ok(tungstenite::Message::Ping(_)) => {
                    // tungstenite queued the Pong; send it now rather than on the next call, which
                    // may be long after the server's idle timer expires.
                    match self.ws.flush() {
                        Ok(()) => {}
                        // Still queued; it goes out with the next read or write.
                        Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(tungstenite::Message::Pong(_) | tungstenite::Message::Frame(_)) => {}
                Ok(tungstenite::Message::Close(frame)) => {
                    let (code, reason) = match frame {
                        Some(f) => (u16::from(f.code), f.reason.as_str().to_string()),
                        None => (CLOSE_CODE_NO_STATUS, String::new()),
                    };
                    // Send the queued Close reply; the server drops the TCP connection next, so
                    // a failure here changes nothing.
                    let _ = self.ws.flush();
                    self.closed = Some((code, reason.clone()));
                    return Err(ClientError::Closed { code, reason });
                }
                Err(tungstenite::Error::Io(e)) if is_timeout(&e) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_with_and_without_query_token() {
        let mut c = ClientConfig::new("127.0.0.1:7070", "a b/+=é");
        assert_eq!(
            c.uri().expect("uri").to_string(),
            "ws://127.0.0.1:7070/v1/ws"
        );
        c.token_in_query = true;
        assert_eq!(
            c.uri().expect("uri").to_string(),
            "ws://127.0.0.1:7070/v1/ws?token=a%20b%2F%2B%3D%C3%A9"
        );
        c.token.clear();
        assert_eq!(
            c.uri().expect("uri").to_string(),
            "ws://127.0.0.1:7070/v1/ws"
        );
    }

    #[test]
    fn validate_rejects_bad_configs() {
        assert!(ClientConfig::new("127.0.0.1:1", "tok").validate().is_ok());
        assert!(ClientConfig::new("", "tok").validate().is_err());
        assert!(ClientConfig::new("host:1/x", "tok").validate().is_err());
        assert!(ClientConfig::new("127.0.0.1:1", "bad\ntoken")
            .validate()
            .is_err());
        let query = ClientConfig {
            token_in_query: true,
            ..ClientConfig::new("127.0.0.1:1", "any token")
        };
        assert!(query.validate().is_ok());
        let zero = ClientConfig {
            io_timeout: Duration::ZERO,
            ..ClientConfig::default()
        };
        assert!(zero.validate().is_err());
    }
}
