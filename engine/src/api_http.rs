//! The HTTP API on the engine's port: every request that is not a WebSocket upgrade comes here
//! and is served on a keep-alive HTTP/1.1 connection driven by the sans-IO `api::http1` codec
//! and `api::router`.
//!
//! ```text
//!  Transport ──bytes──► http1::Conn ──Head──► Router<Endpoint> ──► Endpoint::body_mode
//!                                                                     ├─ Buffer: read whole body (≤ 1 MiB)
//!                                                                     └─ Stream: BodyStream (uploads)
//!                        ┌──────────── dispatch(cx, endpoint, body) ◄───┘
//!                        └──► Reply ──http1::Response──► Transport   (keep-alive, next request)
//! ```
//!
//! # Adding an endpoint
//!
//! 1. Add a variant to [`Endpoint`] and one line to [`router`] (method, path pattern with
//!    `{params}`).
//! 2. If its body is large (uploads), return [`BodyMode::Stream`] for it in
//!    [`Endpoint::body_mode`]; the handler then pulls the body with [`BodyStream::next_chunk`]
//!    (never whole in memory; `Expect: 100-continue` is answered when it first asks).
//! 3. Add its arm to [`dispatch`]: a handler `async fn(&Ctx, Body) -> Handled` in the module
//!    of its service. Errors are `Err(Reply::error(status, code, message))`; helpers on [`Ctx`]
//!    parse JSON bodies (`cx.json`), authenticate (`cx.auth`) and read path parameters
//!    (`cx.param_u64`).
//!
//! Handlers run on the core that accepted the connection and must not block: state owned by
//! another core is reached over the mesh (`calls.rs`), I/O is async.

use crate::calls::Calls;
use crate::core::Core;
use crate::transport::Transport;
use std::cell::RefCell;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use switchboard_api::http1::{
    self, BodyMode, Event, Limits, Method, ParseError, RequestHead, Response,
};
use switchboard_api::origin::OriginPolicy;
use switchboard_api::otp::{self, LogSender, Otp, OtpConfig, SmsSender, WebhookSender};
use switchboard_api::ratelimit::{self, KeyedLimiter};
use switchboard_api::router::{RouteError, Router};
use switchboard_wire::UserId;

/// Every endpoint of the HTTP API. The extension point: see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    Health,
    Metrics,
    PushTokenPut,
    PushTokenDelete,
    ChatMute,
    Register,
    Verify,
    Refresh,
    Logout,
    ListDevices,
    RemoveDevice,
    GetMe,
    PutMe,
    GetUser,
    ContactsLookup,
    PutKeys,
    OwnKeys,
    GetKeys,
    MediaCreate,
    MediaUpload,
    MediaUrl,
    MediaDownload,
}

/// The routing table (built once per core).
pub fn router() -> Router<Endpoint> {
    let mut r = Router::new();
    r.add(Method::Get, "/health", Endpoint::Health)
        .add(Method::Get, "/healthz", Endpoint::Health)
        .add(Method::Get, "/metrics", Endpoint::Metrics)
        .add(Method::Post, "/v1/push/tokens", Endpoint::PushTokenPut)
        .add(Method::Delete, "/v1/push/tokens", Endpoint::PushTokenDelete)
        .add(Method::Put, "/v1/chats/{chat}/mute", Endpoint::ChatMute)
        .add(Method::Post, "/v1/auth/register", Endpoint::Register)
        .add(Method::Post, "/v1/auth/verify", Endpoint::Verify)
        .add(Method::Post, "/v1/auth/refresh", Endpoint::Refresh)
        .add(Method::Post, "/v1/auth/logout", Endpoint::Logout)
        .add(Method::Get, "/v1/devices", Endpoint::ListDevices)
        .add(
            Method::Delete,
            "/v1/devices/{device}",
            Endpoint::RemoveDevice,
        )
        .add(Method::Get, "/v1/users/me", Endpoint::GetMe)
        .add(Method::Put, "/v1/users/me", Endpoint::PutMe)
        .add(Method::Get, "/v1/users/{id}", Endpoint::GetUser)
        .add(
            Method::Post,
            "/v1/contacts/lookup",
            Endpoint::ContactsLookup,
        )
        .add(Method::Put, "/v1/keys", Endpoint::PutKeys)
        .add(Method::Get, "/v1/keys", Endpoint::OwnKeys)
        .add(Method::Get, "/v1/keys/{user}/{device}", Endpoint::GetKeys)
        .add(Method::Post, "/v1/media", Endpoint::MediaCreate)
        .add(Method::Post, "/v1/media/{id}/url", Endpoint::MediaUrl)
        .add(Method::Put, "/v1/media/{id}/blob", Endpoint::MediaUpload)
        .add(Method::Get, "/v1/media/{id}/blob", Endpoint::MediaDownload);
    r
}

