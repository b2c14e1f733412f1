//! One TCP connection on its core: the HTTP request head (upgrade, metrics, health), then the
//! WebSocket loop. The only code that touches client sockets.
//!
//! ```text
//!  socket ──read──► WsIo.rx ──tungstenite──► decode_client ──► route to the chat's owner core
//!  ConnShared.queue (frames from any core) ──► WsIo.tx ──write──► socket
//! ```

use crate::core::Core;
use crate::http::{self, Route};
use crate::msg::{Action, ConnRef, CoreMsg, Frame, FrameKind, Origin};
use crate::notify::Notify;
use crate::transport::{ReadScratch, Transport};
use crate::ws::{self, close, WsIo};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchboard_api::ratelimit::{self, Bucket, Decision, Rate};
use switchboard_storage::CursorKind;
use switchboard_wire::{
    decode_client, ChatId, ClientFrame, DeviceId, ErrorCode, ErrorFrame, Seq, ServerFrame, Target,
    UserId,
};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketContext};
use tungstenite::Message as WsMessage;

/// A `Sync` in progress: live messages wait in `held` until every shard has answered, so the
/// client sees each chat in seq order.
struct SyncProgress {
    request_id: u32,
    parts_pending: u32,
    messages: u32,
    more: bool,
    max_seq: HashMap<ChatId, Seq>,
    held: Vec<(ChatId, Seq, Frame)>,
}

/// The part of a connection other tasks on its core see: its outbound queue and flags.
pub struct ConnShared {
    pub id: u64,
    pub user: UserId,
    pub device: DeviceId,
    queue: RefCell<VecDeque<Frame>>,
    /// Bytes in `queue`, in `held`, and not yet written from `WsIo::tx`.
    queued_bytes: Cell<usize>,
    inflight: Cell<usize>,
    closing: Cell<Option<(u16, &'static str)>>,
    sync: RefCell<Option<SyncProgress>>,
    wake: Notify,
    /// Users whose presence this connection follows (at most `PRESENCE_SUBSCRIPTIONS_MAX`).
    presence_subs: RefCell<HashSet<UserId>>,
    /// Frames per connection (config `frames_per_conn_*`).
    frames: Cell<Bucket>,
}

impl ConnShared {
    fn new(id: u64, user: UserId, device: DeviceId, frames: Rate) -> ConnShared {
        ConnShared {
            id,
            user,
            device,
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            inflight: Cell::new(0),
            closing: Cell::new(None),
            sync: RefCell::new(None),
            wake: Notify::new(),
            presence_subs: RefCell::new(HashSet::new()),
            frames: Cell::new(Bucket::new(frames)),
        }
    }

    /// Asks the connection task to close with `code`; queued frames are dropped (the messages
    /// are durable: the client gets them on its next sync).
    pub fn close(&self, code: u16, reason: &'static str) {
        if self.closing.get().is_none() {
            self.closing.set(Some((code, reason)));
            self.queue.borrow_mut().clear();
            self.sync.borrow_mut().take();
            self.wake.notify();
        }
    }

    /// Accounts `len` more queued bytes; false (and the connection closes) past the limit.
    fn reserve(&self, core: &Core, len: usize) -> bool {
        let total = self.queued_bytes.get() + len;
        if total > core.cfg.conn_send_queue_bytes_max {
            core.metrics().slow_consumer_closes.fetch_add(1, Relaxed);
            self.close(
                close::SLOW_CONSUMER,
                "send queue full: read faster, then sync",
            );
            return false;
        }
        self.queued_bytes.set(total);
        true
    }

    fn enqueue(&self, frame: Frame) {
        self.queue.borrow_mut().push_back(frame);
        self.wake.notify();
    }

    /// A frame for this connection from any core.
    pub fn push(&self, core: &Core, frame: Frame, kind: FrameKind) {
        if self.closing.get().is_some() {
            return;
        }
        if let FrameKind::Reply {
            completes_send: true,
        } = kind
        {
            self.inflight.set(self.inflight.get().saturating_sub(1));
            self.wake.notify();
        }
        if !self.reserve(core, frame.len()) {
            return;
        }
        let mut sync = self.sync.borrow_mut();
        match (kind, sync.as_mut()) {
            (FrameKind::Live { chat, seq }, Some(s)) => s.held.push((chat, seq, frame)),
            (FrameKind::SyncMessage { chat, seq }, Some(s)) => {
                let max = s.max_seq.entry(chat).or_default();
                *max = (*max).max(seq);
                s.messages += 1;
                drop(sync);
                self.enqueue(frame);
            }
            _ => {
                drop(sync);
                self.enqueue(frame);
            }
        }
    }

