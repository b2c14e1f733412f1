//! WebSocket rate limits (messages per user, frames per connection, connection attempts per
//! source address) and the Origin check before `101`, over real sockets.

mod util;

use std::io::{Read, Write};
use std::time::Duration;
use switchboard_client::ClientError;
use switchboard_wire::{ClientMsgId, ErrorCode, ServerFrame, Target, UserId};
use util::{Server, T};

/// A server with `toml` as its config file.
fn server_with_config(cores: usize, toml: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchboard.toml");
    std::fs::write(&path, toml).unwrap();
    let path = path.to_str().unwrap().to_string();
    (Server::start_with(cores, &["--config", &path]), dir)
}

#[test]
fn messages_over_the_per_user_rate_get_rate_limited_and_are_not_stored() {
    let (server, _dir) = server_with_config(
        2,
        "messages_per_user_burst = 5\nmessages_per_user_refill_per_s = 2\n",
    );
    let mut a = server.connect(500, 1);
    let mut b = server.connect(501, 1);
    let peer = Target::Peer(UserId(501));
    for i in 0..5u64 {
        let id = ClientMsgId::from_halves(7, i);
        a.send_message_with_id(id, peer, &i.to_be_bytes()).unwrap();
        a.wait_ack(id, T).unwrap();
    }
    let sixth = ClientMsgId::from_halves(7, 5);
    a.send_message_with_id(sixth, peer, b"six").unwrap();
    match a.wait_ack(sixth, T) {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::RateLimited);
            assert_eq!(e.client_msg_id, Some(sixth));
        }
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    // The client retries with the same id once the bucket refilled: stored once.
    std::thread::sleep(Duration::from_millis(600));
    a.send_message_with_id(sixth, peer, b"six").unwrap();
    let ack = a.wait_ack(sixth, T).unwrap();
    assert!(!ack.duplicate, "the refused attempt was not stored");
    assert_eq!(ack.seq.0, 6);
    let mut got = Vec::new();
    while got.len() < 6 {
        match b.recv(T).unwrap() {
            Some(ServerFrame::Message(m)) => got.push(m.seq.0),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn frames_over_the_per_connection_rate_are_refused() {
    let (server, _dir) = server_with_config(
        1,
        "frames_per_conn_burst = 10\nframes_per_conn_refill_per_s = 1\n",
    );
    let mut a = server.connect(510, 1);
    for n in 0..10 {
        a.ping_pong(n, T).unwrap();
    }
    a.ping(99).unwrap();
    let refused = (0..50).find_map(|_| match a.recv(Duration::from_millis(100)).unwrap() {
        Some(ServerFrame::Error(e)) => Some(e.code),
        Some(ServerFrame::Pong { .. }) => panic!("a frame over the limit was served"),
        _ => None,
    });
    assert_eq!(refused, Some(ErrorCode::RateLimited));
    std::thread::sleep(Duration::from_millis(1100));
    a.ping_pong(100, T).unwrap();
}

#[test]
fn connection_attempts_per_address_are_limited() {
    let (server, _dir) = server_with_config(
        1,
        "connects_per_addr_burst = 5\nconnects_per_addr_refill_per_s = 1\nrate_limit_loopback = true\n",
    );
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        statuses.push(out.split_whitespace().nth(1).unwrap_or("").to_string());
        if out.contains(" 429 ") {
            assert!(out.contains("retry-after"), "{out}");
            assert!(out.contains("\"code\":\"rate_limited\""), "{out}");
        }
    }
    assert_eq!(statuses, ["200", "200", "200", "200", "200", "429", "429"]);
    // Loopback is exempt by default (a local reverse proxy is one address for every client).
    let open = Server::start(1);
    for _ in 0..40 {
        assert_eq!(open.http_get("/health").0, 200);
    }
}

fn upgrade_status(addr: &str, token: &str, origin: Option<&str>) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /v1/ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n{origin}\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn websocket_origin_is_checked_before_101() {
    let server = Server::start_with(1, &["--allow-origin", "https://chat.example.com"]);
    let token = server.token(520, 1);
    assert_eq!(
        upgrade_status(&server.addr, &token, Some("https://evil.example")),
        403
    );
    assert_eq!(upgrade_status(&server.addr, &token, Some("null")), 403);
    assert_eq!(
        upgrade_status(&server.addr, &token, Some("https://chat.example.com")),
        101
    );
    assert_eq!(
        upgrade_status(&server.addr, &token, None),
        101,
        "native clients send none"
    );
}
