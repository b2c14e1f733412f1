//! Sans-IO HTTP/1.1 request-head parsing and response building for the one listener that serves
//! the WebSocket upgrade (`GET /v1/ws`), the echo endpoint and `GET /metrics`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Largest request head (request line + headers) accepted; a longer one gets 431.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Most headers in a request head; more gets 431.
pub const REQUEST_HEADERS_MAX: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/ws` with a valid upgrade. `origin`: the `Origin` header, if any (several are
    /// refused here: 403).
    WebSocket {
        key: String,
        token: Option<String>,
        origin: Option<String>,
    },
    /// `GET /v1/echo` with a valid upgrade.
    Echo { key: String },
    /// `GET /metrics`.
    Metrics,
    /// `GET /healthz`.
    Health,
}

/// A request the server answers with an HTTP error status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub reason: &'static str,
    pub detail: &'static str,
}

const fn err(status: u16, reason: &'static str, detail: &'static str) -> HttpError {
    HttpError {
        status,
        reason,
        detail,
    }
}

/// Parses a request head from `buf`. `Ok(None)`: incomplete, read more (unless `buf` already
/// holds `REQUEST_HEAD_BYTES_MAX`, which the caller turns into 431). On success returns the
/// route and the head's length (bytes after it belong to the WebSocket stream).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Route, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= REQUEST_HEAD_BYTES_MAX {
                return Err(err(
                    431,
                    "Request Header Fields Too Large",
                    "request head too large",
                ));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(err(
                431,
                "Request Header Fields Too Large",
                "too many headers",
            ))
        }
        Err(_) => return Err(err(400, "Bad Request", "malformed HTTP request")),
    };
    if head_len > REQUEST_HEAD_BYTES_MAX {
        return Err(err(
            431,
            "Request Header Fields Too Large",
            "request head too large",
        ));
    }
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if method != "GET" {
        return Err(err(405, "Method Not Allowed", "only GET is served here"));
    }
    let header = |name: &str| -> Option<&str> {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    match path {
        "/metrics" => return Ok(Some((Route::Metrics, head_len))),
        "/healthz" => return Ok(Some((Route::Health, head_len))),
        "/v1/ws" | "/v1/echo" => {}
        _ => return Err(err(404, "Not Found", "no such endpoint")),
    }
    // RFC 6455 section 4.2.1: the opening handshake.
    if req.version != Some(1) {
        return Err(err(400, "Bad Request", "WebSocket needs HTTP/1.1"));
    }
    let upgrade_ok = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection_ok = header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !upgrade_ok || !connection_ok {
        return Err(err(
            426,
            "Upgrade Required",
            "this endpoint needs a WebSocket upgrade",
        ));
    }
    if header("sec-websocket-version") != Some("13") {
        return Err(err(
            426,
            "Upgrade Required",
            "only WebSocket version 13 is supported",
        ));
    }
    let key = match header("sec-websocket-key") {
        Some(k) if STANDARD.decode(k).map(|b| b.len() == 16).unwrap_or(false) => k.to_string(),
        _ => {
            return Err(err(
                400,
                "Bad Request",
                "missing or invalid Sec-WebSocket-Key",
            ))
        }
    };
    if path == "/v1/echo" {
        return Ok(Some((Route::Echo { key }, head_len)));
    }
    let token = header("authorization")
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_string())
        })
        .or_else(|| query.and_then(|q| query_param(q, "token")));
    let mut origins = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("origin"));
    let origin = origins
        .next()
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string());
    if origins.next().is_some() {
        return Err(err(403, "Forbidden", "more than one Origin header"));
    }
    Ok(Some((Route::WebSocket { key, token, origin }, head_len)))
}

/// The value of `name` in a query string. Tokens are base64url, so no percent-decoding is needed
/// for valid ones; anything percent-encoded simply fails verification.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// A complete response with a body; the connection is closed after it.
pub fn response(status: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 426 {
        out.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    if status == 401 {
        out.push_str("WWW-Authenticate: Bearer\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

pub fn error_response(e: &HttpError) -> Vec<u8> {
    let body = format!("{{\"error\":{:?},\"status\":{}}}\n", e.detail, e.status);
    response(e.status, e.reason, "application/json", body.as_bytes())
}

/// The `101 Switching Protocols` answer to a valid upgrade.
pub fn upgrade_response(key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn ws(extra: &str, target: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
        )
    }

    fn check(input: &str, expect: Result<Option<Route>, u16>) {
        let got = parse_request(input.as_bytes())
            .map(|o| o.map(|(r, _)| r))
            .map_err(|e| e.status);
        assert_eq!(got, expect, "input: {input:?}");
    }

    #[test]
    fn routes_and_errors() {
        let tok = |t: &str| {
            Ok(Some(Route::WebSocket {
                key: KEY.into(),
                token: Some(t.into()),
                origin: None,
            }))
        };
        check(&ws("Authorization: Bearer abc\r\n", "/v1/ws"), tok("abc"));
        check(&ws("", "/v1/ws?x=1&token=qq"), tok("qq"));
        check(
            &ws("", "/v1/ws"),
            Ok(Some(Route::WebSocket {
                key: KEY.into(),
                token: None,
                origin: None,
            })),
        );
        check(
            &ws("", "/v1/echo"),
            Ok(Some(Route::Echo { key: KEY.into() })),
        );
        check("GET /metrics HTTP/1.1\r\n\r\n", Ok(Some(Route::Metrics)));
        check("GET /metrics HTTP/1.1\r\nHost: a", Ok(None));
        check("GET /nope HTTP/1.1\r\n\r\n", Err(404));
        check("POST /v1/ws HTTP/1.1\r\n\r\n", Err(405));
        check("GET /v1/ws HTTP/1.1\r\n\r\n", Err(426));
        check(
            &ws("", "/v1/ws").replace("Version: 13", "Version: 8"),
            Err(426),
        );
        check(&ws("", "/v1/ws").replace(KEY, "short"), Err(400));
        check("\x00\x01garbage\r\n\r\n", Err(400));
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        check(&format!("GET /metrics HTTP/1.1\r\n{many}\r\n"), Err(431));
        let long = format!(
            "GET /metrics HTTP/1.1\r\nX: {}",
            "a".repeat(REQUEST_HEAD_BYTES_MAX)
        );
        check(&long, Err(431));
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let r = String::from_utf8(upgrade_response(KEY)).unwrap();
        assert!(
            r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{r}"
        );
    }

    /// Mutated copies of valid heads (bit flips, truncation, inserted and duplicated bytes) never
    /// make `parse_request` panic, and a complete head always fits in the input. A deterministic
    /// stand-in for the `engine/fuzz` target `http_request` that runs with `cargo test`.
    #[test]
    fn parse_request_never_panics_on_mutations() {
        let seeds = [
            ws("", "/v1/ws"),
            ws("Authorization: Bearer abc\r\n", "/v1/ws?x=1&token=qq"),
            ws("", "/v1/echo"),
            "GET /metrics HTTP/1.1\r\n\r\n".to_string(),
        ];
        // xorshift64: deterministic, so a failure reproduces.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as usize
        };
        // Bytes that matter to the parser, inserted half the time instead of a random one.
        const SPECIAL: &[u8] = b"\r\n :,?&=\t\0\x7f\xff";
        let (mut complete, mut partial, mut rejected) = (0u32, 0u32, 0u32);
        let mut input = Vec::new();
        for i in 0..100_000 {
            input.clear();
            input.extend_from_slice(seeds[i % seeds.len()].as_bytes());
            for _ in 0..1 + next() % 3 {
                let len = input.len();
                match next() % 4 {
                    0 if len > 0 => {
                        let at = next() % len;
                        input[at] ^= 1u8 << (next() % 8);
                    }
                    1 => input.truncate(next() % (len + 1)),
                    2 => {
                        let byte = if next() % 2 == 0 {
                            SPECIAL[next() % SPECIAL.len()]
                        } else {
                            next() as u8
                        };
                        input.insert(next() % (len + 1), byte);
                    }
                    3 if len > 0 => {
                        let start = next() % len;
                        let end = start + 1 + next() % (len - start).min(32);
                        let piece = input[start..end].to_vec();
                        let at = next() % (len + 1);
                        input.splice(at..at, piece);
                    }
                    _ => {}
                }
            }
            match parse_request(&input) {
                Ok(Some((_, len))) => {
                    assert!(
                        len <= input.len() && len <= REQUEST_HEAD_BYTES_MAX,
                        "head of {len} bytes from {:?}",
                        String::from_utf8_lossy(&input)
                    );
                    complete += 1;
                }
                Ok(None) => partial += 1,
                Err(_) => rejected += 1,
            }
        }
        // The mutations reach every outcome, so the success path is exercised too.
        assert!(
            complete > 1_000 && partial > 1_000 && rejected > 1_000,
            "complete {complete}, partial {partial}, rejected {rejected}"
        );
    }
}