    /// One shard finished its part of the sync; after the last, send `SyncDone` and release the
    /// live messages held meanwhile (minus those the sync already delivered).
    pub fn sync_part(&self, core: &Core, request_id: u32, more: bool) {
        let done = {
            let mut sync = self.sync.borrow_mut();
            let Some(s) = sync.as_mut().filter(|s| s.request_id == request_id) else {
                return;
            };
            s.more |= more;
            s.parts_pending -= 1;
            if s.parts_pending > 0 {
                return;
            }
            sync.take().expect("checked above")
        };
        let frame = core.encode(&ServerFrame::SyncDone {
            request_id,
            messages: done.messages,
            more: done.more,
        });
        if !self.reserve(core, frame.len()) {
            return;
        }
        self.enqueue(frame);
        for (chat, seq, frame) in done.held {
            if done.max_seq.get(&chat).is_some_and(|max| seq <= *max) {
                self.queued_bytes.set(self.queued_bytes.get() - frame.len());
                continue;
            }
            self.enqueue(frame);
        }
    }
}

enum Event {
    Read(std::io::Result<usize>),
    Wake,
    Tick,
}

enum Mode {
    Chat(Rc<ConnShared>),
    Echo,
}

/// Longest request line looked at to tell a WebSocket upgrade from an API request: the upgrade
/// targets are short; anything longer is an API request (the API codec applies its own limits).
const UPGRADE_SNIFF_BYTES_MAX: usize = 2048;

/// Whether the first request line names a WebSocket endpoint (`GET /v1/ws`, `GET /v1/echo`,
/// with or without a query). `None`: the request line is not complete yet.
fn is_upgrade_request(buf: &[u8]) -> Option<bool> {
    let line_end = buf.iter().position(|b| *b == b'\n');
    let line = match line_end {
        Some(i) => &buf[..i],
        None if buf.len() >= UPGRADE_SNIFF_BYTES_MAX => return Some(false),
        None => {
            // Decided already if what we have cannot start an upgrade line.
            let prefix_ok = [&b"GET /v1/ws"[..], &b"GET /v1/echo"[..]]
                .iter()
                .any(|p| p.starts_with(buf) || buf.starts_with(p));
            return if prefix_ok { None } else { Some(false) };
        }
    };
    let target = line
        .strip_prefix(b"GET ")
        .and_then(|rest| rest.split(|b| *b == b' ').next())
        .unwrap_or(b"");
    let path = target.split(|b| *b == b'?').next().unwrap_or(b"");
    Some(path == b"/v1/ws" || path == b"/v1/echo")
}

/// Serves one accepted TCP connection to its end: a WebSocket upgrade goes to the chat loop,
/// every other request to the HTTP API (`api_http.rs`, keep-alive).
pub async fn serve(core: Rc<Core>, mut stream: TcpStream) {
    core.metrics().connections_accepted.fetch_add(1, Relaxed);
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    if !peer.is_loopback() || core.cfg.rate_limit_loopback {
        let decision = core
            .connect_limiter
            .borrow_mut()
            .check(&ratelimit::source_key(peer), crate::core::unix_ms());
        if let Decision::Limited { retry_after_ms } = decision {
            core.metrics().rate_limited.fetch_add(1, Relaxed);
            let mut out = Vec::new();
            let retry = retry_after_ms.div_ceil(1000).max(1).to_string();
            switchboard_api::http1::write_json_error(
                &mut out,
                429,
                "rate_limited",
                "too many connection attempts from this address",
                false,
                &[("retry-after", &retry)],
            );
            let _ = stream.write_all(&out).await;
            let _ = stream.close().await;
            return;
        }
    }
    // Read until the request line tells which protocol this is (after the TLS handshake, when
    // the first byte is a TLS handshake record and TLS is configured). One deadline covers the
    // handshake, the sniff and the upgrade head.
    let deadline = Instant::now() + core.cfg.handshake_timeout;
    let opened = futures_lite::future::or(
        async {
            let n = ReadScratch {
                stream: &mut stream,
                core: &core,
            }
            .await
            .ok()?;
            (n > 0).then(|| core.read_scratch.borrow()[..n].to_vec())
        },
        async {
            glommio::timer::sleep(core.cfg.handshake_timeout).await;
            None
        },
    )
    .await;
    let Some(first) = opened else {
        return;
    };
    let (mut stream, mut buf) = match &core.tls {
        Some(tls) if first[0] == 0x16 => match Transport::tls(stream, tls.clone(), &first) {
            Ok(t) => (t, Vec::new()),
            Err(_) => return,
        },
        _ => (Transport::plain(stream), first),
    };
    let sniffed = futures_lite::future::or(
        async {
            loop {
                if let Some(upgrade) = is_upgrade_request(&buf) {
                    return Some(upgrade);
                }
                match stream.read(&core, &mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return None,
                }
            }
        },
        async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            None
        },
    )
    .await;
    match sniffed {
        None => return stream.close().await,
        Some(false) => {
            return crate::api_http::serve(core, stream, buf, peer).await;
        }
        Some(true) => {}
    }
    let head = futures_lite::future::or(
        async { Some(read_head(&core, &mut stream, buf).await) },
        async {
            glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
            None
        },
    )
    .await;
    let Some(Ok((route, leftover))) = head else {
        if let Some(Err(Some(e))) = head {
            let _ = stream.write_all(&http::error_response(&e)).await;
        }
        return;
    };
    match route {
        Route::Metrics => {
            let body = crate::metrics::render(&core.all_metrics);
            let _ = stream
                .write_all(&http::response(
                    200,
                    "OK",
                    "text/plain; version=0.0.4",
                    body.as_bytes(),
                ))
                .await;
        }
        Route::Health => {
            let _ = stream
                .write_all(&http::response(200, "OK", "text/plain", b"ok\n"))
                .await;
        }
        Route::Echo { key } => {
            if !core.cfg.echo_endpoint {
                let e = http::HttpError {
                    status: 404,
                    reason: "Not Found",
                    detail: "echo endpoint is disabled",
                };
                let _ = stream.write_all(&http::error_response(&e)).await;
                return;
            }
            if stream
                .write_all(&http::upgrade_response(&key))
                .await
                .is_ok()
            {
                run_ws(&core, stream, leftover, Mode::Echo).await;
            }
        }
        Route::WebSocket { key, token, origin } => {
            // Browsers: the Origin must be on the allow-list before 101.
            if let Some(o) = origin {
                if !core.api.origins.allows_value(&o) {
                    let e = http::HttpError {
                        status: 403,
                        reason: "Forbidden",
                        detail: "this Origin is not on the server's allow-list",
                    };
                    let _ = stream.write_all(&http::error_response(&e)).await;
                    return;
                }
            }
            let now_s = crate::core::unix_ms() / 1000;
            let claims = match token.as_deref().map(|t| core.key.verify(t, now_s)) {
                Some(Ok(c)) if !core.is_revoked(&c) => c,
                other => {
                    core.metrics().http_unauthorized.fetch_add(1, Relaxed);
                    let detail = match other {
                        None => "missing token: send Authorization: Bearer <token> or ?token=",
                        Some(Ok(_)) => "token revoked (logged out or device removed)",
                        Some(Err(crate::token::TokenError::Expired)) => "token expired",
                        _ => "invalid token",
                    };
                    let e = http::HttpError {
                        status: 401,
                        reason: "Unauthorized",
                        detail,
                    };
                    let _ = stream.write_all(&http::error_response(&e)).await;
                    return;
                }
            };
            if core.conns.borrow().len() >= core.cfg.conns_per_core_max {
                core.metrics().connections_rejected.fetch_add(1, Relaxed);
                let e = http::HttpError {
                    status: 503,
                    reason: "Service Unavailable",
                    detail: "connection limit reached",
                };
                let _ = stream.write_all(&http::error_response(&e)).await;
                return;
            }
            // Devices per user: counted in this core's directory replica (other devices of the
            // same user; a reconnecting device replaces its old connection instead).
            let other_devices = core
                .directory
                .borrow()
                .devices(claims.user)
                .iter()
                .filter(|(d, _)| *d != claims.device)
                .count();
            if other_devices >= core.cfg.devices_per_user_max {
                core.metrics().connections_rejected.fetch_add(1, Relaxed);
                let e = http::HttpError {
                    status: 409,
                    reason: "Conflict",
                    detail: "too many devices connected for this user",
                };
                let _ = stream.write_all(&http::error_response(&e)).await;
                return;
            }
            if stream
                .write_all(&http::upgrade_response(&key))
                .await
                .is_err()
            {
                return;
            }
            let conn = Rc::new(ConnShared::new(
                core.next_conn_id(),
                claims.user,
                claims.device,
                crate::config::Config::rate(
                    core.cfg.frames_per_conn_burst,
                    core.cfg.frames_per_conn_refill_per_s,
                ),
            ));
            core.conns.borrow_mut().insert(conn.id, conn.clone());
            core.metrics().connections.fetch_add(1, Relaxed);
            let me = ConnRef {
                core: core.id,
                conn: conn.id,
            };
            let (user, device) = (conn.user, conn.device);
            let epoch = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0);
            core.broadcast(|| CoreMsg::Online {
                user,
                device,
                conn: me,
                epoch,
            })
            .await;
            run_ws(&core, stream, leftover, Mode::Chat(conn.clone())).await;
            core.conns.borrow_mut().remove(&conn.id);
            core.metrics().connections.fetch_sub(1, Relaxed);
            core.broadcast(|| CoreMsg::Offline {
                user,
                device,
                conn: me,
            })
            .await;
        }
    }
}

