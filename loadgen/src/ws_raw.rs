//! The smallest WebSocket client that holds an idle connection honestly: the real RFC 6455
//! upgrade over a blocking `TcpStream`, then non-blocking reads that answer the server's Pings
//! and Close. No thread and no heap buffer per connection while nothing arrives.
//!
//! ```text
//!  connect ─► "GET /v1/ws" + Sec-WebSocket-Key + Authorization: Bearer ─► read head ─► 101 + accept ok
//!  then, per sweep: read (non-blocking) ─► parse_frame ─► Ping: masked Pong / Close: masked Close, done
//! ```

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use socket2::{Domain, Protocol, Socket, Type};
use switchboard_wire::splitmix64;

/// Largest upgrade response head accepted. The server's 101 is about 130 bytes.
pub const RESPONSE_HEAD_BYTES_MAX: usize = 2048;

/// Largest server frame an idle connection buffers. An idle user is sent only control frames
/// (at most 125 bytes of payload); anything bigger is a protocol surprise, counted and dropped.
pub const IDLE_FRAME_BYTES_MAX: usize = 64 * 1024;

/// Bytes read per `read` call in a sweep.
const SWEEP_READ_BYTES: usize = 512;

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// Why one connection could not be opened, grouped for counting.
#[derive(Debug)]
pub enum OpenError {
    /// TCP connect failed (refused, no ports left, ...).
    Connect(io::Error),
    /// Connect or upgrade response did not complete in time.
    Timeout,
    /// The socket failed after connecting.
    Io(io::Error),
    /// The server answered with this HTTP status instead of 101 (401: bad token, 503: full).
    Status(u16),
    /// The response was not a valid upgrade (bad head, wrong accept key, too long, EOF).
    BadResponse(&'static str),
}

impl OpenError {
    /// A short stable label for counting errors by kind.
    pub fn kind(&self) -> String {
        match self {
            OpenError::Connect(e) => format!("connect: {:?}", e.kind()),
            OpenError::Timeout => "timeout".to_string(),
            OpenError::Io(e) => format!("io: {:?}", e.kind()),
            OpenError::Status(s) => format!("http {s}"),
            OpenError::BadResponse(what) => format!("bad response: {what}"),
        }
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Connect(e) => write!(f, "connect: {e}"),
            OpenError::Timeout => f.write_str("timed out"),
            OpenError::Io(e) => write!(f, "i/o: {e}"),
            OpenError::Status(s) => write!(f, "upgrade answered with HTTP {s}"),
            OpenError::BadResponse(what) => write!(f, "bad upgrade response: {what}"),
        }
    }
}

fn io_error(e: io::Error) -> OpenError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => OpenError::Timeout,
        _ => OpenError::Io(e),
    }
}

/// A `Sec-WebSocket-Key`: base64 of 16 bytes. Derived from `seed` (the RFC asks for randomness
/// to defeat caching proxies; there are none on loopback, and a server must accept any key).
pub fn sec_websocket_key(seed: u64) -> String {
    let a = splitmix64(seed);
    let b = splitmix64(a);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    STANDARD.encode(bytes)
}

pub fn upgrade_request(host: &str, key: &str, token: &str) -> String {
    format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
}

/// The `Sec-WebSocket-Accept` a correct server answers `key` with (RFC 6455 4.2.2).
pub fn accept_key(key: &str) -> String {
    tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// Checks a complete response head: status 101 and the accept key derived from `key`.
pub fn check_upgrade_response(head: &[u8], key: &str) -> Result<(), OpenError> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(OpenError::BadResponse("incomplete head")),
        Err(_) => return Err(OpenError::BadResponse("malformed head")),
    }
    let status = response.code.unwrap_or(0);
    if status != 101 {
        return Err(OpenError::Status(status));
    }
    let accept = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept.map(<[u8]>::trim_ascii) != Some(accept_key(key).as_bytes()) {
        return Err(OpenError::BadResponse("wrong Sec-WebSocket-Accept"));
    }
    Ok(())
}

