//! A scripted one-connection WebSocket server for testing the client over a real socket: a
//! `std::net` listener on an ephemeral port, `tungstenite::accept_hdr` for the upgrade, and a
//! closure that answers each decoded client frame with a list of [`Out`] actions.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use switchboard_wire::{decode_client, ClientFrame, Encoder, ServerFrame};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Bytes, Message};

/// Long enough for a loaded CI machine, short enough that a broken test fails instead of hanging.
pub const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the scripted server does in answer to a client frame.
pub enum Out {
    Frame(ServerFrame),
    /// A WebSocket Ping control frame (the client must answer with a Pong).
    WsPing,
    /// A WebSocket Close with this code and reason.
    Close(u16, &'static str),
    RawBinary(Vec<u8>),
    Text(&'static str),
}

/// What the server saw on its one connection.
#[derive(Debug, Default)]
pub struct Seen {
    pub frames: Vec<ClientFrame>,
    /// Pong control frames received (answers to `Out::WsPing`).
    pub ws_pongs: usize,
    /// The close code the client sent, if it started or answered a close handshake.
    pub close_code: Option<u16>,
    /// Binary messages that did not decode, and text messages.
    pub bad_messages: usize,
}

pub struct Server {
    pub addr: String,
    handle: JoinHandle<Seen>,
}

impl Server {
    /// Waits for the connection to end and returns what the server saw (re-raising its panics).
    pub fn join(self) -> Seen {
        match self.handle.join() {
            Ok(seen) => seen,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local_addr").to_string();
    (listener, addr)
}

fn accept(listener: &TcpListener) -> TcpStream {
    let (stream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(SERVER_IO_TIMEOUT))
        .expect("timeout");
    stream
        .set_write_timeout(Some(SERVER_IO_TIMEOUT))
        .expect("timeout");
    stream
}

/// Whether the upgrade request carries `token`, as a Bearer header or as `?token=` (the
/// client percent-encodes, so `token_query` is the encoded form).
fn authorized(req: &Request, token: &str, token_query: &str) -> bool {
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {token}"));
    let query = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == format!("token={token_query}")));
    req.uri().path() == "/v1/ws" && (header || query)
}

/// Serves one connection: upgrades it if it carries `token` (else answers 401 with body
/// "bad token"), then answers every client frame with `script(frame)`.
pub fn serve<F>(token: &'static str, token_query: &'static str, mut script: F) -> Server
where
    F: FnMut(&ClientFrame) -> Vec<Out> + Send + 'static,
{
    let (listener, addr) = listen();
    let handle = std::thread::spawn(move || {
        let mut seen = Seen::default();
        let stream = accept(&listener);
        // The shape of the Err is tungstenite's `Callback` contract, not ours to shrink.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            if authorized(req, token, token_query) {
                Ok(resp)
            } else {
                let mut err = ErrorResponse::new(Some("bad token".to_string()));
                *err.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
                Err(err)
            }
        };
        let mut ws = match tungstenite::accept_hdr(stream, callback) {
            Ok(ws) => ws,
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(_))) => return seen,
            Err(e) => panic!("server handshake: {e:?}"),
        };
        let mut encoder = Encoder::new();
        loop {
            let outs = match ws.read() {
                Ok(Message::Binary(b)) => match decode_client(&b) {
                    Ok(frame) => {
                        let outs = script(&frame);
                        seen.frames.push(frame);
                        outs
                    }
                    Err(_) => {
                        seen.bad_messages += 1;
                        Vec::new()
                    }
                },
                Ok(Message::Text(_)) => {
                    seen.bad_messages += 1;
                    Vec::new()
                }
                Ok(Message::Pong(_)) => {
                    seen.ws_pongs += 1;
                    Vec::new()
                }
                Ok(Message::Close(frame)) => {
                    seen.close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                    Vec::new()
                }
                Ok(_) => Vec::new(),
                Err(tungstenite::Error::ConnectionClosed) => return seen,
                Err(e) => panic!("server read: {e}"),
            };
            for out in outs {
                let msg = match out {
                    Out::Frame(f) => {
                        Message::Binary(Bytes::copy_from_slice(encoder.encode_server(&f)))
                    }
                    Out::WsPing => Message::Ping(Bytes::from_static(b"hb")),
                    Out::RawBinary(b) => Message::Binary(b.into()),
                    Out::Text(t) => Message::text(t),
                    Out::Close(code, reason) => {
                        let frame = CloseFrame {
                            code: CloseCode::from(code),
                            reason: reason.into(),
                        };
                        ws.close(Some(frame)).expect("server close");
                        continue;
                    }
                };
                ws.send(msg).expect("server send");
            }
        }
    });
    Server { addr, handle }
}

/// Answers one connection with a raw HTTP 401 (no WebSocket library involved) and returns the
/// request head it read.
pub fn serve_raw_401() -> (String, JoinHandle<String>) {
    let (listener, addr) = listen();
    let handle = std::thread::spawn(move || {
        let mut stream = accept(&listener);
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).expect("read request");
            assert!(n > 0, "client closed before finishing its request");
            head.extend_from_slice(&buf[..n]);
        }
        let body = "token expired";
        let response = format!(
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).expect("write 401");
        String::from_utf8_lossy(&head).into_owned()
    });
    (addr, handle)
}
