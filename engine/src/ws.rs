//! WebSocket framing (RFC 6455) on caller-owned buffers, sans-IO.
//!
//! ```text
//!  socket ──read──► core scratch ──WsReader::feed──► Vec<WsEvent> (complete messages, pings, close)
//!                                   └─ an incomplete frame's bytes stay in the WsReader (only
//!                                      then does the connection own a receive buffer)
//!  encoded frames ──write_frame──► the connection's tx bytes ──one write──► socket
//! ```
//!
//! The server's receive side is ours, not tungstenite's `WebSocketContext`: an idle connection
//! costs 40 bytes of framing state instead of a context whose read buffer keeps the capacity
//! of the largest frame it saw. Clients must mask; control frames are at most 125 bytes and
//! unfragmented; fragmented messages are reassembled up to `frame_bytes_max`; close codes are
//! validated. UTF-8 is not checked here (chat connections refuse text with 1003; the echo
//! endpoint checks complete text messages).

/// Close codes the server sends. 1xxx are RFC 6455's; 4xxx are Switchboard's own.
pub mod close {
    /// The client closed, or the server is shutting down.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (SIGTERM / SIGINT): reconnect (to another node) and sync.
    pub const GOING_AWAY: u16 = 1001;
    /// Bad WebSocket framing (RFC 6455 protocol error).
    pub const PROTOCOL: u16 = 1002;
    /// A text frame: only binary frames carry the protocol.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A text frame with invalid UTF-8 (echo endpoint only).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message larger than `frame_bytes_max`.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed; reconnect and sync.
    pub const INTERNAL: u16 = 1011;
    /// A newer connection of the same user and device took over.
    pub const REPLACED: u16 = 4001;
    /// The connection's send queue exceeded `conn_send_queue_bytes_max`: it did not read fast
    /// enough. Nothing is lost: reconnect and sync.
    pub const SLOW_CONSUMER: u16 = 4002;
    /// Nothing received for `idle_timeout`.
    pub const IDLE_TIMEOUT: u16 = 4003;
    /// The device logged out or was removed: its tokens are revoked.
    pub const REVOKED: u16 = 4004;
}

/// Opcodes (RFC 6455 5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Largest control frame payload (RFC 6455 5.5).
pub const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
/// Longest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
pub const FRAME_HEADER_BYTES_MAX: usize = 14;

/// Something a client sent, complete.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// A complete data message (all fragments joined); `text` for opcode 1.
    Message {
        text: bool,
        payload: Vec<u8>,
    },
    /// A ping; answer with a pong carrying the same payload.
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame: its code (if any) and reason. Nothing after it is read.
    Close(Option<(u16, Vec<u8>)>),
}

/// Why the client's bytes cannot be framed; each maps to the close code the server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// RFC 6455 violation (1002): unmasked frame, reserved bits or opcode, bad control frame,
    /// continuation without a message, new message inside a fragmented one, bad close payload.
    Protocol(&'static str),
    /// A message longer than `frame_bytes_max` (1009).
    TooBig,
    /// A close reason that is not UTF-8 (1007).
    BadUtf8,
}

impl WsError {
    pub fn close_code(self) -> u16 {
        match self {
            WsError::Protocol(_) => close::PROTOCOL,
            WsError::TooBig => close::TOO_BIG,
            WsError::BadUtf8 => close::INVALID_PAYLOAD,
        }
    }
    pub fn reason(self) -> &'static str {
        match self {
            WsError::Protocol(_) => "WebSocket protocol error",
            WsError::TooBig => "message too big",
            WsError::BadUtf8 => "invalid UTF-8",
        }
    }
}

/// A fragmented data message being reassembled.
#[derive(Debug)]
struct Fragments {
    text: bool,
    payload: Vec<u8>,
}

/// A connection's receive state. Between frames it owns no heap memory: bytes are parsed straight
/// out of the caller's (shared) read buffer, and only an incomplete frame's bytes, or the
/// fragments of an unfinished message, are kept here until the rest arrives.
#[derive(Debug, Default)]
pub struct WsReader {
    /// Bytes of an incomplete frame (at most `FRAME_HEADER_BYTES_MAX + frame_bytes_max`).
    partial: Vec<u8>,
    fragments: Option<Box<Fragments>>,
    closed: bool,
}

