//! One TCP connection on its core: the HTTP request head (upgrade, metrics, health), then the
//! WebSocket loop. The only code that touches client sockets.
//!
//! ```text
//!  socket ──read──► core scratch ──ws::WsReader──► decode_client ──► route to the chat's owner core
//!  ConnShared.queue (frames from any core) ──► tx bytes ──one write──► socket
//!  core sweep (every ≤ 1 s) ──► ping_due / close(4003) ──wake──► the connection task
//! ```

use crate::core::Core;
use crate::http::{self, Route};
use crate::msg::{Action, ConnRef, CoreMsg, Frame, FrameKind, Origin};
use crate::notify::Notify;
use crate::transport::{ReadScratch, Transport};
use crate::ws::{self, close};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
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
    /// Bytes in `queue`, in `held`, and being written from the task's `tx`.
    queued_bytes: Cell<usize>,
    inflight: Cell<usize>,
    closing: Cell<Option<(u16, &'static str)>>,
    /// Boxed: most connections are not syncing, and this struct is paid per connection.
    sync: RefCell<Option<Box<SyncProgress>>>,
    wake: Notify,
    /// When the socket last delivered bytes; the core's sweep closes the connection after
    /// `idle_timeout` of silence.
    last_rx: Cell<Instant>,
    /// When the sweep next asks for a ping; `ping_due` is that request.
    next_ping: Cell<Instant>,
    ping_due: Cell<bool>,
    /// Users whose presence this connection follows (at most `PRESENCE_SUBSCRIPTIONS_MAX`).
    /// `None` (no allocation) while it follows nobody. Boxed on purpose: the set's 48-byte
    /// header would otherwise sit in every connection's `ConnShared`.
    #[allow(clippy::box_collection)]
    presence_subs: RefCell<Option<Box<HashSet<UserId>>>>,
    /// Frames per connection (config `frames_per_conn_*`).
    frames: Cell<Bucket>,
}