/// A TCP connection to `addr` from `source` (port chosen by the kernel).
///
/// Why bind first: `connect()` on Linux searches the local port range for a free port, trying
/// ports of one parity first; once about half the range holds connections to the same
/// destination, every further connect scans thousands of ports (`__inet_hash_connect`), which
/// made opening 19,000 connections client-bound. Several loopback source addresses keep each
/// address's share small. `IP_BIND_ADDRESS_NO_PORT` defers the port choice to `connect()`, so the
/// port only has to be unique per 4-tuple.
fn connect_from(addr: SocketAddr, source: IpAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = bound_socket(addr, source)?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// Starts a non-blocking connect from `source` (see [`connect_from`] for why bind first). The
/// connection completes (or fails: `take_error`) when the socket turns writable.
pub fn connect_nonblocking(addr: SocketAddr, source: IpAddr) -> io::Result<TcpStream> {
    let socket = bound_socket(addr, source)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    // Receive timestamps: the worker's `read_lag` (how long bytes waited in this socket).
    crate::sys::enable_rx_timestamps(socket.as_raw_fd())?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

fn bound_socket(addr: SocketAddr, source: IpAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    let one: libc::c_int = 1;
    // SAFETY: the fd is an open socket owned by `socket`; the option value is a c_int that
    // outlives the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // IPv4 only; on an IPv6 socket the bind below still works, with the port chosen at bind.
    if rc != 0 && addr.is_ipv4() {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    Ok(socket)
}

/// Connects from `source` and upgrades. On success the stream is non-blocking, with any bytes
/// that followed the response head (none expected) returned alongside.
pub fn open(
    addr: SocketAddr,
    source: IpAddr,
    token: &str,
    key_seed: u64,
    timeout: Duration,
) -> Result<(TcpStream, Vec<u8>), OpenError> {
    let mut stream = connect_from(addr, source, timeout).map_err(|e| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => OpenError::Timeout,
        _ => OpenError::Connect(e),
    })?;
    stream.set_nodelay(true).map_err(io_error)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_error)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_error)?;
    let key = sec_websocket_key(key_seed);
    let request = upgrade_request(&addr.to_string(), &key, token);
    stream.write_all(request.as_bytes()).map_err(io_error)?;
    let mut head = [0u8; RESPONSE_HEAD_BYTES_MAX];
    let mut len = 0;
    loop {
        let n = stream.read(&mut head[len..]).map_err(io_error)?;
        if n == 0 {
            return Err(OpenError::BadResponse(
                "connection closed before a response",
            ));
        }
        // Search from a little before the new bytes: the terminator may straddle two reads.
        let from = len.saturating_sub(3);
        len += n;
        if let Some(at) = head[from..len].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at + 4;
            check_upgrade_response(&head[..end], &key)?;
            stream.set_nonblocking(true).map_err(io_error)?;
            return Ok((stream, head[end..len].to_vec()));
        }
        if len == head.len() {
            return Err(OpenError::BadResponse("response head too long"));
        }
    }
}

/// Where one complete frame sits in a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameAt {
    pub opcode: u8,
    pub payload: Range<usize>,
    /// Header plus payload.
    pub len: usize,
}

/// The complete server frame at the start of `buf`; `Ok(None)`: incomplete. Server frames are
/// never masked (RFC 6455 5.1).
pub fn parse_frame(buf: &[u8]) -> Result<Option<FrameAt>, &'static str> {
    parse_frame_limit(buf, IDLE_FRAME_BYTES_MAX)
}

/// [`parse_frame`] with a payload limit of `payload_max` bytes.
pub fn parse_frame_limit(buf: &[u8], payload_max: usize) -> Result<Option<FrameAt>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 != 0 {
        return Err("masked server frame");
    }
    let (len, header) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            (usize::try_from(len).unwrap_or(usize::MAX), 10)
        }
        n => (usize::from(n), 2),
    };
    if len > payload_max {
        return Err("server frame larger than the limit");
    }
    if buf.len() < header + len {
        return Ok(None);
    }
    Ok(Some(FrameAt {
        opcode: buf[0] & 0x0f,
        payload: header..header + len,
        len: header + len,
    }))
}

/// A final, masked client frame with a control-sized payload (at most 125 bytes).
pub fn client_control_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    assert!(
        payload.len() <= 125,
        "control frame payloads are at most 125 bytes"
    );
    let mut out = Vec::with_capacity(6 + payload.len());
    write_client_frame(&mut out, opcode, payload, mask);
    out
}

