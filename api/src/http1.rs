//! Sans-IO HTTP/1.1 server codec for keep-alive connections.
//!
//! ```text
//!  socket bytes ──feed──► Conn ──poll──► Event::Head ─► (caller routes; may set_body_mode(Stream))
//!                                        Event::Continue   ─► write CONTINUE_RESPONSE
//!                                        Event::BodyChunk  ─► (stream mode) hand to the upload
//!                                        Event::BodyEnd    ─► handle, write a Response
//!  Response / write_json_error ──► out: Vec<u8> ──► socket
//! ```
//!
//! Call order per connection: `feed(bytes)` after each read, then `poll()` until it returns
//! `Ok(None)`; stop polling between `BodyEnd` and the response to it, so pipelined requests are
//! answered in order (their bytes stay buffered). `poll()` returning `Err(e)` ends the
//! connection: answer with [`write_error`] (which says `Connection: close`) and close. When
//! [`Conn::keep_alive`] is false after a response, close too.
//!
//! The head is parsed by `httparse`; bodies are framed by `Content-Length` or
//! `Transfer-Encoding: chunked` (nothing else; a request with both is refused, the classic
//! smuggling vector). Buffered bodies are capped by `request_body_bytes_max`; a caller that
//! expects a large body (media upload) switches that request to [`BodyMode::Stream`] right
//! after its `Head` and receives the body as it arrives, never whole.

use std::fmt;

/// Largest request head (request line + headers + blank line) accepted; a longer one gets 431.
/// Each connection may buffer this much before a request is complete.
pub const REQUEST_HEAD_BYTES_MAX: usize = 16 * 1024;
/// Most header lines in one request; more gets 431. Bounds the parser's stack array
/// (`httparse::Header` is 32 bytes, so 2 KiB).
pub const REQUEST_HEADERS_MAX: usize = 64;
/// Longest request target (path + query); longer gets 414. Our paths are short; the longest
/// legitimate targets are signed media URLs (~200 bytes).
pub const REQUEST_TARGET_BYTES_MAX: usize = 4 * 1024;
/// Largest body buffered whole (JSON requests); larger gets 413. Media uploads use
/// [`BodyMode::Stream`] with their own limit instead.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;
/// Default largest streamed body (media upload), 100 MiB as the issue asks; configurable per
/// request through [`BodyMode::Stream`].
pub const MEDIA_BODY_BYTES_MAX: u64 = 100 * 1024 * 1024;
/// Longest chunk-size line of a chunked body, extensions included; longer gets 400.
pub const CHUNK_LINE_BYTES_MAX: usize = 1024;
/// Largest trailer section of a chunked body (trailers are read and ignored); larger gets 431.
pub const CHUNK_TRAILER_BYTES_MAX: usize = 8 * 1024;
/// Longest method, version and separators on a request line beyond the target: a head limit
/// must leave room for a request line with a maximal target, so such a line is never a 431.
const REQUEST_LINE_OVERHEAD_BYTES_MAX: usize = 32;
/// Longest method token that can be valid (`OPTIONS`), with room to spare.
const METHOD_BYTES_MAX: usize = 16;

const _: () =
    assert!(REQUEST_TARGET_BYTES_MAX + REQUEST_LINE_OVERHEAD_BYTES_MAX < REQUEST_HEAD_BYTES_MAX);
const _: () = assert!(REQUEST_BODY_BYTES_MAX as u64 <= MEDIA_BODY_BYTES_MAX);

/// What to write after `Event::Continue`.
pub const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Per-connection limits, defaulting to the constants above (the engine's config may lower
/// them). `request_headers_max` cannot exceed [`REQUEST_HEADERS_MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub request_head_bytes_max: usize,
    pub request_headers_max: usize,
    pub request_target_bytes_max: usize,
    pub request_body_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_head_bytes_max: REQUEST_HEAD_BYTES_MAX,
            request_headers_max: REQUEST_HEADERS_MAX,
            request_target_bytes_max: REQUEST_TARGET_BYTES_MAX,
            request_body_bytes_max: REQUEST_BODY_BYTES_MAX,
        }
    }
}

/// The request methods the server implements; anything else gets 501.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Get,
        Method::Head,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
        Method::Options,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
        }
    }

    /// Methods are case-sensitive (RFC 9110 §9.1).
    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Whether a request with this method must declare its body length (else 411). Our POST,
    /// PUT and PATCH endpoints all take bodies; an empty one is `Content-Length: 0`.
    fn requires_length(self) -> bool {
        matches!(self, Method::Post | Method::Put | Method::Patch)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no `Content-Length`, no `Transfer-Encoding`).
    None,
    Length(u64),
    Chunked,
}