/// Reads until a complete request head. `Err(None)`: the peer went away; `Err(Some(e))`: answer e.
async fn read_head(
    core: &Core,
    stream: &mut Transport,
    mut buf: Vec<u8>,
) -> Result<(Route, Vec<u8>), Option<http::HttpError>> {
    loop {
        if let Some((route, len)) = http::parse_request(&buf).map_err(Some)? {
            return Ok((route, buf.split_off(len)));
        }
        match stream.read(core, &mut buf).await {
            Ok(n) if n > 0 => {}
            _ => return Err(None),
        }
    }
}

/// Why the WebSocket loop ended.
enum End {
    /// Send a close frame with this code, then close.
    Close(u16, &'static str),
    /// The peer is gone or the close handshake finished: just close the socket.
    Gone,
}

async fn run_ws(core: &Rc<Core>, mut stream: Transport, leftover: Vec<u8>, mode: Mode) {
    let cfg = core.cfg.clone();
    let mut ctx = WebSocketContext::new(Role::Server, Some(ws::config(cfg.frame_bytes_max)));
    let mut io = WsIo::new(leftover);
    let mut last_rx = Instant::now();
    let mut next_ping = last_rx + cfg.ping_interval;
    let chat = match &mode {
        Mode::Chat(c) => Some(c.clone()),
        Mode::Echo => None,
    };
    // Bytes from before the first read (sent together with the request head).
    let mut fresh_input = !io.rx.is_empty();
    let end = 'conn: loop {
        if fresh_input {
            fresh_input = false;
            loop {
                match ctx.read(&mut io) {
                    Ok(msg) => {
                        // Boxed: the frame-handling state lives on the heap only while a frame is
                        // handled, so an idle connection's task stays small.
                        let handling = Box::pin(on_message(core, &mut ctx, &mut io, &mode, msg));
                        if let Some(end) = handling.await {
                            break 'conn end;
                        }
                    }
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        break
                    }
                    Err(e) => break 'conn ws_error_end(e),
                }
            }
        }
        if let Some(c) = &chat {
            if let Some((code, reason)) = c.closing.get() {
                break End::Close(code, reason);
            }
            let _ = ctx.flush(&mut io); // pending pongs first
            let mut q = c.queue.borrow_mut();
            let n = q.len();
            while let Some(frame) = q.pop_front() {
                ws::write_binary_frame(&mut io.tx, &frame);
                // The frame's bytes move from the queue to `tx`, which is counted separately.
                c.queued_bytes.set(c.queued_bytes.get() - frame.len());
            }
            core.metrics().frames_out.fetch_add(n as u64, Relaxed);
        } else {
            let _ = ctx.flush(&mut io);
        }
        if !io.tx.is_empty() {
            if let Some(c) = &chat {
                c.queued_bytes.set(c.queued_bytes.get() + io.tx.len());
            }
            let written = io.tx.len();
            let ok =
                futures_lite::future::or(async { stream.write_all(&io.tx).await.is_ok() }, async {
                    glommio::timer::sleep(cfg.idle_timeout).await;
                    false
                })
                .await;
            if let Some(c) = &chat {
                c.queued_bytes.set(c.queued_bytes.get() - written);
            }
            io.tx.clear();
            if !ok {
                break End::Gone;
            }
            core.metrics().bytes_out.fetch_add(written as u64, Relaxed);
        }
        io.compact();
        if !ctx.can_write() && io.tx.is_empty() {
            break End::Gone; // close handshake done
        }
        let can_read = chat
            .as_ref()
            .is_none_or(|c| c.inflight.get() < cfg.conn_inflight_sends_max);
        let now = Instant::now();
        let deadline = next_ping.min(last_rx + cfg.idle_timeout);
        let tick = async {
            glommio::timer::sleep(deadline.saturating_duration_since(now)).await;
            Event::Tick
        };
        let wake = async {
            match &chat {
                Some(c) => c.wake.notified().await,
                None => std::future::pending().await,
            }
            Event::Wake
        };
        let event = if can_read {
            let read = async { Event::Read(stream.read_with(core, |b| io.feed(b)).await) };
            futures_lite::future::or(read, futures_lite::future::or(wake, tick)).await
        } else {
            futures_lite::future::or(wake, tick).await
        };
        match event {
            Event::Read(Ok(0)) | Event::Read(Err(_)) => break End::Gone,
            Event::Read(Ok(n)) => {
                last_rx = Instant::now();
                core.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                fresh_input = true;
            }
            Event::Wake => {}
            Event::Tick => {
                let now = Instant::now();
                if now >= last_rx + cfg.idle_timeout {
                    break End::Close(close::IDLE_TIMEOUT, "idle timeout");
                }
                if now >= next_ping {
                    let _ = ctx.write(&mut io, WsMessage::Ping(Default::default()));
                    next_ping = now + cfg.ping_interval;
                }
            }
        }
    };
    if let End::Close(code, reason) = end {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        let _ = ctx.close(&mut io, Some(frame));
    }
    // Send what is queued last: our Close, or tungstenite's answer to a client's Close
    // (RFC 6455 5.5.1), which it queues before reporting the connection closed.
    let _ = ctx.flush(&mut io);
    if !io.tx.is_empty() {
        let _ = futures_lite::future::or(
            async { stream.write_all(&io.tx).await.map(|_| ()) },
            async {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                Ok(())
            },
        )
        .await;
    }
    let _ = stream.close().await;
}

