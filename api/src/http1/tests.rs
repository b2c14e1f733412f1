use super::*;

/// Requests whose path starts with `/upload` are streamed with this limit.
const TEST_STREAM_BYTES_MAX: u64 = 16;

fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// Drives a `Conn` over `input` fed in pieces of `step` bytes (then EOF) and renders the events
/// as `; `-separated items. Consecutive stream chunks are merged so the transcript does not
/// depend on `step`.
fn transcript_with(input: &[u8], step: usize, limits: Limits) -> String {
    let mut conn = Conn::new(limits);
    let mut out: Vec<String> = Vec::new();
    let mut pieces: Vec<&[u8]> = input.chunks(step.max(1)).collect();
    if pieces.is_empty() {
        pieces.push(b"");
    }
    let mut pending_chunk: Option<Vec<u8>> = None;
    let last = pieces.len() - 1;
    for (i, piece) in pieces.into_iter().enumerate() {
        conn.feed(piece);
        if i == last {
            conn.feed_eof();
        }
        for _ in 0..10_000 {
            match conn.poll() {
                Ok(None) => break,
                Ok(Some(ev)) => {
                    if let Event::BodyChunk(data) = &ev {
                        pending_chunk
                            .get_or_insert_with(Vec::new)
                            .extend_from_slice(data);
                        continue;
                    }
                    if let Some(c) = pending_chunk.take() {
                        out.push(format!("chunk \"{}\"", printable(&c)));
                    }
                    match ev {
                        Event::Head(h) => {
                            if h.path.starts_with("/upload") {
                                conn.set_body_mode(BodyMode::Stream {
                                    bytes_max: TEST_STREAM_BYTES_MAX,
                                });
                            }
                            let framing = match h.body {
                                BodyFraming::None => "none".to_owned(),
                                BodyFraming::Length(n) => format!("len={n}"),
                                BodyFraming::Chunked => "chunked".to_owned(),
                            };
                            let mut s = format!("{} {} {framing}", h.method, h.target);
                            if h.version == Version::Http10 {
                                s.push_str(" 1.0");
                            }
                            if !h.keep_alive {
                                s.push_str(" close");
                            }
                            if h.expect_continue {
                                s.push_str(" expect");
                            }
                            out.push(s);
                        }
                        Event::Continue => out.push("100".to_owned()),
                        Event::BodyEnd { body } => {
                            out.push(format!("end \"{}\"", printable(&body)))
                        }
                        Event::BodyChunk(_) => unreachable!(),
                    }
                }
                Err(e) => {
                    if let Some(c) = pending_chunk.take() {
                        out.push(format!("chunk \"{}\"", printable(&c)));
                    }
                    out.push(format!("err {} {}", e.status(), e.code()));
                    assert!(conn.is_closed());
                    assert!(!conn.keep_alive());
                    return out.join("; ");
                }
            }
        }
    }
    if let Some(c) = pending_chunk.take() {
        out.push(format!("chunk \"{}\"", printable(&c)));
    }
    if conn.is_closed() {
        out.push("closed".to_owned());
    }
    out.join("; ")
}

/// Checks the transcript, fed whole and byte by byte (the result must not depend on how the
/// bytes arrive).
#[track_caller]
fn check(input: &str, expect: &str) {
    let whole = transcript_with(input.as_bytes(), input.len(), Limits::default());
    assert_eq!(whole, expect, "input fed whole: {input:?}");
    let bytewise = transcript_with(input.as_bytes(), 1, Limits::default());
    assert_eq!(bytewise, expect, "input fed byte by byte: {input:?}");
}