impl ConnShared {
    fn new(
        id: u64,
        user: UserId,
        device: DeviceId,
        ping_interval: Duration,
        frames: Rate,
    ) -> ConnShared {
        let now = Instant::now();
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
            last_rx: Cell::new(now),
            next_ping: Cell::new(now + ping_interval),
            ping_due: Cell::new(false),
            presence_subs: RefCell::new(None),
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
            *sync.take().expect("checked above")
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

/// Serves one accepted TCP connection to its end. Every idle connection is one task holding
/// this future, so it keeps only what the WebSocket loop needs: the handshake (request head,
/// token, HTTP answers) and the directory broadcasts run in boxed futures that live on the heap
/// only while they run.
pub fn serve(core: Rc<Core>, stream: TcpStream) -> impl Future<Output = ()> {
    // An async fn keeps its arguments for its whole life: the stream (120 bytes) moves into
    // the boxed handshake here instead, and comes back out of it for the WebSocket loop.
    let handshake = Box::pin(handshake(core.clone(), stream));
    serve_upgraded(core, handshake)
}

async fn serve_upgraded(
    core: Rc<Core>,
    handshake: Pin<Box<impl Future<Output = Option<(Transport, Vec<u8>, Mode)>>>>,
) {
    let Some((stream, leftover, mode)) = handshake.await else {
        return;
    };
    let conn = match &mode {
        Mode::Chat(c) => Some(c.clone()),
        Mode::Echo => None,
    };
    run_ws(&core, stream, leftover, mode).await;
    if let Some(conn) = conn {
        core.conns.borrow_mut().remove(&conn.id);
        core.metrics().connections.fetch_sub(1, Relaxed);
        let (user, device) = (conn.user, conn.device);
        let me = ConnRef {
            core: core.id,
            conn: conn.id,
        };
        drop(conn);
        Box::pin(core.broadcast(|| CoreMsg::Offline {
            user,
            device,
            conn: me,
        }))
        .await;
    }
}

/// Everything before the WebSocket loop: the request head (bounded by `handshake_timeout`),
/// metrics / health / errors answered and closed here, the token and limits checked, the
/// upgrade answered, and a chat connection registered and announced (`Online`). `None`: the
/// connection is done.
async fn handshake(core: Rc<Core>, mut stream: TcpStream) -> Option<(Transport, Vec<u8>, Mode)> {
    let core = &core;
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
            return None;
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
                core,
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
    let first = opened?;
    let (mut stream, mut buf) = match &core.tls {
        Some(tls) if first[0] == 0x16 => match Transport::tls(stream, tls.clone(), &first) {
            Ok(t) => (t, Vec::new()),
            Err(_) => return None,
        },
        _ => (Transport::plain(stream), first),
    };
    let sniffed = futures_lite::future::or(
        async {
            loop {
                if let Some(upgrade) = is_upgrade_request(&buf) {
                    return Some(upgrade);
                }
                match stream.read(core, &mut buf).await {
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
        None => {
            stream.close().await;
            return None;
        }
        Some(false) => {
            crate::api_http::serve(core.clone(), stream, buf, peer).await;
            return None;
        }
        Some(true) => {}
    }
    let head = futures_lite::future::or(
        async { Some(read_head(core, &mut stream, buf).await) },
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
        return None;
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
            None
        }
        Route::Health => {
            let _ = stream
                .write_all(&http::response(200, "OK", "text/plain", b"ok\n"))
                .await;
            None
        }
        Route::Echo { key } => {
            if !core.cfg.echo_endpoint {
                let e = http::HttpError {
                    status: 404,
                    reason: "Not Found",
                    detail: "echo endpoint is disabled",
                };
                let _ = stream.write_all(&http::error_response(&e)).await;
                return None;
            }
            if stream
                .write_all(&http::upgrade_response(&key))
                .await
                .is_ok()
            {
                return Some((stream, leftover, Mode::Echo));
            }
            None
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
                    return None;
                }
            }
            let now_s = crate::core::unix_ms() / 1000;
            let claims = match token.as_deref().map(|t| core.key.verify(t, now_s)) {
                Some(Ok(c)) if !core.is_revoked(&c) => c,
                other => {
                    core.metrics().http_unauthorized.fetch_add(1, Relaxed);
                    let detail = match other {
                        None => "missing token: send Authorization: Bearer <token> or ?token=",
                        Some(Err(crate::token::TokenError::Expired)) => "token expired",
                        _ => "invalid token",
                    };
                    let e = http::HttpError {
                        status: 401,
                        reason: "Unauthorized",
                        detail,
                    };
                    let _ = stream.write_all(&http::error_response(&e)).await;
                    return None;
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
                return None;
            }
            // Devices per user: counted in this core's directory replica (other devices of the
            // same user; a reconnecting device replaces its old connection instead).
            let other_devices = core
                .directory
                .borrow()
                .devices(claims.user)
                .iter()
                .filter(|(d, _, _)| *d != claims.device)
                .count();
            if other_devices >= core.cfg.devices_per_user_max {
                core.metrics().connections_rejected.fetch_add(1, Relaxed);
                let e = http::HttpError {
                    status: 409,
                    reason: "Conflict",
                    detail: "too many devices connected for this user",
                };
                let _ = stream.write_all(&http::error_response(&e)).await;
                return None;
            }
            if stream
                .write_all(&http::upgrade_response(&key))
                .await
                .is_err()
            {
                return None;
            }
            let conn = Rc::new(ConnShared::new(
                core.next_conn_id(),
                claims.user,
                claims.device,
                core.cfg.ping_interval,
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
            Some((stream, leftover, Mode::Chat(conn)))
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
    /// The peer is gone, or it closed (our answering close frame is already in `tx`): just
    /// send what is queued and close the socket.
    Gone,
}

/// Longest wait between two checks of every connection's ping and idle deadlines on a core.
pub const CONN_SWEEP_INTERVAL_MAX: Duration = Duration::from_secs(1);

/// How often a core checks its connections' ping and idle deadlines: a quarter of the ping
/// interval, at most `CONN_SWEEP_INTERVAL_MAX`. Pings and idle closes are therefore up to one
/// interval late, which both timeouts tolerate.
pub fn sweep_interval(cfg: &crate::config::Config) -> Duration {
    (cfg.ping_interval / 4).min(CONN_SWEEP_INTERVAL_MAX)
}

/// One sweep over a core's chat connections (instead of one timer per connection): closes those
/// silent for `idle_timeout` (4003) and asks those due for a ping to send one.
pub fn sweep_conns(core: &Core, now: Instant) {
    let cfg = &core.cfg;
    for c in core.conns.borrow().values() {
        if now.saturating_duration_since(c.last_rx.get()) >= cfg.idle_timeout {
            c.close(close::IDLE_TIMEOUT, "idle timeout");
        } else if now >= c.next_ping.get() {
            c.next_ping.set(now + cfg.ping_interval);
            c.ping_due.set(true);
            c.wake.notify();
        }
    }
}

async fn run_ws(core: &Rc<Core>, mut stream: Transport, leftover: Vec<u8>, mode: Mode) {
    let frame_bytes_max = core.cfg.frame_bytes_max;
    let mut rx = ws::WsReader::new();
    let mut tx: Vec<u8> = Vec::new();
    let mut events: Vec<ws::WsEvent> = Vec::new();
    // Echo connections keep their own deadlines; chat connections are swept by their core.
    let mut echo_last_rx = Instant::now();
    let mut echo_next_ping = echo_last_rx + core.cfg.ping_interval;
    let chat = match &mode {
        Mode::Chat(c) => Some(c.clone()),
        Mode::Echo => None,
    };
    // Bytes from before the first read (sent together with the request head).
    let mut failed = None;
    if !leftover.is_empty() {
        let mut leftover = leftover;
        failed = rx.feed(&mut leftover, frame_bytes_max, &mut events).err();
    }
    let end = 'conn: loop {
        if !events.is_empty() {
            for event in std::mem::take(&mut events) {
                // Boxed: the frame-handling state lives on the heap only while a frame is
                // handled, so an idle connection's task stays small.
                let handling = Box::pin(on_event(core, &mut tx, &mode, event));
                if let Some(end) = handling.await {
                    break 'conn end;
                }
            }
        }
        if let Some(e) = failed.take() {
            break End::Close(e.close_code(), e.reason());
        }
        if let Some(c) = &chat {
            if let Some((code, reason)) = c.closing.get() {
                break End::Close(code, reason);
            }
            if c.ping_due.replace(false) {
                ws::write_frame(&mut tx, ws::opcode::PING, &[]);
            }
            let mut q = c.queue.borrow_mut();
            let n = q.len();
            while let Some(frame) = q.pop_front() {
                ws::write_binary_frame(&mut tx, &frame);
                // The frame's bytes move from the queue to `tx`, which is counted separately.
                c.queued_bytes.set(c.queued_bytes.get() - frame.len());
            }
            core.metrics().frames_out.fetch_add(n as u64, Relaxed);
        }
        if !tx.is_empty() {
            if let Some(c) = &chat {
                c.queued_bytes.set(c.queued_bytes.get() + tx.len());
            }
            let written = tx.len();
            let ok =
                futures_lite::future::or(async { stream.write_all(&tx).await.is_ok() }, async {
                    glommio::timer::sleep(core.cfg.idle_timeout).await;
                    false
                })
                .await;
            if let Some(c) = &chat {
                c.queued_bytes.set(c.queued_bytes.get() - written);
            }
            // Released, not kept: an idle connection holds no send buffer.
            tx = Vec::new();
            if !ok {
                break End::Gone;
            }
            core.metrics().bytes_out.fetch_add(written as u64, Relaxed);
        }
        let can_read = chat
            .as_ref()
            .is_none_or(|c| c.inflight.get() < core.cfg.conn_inflight_sends_max);
        let read = async {
            if can_read {
                Event::Read(stream.read_to_scratch(core).await)
            } else {
                std::future::pending().await
            }
        };
        let event = match &chat {
            Some(c) => {
                let wake = async {
                    c.wake.notified().await;
                    Event::Wake
                };
                futures_lite::future::or(read, wake).await
            }
            None => {
                let deadline = echo_next_ping.min(echo_last_rx + core.cfg.idle_timeout);
                let tick = async {
                    glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
                    Event::Tick
                };
                futures_lite::future::or(read, tick).await
            }
        };
        match event {
            Event::Read(Ok(0)) | Event::Read(Err(_)) => break End::Gone,
            Event::Read(Ok(n)) => {
                let now = Instant::now();
                match &chat {
                    Some(c) => c.last_rx.set(now),
                    None => echo_last_rx = now,
                }
                core.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                let mut scratch = core.read_scratch.borrow_mut();
                failed = rx
                    .feed(&mut scratch[..n], frame_bytes_max, &mut events)
                    .err();
            }
            Event::Wake => {}
            Event::Tick => {
                let now = Instant::now();
                if now >= echo_last_rx + core.cfg.idle_timeout {
                    break End::Close(close::IDLE_TIMEOUT, "idle timeout");
                }
                if now >= echo_next_ping {
                    ws::write_frame(&mut tx, ws::opcode::PING, &[]);
                    echo_next_ping = now + core.cfg.ping_interval;
                }
            }
        }
    };
    if let End::Close(code, reason) = end {
        ws::write_close(&mut tx, code, reason.as_bytes());
    }
    // Send what is queued last: our close, or our answer to the client's close (RFC 6455
    // 5.5.1), bounded in time.
    if !tx.is_empty() {
        let _ =
            futures_lite::future::or(async { stream.write_all(&tx).await.map(|_| ()) }, async {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                Ok(())
            })
            .await;
    }
    let _ = stream.close().await;
}

/// Handles one complete WebSocket message or control frame; `Some(end)` ends the connection.
async fn on_event(
    core: &Rc<Core>,
    tx: &mut Vec<u8>,
    mode: &Mode,
    event: ws::WsEvent,
) -> Option<End> {
    use ws::WsEvent;
    match (mode, event) {
        (Mode::Echo, WsEvent::Message { text, payload }) => {
            if text && std::str::from_utf8(&payload).is_err() {
                return Some(End::Close(close::INVALID_PAYLOAD, "invalid UTF-8"));
            }
            let op = if text {
                ws::opcode::TEXT
            } else {
                ws::opcode::BINARY
            };
            ws::write_frame(tx, op, &payload);
            None
        }
        (Mode::Chat(_), WsEvent::Message { text: true, .. }) => {
            Some(End::Close(close::UNSUPPORTED_DATA, "binary frames only"))
        }
        (Mode::Chat(conn), WsEvent::Message { payload, .. }) => {
            core.metrics().frames_in.fetch_add(1, Relaxed);
            on_frame(core, conn, &payload).await;
            None
        }
        (_, WsEvent::Ping(payload)) => {
            ws::write_frame(tx, ws::opcode::PONG, &payload);
            None
        }
        // Pongs only refresh the receive time (done for every read).
        (_, WsEvent::Pong) => None,
        // Answer a close with the same code and reason, then end.
        (_, WsEvent::Close(frame)) => {
            match frame {
                Some((code, reason)) => ws::write_close(tx, code, &reason),
                None => ws::write_frame(tx, ws::opcode::CLOSE, &[]),
            }
            Some(End::Gone)
        }
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
            *conn.sync.borrow_mut() = Some(Box::new(SyncProgress {
                request_id,
                parts_pending: core.shards_total,
                messages: 0,
                more: false,
                max_seq: HashMap::new(),
                held: Vec::new(),
            }));
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
                let none = HashSet::new();
                let subs = conn.presence_subs.borrow();
                let current = subs.as_deref().unwrap_or(&none);
                (
                    wanted.difference(current).copied().collect(),
                    current.difference(&wanted).copied().collect(),
                )
            };
            *conn.presence_subs.borrow_mut() = (!wanted.is_empty()).then(|| Box::new(wanted));
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
                "connection task future: {size} bytes; ConnShared: {} bytes; WsReader: {}; TcpStream: {}; Timer: {}; run_ws: {}",
                std::mem::size_of::<ConnShared>(),
                std::mem::size_of::<ws::WsReader>(),
                std::mem::size_of::<TcpStream>(),
                std::mem::size_of::<glommio::timer::Timer>(),
                std::mem::size_of_val(&run_ws(
                    &core2,
                    Transport::plain(stream2),
                    Vec::new(),
                    Mode::Echo,
                )),
            );
            // 648 bytes when written; with glommio's task header it fits mimalloc's 768-byte
            // size class. Idle RSS per connection was measured at this size (issue 4 target 2 KB).
            assert!(size <= 704, "the connection future grew to {size} bytes");
        });
    }
}