fn ws_error_end(e: tungstenite::Error) -> End {
    use tungstenite::error::{CapacityError, Error as E};
    match e {
        E::ConnectionClosed | E::AlreadyClosed | E::Io(_) => End::Gone,
        E::Capacity(CapacityError::MessageTooLong { .. }) => {
            End::Close(close::TOO_BIG, "message too big")
        }
        E::Capacity(_) => End::Close(close::TOO_BIG, "frame too big"),
        E::Utf8(_) => End::Close(close::INVALID_PAYLOAD, "invalid UTF-8"),
        E::Protocol(_) => End::Close(close::PROTOCOL, "WebSocket protocol error"),
        _ => End::Close(close::INTERNAL, "internal error"),
    }
}

/// Handles one complete WebSocket message; `Some(end)` ends the connection.
async fn on_message(
    core: &Rc<Core>,
    ctx: &mut WebSocketContext,
    io: &mut WsIo,
    mode: &Mode,
    msg: WsMessage,
) -> Option<End> {
    match (mode, msg) {
        (Mode::Echo, m @ (WsMessage::Binary(_) | WsMessage::Text(_))) => {
            let _ = ctx.write(io, m);
            None
        }
        (Mode::Chat(_), WsMessage::Text(_)) => {
            Some(End::Close(close::UNSUPPORTED_DATA, "binary frames only"))
        }
        (Mode::Chat(conn), WsMessage::Binary(bytes)) => {
            core.metrics().frames_in.fetch_add(1, Relaxed);
            on_frame(core, conn, &bytes).await;
            None
        }
        // Pings are answered by tungstenite; pongs only refresh `last_rx`; a close is answered
        // by tungstenite and ends the loop once written.
        _ => None,
    }
}