/// One header line; the name is lower-cased, the value is as sent (trimmed by httparse).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

/// A parsed, validated request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// The request target as sent (origin-form `/path?query`, or `*` for `OPTIONS`).
    pub target: String,
    /// The path (not percent-decoded); for an absolute-form target, its path part.
    pub path: String,
    pub query: Option<String>,
    pub version: Version,
    pub headers: Vec<Header>,
    pub body: BodyFraming,
    /// Whether the client lets the connection stay open after this request.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        debug_assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_slice())
    }

    /// The first header with this name, if it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The value of query parameter `key` (not percent-decoded).
    pub fn query_param(&self, key: &str) -> Option<&str> {
        self.query
            .as_deref()?
            .split('&')
            .find_map(|kv| match kv.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if kv == key => Some(""),
                _ => None,
            })
    }
}

/// Why a request was refused. Every variant is the client's fault (the codec has no other
/// failure); each maps to a status and a stable machine-readable `code` for the JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// The head is not valid HTTP/1.x syntax. 400.
    MalformedHead,
    /// Not HTTP/1.0 or HTTP/1.1. 505.
    UnsupportedVersion,
    /// A method we do not implement. 501.
    UnsupportedMethod,
    /// Not origin-form (or `*` for OPTIONS, or absolute-form), or not ASCII. 400.
    BadTarget,
    /// The target is longer than `request_target_bytes_max`. 414.
    TargetTooLong,
    /// The head is larger than `request_head_bytes_max`. 431.
    HeadTooLarge,
    /// More than `request_headers_max` header lines. 431.
    TooManyHeaders,
    /// HTTP/1.1 without exactly one `Host`. 400.
    BadHost,
    /// `Content-Length` not a plain decimal, or repeated. 400.
    BadContentLength,
    /// Both `Content-Length` and `Transfer-Encoding`, or `chunked` not last. 400.
    BadFraming,
    /// A transfer coding other than `chunked` (gzip, …), or one in an HTTP/1.0 request. 501.
    UnsupportedTransferEncoding,
    /// An `Expect` other than `100-continue`. 417.
    UnsupportedExpectation,
    /// POST/PUT/PATCH without `Content-Length` or chunked encoding. 411.
    LengthRequired,
    /// The body is larger than the limit of its mode. 413.
    BodyTooLarge,
    /// Bad chunked framing (size line, CRLF after data). 400.
    MalformedChunk,
    /// The chunked trailer section is larger than [`CHUNK_TRAILER_BYTES_MAX`]. 431.
    TrailersTooLarge,
    /// The peer closed the connection in the middle of a request. 400 (rarely deliverable).
    UnexpectedEof,
}

impl ParseError {
    pub fn status(self) -> u16 {
        match self {
            ParseError::MalformedHead
            | ParseError::BadTarget
            | ParseError::BadHost
            | ParseError::BadContentLength
            | ParseError::BadFraming
            | ParseError::MalformedChunk
            | ParseError::UnexpectedEof => 400,
            ParseError::LengthRequired => 411,
            ParseError::BodyTooLarge => 413,
            ParseError::TargetTooLong => 414,
            ParseError::UnsupportedExpectation => 417,
            ParseError::HeadTooLarge
            | ParseError::TooManyHeaders
            | ParseError::TrailersTooLarge => 431,
            ParseError::UnsupportedMethod | ParseError::UnsupportedTransferEncoding => 501,
            ParseError::UnsupportedVersion => 505,
        }
    }