impl Endpoint {
    /// How this endpoint's request body is delivered. JSON endpoints buffer it (at most
    /// `http1::REQUEST_BODY_BYTES_MAX`); uploads stream it.
    pub fn body_mode(self) -> BodyMode {
        // Exhaustive on purpose: a new endpoint must say how it reads its body. An upload
        // answers `BodyMode::Stream { bytes_max: <media limit> }`.
        match self {
            Endpoint::Health
            | Endpoint::Metrics
            | Endpoint::PushTokenPut
            | Endpoint::PushTokenDelete
            | Endpoint::ChatMute
            | Endpoint::Register
            | Endpoint::Verify
            | Endpoint::Refresh
            | Endpoint::Logout
            | Endpoint::ListDevices
            | Endpoint::RemoveDevice
            | Endpoint::GetMe
            | Endpoint::PutMe
            | Endpoint::GetUser
            | Endpoint::ContactsLookup
            | Endpoint::PutKeys
            | Endpoint::OwnKeys
            | Endpoint::GetKeys
            | Endpoint::MediaCreate
            | Endpoint::MediaUrl
            | Endpoint::MediaDownload => BodyMode::Buffer,
            // The configured media limit is checked against the declared size before any body
            // byte is read, and no byte past the declared size is accepted.
            Endpoint::MediaUpload => BodyMode::Stream {
                bytes_max: crate::media_svc::MEDIA_BODY_BYTES_CAP,
            },
        }
    }
}

/// What a handler returns: `Err` is an error reply, so handlers can use `?`.
pub type Handled = Result<Reply, Reply>;

/// A response to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    /// Close the connection after this response.
    pub close: bool,
    /// A body streamed from a media file instead of `body` (media downloads).
    pub blob: Option<BlobBody>,
}

/// Part of an uploaded media object (local store), written to the socket in bounded pieces
/// after the head. Named, not held open: a `Reply` may cross cores, a file handle may not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobBody {
    pub media_id: String,
    pub start: u64,
    pub len: u64,
}

impl Reply {
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Reply {
        match serde_json::to_vec(value) {
            Ok(body) => Reply::bytes(status, "application/json", body),
            // Our response types always serialise; a failure is a bug, answered as one.
            Err(e) => Reply::error(500, "internal", &format!("response encoding failed: {e}")),
        }
    }

    pub fn bytes(status: u16, content_type: &'static str, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type: Some(content_type),
            headers: Vec::new(),
            body,
            close: false,
            blob: None,
        }
    }

    /// `204 No Content`.
    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            content_type: None,
            headers: Vec::new(),
            body: Vec::new(),
            close: false,
            blob: None,
        }
    }

    /// The JSON error every failure gets: `{"error": message, "code": code}`.
    pub fn error(status: u16, code: &str, message: &str) -> Reply {
        Reply::bytes(
            status,
            "application/json",
            http1::json_error_body(code, message),
        )
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// `429` with `Retry-After`.
    pub fn rate_limited(code: &str, retry_after_s: u64) -> Reply {
        Reply::error(429, code, "rate limited: retry later")
            .with_header("retry-after", retry_after_s.max(1).to_string())
    }

    fn write(&self, out: &mut Vec<u8>, keep_alive: bool, head_only: bool) {
        let mut r = Response::new(self.status).keep_alive(keep_alive);
        if let Some(ct) = self.content_type {
            r = r.header("content-type", ct);
        }
        for (n, v) in &self.headers {
            r = r.header(n, v);
        }
        if self.status == 204 {
            r.write_head(out, http1::ResponseBody::Empty);
        } else if let Some(b) = &self.blob {
            // The bytes follow (unless HEAD): see `HttpConn::write_reply`.
            r.write_head_only(out, b.len);
        } else if head_only {
            r.write_head_only(out, self.body.len() as u64);
        } else {
            r.write(out, &self.body);
        }
    }
}

