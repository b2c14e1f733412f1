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

use crate::core::Core;
use crate::transport::Transport;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use switchboard_api::http1::{
    self, BodyMode, Event, Limits, Method, ParseError, RequestHead, Response,
};
use switchboard_api::origin::OriginPolicy;
use switchboard_api::router::{RouteError, Router};

/// Every endpoint of the HTTP API. The extension point: see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    Health,
    Metrics,
}

/// The routing table (built once per core).
pub fn router() -> Router<Endpoint> {
    let mut r = Router::new();
    r.add(Method::Get, "/health", Endpoint::Health)
        .add(Method::Get, "/healthz", Endpoint::Health)
        .add(Method::Get, "/metrics", Endpoint::Metrics);
    r
}

impl Endpoint {
    /// How this endpoint's request body is delivered. JSON endpoints buffer it (at most
    /// `http1::REQUEST_BODY_BYTES_MAX`); uploads stream it.
    pub fn body_mode(self) -> BodyMode {
        match self {
            Endpoint::Health | Endpoint::Metrics => BodyMode::Buffer,
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
        let ok = self.io.write_all(&self.out).await.is_ok();
        ok && keep_alive
    }
}

/// Per-core state of the HTTP API.
pub struct ApiState {
    pub router: Router<Endpoint>,
    pub origins: OriginPolicy,
}

impl ApiState {
    pub fn new(cfg: &crate::config::Config) -> ApiState {
        let origins: Vec<&str> = cfg.allowed_origins.iter().map(String::as_str).collect();
        ApiState {
            router: router(),
            // Validated with the config.
            origins: OriginPolicy::new(&origins).expect("allowed_origins validated"),
        }
    }
}

/// Serves HTTP requests on one connection until it closes. `initial` holds the bytes already
/// read while telling this connection apart from a WebSocket upgrade.
pub async fn serve(core: Rc<Core>, io: Transport, initial: Vec<u8>, peer: IpAddr) {
    core.metrics().http_connections.fetch_add(1, Relaxed);
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
    let _ = &body;
    match endpoint {
        Endpoint::Health => Ok(Reply::bytes(200, "text/plain", b"ok\n".to_vec())),
        Endpoint::Metrics => {
            let text = crate::metrics::render(&cx.core.all_metrics);
            Ok(Reply::bytes(
                200,
                "text/plain; version=0.0.4",
                text.into_bytes(),
            ))
        }
    }
}