    /// The stable error code of the JSON error body.
    pub fn code(self) -> &'static str {
        match self {
            ParseError::MalformedHead => "malformed_request",
            ParseError::UnsupportedVersion => "http_version_not_supported",
            ParseError::UnsupportedMethod => "method_not_implemented",
            ParseError::BadTarget => "bad_target",
            ParseError::TargetTooLong => "uri_too_long",
            ParseError::HeadTooLarge => "headers_too_large",
            ParseError::TooManyHeaders => "too_many_headers",
            ParseError::BadHost => "bad_host",
            ParseError::BadContentLength => "bad_content_length",
            ParseError::BadFraming => "bad_framing",
            ParseError::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            ParseError::UnsupportedExpectation => "expectation_failed",
            ParseError::LengthRequired => "length_required",
            ParseError::BodyTooLarge => "body_too_large",
            ParseError::MalformedChunk => "malformed_chunk",
            ParseError::TrailersTooLarge => "trailers_too_large",
            ParseError::UnexpectedEof => "unexpected_eof",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            ParseError::MalformedHead => "malformed HTTP request",
            ParseError::UnsupportedVersion => "only HTTP/1.0 and HTTP/1.1 are supported",
            ParseError::UnsupportedMethod => "method not implemented",
            ParseError::BadTarget => "request target must be an ASCII absolute path",
            ParseError::TargetTooLong => "request target too long",
            ParseError::HeadTooLarge => "request head too large",
            ParseError::TooManyHeaders => "too many header fields",
            ParseError::BadHost => "exactly one Host header is required",
            ParseError::BadContentLength => "invalid Content-Length",
            ParseError::BadFraming => "conflicting or invalid message framing",
            ParseError::UnsupportedTransferEncoding => {
                "only chunked transfer-encoding is supported"
            }
            ParseError::UnsupportedExpectation => "only Expect: 100-continue is supported",
            ParseError::LengthRequired => "Content-Length or chunked encoding required",
            ParseError::BodyTooLarge => "request body too large",
            ParseError::MalformedChunk => "malformed chunked body",
            ParseError::TrailersTooLarge => "chunked trailers too large",
            ParseError::UnexpectedEof => "connection closed mid-request",
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

impl std::error::Error for ParseError {}

/// How the body of the current request is delivered; chosen after its `Head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyMode {
    /// Collect the whole body (up to `request_body_bytes_max`) into `BodyEnd`. The default.
    Buffer,
    /// Hand the body out as `BodyChunk`s as it arrives, refusing more than `bytes_max` in total.
    Stream { bytes_max: u64 },
}

/// What [`Conn::poll`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new request. Its body (possibly empty) follows; `BodyEnd` always comes.
    Head(RequestHead),
    /// The client sent `Expect: 100-continue` and the body was accepted (mode chosen, length
    /// within the limit): write [`CONTINUE_RESPONSE`] now. To refuse instead, answer with a final
    /// status and close.
    Continue,
    /// Body bytes, in [`BodyMode::Stream`] only.
    BodyChunk(Vec<u8>),
    /// The request is complete. In [`BodyMode::Buffer`] `body` holds it all; in stream mode it
    /// is empty.
    BodyEnd { body: Vec<u8> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunked {
    /// Reading a chunk-size line.
    Size,
    /// `remaining` data bytes of the current chunk.
    Data { remaining: u64 },
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk, `bytes` read so far.
    Trailers { bytes: usize },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Waiting for a request head. `scanned` bytes of the buffer hold no head terminator.
    Head { scanned: usize },
    /// Head delivered; the first `poll` fixes the body mode.
    HeadDelivered {
        framing: BodyFraming,
        expect_continue: bool,
    },
    Body {
        framing: BodyState,
        mode: BodyMode,
        /// Body bytes received so far.
        received: u64,
        body: Vec<u8>,
    },
    /// `BodyEnd` given; the next poll starts the next request (or closes).
    Done,
    /// No more requests on this connection (error, `Connection: close`, or EOF).
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyState {
    Length { remaining: u64 },
    Chunked(Chunked),
}

/// One HTTP/1.1 connection's request side. See the module docs for the call order.
#[derive(Debug)]
pub struct Conn {
    limits: Limits,
    /// Received bytes not consumed yet, from `start`.
    buf: Vec<u8>,
    start: usize,
    state: State,
    /// Mode requested for the current request's body.
    mode: BodyMode,
    /// Whether the current request lets the connection stay open.
    keep_alive: bool,
    eof: bool,
}

impl Default for Conn {
    fn default() -> Self {
        Conn::new(Limits::default())
    }
}

impl Conn {
    pub fn new(limits: Limits) -> Self {
        assert!(limits.request_headers_max <= REQUEST_HEADERS_MAX);
        assert!(
            limits.request_target_bytes_max + REQUEST_LINE_OVERHEAD_BYTES_MAX
                < limits.request_head_bytes_max
        );
        Conn {
            limits,
            buf: Vec::new(),
            start: 0,
            state: State::Head { scanned: 0 },
            mode: BodyMode::Buffer,
            keep_alive: true,
            eof: false,
        }
    }

    /// Appends bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Compact so a long-lived connection's buffer does not grow with its history.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The peer closed its sending side: a request in progress is an error, an idle
    /// connection just ends.
    pub fn feed_eof(&mut self) {
        self.eof = true;
    }

    /// Bytes received and not yet consumed (pipelined requests wait here).
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Whether the connection may carry another request after the current response. False
    /// after `Connection: close`, an HTTP/1.0 request without keep-alive, an error, or EOF.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive && !matches!(self.state, State::Closed) && !self.eof
    }

    /// No more requests will come from this connection.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Ends the connection after the current response: for refusing a request (401, 403, 413…)
    /// without reading its body, whose end is then unknown. `keep_alive()` turns false, so the
    /// response says `Connection: close`.
    pub fn close(&mut self) {
        self.state = State::Closed;
        self.keep_alive = false;
    }

    /// Whether a request is between its `Head` and its `BodyEnd`.
    pub fn in_request(&self) -> bool {
        matches!(self.state, State::HeadDelivered { .. } | State::Body { .. })
    }

    /// Chooses how the current request's body is delivered. Call right after `Event::Head`,
    /// before the next `poll`; later calls are ignored (debug builds assert).
    pub fn set_body_mode(&mut self, mode: BodyMode) {
        debug_assert!(matches!(self.state, State::HeadDelivered { .. }));
        if matches!(self.state, State::HeadDelivered { .. }) {
            self.mode = mode;
        }
    }

    /// Produces the next event, `Ok(None)` when more bytes are needed (or the connection is
    /// closed). After `Err`, the connection is closed: answer with [`write_error`] and close.
    pub fn poll(&mut self) -> Result<Option<Event>, ParseError> {
        let result = self.poll_inner();
        if result.is_err() {
            self.state = State::Closed;
            self.keep_alive = false;
        }
        result
    }

    fn poll_inner(&mut self) -> Result<Option<Event>, ParseError> {
        loop {
            match &mut self.state {
                State::Closed => return Ok(None),
                State::Done => {
                    if !self.keep_alive {
                        self.state = State::Closed;
                        return Ok(None);
                    }
                    self.state = State::Head { scanned: 0 };
                    self.mode = BodyMode::Buffer;
                }
                State::Head { .. } => return self.poll_head(),
                State::HeadDelivered {
                    framing,
                    expect_continue,
                } => {
                    let (framing, expect_continue) = (*framing, *expect_continue);
                    let limit = self.body_limit();
                    let body = match framing {
                        BodyFraming::None => {
                            self.state = State::Done;
                            return Ok(Some(Event::BodyEnd { body: Vec::new() }));
                        }
                        BodyFraming::Length(n) if n > limit => {
                            return Err(ParseError::BodyTooLarge)
                        }
                        BodyFraming::Length(0) => {
                            self.state = State::Done;
                            return Ok(Some(Event::BodyEnd { body: Vec::new() }));
                        }
                        BodyFraming::Length(n) => BodyState::Length { remaining: n },
                        BodyFraming::Chunked => BodyState::Chunked(Chunked::Size),
                    };
                    let capacity = match (self.mode, framing) {
                        // Trust the declared length for the allocation only up to what is here.
                        (BodyMode::Buffer, BodyFraming::Length(n)) => {
                            clamp_len(n, self.buf.len() - self.start)
                        }
                        _ => 0,
                    };
                    self.state = State::Body {
                        framing: body,
                        mode: self.mode,
                        received: 0,
                        body: Vec::with_capacity(capacity),
                    };
                    if expect_continue {
                        return Ok(Some(Event::Continue));
                    }
                }
                State::Body { .. } => return self.poll_body(),
            }
        }
    }

    fn body_limit(&self) -> u64 {
        match self.mode {
            BodyMode::Buffer => self.limits.request_body_bytes_max as u64,
            BodyMode::Stream { bytes_max } => bytes_max,
        }
    }

    fn poll_head(&mut self) -> Result<Option<Event>, ParseError> {
        let State::Head { scanned } = self.state else {
            unreachable!("poll_head outside State::Head");
        };
        // Blank lines before a request line are ignored (RFC 9112 §2.2); consuming them here
        // keeps them out of the terminator search.
        let blank = self.buf[self.start..]
            .iter()
            .take_while(|&&b| b == b'\r' || b == b'\n')
            .count();
        if blank > 0 {
            self.start += blank;
            self.state = State::Head { scanned: 0 };
        }
        let scanned = if blank > 0 { 0 } else { scanned };
        let input = &self.buf[self.start..];
        if input.is_empty() {
            if self.eof {
                self.state = State::Closed;
            }
            return Ok(None);
        }
        // Only run httparse once the head can be complete, so a client trickling a head byte
        // by byte costs O(n), not O(n²).
        let Some(end) = find_head_end(input, scanned) else {
            self.state = State::Head {
                scanned: input.len(),
            };
            return self.head_incomplete();
        };
        // The same checks, in the same order, as on an incomplete head, so the outcome does
        // not depend on how the bytes were split across reads.
        self.check_request_line(&input[..end])?;
        if end > self.limits.request_head_bytes_max {
            return Err(ParseError::HeadTooLarge);
        }
        let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
        let mut req = httparse::Request::new(&mut headers[..self.limits.request_headers_max]);
        let head_len = match req.parse(&input[..end]) {
            Ok(httparse::Status::Complete(n)) => n,
            // A head terminator after a non-blank start cannot leave httparse wanting more.
            Ok(httparse::Status::Partial) => return Err(ParseError::MalformedHead),
            Err(httparse::Error::TooManyHeaders) => return Err(ParseError::TooManyHeaders),
            Err(httparse::Error::Version) => return Err(ParseError::UnsupportedVersion),
            Err(_) => return Err(ParseError::MalformedHead),
        };
        let head = validate_head(&req, &self.limits)?;
        self.start += head_len;
        self.keep_alive = head.keep_alive;
        self.mode = BodyMode::Buffer;
        self.state = State::HeadDelivered {
            framing: head.body,
            expect_continue: head.expect_continue,
        };
        Ok(Some(Event::Head(head)))
    }

    /// Refuses a request line that cannot become valid whatever follows: a method longer than
    /// any we know (400), or a target over the limit (414).
    fn check_request_line(&self, input: &[u8]) -> Result<(), ParseError> {
        let line = request_line(input);
        let method_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
        if method_len > METHOD_BYTES_MAX {
            return Err(ParseError::MalformedHead);
        }
        let target = line[(method_len + 1).min(line.len())..]
            .split(|&b| b == b' ')
            .next()
            .unwrap_or(&[]);
        if target.len() > self.limits.request_target_bytes_max {
            return Err(ParseError::TargetTooLong);
        }
        Ok(())
    }

    fn head_incomplete(&mut self) -> Result<Option<Event>, ParseError> {
        let input = &self.buf[self.start..];
        self.check_request_line(input)?;
        if input.len() >= self.limits.request_head_bytes_max {
            return Err(ParseError::HeadTooLarge);
        }
        if self.eof {
            return Err(ParseError::UnexpectedEof);
        }
        Ok(None)
    }

    fn poll_body(&mut self) -> Result<Option<Event>, ParseError> {
        let limit = self.body_limit();
        let State::Body {
            framing,
            mode,
            received,
            body,
        } = &mut self.state
        else {
            unreachable!("poll_body outside State::Body");
        };
        loop {
            let input = &self.buf[self.start..];
            match framing {
                BodyState::Length { remaining } => {
                    if *remaining == 0 {
                        let body = std::mem::take(body);
                        self.state = State::Done;
                        return Ok(Some(Event::BodyEnd { body }));
                    }
                    if input.is_empty() {
                        return if self.eof {
                            Err(ParseError::UnexpectedEof)
                        } else {
                            Ok(None)
                        };
                    }
                    let n = clamp_len(*remaining, input.len());
                    *remaining -= n as u64;
                    *received += n as u64;
                    let data = &input[..n];
                    self.start += n;
                    match mode {
                        BodyMode::Buffer => body.extend_from_slice(data),
                        BodyMode::Stream { .. } => {
                            return Ok(Some(Event::BodyChunk(data.to_vec())))
                        }
                    }
                }
                BodyState::Chunked(Chunked::Size) => {
                    let Some(nl) = input
                        .iter()
                        .take(CHUNK_LINE_BYTES_MAX)
                        .position(|&b| b == b'\n')
                    else {
                        if input.len() >= CHUNK_LINE_BYTES_MAX {
                            return Err(ParseError::MalformedChunk);
                        }
                        return if self.eof {
                            Err(ParseError::UnexpectedEof)
                        } else {
                            Ok(None)
                        };
                    };
                    let size = parse_chunk_size(&input[..nl])?;
                    self.start += nl + 1;
                    if size > limit.saturating_sub(*received) {
                        return Err(ParseError::BodyTooLarge);
                    }
                    *framing = BodyState::Chunked(if size == 0 {
                        Chunked::Trailers { bytes: 0 }
                    } else {
                        Chunked::Data { remaining: size }
                    });
                }
                BodyState::Chunked(Chunked::Data { remaining }) => {
                    if input.is_empty() {
                        return if self.eof {
                            Err(ParseError::UnexpectedEof)
                        } else {
                            Ok(None)
                        };
                    }
                    let n = clamp_len(*remaining, input.len());
                    *remaining -= n as u64;
                    *received += n as u64;
                    let data = &input[..n];
                    self.start += n;
                    if *remaining == 0 {
                        *framing = BodyState::Chunked(Chunked::DataEnd);
                    }
                    match mode {
                        BodyMode::Buffer => body.extend_from_slice(data),
                        BodyMode::Stream { .. } => {
                            return Ok(Some(Event::BodyChunk(data.to_vec())))
                        }
                    }
                }
                BodyState::Chunked(Chunked::DataEnd) => {
                    if input.len() < 2 {
                        return if self.eof {
                            Err(ParseError::UnexpectedEof)
                        } else {
                            Ok(None)
                        };
                    }
                    if &input[..2] != b"\r\n" {
                        return Err(ParseError::MalformedChunk);
                    }
                    self.start += 2;
                    *framing = BodyState::Chunked(Chunked::Size);
                }
                BodyState::Chunked(Chunked::Trailers { bytes }) => {
                    let allowance = CHUNK_TRAILER_BYTES_MAX - *bytes;
                    let Some(nl) = input.iter().take(allowance).position(|&b| b == b'\n') else {
                        if input.len() >= allowance {
                            return Err(ParseError::TrailersTooLarge);
                        }
                        return if self.eof {
                            Err(ParseError::UnexpectedEof)
                        } else {
                            Ok(None)
                        };
                    };
                    let line = &input[..nl];
                    if line.last() != Some(&b'\r') {
                        return Err(ParseError::MalformedChunk);
                    }
                    let is_end = line.len() == 1;
                    self.start += nl + 1;
                    *bytes += nl + 1;
                    if is_end {
                        let body = std::mem::take(body);
                        self.state = State::Done;
                        return Ok(Some(Event::BodyEnd { body }));
                    }
                    if !line.contains(&b':') {
                        return Err(ParseError::MalformedChunk);
                    }
                }
            }
        }
    }
}

fn clamp_len(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

/// The end (exclusive) of the first head terminator (`\n\r\n` or `\n\n`) in `input`, searching
/// from `scanned` (minus the 2 bytes a terminator can straddle).
fn find_head_end(input: &[u8], scanned: usize) -> Option<usize> {
    let from = scanned.saturating_sub(2).max(1);
    (from..input.len()).find_map(|i| {
        if input[i] != b'\n' {
            return None;
        }
        let prev = input[i - 1];
        if prev == b'\n' || (prev == b'\r' && i >= 2 && input[i - 2] == b'\n') {
            Some(i + 1)
        } else {
            None
        }
    })
}

/// The first line of `input` (as far as it goes), after the blank lines httparse skips.
fn request_line(input: &[u8]) -> &[u8] {
    let from = input
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(input.len());
    let rest = &input[from..];
    let to = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    &rest[..to]
}

/// `1*HEXDIG [BWS ";" ext] CRLF`, the line without its `\n`.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ParseError> {
    let line = line.strip_suffix(b"\r").ok_or(ParseError::MalformedChunk)?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(ParseError::MalformedChunk);
    }
    let rest = &line[digits..];
    let rest_trimmed: &[u8] = {
        let ws = rest
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        &rest[ws..]
    };
    if !(rest_trimmed.is_empty() || rest_trimmed[0] == b';') {
        return Err(ParseError::MalformedChunk);
    }
    if rest_trimmed.iter().any(|&b| b == b'\r' || b == 0) {
        return Err(ParseError::MalformedChunk);
    }
    // Leading zeros are allowed; more than 16 significant digits overflow u64.
    let significant = line[..digits].iter().skip_while(|&&b| b == b'0').count();
    if significant > 16 {
        return Err(ParseError::BodyTooLarge);
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).ok_or(ParseError::MalformedChunk)?;
        size = (size << 4) | u64::from(d);
    }
    Ok(size)
}