/// Appends one final, masked client frame (client frames must be masked, RFC 6455 5.3).
pub fn write_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let len = payload.len();
    out.reserve(len + 14);
    out.push(0x80 | opcode);
    if len < 126 {
        // Fits the 7-bit length.
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// What one sweep saw on one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub pings_answered: u64,
    pub pongs_not_sent: u64,
    /// Data frames (text/binary) pushed to a connection that asked for nothing.
    pub unexpected_frames: u64,
}

/// Why a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The server sent Close with this code (1005: none given).
    Closed(u16),
    /// The TCP connection ended without a Close frame first.
    Eof,
    /// A socket error or a protocol surprise.
    Error(String),
}

/// One held connection: the socket plus a buffer that is only non-empty while a frame is split
/// across reads (in practice never).
#[derive(Debug)]
pub struct IdleConn {
    pub stream: TcpStream,
    pub pending: Vec<u8>,
    /// Set once this side has sent Close; EOF is then the expected end.
    pub close_sent: bool,
    /// Set once the server's Close arrived.
    pub close_received: Option<u16>,
}

impl IdleConn {
    pub fn new(stream: TcpStream, leftover: Vec<u8>) -> IdleConn {
        IdleConn {
            stream,
            pending: leftover,
            close_sent: false,
            close_received: None,
        }
    }

    /// Reads whatever arrived (non-blocking) and answers it. `Err` ends the connection; after
    /// this side sent Close, `Err(Ended::Eof)` is the clean end.
    pub fn sweep(&mut self, stats: &mut SweepStats, mask_seed: u64) -> Result<(), Ended> {
        let mut chunk = [0u8; SWEEP_READ_BYTES];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Ended::Eof),
                Ok(n) => {
                    self.pending.extend_from_slice(&chunk[..n]);
                    self.process(stats, mask_seed)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Ended::Error(format!("read: {e}"))),
            }
        }
    }

    fn process(&mut self, stats: &mut SweepStats, mask_seed: u64) -> Result<(), Ended> {
        let mut consumed = 0;
        while let Some(FrameAt {
            opcode,
            payload,
            len,
        }) =
            parse_frame(&self.pending[consumed..]).map_err(|e| Ended::Error(e.to_string()))?
        {
            let payload = consumed + payload.start..consumed + payload.end;
            match opcode {
                OPCODE_PING => {
                    if payload.len() > 125 {
                        return Err(Ended::Error("ping payload over 125 bytes".into()));
                    }
                    let pong =
                        client_control_frame(OPCODE_PONG, &self.pending[payload], mask(mask_seed));
                    if self.write_control(&pong) {
                        stats.pings_answered += 1;
                    } else {
                        stats.pongs_not_sent += 1;
                    }
                }
                OPCODE_PONG => {}
                OPCODE_CLOSE => {
                    let p = &self.pending[payload];
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    self.close_received = Some(code);
                    if !self.close_sent {
                        // Echo the code (RFC 6455 5.5.1); the server drops TCP next.
                        let reply = client_control_frame(
                            OPCODE_CLOSE,
                            &code.to_be_bytes(),
                            mask(mask_seed),
                        );
                        let _ = self.write_control(&reply);
                        return Err(Ended::Closed(code));
                    }
                }
                OPCODE_CONTINUATION | OPCODE_TEXT | OPCODE_BINARY => stats.unexpected_frames += 1,
                _ => return Err(Ended::Error(format!("reserved opcode {opcode:#x}"))),
            }
            consumed += len;
        }
        self.pending.drain(..consumed);
        if self.pending.is_empty() {
            // Give back the memory of a rare split frame.
            self.pending = Vec::new();
        }
        Ok(())
    }

    /// Writes a small frame on the non-blocking socket; `false` if it did not go out whole
    /// (a full send buffer on an idle connection means the server stopped reading).
    fn write_control(&mut self, frame: &[u8]) -> bool {
        matches!(self.stream.write(frame), Ok(n) if n == frame.len())
    }

    /// Starts the close handshake with code 1000.
    pub fn send_close(&mut self, mask_seed: u64) -> bool {
        let frame = client_control_frame(OPCODE_CLOSE, &1000u16.to_be_bytes(), mask(mask_seed));
        self.close_sent = true;
        self.write_control(&frame)
    }
}

