//! TLS on the engine's listener: https and wss with an rcgen certificate, next to plain
//! HTTP and WebSocket on the same port.

mod util;

use rustls::pki_types::ServerName;
use std::io::{Read, Write};
use std::sync::Arc;
use switchboard_wire::{decode_server, ClientFrame, Encoder, ServerFrame};
use util::{Http, Server, T};

struct Tls {
    server: Server,
    roots: rustls::RootCertStore,
    _dir: tempfile::TempDir,
}

fn tls_server() -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let server = Server::start_with(
        2,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    Tls {
        server,
        roots,
        _dir: dir,
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

fn connect(t: &Tls) -> TlsStream {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(t.roots.clone())
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from("localhost".to_string()).unwrap(),
    )
    .unwrap();
    let tcp = std::net::TcpStream::connect(&t.server.addr).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads one Content-Length framed response; returns (status, body).
fn read_response(s: &mut TlsStream, buf: &mut Vec<u8>) -> (u16, Vec<u8>) {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            while buf.len() < i + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            let body = buf[i + 4..i + 4 + len].to_vec();
            buf.drain(..i + 4 + len);
            return (status, body);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "server closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn https_keep_alive_and_plain_http_share_the_port() {
    let t = tls_server();
    let mut s = connect(&t);
    let mut buf = Vec::new();
    for _ in 0..3 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut s, &mut buf), (200, b"ok\n".to_vec()));
    }
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, body) = read_response(&mut s, &mut buf);
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("not_found"));
    // Pipelined requests whose answers (several KiB each, ~70 KiB in all) cross many TLS
    // records.
    let many = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(8);
    s.write_all(&many).unwrap();
    for _ in 0..8 {
        let (status, body) = read_response(&mut s, &mut buf);
        assert_eq!(status, 200);
        assert!(body.len() > 4 * 1024, "{}", body.len());
    }
    // Plain HTTP still works on the same port.
    let mut plain = Http::connect(&t.server.addr);
    assert_eq!(plain.request("GET", "/health", None, None).status, 200);
    // A plain client speaking garbage to the TLS side is just closed.
    let mut raw = std::net::TcpStream::connect(&t.server.addr).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
}

#[test]
fn wss_carries_the_chat_protocol() {
    let t = tls_server();
    let token = t.server.token(600, 1);
    let url = format!("wss://localhost/v1/ws?token={token}");
    let (mut ws, resp) = tungstenite::client(url.as_str(), connect(&t)).expect("wss upgrade");
    assert_eq!(resp.status(), 101);
    let mut enc = Encoder::new();
    for nonce in [1u64, 2, 3] {
        let bytes = enc.encode_client(&ClientFrame::Ping { nonce }).to_vec();
        ws.send(tungstenite::Message::binary(bytes)).unwrap();
        loop {
            match ws.read().unwrap() {
                tungstenite::Message::Binary(b) => {
                    assert_eq!(decode_server(&b).unwrap(), ServerFrame::Pong { nonce });
                    break;
                }
                _ => continue,
            }
        }
    }
    // A plain WebSocket client on the same port, and a wss message to it.
    let mut plain = t.server.connect(601, 1);
    plain.ping_pong(9, T).unwrap();
}