/// One request as a handler sees it.
pub struct Ctx<'a> {
    pub core: &'a Rc<Core>,
    pub peer: IpAddr,
    pub head: &'a RequestHead,
    /// Path parameters by name, in pattern order.
    pub params: Vec<(String, String)>,
}

impl Ctx<'_> {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A decimal id parameter; `404 not_found` when it is not one (no such resource).
    pub fn param_u64(&self, name: &str) -> Result<u64, Reply> {
        self.param(name)
            .filter(|v| !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Reply::error(404, "not_found", "no such resource"))
    }

    /// The buffered body parsed as JSON (`415` without `Content-Type: application/json`,
    /// `400 malformed_json` otherwise).
    pub fn json<T: serde::de::DeserializeOwned>(&self, body: Body<'_>) -> Result<T, Reply> {
        let Body::Buffered(bytes) = body else {
            return Err(Reply::error(500, "internal", "endpoint streams its body"));
        };
        http1::parse_json_body(self.head, &bytes).map_err(|e| {
            let message = match &e {
                http1::JsonBodyError::NotJson => "Content-Type must be application/json".into(),
                http1::JsonBodyError::Malformed(m) => format!("malformed JSON body: {m}"),
            };
            Reply::error(e.status(), e.code(), &message)
        })
    }
}

/// A request body: whole (JSON endpoints) or streamed (uploads).
pub enum Body<'a> {
    Buffered(Vec<u8>),
    Stream(BodyStream<'a>),
}

/// A request body read as it arrives. Pull it with [`BodyStream::next_chunk`] until `None`; a
/// handler that answers before the end makes the connection close after its reply.
pub struct BodyStream<'a> {
    conn: &'a mut HttpConn,
    finished: bool,
}

impl BodyStream<'_> {
    /// The next piece of the body, `None` at its end. `Err` is the reply to send (a framing
    /// error, the body limit, a timeout); the connection closes after it.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Reply> {
        if self.finished {
            return Ok(None);
        }
        loop {
            match self.conn.next_event().await {
                Next::Event(Event::Continue) => self.conn.send_continue().await?,
                Next::Event(Event::BodyChunk(data)) => return Ok(Some(data)),
                Next::Event(Event::BodyEnd { .. }) => {
                    self.finished = true;
                    return Ok(None);
                }
                Next::Event(Event::Head(_)) => {
                    // The codec never starts a new request before BodyEnd.
                    return Err(Reply::error(500, "internal", "request framing"));
                }
                Next::Error(e) => return Err(parse_error_reply(e)),
                Next::Closed => {
                    return Err(parse_error_reply(ParseError::UnexpectedEof));
                }
                Next::Timeout => {
                    return Err(Reply::error(408, "timeout", "request body timed out"));
                }
            }
        }
    }

    /// Whether the whole body has been read.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

fn parse_error_reply(e: ParseError) -> Reply {
    let mut r = Reply::error(e.status(), e.code(), e.message());
    r.close = true;
    r
}

/// What the socket side produced.
enum Next {
    Event(Event),
    /// The peer closed (between requests: a normal end).
    Closed,
    Error(ParseError),
    Timeout,
}

/// The codec and the transport of one connection.
struct HttpConn {
    core: Rc<Core>,
    io: Transport,
    http: http1::Conn,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    read_timeout: Duration,
}

impl HttpConn {
    async fn next_event(&mut self) -> Next {
        loop {
            match self.http.poll() {
                Ok(Some(ev)) => return Next::Event(ev),
                Ok(None) if self.http.is_closed() => return Next::Closed,
                Ok(None) => {}
                Err(e) => return Next::Error(e),
            }
            self.inbuf.clear();
            let read = futures_lite::future::or(
                async { Some(self.io.read(&self.core, &mut self.inbuf).await) },
                async {
                    glommio::timer::sleep(self.read_timeout).await;
                    None
                },
            )
            .await;
            match read {
                None => return Next::Timeout,
                Some(Ok(0)) | Some(Err(_)) => {
                    self.http.feed_eof();
                    if self.http.in_request() {
                        return Next::Error(ParseError::UnexpectedEof);
                    }
                    return Next::Closed;
                }
                Some(Ok(n)) => {
                    self.core.metrics().bytes_in.fetch_add(n as u64, Relaxed);
                    self.http.feed(&self.inbuf);
                }
            }
        }
    }