/// A parsed frame header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: u64,
}

/// Parses a client frame header. `Ok(None)`: more bytes needed.
fn parse_header(b: &[u8]) -> Result<Option<Header>, WsError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (b[0], b[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol(
            "reserved bits set (no extension was negotiated)",
        ));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
        }
        _ => return Err(WsError::Protocol("reserved opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("unmasked client frame"));
    }
    let (payload_len, len_bytes) = match b1 & 0x7F {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as u64, 2)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            let n = u64::from_be_bytes(n);
            if n >> 63 != 0 {
                return Err(WsError::Protocol("64-bit length with the high bit set"));
            }
            (n, 8)
        }
        n => (n as u64, 0),
    };
    if opcode >= opcode::CLOSE && payload_len > CONTROL_PAYLOAD_BYTES_MAX as u64 {
        return Err(WsError::Protocol("control frame longer than 125 bytes"));
    }
    let header_len = 2 + len_bytes + 4;
    if b.len() < header_len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&b[header_len - 4..header_len]);
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        payload_len,
    }))
}

/// XORs `data` with the 4-byte mask, 8 bytes at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Close codes a peer may send (RFC 6455 7.4; as tungstenite accepts them).
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

impl WsReader {
    pub fn new() -> WsReader {
        WsReader::default()
    }

    /// Bytes this connection holds for incomplete input (0 when idle between frames).
    pub fn buffered_bytes(&self) -> usize {
        self.partial.capacity() + self.fragments.as_ref().map_or(0, |f| f.payload.capacity())
    }

    /// Parses `input` (fresh bytes from the socket; unmasked in place) and appends every
    /// complete event to `out`, in order. Incomplete input is kept for the next call. After an
    /// error or a `Close` event the connection is over: later input is ignored. Events parsed
    /// before an error are still in `out`.
    pub fn feed(
        &mut self,
        input: &mut [u8],
        frame_bytes_max: usize,
        out: &mut Vec<WsEvent>,
    ) -> Result<(), WsError> {
        if self.closed {
            return Ok(());
        }
        let result = if self.partial.is_empty() {
            let r = self.parse(input, frame_bytes_max, out);
            if let Ok(used) = r {
                self.partial.extend_from_slice(&input[used..]);
            }
            r
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(input);
            let r = self.parse(&mut buf, frame_bytes_max, out);
            if let Ok(used) = r {
                if used < buf.len() {
                    buf.drain(..used);
                    self.partial = buf;
                }
            }
            r
        };
        match result {
            Ok(_) if self.closed => {
                self.partial = Vec::new();
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.closed = true;
                self.partial = Vec::new();
                self.fragments = None;
                Err(e)
            }
        }
    }