/// Sends an error frame to this connection directly.
fn reply_error(
    core: &Core,
    conn: &ConnShared,
    code: ErrorCode,
    text: &str,
    request_id: u32,
    id: Option<switchboard_wire::ClientMsgId>,
) {
    core.metrics().error(code);
    let frame = core.encode(&ServerFrame::Error(ErrorFrame {
        code,
        text: text.to_string(),
        client_msg_id: id,
        request_id,
    }));
    conn.push(
        core,
        frame,
        FrameKind::Reply {
            completes_send: false,
        },
    );
}

/// The ids an answer to `frame` carries, so a refused request can be matched and retried.
fn frame_ids(frame: &ClientFrame) -> (u32, Option<switchboard_wire::ClientMsgId>) {
    match frame {
        ClientFrame::Send(r) => (0, Some(r.client_msg_id)),
        ClientFrame::CreateGroup(r) => (0, Some(r.client_msg_id)),
        ClientFrame::GroupUpdate(r) => (0, Some(r.client_msg_id)),
        ClientFrame::Edit { client_msg_id, .. }
        | ClientFrame::Delete { client_msg_id, .. }
        | ClientFrame::React { client_msg_id, .. } => (0, Some(*client_msg_id)),
        ClientFrame::Sync { request_id, .. }
        | ClientFrame::History { request_id, .. }
        | ClientFrame::GetGroupInfo { request_id, .. }
        | ClientFrame::GetReceipts { request_id, .. }
        | ClientFrame::Block { request_id, .. }
        | ClientFrame::Subscribe { request_id, .. }
        | ClientFrame::SetPrivacy { request_id, .. } => (*request_id, None),
        _ => (0, None),
    }
}