#[test]
fn simple_requests() {
    check(
        "GET /v1/users/me HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /v1/users/me none; end \"\"; closed",
    );
    check(
        "GET /v1/x?a=1&b HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /v1/x?a=1&b none; end \"\"; closed",
    );
    check(
        "POST /v1/auth/register HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        "POST /v1/auth/register len=5; end \"hello\"; closed",
    );
    check(
        "POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        "POST /v1/x len=0; end \"\"; closed",
    );
    // Leading blank lines are ignored (RFC 9112 §2.2); bare LF line ends are accepted in the head.
    check(
        "\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / none; end \"\"; closed",
    );
    check(
        "GET / HTTP/1.1\nHost: a\n\n",
        "GET / none; end \"\"; closed",
    );
    check(
        "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        "OPTIONS * none; end \"\"; closed",
    );
    check(
        "GET http://example.com/v1/x?y HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "GET http://example.com/v1/x?y none; end \"\"; closed",
    );
    check(
        "\r\n\r\n\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / none; end \"\"; GET /b none; end \"\"; closed",
    );
    check("", "closed");
    check("\r\n", "closed");
}

#[test]
fn keep_alive_and_pipelining() {
    // Two pipelined requests: both come out, in order, bodies intact.
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /a len=3; end \"abc\"; GET /b none; end \"\"; closed",
    );
    // Connection: close ends the connection after its request; later bytes are ignored.
    check(
        "GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /a none close; end \"\"; closed",
    );
    check(
        "GET /a HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n",
        "GET /a none close; end \"\"; closed",
    );
    // HTTP/1.0 closes unless it asks for keep-alive; Host is optional there.
    check(
        "GET /a HTTP/1.0\r\n\r\n",
        "GET /a none 1.0 close; end \"\"; closed",
    );
    check(
        "GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\n\r\n",
        "GET /a none 1.0; end \"\"; GET /b none 1.0 close; end \"\"; closed",
    );
}

#[test]
fn chunked_bodies() {
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        "POST /a chunked; end \"hello world\"; closed",
    );
    // Upper-case hex, leading zeros, BWS before an extension, trailers ignored.
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n00A \t;x\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /a chunked; end \"0123456789\"; GET /b none; end \"\"; closed",
    );
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /a chunked; end \"\"; closed",
    );
    // Malformed framing.
    for bad in [
        "x\r\n",                 // not hex
        "\r\n",                  // empty size
        "5\nhello\r\n0\r\n\r\n", // bare LF after size
        "5\r\nhelloXX0\r\n\r\n", // no CRLF after data
        "5 x\r\nhello\r\n",      // junk after size
        "0\r\nno colon\r\n\r\n", // bad trailer line
        "0\r\nX: y\n\r\n",       // bare LF in trailers
        "-1\r\n",                // sign
    ] {
        check(
            &format!("POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{bad}"),
            "POST /a chunked; err 400 malformed_chunk",
        );
    }
    // More than 16 significant hex digits would overflow.
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
        "POST /a chunked; err 413 body_too_large",
    );
    // EOF in the middle of a body.
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        "POST /a chunked; err 400 unexpected_eof",
    );
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel",
        "POST /a len=5; err 400 unexpected_eof",
    );
}

#[test]
fn streaming_bodies() {
    check(
        "PUT /upload/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n0123456789GET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        "PUT /upload/1 len=10; chunk \"0123456789\"; end \"\"; GET /b none; end \"\"; closed",
    );
    check(
        "PUT /upload/1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n",
        "PUT /upload/1 chunked; chunk \"abcdef\"; end \"\"; closed",
    );
    // The stream limit (16 in these tests): declared length over it, and chunks adding up over it.
    check(
        "PUT /upload/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 17\r\n\r\n",
        "PUT /upload/1 len=17; err 413 body_too_large",
    );
    check(
        "PUT /upload/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 16\r\n\r\n0123456789abcdef",
        "PUT /upload/1 len=16; chunk \"0123456789abcdef\"; end \"\"; closed",
    );
    check(
        "PUT /upload/1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n01234567\r\n9\r\n",
        "PUT /upload/1 chunked; chunk \"01234567\"; err 413 body_too_large",
    );
}