    async fn send_continue(&mut self) -> Result<(), Reply> {
        self.io
            .write_all(http1::CONTINUE_RESPONSE)
            .await
            .map_err(|_| Reply {
                close: true,
                ..Reply::error(400, "unexpected_eof", "connection closed")
            })
    }

    /// Reads a buffered body to its end.
    async fn read_body(&mut self) -> Result<Vec<u8>, Reply> {
        loop {
            match self.next_event().await {
                Next::Event(Event::Continue) => self.send_continue().await?,
                Next::Event(Event::BodyEnd { body }) => return Ok(body),
                Next::Event(_) => return Err(Reply::error(500, "internal", "request framing")),
                Next::Error(e) => return Err(parse_error_reply(e)),
                Next::Closed => return Err(parse_error_reply(ParseError::UnexpectedEof)),
                Next::Timeout => {
                    let mut r = Reply::error(408, "timeout", "request body timed out");
                    r.close = true;
                    return Err(r);
                }
            }
        }
    }

    async fn write_reply(&mut self, reply: &Reply, head_only: bool) -> bool {
        if reply.close {
            self.http.close();
        }
        let keep_alive = self.http.keep_alive();
        self.out.clear();
        reply.write(&mut self.out, keep_alive, head_only);
        let mut ok = self.io.write_all(&self.out).await.is_ok();
        if let (Some(b), false, true) = (&reply.blob, head_only, ok) {
            ok = self.write_blob(b).await;
        }
        ok && keep_alive
    }

    /// Streams a media body: at most `IO_CHUNK_BYTES_MAX` in memory, one file read then one
    /// socket write at a time. A failed read cuts the response short, which the client sees as
    /// a body shorter than `Content-Length`; the connection then closes.
    async fn write_blob(&mut self, b: &BlobBody) -> bool {
        // Objects are never changed or deleted once published, so this is the file the handler
        // checked.
        let Ok((_, blob)) = self.core.media.local.open(&b.media_id).await else {
            return false;
        };
        let mut pos = b.start;
        let end = b.start + b.len;
        let mut ok = end <= blob.len();
        while ok && pos < end {
            let want = (end - pos).min(switchboard_media::IO_CHUNK_BYTES_MAX as u64) as usize;
            let chunk = match blob.read_at(pos, want).await {
                Ok(c) if !c.is_empty() => c,
                Ok(_) | Err(_) => break,
            };
            let n = chunk.len().min(want);
            if self.io.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            self.core.metrics().bytes_out.fetch_add(n as u64, Relaxed);
            pos += n as u64;
        }
        ok &= pos == end;
        let _ = blob.close().await;
        ok
    }
}

/// SMS webhook POSTs in flight per core (each on its own short-lived thread); registrations
/// past it get 503 `busy`.
pub const SMS_POSTS_INFLIGHT_MAX: usize = 64;
/// Time allowed for one SMS webhook POST (connect, write, read the status line).
pub const SMS_POST_TIMEOUT: Duration = Duration::from_secs(5);

/// How login codes leave the server.
pub enum Sms {
    Log(LogSender),
    Webhook(WebhookSender),
}

impl SmsSender for Sms {
    fn deliver(&self, msg: &otp::SmsMessage, now_unix_s: u64) -> otp::SmsDelivery {
        match self {
            Sms::Log(s) => s.deliver(msg, now_unix_s),
            Sms::Webhook(s) => s.deliver(msg, now_unix_s),
        }
    }
}

/// Counts an open HTTP connection while alive.
struct OpenConn<'a>(&'a std::cell::Cell<usize>);

impl Drop for OpenConn<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Per-core state of the HTTP API.
pub struct ApiState {
    /// HTTP API connections open on this core (at most `conns_per_core_max`).
    pub http_conns: std::cell::Cell<usize>,
    pub router: Router<Endpoint>,
    pub origins: OriginPolicy,
    /// Calls to other cores waiting for their answers.
    pub calls: Calls,
    /// Login codes of the phones homed on this core.
    pub otp: RefCell<Otp>,
    pub code_ttl_ms: u64,
    pub sms: Sms,
    pub sms_inflight: Arc<AtomicUsize>,
    /// Per user, on this core (a user's requests spread over cores by connection, so the
    /// effective limit is at most `cores` times this).
    pub contact_lookups: RefCell<KeyedLimiter<UserId>>,
    pub prekey_fetches: RefCell<KeyedLimiter<UserId>>,
}