async fn on_frame(core: &Rc<Core>, conn: &Rc<ConnShared>, bytes: &[u8]) {
    let frame = match decode_client(bytes) {
        Ok(f) => f,
        Err(e) => return reply_error(core, conn, e.code(), &e.to_string(), 0, None),
    };
    // Rate limits: frames per connection, then messages (anything stored) per user. A refused
    // frame stores nothing; the client retries it with the same ids.
    let now_ms = crate::core::unix_ms();
    let mut bucket = conn.frames.get();
    let frame_ok = bucket.check(now_ms).is_allowed();
    conn.frames.set(bucket);
    let (request_id, client_msg_id) = frame_ids(&frame);
    let stores = client_msg_id.is_some();
    let limited = if !frame_ok {
        Some("too many frames on this connection")
    } else if stores
        && !core
            .msg_limiter
            .borrow_mut()
            .check(&conn.user, now_ms)
            .is_allowed()
    {
        Some("too many messages: retry later with the same client_msg_id")
    } else {
        None
    };
    if let Some(text) = limited {
        core.metrics().rate_limited.fetch_add(1, Relaxed);
        return reply_error(
            core,
            conn,
            ErrorCode::RateLimited,
            text,
            request_id,
            client_msg_id,
        );
    }
    let origin = Origin {
        conn: ConnRef {
            core: core.id,
            conn: conn.id,
        },
        user: conn.user,
        device: conn.device,
    };
    match frame {
        ClientFrame::Send(req) => {
            let (chat, peer) = match req.target {
                Target::Peer(p) if p == conn.user => {
                    return reply_error(
                        core,
                        conn,
                        ErrorCode::SelfChat,
                        "cannot open a 1:1 chat with yourself",
                        0,
                        Some(req.client_msg_id),
                    );
                }
                Target::Peer(p) => (ChatId::direct(conn.user, p), Some(p)),
                Target::Chat(c) => (c, None),
            };
            conn.inflight.set(conn.inflight.get() + 1);
            let owner = core.core_of_chat(chat);
            core.route(
                owner,
                CoreMsg::Send {
                    origin,
                    chat,
                    peer,
                    req,
                },
            )
            .await;
        }
        ClientFrame::Delivered { chat, up_to } => {
            core.route(
                core.core_of_chat(chat),
                CoreMsg::Cursor {
                    origin,
                    chat,
                    kind: CursorKind::Delivered,
                    up_to,
                },
            )
            .await
        }
        ClientFrame::Read { chat, up_to } => {
            core.route(
                core.core_of_chat(chat),
                CoreMsg::Cursor {
                    origin,
                    chat,
                    kind: CursorKind::Read,
                    up_to,
                },
            )
            .await
        }
        ClientFrame::Sync {
            request_id,
            cursors,
        } => {
            if conn.sync.borrow().is_some() {
                return reply_error(
                    core,
                    conn,
                    ErrorCode::InvalidArgument,
                    "a sync is already in progress",
                    request_id,
                    None,
                );
            }
            *conn.sync.borrow_mut() = Some(SyncProgress {
                request_id,
                parts_pending: core.shards_total,
                messages: 0,
                more: false,
                max_seq: HashMap::new(),
                held: Vec::new(),
            });
            let cursors = Arc::new(cursors);
            core.broadcast(|| CoreMsg::Sync {
                origin,
                request_id,
                cursors: cursors.clone(),
            })
            .await;
        }
        ClientFrame::History {
            request_id,
            chat,
            before,
            limit,
        } => {
            core.route(
                core.core_of_chat(chat),
                CoreMsg::History {
                    origin,
                    request_id,
                    chat,
                    before,
                    limit,
                },
            )
            .await
        }
        ClientFrame::CreateGroup(req) => {
            let chat = ChatId::group(conn.user, req.client_msg_id);
            conn.inflight.set(conn.inflight.get() + 1);
            core.route(
                core.core_of_chat(chat),
                CoreMsg::CreateGroup { origin, chat, req },
            )
            .await
        }
        ClientFrame::GroupUpdate(req) => {
            if req.chat.is_direct() {
                let id = Some(req.client_msg_id);
                return reply_error(core, conn, ErrorCode::UnknownChat, "not a group", 0, id);
            }
            conn.inflight.set(conn.inflight.get() + 1);
            core.route(
                core.core_of_chat(req.chat),
                CoreMsg::GroupUpdate { origin, req },
            )
            .await
        }
        ClientFrame::GetGroupInfo { request_id, chat } => {
            let msg = CoreMsg::GroupInfo {
                origin,
                request_id,
                chat,
            };
            core.route(core.core_of_chat(chat), msg).await
        }
        ClientFrame::Typing { chat, typing } => {
            core.route(
                core.core_of_chat(chat),
                CoreMsg::Typing {
                    origin,
                    chat,
                    typing,
                },
            )
            .await
        }
        ClientFrame::GetReceipts {
            request_id,
            chat,
            seq,
        } => {
            let msg = CoreMsg::GetReceipts {
                origin,
                request_id,
                chat,
                seq,
            };
            core.route(core.core_of_chat(chat), msg).await
        }
        ClientFrame::Edit {
            client_msg_id,
            chat,
            target,
            payload,
        } => {
            let action = Action::Edit {
                client_msg_id,
                target,
                payload,
            };
            send_action(core, conn, origin, chat, action).await
        }
        ClientFrame::Delete {
            client_msg_id,
            chat,
            target,
        } => {
            send_action(
                core,
                conn,
                origin,
                chat,
                Action::Delete {
                    client_msg_id,
                    target,
                },
            )
            .await
        }
        ClientFrame::React {
            client_msg_id,
            chat,
            target,
            reaction,
        } => {
            let action = Action::React {
                client_msg_id,
                target,
                reaction,
            };
            send_action(core, conn, origin, chat, action).await
        }
        ClientFrame::Block {
            request_id,
            user,
            blocked,
        } => {
            if user == conn.user {
                return reply_error(
                    core,
                    conn,
                    ErrorCode::InvalidArgument,
                    "cannot block yourself",
                    request_id,
                    None,
                );
            }
            let chat = ChatId::direct(conn.user, user);
            let msg = CoreMsg::Block {
                origin,
                request_id,
                chat,
                peer: user,
                blocked,
            };
            core.route(core.core_of_chat(chat), msg).await
        }
        ClientFrame::Subscribe { request_id, users } => {
            let wanted: HashSet<UserId> = users.into_iter().filter(|u| *u != conn.user).collect();
            let (added, removed): (Vec<UserId>, Vec<UserId>) = {
                let current = conn.presence_subs.borrow();
                (
                    wanted.difference(&current).copied().collect(),
                    current.difference(&wanted).copied().collect(),
                )
            };
            *conn.presence_subs.borrow_mut() = wanted;
            let done = core.encode(&ServerFrame::Done { request_id });
            conn.push(
                core,
                done,
                FrameKind::Reply {
                    completes_send: false,
                },
            );
            for target in removed {
                let msg = CoreMsg::PresenceUnsub {
                    conn: origin.conn,
                    target,
                };
                core.route(core.home_core(target), msg).await;
            }
            for target in added {
                let chat = ChatId::direct(conn.user, target);
                core.route(
                    core.core_of_chat(chat),
                    CoreMsg::PresenceCheck { origin, target },
                )
                .await;
            }
        }
        ClientFrame::SetPrivacy {
            request_id,
            last_seen,
            online,
        } => {
            let msg = CoreMsg::SetPrivacy {
                origin,
                request_id,
                last_seen: last_seen.0,
                online: online.0,
            };
            core.route(core.home_core(conn.user), msg).await
        }
        ClientFrame::Ping { nonce } => {
            let frame = core.encode(&ServerFrame::Pong { nonce });
            conn.push(
                core,
                frame,
                FrameKind::Reply {
                    completes_send: false,
                },
            );
        }
    }
}