#[test]
fn expect_continue() {
    check(
        "PUT /upload/1 HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
        "PUT /upload/1 len=2 expect; 100; chunk \"hi\"; end \"\"; closed",
    );
    // Over the limit: refused before the 100, so the client never sends the body.
    check(
        "PUT /upload/1 HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 99\r\n\r\n",
        "PUT /upload/1 len=99 expect; err 413 body_too_large",
    );
    // No body, nothing to continue; HTTP/1.0 ignores Expect.
    check(
        "GET /a HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
        "GET /a none; end \"\"; closed",
    );
    check(
        "POST /a HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
        "POST /a len=1 1.0 close; end \"x\"; closed",
    );
    check(
        "POST /a HTTP/1.1\r\nHost: a\r\nExpect: something\r\nContent-Length: 1\r\n\r\nx",
        "err 417 expectation_failed",
    );
}

#[test]
fn rejected_heads() {
    let cases: &[(&str, &str)] = &[
        ("GARBAGE\r\n\r\n", "err 400 malformed_request"),
        ("GET /a HTTP/1.1\r\nBad Header: x\r\n\r\n", "err 400 malformed_request"),
        ("GET /a HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "err 400 malformed_request"),
        ("GET /a HTTP/2.0\r\nHost: a\r\n\r\n", "err 505 http_version_not_supported"),
        ("BREW /a HTTP/1.1\r\nHost: a\r\n\r\n", "err 501 method_not_implemented"),
        ("get /a HTTP/1.1\r\nHost: a\r\n\r\n", "err 501 method_not_implemented"),
        ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", "err 501 method_not_implemented"),
        ("GET a HTTP/1.1\r\nHost: a\r\n\r\n", "err 400 bad_target"),
        ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", "err 400 bad_target"),
        ("GET /\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n", "err 400 bad_target"),
        ("GET /a HTTP/1.1\r\n\r\n", "err 400 bad_host"),
        ("GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "err 400 bad_host"),
        ("POST /a HTTP/1.1\r\nHost: a\r\n\r\n", "err 411 length_required"),
        ("PUT /a HTTP/1.1\r\nHost: a\r\n\r\n", "err 411 length_required"),
        ("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "err 400 bad_content_length"),
        ("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", "err 400 bad_content_length"),
        ("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1,1\r\n\r\n", "err 400 bad_content_length"),
        ("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", "err 400 bad_content_length"),
        (
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "err 400 bad_content_length",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "err 413 body_too_large",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1048577\r\n\r\n",
            "POST /a len=1048577; err 413 body_too_large",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "err 400 bad_framing",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "err 400 bad_framing",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "err 501 unsupported_transfer_encoding",
        ),
        (
            "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "err 400 bad_framing",
        ),
        (
            "POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "err 501 unsupported_transfer_encoding",
        ),
        ("GET /a HTTP/1.1\r\nHost: a\r\n", "err 400 unexpected_eof"),
    ];
    for (input, expect) in cases {
        check(input, expect);
    }
}

#[test]
fn head_size_limits() {
    // Exactly at the target limit is fine; one more is 414, also before the line completes.
    let at = format!("/{}", "a".repeat(REQUEST_TARGET_BYTES_MAX - 1));
    check(
        &format!("GET {at} HTTP/1.1\r\nHost: a\r\n\r\n"),
        &format!("GET {at} none; end \"\"; closed"),
    );
    let over = format!("/{}", "a".repeat(REQUEST_TARGET_BYTES_MAX));
    check(
        &format!("GET {over} HTTP/1.1\r\nHost: a\r\n\r\n"),
        "err 414 uri_too_long",
    );
    check(&format!("GET {over}{over}"), "err 414 uri_too_long");
    // A head over the limit, complete or not, is 431.
    let big = "x".repeat(REQUEST_HEAD_BYTES_MAX);
    check(
        &format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n"),
        "err 431 headers_too_large",
    );
    check(
        &format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}"),
        "err 431 headers_too_large",
    );
    // Header count.
    // A method longer than any we know is refused before its line ends.
    check(
        &format!("{} / HTTP/1.1", "M".repeat(40)),
        "err 400 malformed_request",
    );
    let at: String = (1..REQUEST_HEADERS_MAX)
        .map(|i| format!("X-{i}: v\r\n"))
        .collect();
    check(
        &format!("GET / HTTP/1.1\r\nHost: a\r\n{at}\r\n"),
        "GET / none; end \"\"; closed",
    );
    let over: String = (0..REQUEST_HEADERS_MAX)
        .map(|i| format!("X-{i}: v\r\n"))
        .collect();
    check(
        &format!("GET / HTTP/1.1\r\nHost: a\r\n{over}\r\n"),
        "err 431 too_many_headers",
    );
    // Trailers.
    let big_trailer = format!("X: {}\r\n", "t".repeat(CHUNK_TRAILER_BYTES_MAX));
    check(
        &format!("POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{big_trailer}\r\n"),
        "POST /a chunked; err 431 trailers_too_large",
    );
    // A chunk-size line longer than its limit.
    let long_ext = format!("1;{}\r\n", "e".repeat(CHUNK_LINE_BYTES_MAX));
    check(
        &format!("POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{long_ext}"),
        "POST /a chunked; err 400 malformed_chunk",
    );
}

#[test]
fn buffered_body_limit_is_exact() {
    let limits = Limits {
        request_body_bytes_max: 8,
        ..Limits::default()
    };
    let run = |input: &str| transcript_with(input.as_bytes(), 3, limits);
    assert_eq!(
        run("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n12345678"),
        "POST /a len=8; end \"12345678\"; closed"
    );
    assert_eq!(
        run("POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n123456789"),
        "POST /a len=9; err 413 body_too_large"
    );
    assert_eq!(
        run("POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n1234\r\n4\r\n5678\r\n0\r\n\r\n"),
        "POST /a chunked; end \"12345678\"; closed"
    );
    assert_eq!(
        run("POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n1234\r\n5\r\n56789\r\n0\r\n\r\n"),
        "POST /a chunked; err 413 body_too_large"
    );
}

#[test]
fn head_accessors() {
    let mut conn = Conn::default();
    conn.feed(b"GET /v1/x?token=abc&flag HTTP/1.1\r\nHost: h\r\nX-Thing: \xff\r\nOrigin: https://a\r\n\r\n");
    let Ok(Some(Event::Head(h))) = conn.poll() else {
        panic!("no head");
    };
    assert_eq!(h.path, "/v1/x");
    assert_eq!(h.query_param("token"), Some("abc"));
    assert_eq!(h.query_param("flag"), Some(""));
    assert_eq!(h.query_param("nope"), None);
    assert_eq!(h.header_str("origin"), Some("https://a"));
    assert_eq!(h.header("x-thing"), Some(&b"\xff"[..]));
    assert_eq!(h.header_str("x-thing"), None);
    assert!(conn.in_request());
    assert_eq!(conn.poll(), Ok(Some(Event::BodyEnd { body: Vec::new() })));
    assert!(!conn.in_request());
    assert!(conn.keep_alive());
    assert_eq!(conn.poll(), Ok(None));
}

#[test]
fn refusing_a_request_before_its_body_closes() {
    let mut conn = Conn::default();
    conn.feed(
        b"PUT /v1/media/x/blob HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\npartial body",
    );
    assert!(matches!(conn.poll(), Ok(Some(Event::Head(_)))));
    assert!(conn.keep_alive());
    conn.close();
    assert!(!conn.keep_alive());
    assert!(conn.is_closed());
    assert_eq!(conn.poll(), Ok(None));
}

#[test]
fn responses() {
    let mut out = Vec::new();
    Response::new(200)
        .header("content-type", "application/json")
        .write(&mut out, b"{}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    );

    out.clear();
    Response::new(204)
        .keep_alive(false)
        .write_head(&mut out, ResponseBody::Empty);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
    );

    out.clear();
    Response::new(200).write_head(&mut out, ResponseBody::Chunked);
    write_chunk(&mut out, b"hello");
    write_chunk(&mut out, b"");
    write_chunk(&mut out, &[b'x'; 17]);
    write_last_chunk(&mut out);
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n11\r\n{}\r\n0\r\n\r\n",
            "x".repeat(17)
        )
    );

    out.clear();
    write_json_error(
        &mut out,
        405,
        "method_not_allowed",
        "use \"GET\"",
        true,
        &[("allow", "GET, HEAD")],
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "HTTP/1.1 405 Method Not Allowed\r\ncontent-type: application/json\r\nallow: GET, HEAD\r\ncontent-length: 51\r\n\r\n{\"error\":\"use \\\"GET\\\"\",\"code\":\"method_not_allowed\"}"
    );

    out.clear();
    write_error(&mut out, ParseError::BodyTooLarge);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 413 Content Too Large\r\n"),
        "{text}"
    );
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(
        text.ends_with("{\"error\":\"request body too large\",\"code\":\"body_too_large\"}"),
        "{text}"
    );
}

