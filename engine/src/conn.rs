//! One TCP connection on its core: the HTTP request head (upgrade, metrics, health), then the
//! WebSocket loop. The only code that touches client sockets.
//!
//! ```text
//!  socket ──read──► core scratch ──ws::WsReader──► decode_client ──► route to the chat's owner core
//!  ConnShared.queue (frames from any core) ──► tx bytes ──one write──► socket
//!  core sweep (every ≤ 1 s) ──► ping_due (silent ≥ ping_interval) / close(4003) ──wake──► the connection task
//! ```

use crate::core::Core;
use crate::http::{self, Route};
use crate::msg::{Action, ConnRef, CoreMsg, Frame, FrameKind, Origin};
use crate::transport::{ReadScratch, Transport};
use crate::ws::{self, close};
use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::Context;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use switchboard_api::ratelimit::{self, Bucket, Decision};
use switchboard_storage::CursorKind;
use switchboard_wire::{
    decode_client, splitmix64, ChatId, ClientFrame, DeviceId, ErrorCode, ErrorFrame, Seq,
    ServerFrame, Target, UserId,
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

/// Why a connection closes: the close code and its reason, a constant
/// (`conn.close(&(close::IDLE_TIMEOUT, "idle timeout"))`), so `ConnShared` keeps one pointer.
pub type CloseWhy = (u16, &'static str);

/// The state of a connection that only some connections have at a time: one allocation that
/// exists while any of it is in use, one pointer in every `ConnShared`.
#[derive(Default)]
struct Cold {
    sync: Option<SyncProgress>,
    /// Users whose presence this connection follows (at most `PRESENCE_SUBSCRIPTIONS_MAX`).
    presence_subs: HashSet<UserId>,
    /// Frames read but not handled yet because the connection was throttled part-way through
    /// them (at most one read's worth: the core's 64 KiB read scratch); handled, in order,
    /// before the socket is read again.
    parked: Vec<ws::WsEvent>,
}

impl Cold {
    fn is_empty(&self) -> bool {
        self.sync.is_none() && self.presence_subs.is_empty() && self.parked.is_empty()
    }
}

/// The part of a connection other tasks on its core see: its outbound queue and flags. Every
/// connection has one (in an `Rc`, in the core's `conns`), so it is kept small: 112 bytes, the
/// `Rc` allocation fits mimalloc's 128-byte class (guarded in the tests below).
pub struct ConnShared {
    pub id: u64,
    pub user: UserId,
    pub device: DeviceId,
    /// A `Cell`, not a `RefCell` (8 bytes less): taken out, changed and put back, never borrowed
    /// across a call.
    queue: Cell<VecDeque<Frame>>,
    /// Bytes in `queue`, in `held`, and being written from the task's `tx` (at most
    /// `conn_send_queue_bytes_max`, which is below 4 GiB).
    queued_bytes: Cell<u32>,
    inflight: Cell<u32>,
    closing: Cell<Option<&'static CloseWhy>>,
    /// Sync in progress and presence subscriptions; `None` (no allocation) while neither.
    cold: Cell<Option<Box<Cold>>>,
    /// The connection task's waker while it waits (the task is the only waiter), and whether
    /// something happened since it last looked (`notify`).
    waker: Cell<Option<Waker>>,
    woken: Cell<bool>,
    /// When the socket last delivered bytes (`Core::conn_clock_ms`); the core's sweep closes the
    /// connection after `idle_timeout` of silence.
    last_rx_ms: Cell<u32>,
    /// When the sweep next asks for a ping (`Core::conn_clock_ms`); `ping_due` is that request.
    next_ping_ms: Cell<u32>,
    ping_due: Cell<bool>,
    /// Frames per connection (config `frames_per_conn_*`): the bucket's arrival time; the rate
    /// is the same for every connection.
    frames_tat_ms: Cell<u64>,
    /// Not read while set: the connection sent to a shard under pressure and waits in the
    /// core's list for that shard (`Core::throttle_if_pressed`) until the pressure is off.
    throttled: Cell<bool>,
}

/// A duration for the connections' u32 millisecond clock (`Core::conn_clock_ms`), capped at
/// `CONN_TIMEOUT_MAX` (which `Config::validate` enforces) so wrapping comparisons hold.
fn conn_clock_span_ms(d: Duration) -> i32 {
    const _: () = assert!(crate::config::CONN_TIMEOUT_MAX.as_millis() < i32::MAX as u128);
    d.min(crate::config::CONN_TIMEOUT_MAX).as_millis() as i32
}

/// When a new connection's first ping check comes, from its connect time: `ping_ms` less up to a
/// quarter of it, spread by the connection id. Connections opened together (a reconnect storm
/// after a restart, a load test's ramp) then do not come due in the same sweep, and pings stay
/// spread because each later check follows that connection's own last received bytes.
fn first_ping_ms(id: u64, ping_ms: i32) -> i32 {
    let spread = (ping_ms / 4) as u64;
    ping_ms - (splitmix64(id) % (spread + 1)) as i32
}

impl ConnShared {
    fn new(id: u64, user: UserId, device: DeviceId, now_ms: u32, ping_ms: i32) -> ConnShared {
        ConnShared {
            id,
            user,
            device,
            queue: Cell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            inflight: Cell::new(0),
            closing: Cell::new(None),
            cold: Cell::new(None),
            waker: Cell::new(None),
            woken: Cell::new(false),
            last_rx_ms: Cell::new(now_ms),
            next_ping_ms: Cell::new(now_ms.wrapping_add_signed(first_ping_ms(id, ping_ms))),
            ping_due: Cell::new(false),
            frames_tat_ms: Cell::new(0),
            throttled: Cell::new(false),
        }
    }

    /// Runs `f` on the cold state (`None` when there is none; `f` may create it), then frees it
    /// if it ended up empty. `f` must not call back into `with_cold`.
    fn with_cold<R>(&self, f: impl FnOnce(&mut Option<Box<Cold>>) -> R) -> R {
        let mut cold = self.cold.take();
        let r = f(&mut cold);
        self.cold.set(cold.filter(|c| !c.is_empty()));
        r
    }

    fn syncing(&self) -> bool {
        self.with_cold(|c| c.as_ref().is_some_and(|c| c.sync.is_some()))
    }

    /// Wakes the connection task: something is queued, closing, due, or an in-flight slot freed.
    fn notify(&self) {
        self.woken.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Stops reading the socket (see `throttled`); false if it already was stopped.
    pub fn throttle(&self) -> bool {
        !self.throttled.replace(true)
    }

    /// Reads the socket again.
    pub fn unthrottle(&self) {
        self.throttled.set(false);
        self.notify();
    }

    /// Remembers the waiting task's waker (the connection task is the only waiter).
    fn register(&self, waker: &Waker) {
        let current = self.waker.take();
        match current {
            Some(w) if w.will_wake(waker) => self.waker.set(Some(w)),
            _ => self.waker.set(Some(waker.clone())),
        }
    }

    /// Whether the connection task has anything to do besides reading.
    fn has_work(&self) -> bool {
        let queue = self.queue.take();
        let queued = !queue.is_empty();
        self.queue.set(queue);
        queued
            || self.ping_due.get()
            || self.closing.get().is_some()
            || (!self.throttled.get() && self.has_parked())
    }

    /// Whether frames wait in `Cold::parked`.
    fn has_parked(&self) -> bool {
        self.with_cold(|c| c.as_ref().is_some_and(|c| !c.parked.is_empty()))
    }

    /// The frames parked by a throttle, if any (they are handled before anything read later).
    fn take_parked(&self) -> Vec<ws::WsEvent> {
        self.with_cold(|c| c.as_mut().map(|c| std::mem::take(&mut c.parked)))
            .unwrap_or_default()
    }

    fn park(&self, events: Vec<ws::WsEvent>) {
        self.with_cold(|c| c.get_or_insert_default().parked = events);
    }

    /// Asks the connection task to close with `why`; queued frames are dropped (the messages
    /// are durable: the client gets them on its next sync).
    pub fn close(&self, why: &'static CloseWhy) {
        if self.closing.get().is_none() {
            self.closing.set(Some(why));
            drop(self.queue.take());
            self.with_cold(|c| {
                if let Some(c) = c {
                    c.sync = None;
                }
            });
            self.notify();
        }
    }

    /// Accounts `len` more queued bytes; false (and the connection closes) past the limit.
    fn reserve(&self, core: &Core, len: usize) -> bool {
        let total = self.queued_bytes.get() as usize + len;
        match u32::try_from(total) {
            Ok(t) if total <= core.cfg.conn_send_queue_bytes_max => {
                self.queued_bytes.set(t);
                true
            }
            _ => {
                core.metrics().slow_consumer_closes.fetch_add(1, Relaxed);
                self.close(&(
                    close::SLOW_CONSUMER,
                    "send queue full: read faster, then sync",
                ));
                false
            }
        }
    }

    fn unreserve(&self, len: usize) {
        // Never more than was reserved, which fit in a u32.
        self.queued_bytes.set(self.queued_bytes.get() - len as u32);
    }

    fn enqueue(&self, frame: Frame) {
        let mut q = self.queue.take();
        q.push_back(frame);
        self.queue.set(q);
        self.notify();
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
            self.notify();
        }
        if !self.reserve(core, frame.len()) {
            return;
        }
        let frame =
            self.with_cold(
                |cold| match (kind, cold.as_mut().and_then(|c| c.sync.as_mut())) {
                    (FrameKind::Live { chat, seq }, Some(s)) => {
                        s.held.push((chat, seq, frame));
                        None
                    }
                    (FrameKind::SyncMessage { chat, seq }, Some(s)) => {
                        let max = s.max_seq.entry(chat).or_default();
                        *max = (*max).max(seq);
                        s.messages += 1;
                        Some(frame)
                    }
                    _ => Some(frame),
                },
            );
        if let Some(frame) = frame {
            self.enqueue(frame);
        }
    }

    /// One shard finished its part of the sync; after the last, send `SyncDone` and release the
    /// live messages held meanwhile (minus those the sync already delivered).
    pub fn sync_part(&self, core: &Core, request_id: u32, more: bool) {
        let done = self.with_cold(|cold| {
            let c = cold.as_mut()?;
            let s = c.sync.as_mut().filter(|s| s.request_id == request_id)?;
            s.more |= more;
            s.parts_pending -= 1;
            if s.parts_pending > 0 {
                return None;
            }
            c.sync.take()
        });
        let Some(done) = done else {
            return;
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
                self.unreserve(frame.len());
                continue;
            }
            self.enqueue(frame);
        }
    }
}

/// What ended a connection task's idle wait.
enum Woke {
    Read(std::io::Result<usize>),
    Wake,
    Tick,
}

/// Deadlines of an echo connection (chat connections are swept by their core instead).
struct EchoClock {
    last_rx: Instant,
    next_ping: Instant,
}

enum Mode {
    Chat(Rc<ConnShared>),
    Echo(Box<EchoClock>),
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
    let handshake = Box::pin(open(core.clone(), stream));
    // An `async move` block, not an `async fn`, for the same reason as `run_ws`.
    async move {
        let Some((stream, rx, mode, done)) = handshake.await else {
            return;
        };
        // Only the loop holds the connection's `Rc` meanwhile: it hands it back at its end.
        let conn = run_ws(&core, stream, rx, mode, done).await;
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
}

/// The handshake, then the WebSocket loop's first step on bytes that came with the request head,
/// here on the heap rather than in the loop's future. `done`: that step ended the connection.
async fn open(core: Rc<Core>, stream: TcpStream) -> Option<(Transport, ws::WsReader, Mode, bool)> {
    let (mut stream, leftover, mode) = handshake(core.clone(), stream).await?;
    let mut rx = ws::WsReader::new();
    let mut done = false;
    if !leftover.is_empty() {
        let mut leftover = leftover;
        let mut input = Input::default();
        input.failed = rx
            .feed(&mut leftover, core.cfg.frame_bytes_max, &mut input.events)
            .err();
        done = active(&core, &mut stream, &mode, input).await;
    }
    Some((stream, rx, mode, done))
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
                let now = Instant::now();
                let clock = Box::new(EchoClock {
                    last_rx: now,
                    next_ping: now + core.cfg.ping_interval,
                });
                return Some((stream, leftover, Mode::Echo(clock)));
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
                .filter(|e| e.device != claims.device)
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
                core.conn_clock_ms(Instant::now()),
                conn_clock_span_ms(core.cfg.ping_interval),
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
    let now_ms = core.conn_clock_ms(now);
    let (idle_ms, ping_ms) = (
        conn_clock_span_ms(cfg.idle_timeout),
        conn_clock_span_ms(cfg.ping_interval),
    );
    // Signed wrapping differences: readings are at most `CONN_TIMEOUT_MAX` apart.
    let since = |t: u32| now_ms.wrapping_sub(t) as i32;
    for c in core.conns.borrow().values() {
        if c.throttled.get() {
            // Not read because of a shard's pressure: its silence is the server's doing, so its
            // idle clock starts again from here (the peer may well have answered our pings).
            c.last_rx_ms.set(now_ms);
            continue;
        }
        let heard = since(c.last_rx_ms.get());
        if heard >= idle_ms {
            c.close(&(close::IDLE_TIMEOUT, "idle timeout"));
        } else if since(c.next_ping_ms.get()) >= 0 {
            if heard < ping_ms {
                // Bytes arrived within the last ping interval: the peer is alive and a ping
                // would only add a frame each way to a busy connection. Look again one ping
                // interval after those bytes.
                c.next_ping_ms
                    .set(c.last_rx_ms.get().wrapping_add_signed(ping_ms));
            } else {
                c.next_ping_ms.set(now_ms.wrapping_add_signed(ping_ms));
                c.ping_due.set(true);
                c.notify();
            }
        }
    }
}

/// What an active step of the WebSocket loop starts from: the frames just read, a framing error
/// after them, or how the idle wait ended.
#[derive(Default)]
struct Input {
    events: Vec<ws::WsEvent>,
    failed: Option<ws::WsError>,
    /// Echo connections: a ping is due.
    ping: bool,
    end: Option<End>,
}

/// The WebSocket loop of one connection. Every idle connection is this future, waiting in
/// `WaitPlain` (`wait_chat`, boxed, under TLS): it holds only the socket, the frame reader and
/// the mode. Whatever happens —
/// bytes read, frames queued, a ping or close due — runs in `active`, a future boxed for the
/// time it runs (frame handling, routing, the write), so its state is never paid per idle
/// connection.
///
/// Not an `async fn`: an async fn keeps a second copy of its arguments (they are moved into
/// locals at its start), which would double the socket's and the reader's share of every idle
/// task. The `async move` block here (and in `serve`) uses its captures in place.
///
/// Returns the chat connection's `ConnShared` at the end, so that its caller need not hold a
/// second `Rc` meanwhile. `done`: the connection already ended (in `open`).
#[allow(clippy::manual_async_fn)] // on purpose, see above
fn run_ws(
    core: &Rc<Core>,
    mut stream: Transport,
    mut rx: ws::WsReader,
    mut mode: Mode,
    mut done: bool,
) -> impl Future<Output = Option<Rc<ConnShared>>> + '_ {
    async move {
        while !done {
            let woke = match &mode {
                Mode::Chat(c) => {
                    if c.has_work() {
                        Woke::Wake
                    } else {
                        let can_read = (c.inflight.get() as usize)
                            < core.cfg.conn_inflight_sends_max
                            && !c.throttled.get()
                            && !c.has_parked();
                        if stream.is_tls() {
                            // Boxed: TLS connections carry a session of several KiB anyway.
                            Box::pin(wait_chat(core, &mut stream, c, can_read)).await
                        } else {
                            WaitPlain {
                                core,
                                stream: &mut stream,
                                conn: c,
                                can_read,
                            }
                            .await
                        }
                    }
                }
                // Echo connections keep their own deadlines (a test endpoint: its boxed wait, one
                // allocation per wait, keeps the timer out of every chat connection's task).
                Mode::Echo(clock) => {
                    let deadline = clock.next_ping.min(clock.last_rx + core.cfg.idle_timeout);
                    let stream = &mut stream;
                    Box::pin(futures_lite::future::or(
                        async { Woke::Read(stream.read_to_scratch(core).await) },
                        async {
                            glommio::timer::sleep(
                                deadline.saturating_duration_since(Instant::now()),
                            )
                            .await;
                            Woke::Tick
                        },
                    ))
                    .await
                }
            };
            // Computed outside this future: a local borrowed here would stay in its state.
            let Some(input) = after_wait(core, &mut rx, &mut mode, woke) else {
                continue;
            };
            // Boxed: see `run_ws`. One allocation per wake-up that has work.
            done = Box::pin(active(core, &mut stream, &mode, input)).await;
        }
        match mode {
            Mode::Chat(c) => Some(c),
            Mode::Echo(_) => None,
        }
    }
}

/// What the WebSocket loop does after its idle wait ended with `woke`: `None`, wait again;
/// else run an active step with the returned input.
fn after_wait(core: &Core, rx: &mut ws::WsReader, mode: &mut Mode, woke: Woke) -> Option<Input> {
    let mut input = Input::default();
    match woke {
        Woke::Read(Ok(0)) | Woke::Read(Err(_)) => input.end = Some(End::Gone),
        Woke::Read(Ok(n)) => {
            let now = Instant::now();
            match mode {
                Mode::Chat(c) => c.last_rx_ms.set(core.conn_clock_ms(now)),
                Mode::Echo(clock) => clock.last_rx = now,
            }
            core.metrics().bytes_in.fetch_add(n as u64, Relaxed);
            let mut scratch = core.read_scratch.borrow_mut();
            input.failed = rx
                .feed(
                    &mut scratch[..n],
                    core.cfg.frame_bytes_max,
                    &mut input.events,
                )
                .err();
            if input.events.is_empty() && input.failed.is_none() {
                // Part of a frame: nothing to do until the rest arrives.
                return None;
            }
        }
        Woke::Wake => {
            if let Mode::Chat(c) = &*mode {
                if !c.has_work() {
                    // An in-flight slot freed: wait again, reading if now allowed.
                    return None;
                }
            }
        }
        Woke::Tick => {
            let now = Instant::now();
            if let Mode::Echo(clock) = mode {
                if now >= clock.last_rx + core.cfg.idle_timeout {
                    input.end = Some(End::Close(close::IDLE_TIMEOUT, "idle timeout"));
                } else if now >= clock.next_ping {
                    input.ping = true;
                    clock.next_ping = now + core.cfg.ping_interval;
                } else {
                    return None;
                }
            }
        }
    }
    Some(input)
}

/// The idle wait of a plain chat connection, `wait_chat` written by hand: four words in every
/// idle connection's task instead of a dozen.
struct WaitPlain<'a> {
    core: &'a Core,
    stream: &'a mut Transport,
    conn: &'a ConnShared,
    can_read: bool,
}