impl ApiState {
    pub fn new(cfg: &crate::config::Config) -> ApiState {
        let origins: Vec<&str> = cfg.allowed_origins.iter().map(String::as_str).collect();
        let otp_cfg = OtpConfig::default();
        let code_ttl_ms = otp_cfg.code_ttl_ms;
        let sms = match cfg.sms.as_str() {
            "webhook" => Sms::Webhook(WebhookSender::new(
                &cfg.sms_webhook_url,
                cfg.sms_webhook_secret.as_bytes(),
            )),
            _ => Sms::Log(LogSender),
        };
        ApiState {
            http_conns: std::cell::Cell::new(0),
            router: router(),
            // Validated with the config.
            origins: OriginPolicy::new(&origins).expect("allowed_origins validated"),
            calls: Calls::default(),
            otp: RefCell::new(Otp::new(otp_cfg)),
            code_ttl_ms,
            sms,
            sms_inflight: Arc::new(AtomicUsize::new(0)),
            contact_lookups: RefCell::new(KeyedLimiter::new(
                ratelimit::CONTACT_LOOKUPS_PER_USER,
                ratelimit::LIMITER_KEYS_MAX,
            )),
            prekey_fetches: RefCell::new(KeyedLimiter::new(
                ratelimit::PREKEY_FETCHES_PER_USER,
                ratelimit::LIMITER_KEYS_MAX,
            )),
        }
    }
}

/// `http://host:port/path` → (host:port, path). Only plain HTTP with an explicit authority.
pub fn parse_http_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let valid = !authority.is_empty()
        && authority.contains(':')
        && !authority.contains(['@', ' '])
        && !path.contains([' ', '\r', '\n']);
    valid.then(|| (authority.to_owned(), path.to_owned()))
}

/// POSTs an SMS webhook off the reactor: a short-lived thread with blocking std sockets and a
/// timeout (name resolution may block), bounded by `SMS_POSTS_INFLIGHT_MAX`. The registration
/// does not wait for it; a failure is logged.
pub fn post_webhook(core: &Core, post: otp::WebhookPost) {
    let Some((authority, path)) = parse_http_url(&post.url) else {
        eprintln!("switchboard: sms webhook: bad url {:?}", post.url);
        return;
    };
    let inflight = core.api.sms_inflight.clone();
    inflight.fetch_add(1, Relaxed);
    let spawned = std::thread::Builder::new()
        .name("sb-sms-post".into())
        .spawn({
            let inflight = inflight.clone();
            move || {
                if let Err(e) = post_blocking(&authority, &path, &post) {
                    eprintln!("switchboard: sms webhook {authority}{path}: {e}");
                }
                inflight.fetch_sub(1, Relaxed);
            }
        });
    if spawned.is_err() {
        inflight.fetch_sub(1, Relaxed);
        eprintln!("switchboard: sms webhook: cannot start a thread");
    }
}

fn post_blocking(authority: &str, path: &str, post: &otp::WebhookPost) -> std::io::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, SMS_POST_TIMEOUT)?;
    s.set_read_timeout(Some(SMS_POST_TIMEOUT))?;
    s.set_write_timeout(Some(SMS_POST_TIMEOUT))?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {}\r\nConnection: close\r\n",
        post.body.len()
    );
    for (n, v) in &post.headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(&post.body)?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status)?;
    if !status.starts_with(b"HTTP/1.1 2") && !status.starts_with(b"HTTP/1.0 2") {
        return Err(std::io::Error::other(format!(
            "gateway answered {:?}",
            String::from_utf8_lossy(&status)
        )));
    }
    Ok(())
}