#[test]
fn a_written_response_parses_as_http() {
    // Our responses are valid HTTP/1.1 per httparse's response parser.
    let mut out = Vec::new();
    write_json_error(
        &mut out,
        429,
        "rate_limited",
        "slow down",
        true,
        &[("retry-after", "3")],
    );
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut resp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(n)) = resp.parse(&out) else {
        panic!("unparsable response");
    };
    assert_eq!(resp.code, Some(429));
    let body: serde_json::Value = serde_json::from_slice(&out[n..]).expect("json body");
    assert_eq!(
        body,
        serde_json::json!({"error": "slow down", "code": "rate_limited"})
    );
}

#[test]
fn json_bodies() {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Register {
        phone: String,
    }
    let head_with = |ct: &str| {
        let mut conn = Conn::default();
        conn.feed(
            format!("POST /v1/auth/register HTTP/1.1\r\nHost: h\r\n{ct}Content-Length: 0\r\n\r\n")
                .as_bytes(),
        );
        match conn.poll() {
            Ok(Some(Event::Head(h))) => h,
            other => panic!("no head: {other:?}"),
        }
    };
    let json = head_with("Content-Type: application/json; charset=utf-8\r\n");
    assert_eq!(
        parse_json_body::<Register>(&json, br#"{"phone": "+1"}"#),
        Ok(Register {
            phone: "+1".to_owned()
        })
    );
    let err = parse_json_body::<Register>(&json, br#"{"phone": 1}"#).expect_err("bad shape");
    assert_eq!((err.status(), err.code()), (400, "malformed_json"));
    assert!(parse_json_body::<Register>(&json, b"").is_err());
    for ct in [
        "",
        "Content-Type: text/plain\r\n",
        "Content-Type: application/jsonx\r\n",
    ] {
        let err = parse_json_body::<Register>(&head_with(ct), br#"{"phone": "+1"}"#)
            .expect_err("not json");
        assert_eq!(
            (err.status(), err.code()),
            (415, "unsupported_media_type"),
            "{ct:?}"
        );
    }
    let mut out = Vec::new();
    JsonBodyError::NotJson.write_response(&mut out, true);
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 415 Unsupported Media Type\r\n"));
}

#[test]
fn http_dates() {
    for (unix_s, expect) in [
        (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
        (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
        (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
        (1_700_000_000, "Tue, 14 Nov 2023 22:13:20 GMT"),
        (4_102_444_799, "Thu, 31 Dec 2099 23:59:59 GMT"),
    ] {
        assert_eq!(http_date(unix_s), expect, "{unix_s}");
    }
}

#[test]
fn every_parse_error_maps_to_an_error_status_and_code() {
    for e in [
        ParseError::MalformedHead,
        ParseError::UnsupportedVersion,
        ParseError::UnsupportedMethod,
        ParseError::BadTarget,
        ParseError::TargetTooLong,
        ParseError::HeadTooLarge,
        ParseError::TooManyHeaders,
        ParseError::BadHost,
        ParseError::BadContentLength,
        ParseError::BadFraming,
        ParseError::UnsupportedTransferEncoding,
        ParseError::UnsupportedExpectation,
        ParseError::LengthRequired,
        ParseError::BodyTooLarge,
        ParseError::MalformedChunk,
        ParseError::TrailersTooLarge,
        ParseError::UnexpectedEof,
    ] {
        assert!((400..600).contains(&e.status()), "{e:?}");
        assert!(!reason_phrase(e.status()).is_empty(), "{e:?}");
        assert!(
            e.code()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{e:?}"
        );
    }
}

/// A small deterministic PRNG so the mutation test needs no dependency and replays exactly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Runs `input` through a `Conn` in random pieces, checking the codec's invariants; panics
/// (the test's failure) are what this looks for.
fn drive_checked(input: &[u8], rng: &mut XorShift, limits: Limits) {
    let mut conn = Conn::new(limits);
    let mut fed = 0usize;
    let mut streamed = 0u64;
    let stream = rng.below(2) == 0;
    while fed <= input.len() {
        let n = 1 + rng.below(64);
        let end = (fed + n).min(input.len());
        conn.feed(&input[fed..end]);
        if end == input.len() {
            conn.feed_eof();
        }
        fed = end;
        for _ in 0..100_000 {
            match conn.poll() {
                Ok(None) => break,
                Ok(Some(Event::Head(h))) => {
                    assert!(h.target.len() <= limits.request_target_bytes_max);
                    if stream {
                        conn.set_body_mode(BodyMode::Stream { bytes_max: 64 });
                    }
                    streamed = 0;
                }
                Ok(Some(Event::BodyChunk(c))) => {
                    assert!(stream && !c.is_empty());
                    streamed += c.len() as u64;
                    assert!(streamed <= 64);
                }
                Ok(Some(Event::BodyEnd { body })) => {
                    assert!(body.len() <= limits.request_body_bytes_max);
                    assert!(!stream || body.is_empty());
                }
                Ok(Some(Event::Continue)) => {}
                Err(_) => {
                    assert!(conn.is_closed());
                    assert_eq!(conn.poll(), Ok(None));
                    return;
                }
            }
        }
        assert!(conn.buffered().len() <= input.len());
        if fed == input.len() {
            break;
        }
    }
}

#[test]
fn mutated_requests_never_panic() {
    let seeds: &[&[u8]] = &[
        b"GET /v1/users/me HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /v1/auth/verify HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n{\"a\":\"bcd\"}GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"PUT /upload/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n",
        b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET http://h/b?c HTTP/1.0\r\n\r\n",
    ];
    let limits = Limits {
        request_head_bytes_max: 256,
        request_target_bytes_max: 64,
        request_body_bytes_max: 32,
        ..Limits::default()
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let mut input = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..1 + rng.below(4) {
            let len = input.len();
            match rng.below(7) {
                0 if len > 0 => {
                    let i = rng.below(len);
                    input[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = rng.below(len + 1);
                    let alphabet = b"\r\n:; 0aF-\x00\xff,";
                    let b = alphabet[rng.below(alphabet.len())];
                    input.insert(i, b);
                }
                2 if len > 0 => {
                    let i = rng.below(len);
                    input.remove(i);
                }
                3 if len > 0 => {
                    let i = rng.below(len);
                    let j = (i + rng.below(40)).min(len);
                    let piece = input[i..j].to_vec();
                    let at = rng.below(len + 1);
                    input.splice(at..at, piece);
                }
                4 => input.truncate(rng.below(len + 1)),
                5 if len > 0 => {
                    let i = rng.below(len);
                    input[i] = rng.next() as u8;
                }
                _ => {
                    let extra = seeds[rng.below(seeds.len())];
                    input.extend_from_slice(extra);
                }
            }
        }
        drive_checked(&input, &mut rng, limits);
        // However the bytes are split, the events are the same.
        let step = 1 + rng.below(48);
        assert_eq!(
            transcript_with(&input, input.len(), limits),
            transcript_with(&input, step, limits),
            "split every {step} bytes: {:?}",
            printable(&input)
        );
    }
}