impl Future for WaitPlain<'_> {
    type Output = Woke;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Woke> {
        let this = self.get_mut();
        if this.conn.woken.replace(false) {
            return Poll::Ready(Woke::Wake);
        }
        if this.can_read {
            match this.stream.poll_read_plain_to_scratch(cx, this.core) {
                Some(Poll::Ready(r)) => return Poll::Ready(Woke::Read(r)),
                Some(Poll::Pending) => {}
                None => unreachable!("WaitPlain on a TLS transport"),
            }
        }
        this.conn.register(cx.waker());
        Poll::Pending
    }
}

/// The idle wait of a chat connection: the socket's next bytes (left in the core's read
/// scratch; not while `can_read` is false), or a `notify` on the connection. Used boxed, for
/// TLS connections; plain ones use `WaitPlain`.
async fn wait_chat(core: &Core, stream: &mut Transport, conn: &ConnShared, can_read: bool) -> Woke {
    let mut read = std::pin::pin!(stream.read_to_scratch(core));
    std::future::poll_fn(|cx| {
        if conn.woken.replace(false) {
            // The read is dropped unpolled since its last `Pending`: a TLS read keeps what it
            // decrypted (`transport.rs`).
            return Poll::Ready(Woke::Wake);
        }
        if can_read {
            if let Poll::Ready(r) = read.as_mut().poll(cx) {
                return Poll::Ready(Woke::Read(r));
            }
        }
        conn.register(cx.waker());
        Poll::Pending
    })
    .await
}