/// Serves HTTP requests on one connection until it closes. `initial` holds the bytes already
/// read while telling this connection apart from a WebSocket upgrade.
pub async fn serve(core: Rc<Core>, mut io: Transport, initial: Vec<u8>, peer: IpAddr) {
    core.metrics().http_connections.fetch_add(1, Relaxed);
    // HTTP connections on this core are bounded like WebSocket ones (`conns_per_core_max`).
    if core.api.http_conns.get() >= core.cfg.conns_per_core_max {
        core.metrics().connections_rejected.fetch_add(1, Relaxed);
        let mut out = Vec::new();
        Reply {
            close: true,
            ..Reply::error(503, "unavailable", "connection limit reached")
        }
        .write(&mut out, false, false);
        let _ = io.write_all(&out).await;
        io.close().await;
        return;
    }
    core.api.http_conns.set(core.api.http_conns.get() + 1);
    let _open = OpenConn(&core.api.http_conns);
    let read_timeout = core.cfg.idle_timeout;
    let mut conn = HttpConn {
        core: core.clone(),
        io,
        http: http1::Conn::new(Limits::default()),
        inbuf: Vec::new(),
        out: Vec::new(),
        read_timeout,
    };
    conn.http.feed(&initial);
    loop {
        let head = match conn.next_event().await {
            Next::Event(Event::Head(head)) => head,
            Next::Error(e) => {
                let _ = conn.write_reply(&parse_error_reply(e), false).await;
                break;
            }
            Next::Closed | Next::Timeout | Next::Event(_) => break,
        };
        core.metrics().http_requests.fetch_add(1, Relaxed);
        let head_only = head.method == Method::Head;
        let routed = core.api.router.route(head.method, &head.path).map(|m| {
            let params: Vec<(String, String)> = m
                .params
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect();
            (*m.handler, params)
        });
        let reply = match routed {
            Err(e) => {
                // Read (and drop) the body so the connection can carry the next request.
                match conn.read_body().await {
                    Ok(_) => route_error_reply(&e),
                    Err(r) => r,
                }
            }
            Ok(_) if !core.api.origins.allows(&head) => match conn.read_body().await {
                Ok(_) => Reply::error(
                    403,
                    OriginPolicy::REFUSED_CODE,
                    "this Origin is not on the server's allow-list",
                ),
                Err(r) => r,
            },
            Ok((endpoint, params)) => {
                let mode = endpoint.body_mode();
                conn.http.set_body_mode(mode);
                let cx = Ctx {
                    core: &core,
                    peer,
                    head: &head,
                    params,
                };
                match mode {
                    BodyMode::Buffer => match conn.read_body().await {
                        Ok(body) => flatten(dispatch(&cx, endpoint, Body::Buffered(body)).await),
                        Err(r) => r,
                    },
                    BodyMode::Stream { .. } => {
                        let stream = BodyStream {
                            conn: &mut conn,
                            finished: false,
                        };
                        let reply = flatten(dispatch(&cx, endpoint, Body::Stream(stream)).await);
                        if conn.http.in_request() {
                            // The handler answered before the body's end: its length is
                            // unknown, so no further request can be framed on this connection.
                            conn.http.close();
                        }
                        reply
                    }
                }
            }
        };
        if reply.status >= 400 {
            core.metrics().http_errors.fetch_add(1, Relaxed);
        }
        if !conn.write_reply(&reply, head_only).await {
            break;
        }
    }
    conn.io.close().await;
}

fn flatten(h: Handled) -> Reply {
    match h {
        Ok(r) | Err(r) => r,
    }
}

fn route_error_reply(e: &RouteError) -> Reply {
    match e {
        RouteError::NotFound => Reply::error(404, "not_found", "no such endpoint"),
        RouteError::MethodNotAllowed { allow } => Reply::error(
            405,
            "method_not_allowed",
            "method not allowed on this endpoint",
        )
        .with_header("allow", allow.clone()),
    }
}