fn comma_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn validate_head(
    req: &httparse::Request<'_, '_>,
    limits: &Limits,
) -> Result<RequestHead, ParseError> {
    let version = match req.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(ParseError::UnsupportedVersion),
    };
    let method_str = req.method.ok_or(ParseError::MalformedHead)?;
    let method = Method::parse(method_str).ok_or(ParseError::UnsupportedMethod)?;
    let target = req.path.ok_or(ParseError::MalformedHead)?;
    if target.len() > limits.request_target_bytes_max {
        return Err(ParseError::TargetTooLong);
    }
    if !target.is_ascii() {
        return Err(ParseError::BadTarget);
    }
    let origin = if target.starts_with('/') {
        target
    } else if target == "*" {
        if method != Method::Options {
            return Err(ParseError::BadTarget);
        }
        "*"
    } else if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        // Absolute-form (RFC 9112 §3.2.2): servers must accept it; the path starts at the first
        // '/' after the authority, and is "/" when there is none.
        match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
            Some(_) | None => "/",
        }
    } else {
        return Err(ParseError::BadTarget);
    };
    let (path, query) = match origin.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (origin, None),
    };
    let path = if path.is_empty() { "/" } else { path };

    let mut headers = Vec::with_capacity(req.headers.len());
    let mut hosts = 0usize;
    let mut content_length: Option<u64> = None;
    let mut transfer_codings: Vec<Vec<u8>> = Vec::new();
    let mut conn_close = false;
    let mut conn_keep_alive = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = h.value;
        match name.as_str() {
            "host" => hosts += 1,
            "content-length" => {
                if content_length.is_some() {
                    return Err(ParseError::BadContentLength);
                }
                content_length = Some(parse_content_length(value)?);
            }
            "transfer-encoding" => {
                transfer_codings.extend(comma_tokens(value).map(<[u8]>::to_ascii_lowercase));
            }
            "connection" => {
                for t in comma_tokens(value) {
                    conn_close |= t.eq_ignore_ascii_case(b"close");
                    conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            "expect" => {
                if value.trim_ascii().eq_ignore_ascii_case(b"100-continue") {
                    expect_continue = true;
                } else {
                    return Err(ParseError::UnsupportedExpectation);
                }
            }
            _ => {}
        }
        headers.push(Header {
            name,
            value: value.to_vec(),
        });
    }
    if (version == Version::Http11 && hosts != 1) || hosts > 1 {
        return Err(ParseError::BadHost);
    }
    let body = if !transfer_codings.is_empty() {
        if version == Version::Http10 {
            return Err(ParseError::UnsupportedTransferEncoding);
        }
        if content_length.is_some() {
            return Err(ParseError::BadFraming);
        }
        let chunked_last = transfer_codings.last().is_some_and(|c| c == b"chunked");
        if !chunked_last {
            return Err(ParseError::BadFraming);
        }
        if transfer_codings.len() > 1 {
            return Err(ParseError::UnsupportedTransferEncoding);
        }
        BodyFraming::Chunked
    } else if let Some(n) = content_length {
        BodyFraming::Length(n)
    } else {
        if method.requires_length() {
            return Err(ParseError::LengthRequired);
        }
        BodyFraming::None
    };
    let keep_alive = match version {
        Version::Http11 => !conn_close,
        Version::Http10 => conn_keep_alive && !conn_close,
    };
    // Expect on HTTP/1.0 is ignored (RFC 9110 §10.1.1).
    let expect_continue =
        expect_continue && version == Version::Http11 && body != BodyFraming::None;
    Ok(RequestHead {
        method,
        target: target.to_owned(),
        path: path.to_owned(),
        query,
        version,
        headers,
        body,
        keep_alive,
        expect_continue,
    })
}