    /// Parses complete frames from the front of `buf`; returns the bytes consumed. Checks every
    /// header as soon as it is complete, so a too-long frame is refused before its payload is
    /// buffered.
    fn parse(
        &mut self,
        buf: &mut [u8],
        frame_bytes_max: usize,
        out: &mut Vec<WsEvent>,
    ) -> Result<usize, WsError> {
        let mut pos = 0;
        while !self.closed {
            let rest = &mut buf[pos..];
            let Some(h) = parse_header(rest)? else { break };
            let is_data = h.opcode < opcode::CLOSE;
            if is_data {
                match (h.opcode, &self.fragments) {
                    (opcode::CONTINUATION, None) => {
                        return Err(WsError::Protocol("continuation frame without a message"))
                    }
                    (opcode::TEXT | opcode::BINARY, Some(_)) => {
                        return Err(WsError::Protocol("new message inside a fragmented one"))
                    }
                    _ => {}
                }
                let before = self.fragments.as_ref().map_or(0, |f| f.payload.len()) as u64;
                if before + h.payload_len > frame_bytes_max as u64 {
                    return Err(WsError::TooBig);
                }
            }
            // Bounded above: control frames ≤ 125, data frames ≤ frame_bytes_max.
            let len = h.payload_len as usize;
            let frame_len = h.header_len + len;
            if rest.len() < frame_len {
                if self.partial.capacity() < frame_len {
                    // The rest of this frame goes into `partial`: size it once.
                    self.partial.reserve_exact(frame_len.min(rest.len() + len));
                }
                break;
            }
            let payload = &mut rest[h.header_len..frame_len];
            unmask(payload, h.mask);
            pos += frame_len;
            match h.opcode {
                opcode::PING => out.push(WsEvent::Ping(payload.to_vec())),
                opcode::PONG => out.push(WsEvent::Pong),
                opcode::CLOSE => {
                    out.push(WsEvent::Close(parse_close(payload)?));
                    self.closed = true;
                }
                opcode::CONTINUATION => {
                    let f = self.fragments.as_mut().expect("checked above");
                    f.payload.extend_from_slice(payload);
                    if h.fin {
                        let f = self.fragments.take().expect("checked above");
                        out.push(WsEvent::Message {
                            text: f.text,
                            payload: f.payload,
                        });
                    }
                }
                _ => {
                    let text = h.opcode == opcode::TEXT;
                    if h.fin {
                        out.push(WsEvent::Message {
                            text,
                            payload: payload.to_vec(),
                        });
                    } else {
                        self.fragments = Some(Box::new(Fragments {
                            text,
                            payload: payload.to_vec(),
                        }));
                    }
                }
            }
        }
        Ok(pos)
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, Vec<u8>)>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(WsError::Protocol("close code not allowed"));
            }
            let reason = &payload[2..];
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::BadUtf8);
            }
            Ok(Some((code, reason.to_vec())))
        }
    }
}

/// Appends one unmasked, final frame (server frames are never masked).
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let len = payload.len();
    out.reserve(len + 10);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and `reason` (cut to the 123 bytes a control frame allows,
/// at a character boundary).
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &[u8]) {
    let mut cut = reason.len().min(CONTROL_PAYLOAD_BYTES_MAX - 2);
    while cut > 0 && std::str::from_utf8(&reason[..cut]).is_err() {
        cut -= 1;
    }
    let mut payload = [0u8; CONTROL_PAYLOAD_BYTES_MAX];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + cut].copy_from_slice(&reason[..cut]);
    write_frame(out, opcode::CLOSE, &payload[..2 + cut]);
}