/// One active step of the WebSocket loop: handles `input`, then writes whatever is queued —
/// again after each write, since frames queued while a write waits for the socket must not wait
/// for the next read — and at an end sends the close and closes the socket. True: the
/// connection is done.
async fn active(core: &Rc<Core>, stream: &mut Transport, mode: &Mode, input: Input) -> bool {
    let mut tx: Vec<u8> = Vec::new();
    let Some(end) = step(core, stream, mode, input, &mut tx).await else {
        return false;
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
    stream.close().await;
    true
}

async fn step(
    core: &Rc<Core>,
    stream: &mut Transport,
    mode: &Mode,
    input: Input,
    tx: &mut Vec<u8>,
) -> Option<End> {
    let chat = match mode {
        Mode::Chat(c) => Some(c),
        Mode::Echo(_) => None,
    };
    let mut events = input.events;
    // A connection that goes on (no framing error, no end) stops handling frames once it is
    // throttled and parks the rest; parked frames come first, before anything read later.
    let may_park = input.failed.is_none() && input.end.is_none();
    if let Some(c) = chat.filter(|c| !c.throttled.get()) {
        let mut parked = c.take_parked();
        if !parked.is_empty() {
            parked.append(&mut events);
            events = parked;
        }
    }
    let mut events = events.into_iter();
    while let Some(event) = events.next() {
        if let Some(end) = on_event(core, tx, mode, event).await {
            return Some(end);
        }
        if let Some(c) = chat.filter(|c| may_park && c.throttled.get()) {
            let rest: Vec<_> = events.collect();
            if !rest.is_empty() {
                c.park(rest);
            }
            break;
        }
    }
    if let Some(e) = input.failed {
        return Some(End::Close(e.close_code(), e.reason()));
    }
    if let Some(end) = input.end {
        return Some(end);
    }
    if input.ping {
        ws::write_frame(tx, ws::opcode::PING, &[]);
    }
    loop {
        if let Some(c) = chat {
            // Everything notified so far is handled below.
            c.woken.set(false);
            if let Some(&(code, reason)) = c.closing.get() {
                return Some(End::Close(code, reason));
            }
            if c.ping_due.replace(false) {
                ws::write_frame(tx, ws::opcode::PING, &[]);
            }
            let mut q = c.queue.take();
            let n = q.len();
            for frame in q.drain(..) {
                ws::write_binary_frame(tx, &frame);
                // The frame's bytes move from the queue to `tx`, which is counted below.
                c.unreserve(frame.len());
            }
            c.queue.set(q);
            core.metrics().frames_out.fetch_add(n as u64, Relaxed);
        }
        if tx.is_empty() {
            return None;
        }
        let written = tx.len();
        if let Some(c) = chat {
            // Moved from the queue (or produced here: pongs, pings, replies to bad frames).
            c.queued_bytes
                .set(c.queued_bytes.get().saturating_add(written as u32));
        }
        let ok = futures_lite::future::or(async { stream.write_all(tx).await.is_ok() }, async {
            glommio::timer::sleep(core.cfg.idle_timeout).await;
            false
        })
        .await;
        if let Some(c) = chat {
            c.queued_bytes
                .set(c.queued_bytes.get().saturating_sub(written as u32));
        }
        tx.clear();
        if !ok {
            return Some(End::Gone);
        }
        core.metrics().bytes_out.fetch_add(written as u64, Relaxed);
        // Echo connections have no queue: done after one write.
        chat?;
    }
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
        (Mode::Echo(_), WsEvent::Message { text, payload }) => {
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
    let rate = crate::config::Config::rate(
        core.cfg.frames_per_conn_burst,
        core.cfg.frames_per_conn_refill_per_s,
    );
    let mut bucket = Bucket::with_tat(rate, conn.frames_tat_ms.get());
    let frame_ok = bucket.check(now_ms).is_allowed();
    conn.frames_tat_ms.set(bucket.tat_ms());
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
    // The chat whose shard this frame stages records in: if that shard is under pressure, the
    // connection is not read again until it is off (the frame itself goes on).
    let stages_in = match &frame {
        ClientFrame::Send(req) => match req.target {
            Target::Peer(p) => Some(ChatId::direct(conn.user, p)),
            Target::Chat(c) => Some(c),
        },
        ClientFrame::Delivered { chat, .. }
        | ClientFrame::Read { chat, .. }
        | ClientFrame::Edit { chat, .. }
        | ClientFrame::Delete { chat, .. }
        | ClientFrame::React { chat, .. } => Some(*chat),
        ClientFrame::CreateGroup(req) => Some(ChatId::group(conn.user, req.client_msg_id)),
        ClientFrame::GroupUpdate(req) => Some(req.chat),
        _ => None,
    };
    route_frame(core, conn, origin, frame).await;
    if let Some(chat) = stages_in {
        core.throttle_if_pressed(conn, core.shard_of(chat));
    }
}

/// Sends a checked, rate-allowed frame where it is handled (usually the owner of its chat).
async fn route_frame(core: &Rc<Core>, conn: &Rc<ConnShared>, origin: Origin, frame: ClientFrame) {
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
            if conn.syncing() {
                return reply_error(
                    core,
                    conn,
                    ErrorCode::InvalidArgument,
                    "a sync is already in progress",
                    request_id,
                    None,
                );
            }
            conn.with_cold(|c| {
                c.get_or_insert_default().sync = Some(SyncProgress {
                    request_id,
                    parts_pending: core.shards_total,
                    messages: 0,
                    more: false,
                    max_seq: HashMap::new(),
                    held: Vec::new(),
                })
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
            // The set lives in the cold state, which is freed when it is empty and no sync runs.
            let (added, removed): (Vec<UserId>, Vec<UserId>) = conn.with_cold(|cold| {
                let current = cold
                    .as_mut()
                    .map(|c| std::mem::take(&mut c.presence_subs))
                    .unwrap_or_default();
                let diff = (
                    wanted.difference(&current).copied().collect(),
                    current.difference(&wanted).copied().collect(),
                );
                if !wanted.is_empty() {
                    cold.get_or_insert_default().presence_subs = wanted;
                }
                diff
            });
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

    fn test_core(cfg: Config) -> Rc<Core> {
        let metrics = Arc::new(vec![CoreMetrics::new(1)]);
        Rc::new(Core::new(
            0,
            1,
            1,
            Rc::new(cfg),
            TokenKey::new(&[1u8; 32]),
            metrics,
            HashMap::new(),
            Arc::new(crate::shard::ShardPressure::new(1)),
        ))
    }

    fn test_conn(core: &Core) -> Rc<ConnShared> {
        Rc::new(ConnShared::new(
            1,
            UserId(1),
            DeviceId(1),
            core.conn_clock_ms(Instant::now()),
            conn_clock_span_ms(core.cfg.ping_interval),
        ))
    }

    /// Every idle connection is one task holding this future, plus its `ConnShared`; their
    /// sizes are most of the per-connection user-space memory, so they are guarded here.
    #[test]
    fn connection_task_size_is_bounded() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let core = test_core(Config::default());
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let _client = glommio::net::TcpStream::connect(addr).await.unwrap();
                let stream = listener.accept().await.unwrap();
                let _client2 = glommio::net::TcpStream::connect(addr).await.unwrap();
                let stream2 = listener.accept().await.unwrap();
                let conn = test_conn(&core);
                let size = std::mem::size_of_val(&serve(core.clone(), stream));
                let mut t2 = Transport::plain(stream2);
                let wait = std::mem::size_of_val(&wait_chat(&core, &mut t2, &conn, true));
                let read = std::mem::size_of_val(&t2.read_to_scratch(&core));
                eprintln!(
                    "wait_chat: {wait}; read_to_scratch: {read}; Input: {}; WsError: {}; Mode: {}",
                    std::mem::size_of::<Input>(),
                    std::mem::size_of::<ws::WsError>(),
                    std::mem::size_of::<Mode>(),
                );
                let ws_loop = run_ws(&core, t2, ws::WsReader::new(), Mode::Chat(conn), false);
                eprintln!(
                    "connection task future: {size} bytes; run_ws: {}; ConnShared: {} bytes; \
                 WsReader: {}; Transport: {}; TcpStream: {}; Timer: {}",
                    std::mem::size_of_val(&ws_loop),
                    std::mem::size_of::<ConnShared>(),
                    std::mem::size_of::<ws::WsReader>(),
                    std::mem::size_of::<Transport>(),
                    std::mem::size_of::<TcpStream>(),
                    std::mem::size_of::<glommio::timer::Timer>(),
                );
                // 264 bytes when written (688 before the active path was boxed): with glommio's
                // task header (40 B) and schedule closure the task fits mimalloc's 320-byte size
                // class. Idle RSS per connection was measured at this size and at 288 bytes
                // (benches/results/dev-2vcpu/idle-memory.md).
                assert!(size <= 264, "the connection future grew to {size} bytes");
                // 112 bytes: with the Rc counts, 128, a mimalloc size class.
                let shared = std::mem::size_of::<ConnShared>();
                assert!(shared <= 112, "ConnShared grew to {shared} bytes");
            });
    }

    /// The sweep pings only connections that have been silent for `ping_interval`, closes those
    /// silent for `idle_timeout` (but never one the server is not reading: throttled), and
    /// connections opened together come due spread over the last quarter of the interval
    /// instead of all in one sweep.
    #[test]
    fn sweep_pings_only_silent_connections_and_spreads_first_pings() {
        let ping_ms = 10_000;
        let firsts: HashSet<i32> = (0..1000u64).map(|id| first_ping_ms(id, ping_ms)).collect();
        assert!(firsts.iter().all(|f| (7_500..=10_000).contains(f)));
        assert!(
            firsts.len() > 500,
            "first pings not spread: {}",
            firsts.len()
        );
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let core = test_core(Config {
                    ping_interval: Duration::from_secs(10),
                    idle_timeout: Duration::from_secs(30),
                    ..Config::default()
                });
                let t0 = Instant::now();
                let at = |s: u64| t0 + Duration::from_secs(s);
                let mk = |id: u64| {
                    let c = Rc::new(ConnShared::new(
                        id,
                        UserId(id),
                        DeviceId(1),
                        core.conn_clock_ms(t0),
                        ping_ms,
                    ));
                    core.conns.borrow_mut().insert(id, c.clone());
                    c
                };
                let (busy, silent, dead, throttled) = (mk(1), mk(2), mk(3), mk(4));
                assert!(throttled.throttle());
                // Nobody is due before 7.5 s.
                sweep_conns(&core, at(7));
                assert!(!busy.ping_due.get() && !silent.ping_due.get() && !dead.ping_due.get());
                // At 11 s every first check has come; `busy` sent something at 9 s.
                busy.last_rx_ms.set(core.conn_clock_ms(at(9)));
                sweep_conns(&core, at(11));
                assert!(
                    !busy.ping_due.get(),
                    "a connection heard 2 s ago was pinged"
                );
                assert_eq!(busy.next_ping_ms.get(), core.conn_clock_ms(at(19)));
                assert!(silent.ping_due.get() && dead.ping_due.get());
                silent.ping_due.set(false);
                // `busy` stays quiet from 9 s: its ping comes once it has been silent 10 s.
                sweep_conns(&core, at(18));
                assert!(!busy.ping_due.get());
                sweep_conns(&core, at(19));
                assert!(busy.ping_due.get());
                // `silent` answered at 12 s; `dead` never did and is closed at 30 s.
                silent.last_rx_ms.set(core.conn_clock_ms(at(12)));
                sweep_conns(&core, at(30));
                assert!(dead
                    .closing
                    .get()
                    .is_some_and(|(code, _)| *code == close::IDLE_TIMEOUT));
                assert!(silent.closing.get().is_none() && busy.closing.get().is_none());
                // Throttled (not read) the whole time: neither pinged nor closed, and once read
                // again its idle clock runs from the last sweep.
                assert!(!throttled.ping_due.get() && throttled.closing.get().is_none());
                throttled.unthrottle();
                sweep_conns(&core, at(59));
                assert!(throttled.closing.get().is_none());
                sweep_conns(&core, at(60));
                assert!(throttled
                    .closing
                    .get()
                    .is_some_and(|(code, _)| *code == close::IDLE_TIMEOUT));
            });
    }

    /// A frame queued while the connection task waits for the socket to take an earlier write
    /// must be written once that write is done, not when the client next sends something.
    #[test]
    fn a_frame_queued_during_a_write_is_written_without_a_read() {
        use futures_lite::AsyncReadExt;
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let core = test_core(Config {
                    conn_send_queue_bytes_max: 256 << 20,
                    ..Config::default()
                });
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let mut client = glommio::net::TcpStream::connect(listener.local_addr().unwrap())
                    .await
                    .unwrap();
                let stream = listener.accept().await.unwrap();
                let conn = test_conn(&core);
                let task = glommio::spawn_local({
                    let (core, conn) = (core.clone(), conn.clone());
                    async move {
                        run_ws(
                            &core,
                            Transport::plain(stream),
                            ws::WsReader::new(),
                            Mode::Chat(conn),
                            false,
                        )
                        .await
                    }
                });
                let reply = FrameKind::Reply {
                    completes_send: false,
                };
                // More than the kernel buffers of both ends hold while the client does not read.
                let big: Frame = vec![7u8; 48 << 20].into();
                let small: Frame = vec![9u8; 10].into();
                let expected = big.len() + 10 + small.len() + 2;
                conn.push(&core, big, reply);
                glommio::timer::sleep(Duration::from_millis(200)).await;
                assert!(
                    conn.queued_bytes.get() > 0,
                    "the big frame's write should still wait for the socket"
                );
                conn.push(&core, small, reply);
                let read_all = async {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut got = 0;
                    while got < expected {
                        let n = client.read(&mut buf).await.unwrap();
                        assert!(n > 0, "server closed after {got} bytes");
                        got += n;
                    }
                    got
                };
                let got = futures_lite::future::or(async { Some(read_all.await) }, async {
                    glommio::timer::sleep(Duration::from_secs(10)).await;
                    None
                })
                .await;
                assert_eq!(
                    got,
                    Some(expected),
                    "the frame queued during the write is late"
                );
                drop(client);
                task.await;
            });
    }
}