/// Routes an edit, delete or reaction to the chat's owner; answered like a `Send`.
async fn send_action(
    core: &Rc<Core>,
    conn: &ConnShared,
    origin: Origin,
    chat: ChatId,
    action: Action,
) {
    conn.inflight.set(conn.inflight.get() + 1);
    core.route(
        core.core_of_chat(chat),
        CoreMsg::Action {
            origin,
            chat,
            action,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::core::Core;
    use crate::metrics::CoreMetrics;
    use crate::token::TokenKey;

    #[test]
    fn upgrade_requests_are_told_apart_by_their_request_line() {
        for (input, expect) in [
            ("", None),
            ("G", None),
            ("GET /v1/w", None),
            ("GET /v1/ws?token=abc", None),
            ("GET /v1/ws HTTP/1.1\r\n", Some(true)),
            ("GET /v1/ws?token=abc HTTP/1.1\r\n", Some(true)),
            ("GET /v1/echo HTTP/1.1\r\n", Some(true)),
            ("GET /v1/wsx HTTP/1.1\r\n", Some(false)),
            ("POST /v1/ws HTTP/1.1\r\n", Some(false)),
            ("GET /health", Some(false)),
            ("PUT /v1/keys", Some(false)),
            ("\x16\x03\x01", Some(false)),
        ] {
            assert_eq!(is_upgrade_request(input.as_bytes()), expect, "{input:?}");
        }
        let long = format!("GET /v1/ws?{}", "a".repeat(UPGRADE_SNIFF_BYTES_MAX));
        assert_eq!(is_upgrade_request(long.as_bytes()), Some(false));
    }

    /// Every idle connection is one task holding this future; its size is most of the
    /// per-connection user-space memory, so it is guarded here.
    #[test]
    fn connection_task_size_is_bounded() {
        glommio::LocalExecutorBuilder::default().make().unwrap().run(async {
            let cfg = Rc::new(Config::default());
            let metrics = Arc::new(vec![CoreMetrics::new(1)]);
            let core = Rc::new(Core::new(0, 1, 1, cfg, TokenKey::new(&[1u8; 32]), metrics, HashMap::new()));
            let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let _client = glommio::net::TcpStream::connect(addr).await.unwrap();
            let stream = listener.accept().await.unwrap();
            let _client2 = glommio::net::TcpStream::connect(addr).await.unwrap();
            let stream2 = listener.accept().await.unwrap();
            let core2 = core.clone();
            let fut = serve(core, stream);
            let size = std::mem::size_of_val(&fut);
            eprintln!(
                "connection task future: {size} bytes; ConnShared: {} bytes; WebSocketContext: {}; TcpStream: {}; Timer: {}; run_ws: {}",
                std::mem::size_of::<ConnShared>(),
                std::mem::size_of::<WebSocketContext>(),
                std::mem::size_of::<TcpStream>(),
                std::mem::size_of::<glommio::timer::Timer>(),
                std::mem::size_of_val(&run_ws(&core2, Transport::plain(stream2), Vec::new(), Mode::Echo)),
            );
            assert!(size < 8192, "the connection future grew to {size} bytes");
        });
    }
}
