//! The HTTP API on the engine's port, over real sockets: keep-alive, pipelining, protocol
//! errors with JSON bodies, Origin policy, and the endpoints.

mod util;

use serde_json::json;
use util::{Http, Server};

#[test]
fn health_and_metrics_on_one_keep_alive_connection() {
    let server = Server::start(2);
    let mut c = Http::connect(&server.addr);
    for _ in 0..3 {
        let r = c.request("GET", "/health", None, None);
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));
        assert_eq!(r.header("connection"), None, "keep-alive is the default");
        let r = c.request("GET", "/healthz", None, None);
        assert_eq!(r.status, 200);
        let r = c.request("GET", "/metrics", None, None);
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body).unwrap();
        assert!(text.contains("switchboard_http_requests_total"), "{text}");
    }
    // HEAD is served by GET, without a body but with its length.
    let r = c.request("HEAD", "/health", None, None);
    assert_eq!((r.status, r.header("content-length")), (200, Some("3")));
    assert!(r.body.is_empty());
}

#[test]
fn routing_errors_are_json_and_keep_the_connection() {
    let server = Server::start(1);
    let mut c = Http::connect(&server.addr);
    let r = c.request("GET", "/nope", None, None);
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = c.request("POST", "/health", None, Some(&json!({"x": 1})));
    assert_eq!((r.status, r.code()), (405, "method_not_allowed".into()));
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    // Still usable.
    assert_eq!(c.request("GET", "/health", None, None).status, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(1);
    let mut c = Http::connect(&server.addr);
    c.send_raw(
        b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /nope HTTP/1.1\r\nHost: a\r\n\r\nPOST /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(c.read_response(false).status, 200);
    assert_eq!(c.read_response(false).status, 404);
    assert_eq!(c.read_response(false).status, 405);
    let last = c.read_response(false);
    assert_eq!(last.status, 200);
    assert_eq!(last.header("connection"), Some("close"));
    assert!(c.is_closed_by_server());
}

#[test]
fn framing_errors_get_json_and_close() {
    let server = Server::start(1);
    for (raw, status, code) in [
        (&b"GARBAGE\r\n\r\n"[..], 400, "malformed_request"),
        (b"GET /health HTTP/1.1\r\n\r\n", 400, "bad_host"),
        (b"POST /v1/x HTTP/1.1\r\nHost: a\r\n\r\n", 411, "length_required"),
        (
            b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "bad_framing",
        ),
        (b"GET /health HTTP/2.0\r\nHost: a\r\n\r\n", 505, "http_version_not_supported"),
        (
            b"POST /health HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n",
            413,
            "body_too_large",
        ),
    ] {
        let mut c = Http::connect(&server.addr);
        c.send_raw(raw);
        let r = c.read_response(false);
        assert_eq!(
            (r.status, r.code()),
            (status, code.to_string()),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.is_closed_by_server());
    }
    let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(5000));
    let mut c = Http::connect(&server.addr);
    c.send_raw(long.as_bytes());
    assert_eq!(c.read_response(false).status, 414);
}

#[test]
fn browser_origins_must_be_allowed() {
    let server = Server::start_with(1, &["--allow-origin", "https://web.example.com"]);
    let mut c = Http::connect(&server.addr);
    c.send_raw(b"GET /health HTTP/1.1\r\nHost: a\r\nOrigin: https://evil.example\r\n\r\n");
    let r = c.read_response(false);
    assert_eq!((r.status, r.code()), (403, "origin_not_allowed".into()));
    c.send_raw(b"GET /health HTTP/1.1\r\nHost: a\r\nOrigin: https://web.example.com:443\r\n\r\n");
    assert_eq!(c.read_response(false).status, 200);
    // No Origin: not a browser, not checked.
    assert_eq!(c.request("GET", "/health", None, None).status, 200);
}

#[test]
fn http_connections_per_core_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("{}conns_per_core_max = 2\n", util::UNLIMITED_RATES),
    )
    .unwrap();
    let server = Server::start_with(1, &["--config", cfg.to_str().unwrap()]);
    let mut a = Http::connect(&server.addr);
    let mut b = Http::connect(&server.addr);
    assert_eq!(a.request("GET", "/health", None, None).status, 200);
    assert_eq!(b.request("GET", "/health", None, None).status, 200);
    let mut c = Http::connect(&server.addr);
    c.send_raw(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n");
    let r = c.read_response(false);
    assert_eq!((r.status, r.code()), (503, "unavailable".into()));
    drop(a);
    // The slot frees when a connection ends.
    let ok = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut d = Http::connect(&server.addr);
        d.send_raw(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n");
        d.read_response(false).status == 200
    });
    assert!(ok);
}