/// `1*DIGIT`, nothing else (no sign, no list; a value past u64 is refused as too large).
fn parse_content_length(value: &[u8]) -> Result<u64, ParseError> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadContentLength);
    }
    let significant = v.iter().skip_while(|&&b| b == b'0').count();
    if significant > 19 {
        return Err(ParseError::BodyTooLarge);
    }
    let mut n: u64 = 0;
    for &b in v {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(ParseError::BodyTooLarge)?;
    }
    Ok(n)
}

/// The reason phrase for the statuses we send.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// How a response's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    /// `Content-Length: n`; the caller writes `n` bytes after the head (none for HEAD).
    Length(u64),
    /// `Transfer-Encoding: chunked`; the caller writes [`write_chunk`]s then [`write_last_chunk`].
    Chunked,
    /// No body and no length header (1xx, 204, 304).
    Empty,
}

/// A response head under construction. Header values must not contain CR or LF (a header
/// that does is dropped, and debug builds assert), so user data cannot split the response.
#[derive(Clone, Debug)]
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

impl Response {
    pub fn new(status: u16) -> Self {
        debug_assert!((100..=599).contains(&status));
        Response {
            status,
            headers: Vec::new(),
            keep_alive: true,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        let valid_name = !name.is_empty() && name.bytes().all(is_token_byte);
        let valid_value = !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
        debug_assert!(
            valid_name && valid_value,
            "bad response header {name:?}: {value:?}"
        );
        if valid_name && valid_value {
            self.headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }

    /// `false` adds `Connection: close`; pass [`Conn::keep_alive`].
    pub fn keep_alive(mut self, keep_alive: bool) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// Writes the status line and headers, with the framing header for `body`.
    pub fn write_head(&self, out: &mut Vec<u8>, body: ResponseBody) {
        use std::io::Write as _;
        let no_body_status = self.status < 200 || self.status == 204 || self.status == 304;
        debug_assert!(!no_body_status || body == ResponseBody::Empty || self.status == 304);
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        match body {
            ResponseBody::Length(n) if !no_body_status => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            ResponseBody::Chunked if !no_body_status => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
            _ => {}
        }
        if !self.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Writes the whole response with `body` and its `Content-Length`.
    pub fn write(&self, out: &mut Vec<u8>, body: &[u8]) {
        self.write_head(out, ResponseBody::Length(body.len() as u64));
        out.extend_from_slice(body);
    }

    /// Writes the head of a response to HEAD: the length of the body a GET would get, no body.
    pub fn write_head_only(&self, out: &mut Vec<u8>, body_len: u64) {
        self.write_head(out, ResponseBody::Length(body_len));
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One chunk of a chunked response body; empty `data` writes nothing (an empty chunk would end
/// the body).
pub fn write_chunk(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write as _;
    if data.is_empty() {
        return;
    }
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked response body.
pub fn write_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

/// The JSON error body every failure gets: `{"error": message, "code": code}`.
pub fn json_error_body(code: &str, message: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        code: &'a str,
    }
    // Serialising two strings into a Vec cannot fail.
    serde_json::to_vec(&ErrorBody {
        error: message,
        code,
    })
    .unwrap_or_default()
}

/// Writes an error response with a JSON body; `extra` headers (e.g. `allow`, `retry-after`)
/// are added.
pub fn write_json_error(
    out: &mut Vec<u8>,
    status: u16,
    code: &str,
    message: &str,
    keep_alive: bool,
    extra: &[(&str, &str)],
) {
    let mut r = Response::new(status)
        .header("content-type", "application/json")
        .keep_alive(keep_alive);
    for (n, v) in extra {
        r = r.header(n, v);
    }
    r.write(out, &json_error_body(code, message));
}

/// Writes the answer to a [`ParseError`]; the connection must close after it.
pub fn write_error(out: &mut Vec<u8>, err: ParseError) {
    write_json_error(out, err.status(), err.code(), err.message(), false, &[]);
}

/// Why a JSON request body was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JsonBodyError {
    /// `Content-Type` is not `application/json` (parameters such as `charset=utf-8` allowed).
    /// 415.
    NotJson,
    /// Not valid JSON of the expected shape; the message says where. 400.
    Malformed(String),
}

impl JsonBodyError {
    pub fn status(&self) -> u16 {
        match self {
            JsonBodyError::NotJson => 415,
            JsonBodyError::Malformed(_) => 400,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            JsonBodyError::NotJson => "unsupported_media_type",
            JsonBodyError::Malformed(_) => "malformed_json",
        }
    }

    /// Writes the JSON error response.
    pub fn write_response(&self, out: &mut Vec<u8>, keep_alive: bool) {
        let message = match self {
            JsonBodyError::NotJson => "Content-Type must be application/json".to_owned(),
            JsonBodyError::Malformed(m) => format!("malformed JSON body: {m}"),
        };
        write_json_error(out, self.status(), self.code(), &message, keep_alive, &[]);
    }
}

/// Parses a buffered request body as JSON into `T`, after checking its `Content-Type`.
pub fn parse_json_body<T: serde::de::DeserializeOwned>(
    head: &RequestHead,
    body: &[u8],
) -> Result<T, JsonBodyError> {
    let is_json = head.header_str("content-type").is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err(JsonBodyError::NotJson);
    }
    serde_json::from_slice(body).map_err(|e| JsonBodyError::Malformed(e.to_string()))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) for the `Date` header, from Unix seconds.
pub fn http_date(unix_s: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests;