/// Appends one unmasked, final binary frame. Used for the data path so an encoded frame is
/// copied once, straight into the connection's outbound bytes.
pub fn write_binary_frame(out: &mut Vec<u8>, payload: &[u8]) {
    write_frame(out, opcode::BINARY, payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::io::{self, Read, Write};
    use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
    use tungstenite::Message;

    /// An in-memory stream for driving tungstenite as the peer.
    #[derive(Default)]
    struct Mem {
        rx: Vec<u8>,
        pos: usize,
        tx: Vec<u8>,
    }
    impl Read for Mem {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let avail = &self.rx[self.pos..];
            if avail.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
            self.pos += n;
            Ok(n)
        }
    }
    impl Write for Mem {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.tx.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const MAX: usize = 70_000;

    /// A masked client frame, built by hand.
    fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(b0);
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        let start = out.len();
        out.extend_from_slice(payload);
        unmask(&mut out[start..], mask);
        out
    }

    /// Feeds `wire` in pieces of the given sizes (cycled), collecting every event.
    fn feed_split(wire: &[u8], sizes: &[usize]) -> (Vec<WsEvent>, Result<(), WsError>, WsReader) {
        let mut r = WsReader::new();
        let mut out = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < wire.len() {
            let n = sizes[i % sizes.len()].max(1).min(wire.len() - pos);
            i += 1;
            let mut chunk = wire[pos..pos + n].to_vec();
            pos += n;
            if let Err(e) = r.feed(&mut chunk, MAX, &mut out) {
                return (out, Err(e), r);
            }
        }
        (out, Ok(()), r)
    }

    fn msg(text: bool, payload: &[u8]) -> WsEvent {
        WsEvent::Message {
            text,
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn tungstenite_client_frames_parse_at_any_split() {
        let mut client = WebSocketContext::new(Role::Client, None);
        let mut io = Mem::default();
        let payloads: Vec<Vec<u8>> = [0usize, 1, 7, 8, 9, 125, 126, 127, 65_535, 65_536, 69_000]
            .iter()
            .map(|n| (0..*n).map(|i| (i * 7) as u8).collect())
            .collect();
        for p in &payloads {
            client.write(&mut io, Message::binary(p.clone())).unwrap();
        }
        client.write(&mut io, Message::text("héllo")).unwrap();
        client
            .write(&mut io, Message::Ping(vec![1, 2, 3].into()))
            .unwrap();
        client.flush(&mut io).unwrap();
        let mut expected: Vec<WsEvent> = payloads.iter().map(|p| msg(false, p)).collect();
        expected.push(msg(true, "héllo".as_bytes()));
        expected.push(WsEvent::Ping(vec![1, 2, 3]));
        for sizes in [&[usize::MAX][..], &[1], &[2, 3], &[13, 1, 4096], &[65_536]] {
            let (events, res, r) = feed_split(&io.tx, sizes);
            assert_eq!(res, Ok(()));
            assert_eq!(events, expected, "split {sizes:?}");
            assert_eq!(r.buffered_bytes(), 0, "nothing kept between frames");
        }
    }

    #[test]
    fn server_frames_parse_in_tungstenite() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut io = Mem::default();
            write_binary_frame(&mut io.rx, &payload);
            write_frame(&mut io.rx, opcode::PING, b"p");
            write_close(&mut io.rx, close::SLOW_CONSUMER, "x".repeat(300).as_bytes());
            let cfg = WebSocketConfig::default().max_message_size(Some(1 << 20));
            let mut client = WebSocketContext::new(Role::Client, Some(cfg));
            match client.read(&mut io).unwrap() {
                Message::Binary(b) => assert_eq!(&b[..], &payload[..]),
                other => panic!("{other:?}"),
            }
            assert_eq!(
                client.read(&mut io).unwrap(),
                Message::Ping(b"p".to_vec().into())
            );
            match client.read(&mut io).unwrap() {
                Message::Close(Some(c)) => {
                    assert_eq!(u16::from(c.code), close::SLOW_CONSUMER);
                    assert_eq!(c.reason.len(), 123);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn close_reason_is_cut_at_a_char_boundary() {
        let mut out = Vec::new();
        write_close(&mut out, 1000, "é".repeat(100).as_bytes());
        assert_eq!(out[1] as usize, 2 + 122);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    #[test]
    fn fragments_are_joined_with_control_frames_between() {
        let m = [9, 8, 7, 6];
        let mut wire = client_frame(0x02, b"ab", m); // binary, not final
        wire.extend(client_frame(0x89, b"hi", m)); // ping in between
        wire.extend(client_frame(0x00, b"cd", m)); // continuation
        wire.extend(client_frame(0x8A, b"", m)); // pong
        wire.extend(client_frame(0x80, b"ef", m)); // final continuation
        wire.extend(client_frame(0x81, b"t", m)); // a text message after it
        for sizes in [&[usize::MAX][..], &[1], &[5, 2]] {
            let (events, res, r) = feed_split(&wire, sizes);
            assert_eq!(res, Ok(()));
            assert_eq!(
                events,
                vec![
                    WsEvent::Ping(b"hi".to_vec()),
                    WsEvent::Pong,
                    msg(false, b"abcdef"),
                    msg(true, b"t")
                ]
            );
            assert_eq!(r.buffered_bytes(), 0);
        }
    }

    #[test]
    fn protocol_violations_are_refused() {
        let m = [1, 2, 3, 4];
        let unmasked = {
            let mut f = client_frame(0x82, b"x", m);
            f[1] &= 0x7F;
            f.drain(2..6);
            f
        };
        let long_high_bit = {
            let mut f = vec![0x82, 0x80 | 127];
            f.extend_from_slice(&(1u64 << 63).to_be_bytes());
            f.extend_from_slice(&m);
            f
        };
        let cases: Vec<(&str, Vec<u8>, WsError)> = vec![
            (
                "unmasked",
                unmasked,
                WsError::Protocol("unmasked client frame"),
            ),
            (
                "rsv1",
                client_frame(0xC2, b"x", m),
                WsError::Protocol("reserved bits set (no extension was negotiated)"),
            ),
            (
                "opcode 3",
                client_frame(0x83, b"x", m),
                WsError::Protocol("reserved opcode"),
            ),
            (
                "opcode 0xB",
                client_frame(0x8B, b"", m),
                WsError::Protocol("reserved opcode"),
            ),
            (
                "long ping",
                client_frame(0x89, &[0; 126], m),
                WsError::Protocol("control frame longer than 125 bytes"),
            ),
            (
                "fragmented ping",
                client_frame(0x09, b"", m),
                WsError::Protocol("fragmented control frame"),
            ),
            (
                "lone continuation",
                client_frame(0x80, b"x", m),
                WsError::Protocol("continuation frame without a message"),
            ),
            (
                "new message in fragments",
                [client_frame(0x02, b"x", m), client_frame(0x82, b"y", m)].concat(),
                WsError::Protocol("new message inside a fragmented one"),
            ),
            (
                "high length bit",
                long_high_bit,
                WsError::Protocol("64-bit length with the high bit set"),
            ),
            (
                "close of one byte",
                client_frame(0x88, &[3], m),
                WsError::Protocol("close payload of one byte"),
            ),
            (
                "close 1005",
                client_frame(0x88, &1005u16.to_be_bytes(), m),
                WsError::Protocol("close code not allowed"),
            ),
            (
                "close 999",
                client_frame(0x88, &999u16.to_be_bytes(), m),
                WsError::Protocol("close code not allowed"),
            ),
            (
                "close 1014",
                client_frame(0x88, &1014u16.to_be_bytes(), m),
                WsError::Protocol("close code not allowed"),
            ),
            (
                "close 5000",
                client_frame(0x88, &5000u16.to_be_bytes(), m),
                WsError::Protocol("close code not allowed"),
            ),
            (
                "close reason not UTF-8",
                client_frame(0x88, &[0x03, 0xE8, 0xFF], m),
                WsError::BadUtf8,
            ),
            (
                "one frame too big",
                client_frame(0x82, &vec![0; MAX + 1], m),
                WsError::TooBig,
            ),
            (
                "fragments too big",
                [
                    client_frame(0x02, &vec![0; MAX - 10], m),
                    client_frame(0x80, &[0; 11], m),
                ]
                .concat(),
                WsError::TooBig,
            ),
        ];
        for (name, wire, want) in cases {
            for sizes in [&[usize::MAX][..], &[1]] {
                let (events, res, mut r) = feed_split(&wire, sizes);
                assert_eq!(res, Err(want), "{name} split {sizes:?}");
                assert!(events.is_empty(), "{name}: {events:?}");
                // After an error nothing more is parsed or kept.
                let mut more = client_frame(0x82, b"late", m);
                let mut out = Vec::new();
                assert_eq!(r.feed(&mut more, MAX, &mut out), Ok(()));
                assert!(out.is_empty() && r.buffered_bytes() == 0, "{name}");
            }
        }
    }

    #[test]
    fn too_big_is_refused_from_the_header_alone() {
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&((MAX as u64) + 1).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        let mut r = WsReader::new();
        assert_eq!(
            r.feed(&mut header, MAX, &mut Vec::new()),
            Err(WsError::TooBig)
        );
    }

    #[test]
    fn close_ends_parsing_and_events_before_an_error_are_kept() {
        let m = [5, 6, 7, 8];
        let mut wire = client_frame(0x82, b"a", m);
        wire.extend(client_frame(0x88, &[0x03, 0xE8, b'o', b'k'], m));
        wire.extend(client_frame(0x82, b"after close", m));
        let (events, res, r) = feed_split(&wire, &[usize::MAX]);
        assert_eq!(res, Ok(()));
        assert_eq!(
            events,
            vec![
                msg(false, b"a"),
                WsEvent::Close(Some((1000, b"ok".to_vec())))
            ]
        );
        assert_eq!(r.buffered_bytes(), 0);
        let mut wire = client_frame(0x82, b"a", m);
        wire.extend(client_frame(0x83, b"bad", m));
        let (events, res, _) = feed_split(&wire, &[usize::MAX]);
        assert_eq!(res, Err(WsError::Protocol("reserved opcode")));
        assert_eq!(events, vec![msg(false, b"a")]);
        let (events, _, _) = feed_split(&client_frame(0x88, b"", m), &[1]);
        assert_eq!(events, vec![WsEvent::Close(None)]);
    }

    #[test]
    fn partial_frames_are_kept_and_released() {
        let wire = client_frame(0x82, &vec![7u8; 1000], [1, 1, 2, 2]);
        let mut r = WsReader::new();
        let mut out = Vec::new();
        r.feed(&mut wire[..600].to_vec(), MAX, &mut out).unwrap();
        assert!(out.is_empty());
        assert!(r.buffered_bytes() >= 600 && r.buffered_bytes() <= wire.len());
        r.feed(&mut wire[600..].to_vec(), MAX, &mut out).unwrap();
        assert_eq!(out, vec![msg(false, &[7u8; 1000])]);
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn unmask_matches_bytewise_xor() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let mask: [u8; 4] = rng.gen();
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    /// Never panics, keeps at most one frame's bytes, and gives the same result however the
    /// bytes are split: random bytes and mutations of a valid stream, fed in random chunks.
    #[test]
    fn mutated_and_random_input_never_panics_and_is_split_invariant() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let m = [0x11, 0x22, 0x33, 0x44];
        let mut valid = client_frame(0x02, &[1; 300], m);
        valid.extend(client_frame(0x89, b"ping", m));
        valid.extend(client_frame(0x80, &[2; 40], m));
        valid.extend(client_frame(0x82, &[3; 200], m));
        valid.extend(client_frame(0x81, b"text", m));
        valid.extend(client_frame(0x88, &[0x03, 0xE9], m));
        let max = 1024;
        for round in 0..20_000 {
            let wire: Vec<u8> = if round % 4 == 0 {
                let n = rng.gen_range(0..300);
                (0..n).map(|_| rng.gen()).collect()
            } else {
                let mut w = valid.clone();
                for _ in 0..rng.gen_range(1..4) {
                    match rng.gen_range(0..3) {
                        0 => {
                            let i = rng.gen_range(0..w.len());
                            w[i] ^= 1 << rng.gen_range(0..8);
                        }
                        1 => {
                            let i = rng.gen_range(0..w.len());
                            w[i] = rng.gen();
                        }
                        _ => {
                            let cut = rng.gen_range(0..w.len());
                            w.truncate(cut);
                        }
                    }
                    if w.is_empty() {
                        break;
                    }
                }
                w
            };
            let run = |sizes: &[usize]| {
                let mut r = WsReader::new();
                let mut out = Vec::new();
                let mut pos = 0;
                let mut i = 0;
                let mut res = Ok(());
                while pos < wire.len() {
                    let n = sizes[i % sizes.len()].max(1).min(wire.len() - pos);
                    i += 1;
                    let mut chunk = wire[pos..pos + n].to_vec();
                    pos += n;
                    res = r.feed(&mut chunk, max, &mut out);
                    assert!(
                        r.buffered_bytes() <= 2 * (FRAME_HEADER_BYTES_MAX + max),
                        "kept {} bytes",
                        r.buffered_bytes()
                    );
                    if res.is_err() {
                        break;
                    }
                }
                for e in &out {
                    if let WsEvent::Message { payload, .. } = e {
                        assert!(payload.len() <= max);
                    }
                }
                (out, res)
            };
            let whole = run(&[usize::MAX]);
            let split: Vec<usize> = (0..4).map(|_| rng.gen_range(1..64)).collect();
            assert_eq!(run(&split), whole, "round {round}, split {split:?}");
        }
    }
}