/// The one place requests reach their handlers.
async fn dispatch(cx: &Ctx<'_>, endpoint: Endpoint, body: Body<'_>) -> Handled {
    use crate::accounts_svc as acc;
    match endpoint {
        Endpoint::Register => acc::register(cx, body).await,
        Endpoint::Verify => acc::verify(cx, body).await,
        Endpoint::Refresh => acc::refresh(cx, body).await,
        Endpoint::Logout => acc::logout(cx, body).await,
        Endpoint::ListDevices => acc::devices(cx, body).await,
        Endpoint::RemoveDevice => acc::remove_device(cx, body).await,
        Endpoint::GetMe => acc::get_me(cx, body).await,
        Endpoint::PutMe => acc::put_me(cx, body).await,
        Endpoint::GetUser => acc::get_user(cx, body).await,
        Endpoint::ContactsLookup => acc::contacts_lookup(cx, body).await,
        Endpoint::PutKeys => acc::put_keys(cx, body).await,
        Endpoint::OwnKeys => acc::own_keys(cx, body).await,
        Endpoint::GetKeys => acc::get_keys(cx, body).await,
        Endpoint::MediaCreate => crate::media_svc::create(cx, body).await,
        Endpoint::MediaUpload => crate::media_svc::upload(cx, body).await,
        Endpoint::MediaUrl => crate::media_svc::download_url(cx, body).await,
        Endpoint::MediaDownload => crate::media_svc::download(cx, body).await,
        Endpoint::Health => Ok(Reply::bytes(200, "text/plain", b"ok\n".to_vec())),
        Endpoint::Metrics => {
            let mut text = crate::metrics::render(&cx.core.all_metrics);
            if let Some(push) = cx.core.push.get() {
                push.stats.render(&mut text);
            }
            Ok(Reply::bytes(
                200,
                "text/plain; version=0.0.4",
                text.into_bytes(),
            ))
        }
        Endpoint::PushTokenPut => crate::api_push::register(cx, body).await,
        Endpoint::PushTokenDelete => crate::api_push::unregister(cx, body).await,
        Endpoint::ChatMute => crate::api_push::mute(cx, body).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::CoreMetrics;
    use crate::token::TokenKey;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use std::collections::HashMap;

    /// The path an upload endpoint takes: `100 Continue` goes out when the body is first asked
    /// for, the body arrives in pieces (chunked here), its end is seen, the connection carries
    /// the next request, and a declared length over the stream limit is refused with 413.
    #[test]
    fn streamed_bodies_arrive_in_pieces_after_continue() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let cfg = Rc::new(Config::default());
                let metrics = Arc::new(vec![CoreMetrics::new(1)]);
                let key = TokenKey::new(&[1u8; 32]);
                let core = Rc::new(Core::new(
                    0,
                    1,
                    1,
                    cfg,
                    key,
                    metrics,
                    HashMap::new(),
                    Arc::new(crate::shard::ShardPressure::new(1)),
                ));
                let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let mut client = glommio::net::TcpStream::connect(addr).await.unwrap();
                let server = listener.accept().await.unwrap();
                let client_task = glommio::spawn_local(async move {
                    client
                        .write_all(b"PUT /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
                        .await
                        .unwrap();
                    let mut got = Vec::new();
                    let mut buf = [0u8; 64];
                    while !got.ends_with(b"\r\n\r\n") {
                        let n = client.read(&mut buf).await.unwrap();
                        assert!(n > 0);
                        got.extend_from_slice(&buf[..n]);
                    }
                    assert_eq!(got, http1::CONTINUE_RESPONSE);
                    client.write_all(b"5\r\nhello\r\n").await.unwrap();
                    glommio::timer::sleep(Duration::from_millis(20)).await;
                    client.write_all(b"3\r\nabc\r\n0\r\n\r\n").await.unwrap();
                    client
                        .write_all(b"PUT /up HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n")
                        .await
                        .unwrap();
                    client
                });
                let mut conn = HttpConn {
                    core: core.clone(),
                    io: Transport::plain(server),
                    http: http1::Conn::new(Limits::default()),
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    read_timeout: Duration::from_secs(5),
                };
                let Next::Event(Event::Head(head)) = conn.next_event().await else {
                    panic!("no head");
                };
                assert!(head.expect_continue);
                conn.http
                    .set_body_mode(BodyMode::Stream { bytes_max: 10 });
                let mut stream = BodyStream {
                    conn: &mut conn,
                    finished: false,
                };
                let mut pieces = Vec::new();
                while let Some(piece) = stream.next_chunk().await.unwrap() {
                    pieces.push(piece);
                }
                assert!(stream.is_finished());
                assert!(pieces.len() >= 2, "{pieces:?}");
                assert_eq!(pieces.concat(), b"helloabc");
                assert!(!conn.http.in_request());
                // The next request: its declared body is over the stream limit.
                let Next::Event(Event::Head(_)) = conn.next_event().await else {
                    panic!("no second head");
                };
                conn.http
                    .set_body_mode(BodyMode::Stream { bytes_max: 10 });
                let mut stream = BodyStream {
                    conn: &mut conn,
                    finished: false,
                };
                let refused = stream.next_chunk().await.unwrap_err();
                assert_eq!((refused.status, refused.close), (413, true));
                drop(client_task.await);
            });
    }
}