fn mask(seed: u64) -> [u8; 4] {
    let v = splitmix64(seed);
    // Truncation intended: any 4 bytes make a mask.
    (v as u32).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seeds of the `upgrade_response` fuzz target (`fuzz/seeds/`, written by its
    /// script) are heads the check accepts for their key, so the fuzzer starts on the
    /// accepting path.
    #[test]
    fn upgrade_fuzz_seeds_are_accepted() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/upgrade_response");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            let (&seed, head) = data.split_first().unwrap();
            assert_eq!(seed & 1, 0, "a seed for the raw half");
            let key = sec_websocket_key(u64::from(seed));
            assert!(
                check_upgrade_response(head, &key).is_ok(),
                "{}",
                String::from_utf8_lossy(head)
            );
            // One bit of the accept key changed: refused.
            let accept = accept_key(&key);
            let at = head
                .windows(accept.len())
                .position(|w| w == accept.as_bytes())
                .unwrap();
            let mut bad = head.to_vec();
            bad[at] ^= 1;
            assert!(check_upgrade_response(&bad, &key).is_err());
            n += 1;
        }
        assert!(n >= 3, "{n} seeds in {}", dir.display());
    }

    #[test]
    fn key_and_accept() {
        let key = sec_websocket_key(1);
        assert_eq!(STANDARD.decode(&key).expect("base64").len(), 16);
        assert_ne!(key, sec_websocket_key(2));
        // RFC 6455 section 1.3 example.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert!(check_upgrade_response(ok, key).is_ok());
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: xxx=\r\n\r\n";
        assert!(matches!(
            check_upgrade_response(wrong, key),
            Err(OpenError::BadResponse(_))
        ));
        let unauthorized = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            check_upgrade_response(unauthorized, key),
            Err(OpenError::Status(401))
        ));
        assert!(check_upgrade_response(b"garbage\r\n\r\n", key).is_err());
    }

    #[test]
    fn request_has_the_upgrade_headers() {
        let r = upgrade_request("127.0.0.1:1", "KEY", "TOK");
        assert!(r.starts_with("GET /v1/ws HTTP/1.1\r\n"));
        for h in [
            "Upgrade: websocket\r\n",
            "Connection: Upgrade\r\n",
            "Sec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Key: KEY\r\n",
            "Authorization: Bearer TOK\r\n",
        ] {
            assert!(r.contains(h), "{h}");
        }
        assert!(r.ends_with("\r\n\r\n"));
    }

    #[test]
    fn frames() {
        let at = |opcode, payload, len| {
            Ok(Some(FrameAt {
                opcode,
                payload,
                len,
            }))
        };
        assert_eq!(parse_frame(&[0x89]), Ok(None));
        assert_eq!(parse_frame(&[0x89, 0x00]), at(OPCODE_PING, 2..2, 2));
        assert_eq!(parse_frame(&[0x89, 0x02, 1]), Ok(None));
        assert_eq!(
            parse_frame(&[0x89, 0x02, 1, 2, 0xff]),
            at(OPCODE_PING, 2..4, 4)
        );
        let mut long = vec![0x82, 126, 0x01, 0x00];
        long.resize(4 + 256, 0);
        assert_eq!(parse_frame(&long), at(OPCODE_BINARY, 4..260, 260));
        assert!(parse_frame(&[0x82, 127, 0, 0, 0, 0, 0, 2, 0, 0]).is_err());
        assert!(parse_frame(&[0x89, 0x80]).is_err());

        let mut big = Vec::new();
        write_client_frame(&mut big, OPCODE_BINARY, &[7u8; 300], [0, 0, 0, 0]);
        assert_eq!(&big[..4], &[0x82, 0x80 | 126, 1, 44]);
        assert_eq!(big.len(), 4 + 4 + 300);
        assert!(parse_frame_limit(&[0x82, 126, 1, 44], 299).is_err());

        let f = client_control_frame(OPCODE_PONG, b"abc", [1, 2, 3, 4]);
        assert_eq!(
            f,
            vec![0x8A, 0x83, 1, 2, 3, 4, b'a' ^ 1, b'b' ^ 2, b'c' ^ 3]
        );
    }
}
