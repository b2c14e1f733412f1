//! WebSocket framing on caller-owned buffers. tungstenite's `WebSocketContext` does the RFC 6455
//! work (masking rules, control frames, fragmentation, UTF-8 checks, the close handshake) over
//! [`WsIo`], an in-memory stream: bytes read from the socket are appended to `rx`, bytes to send
//! accumulate in `tx`. The connection task moves bytes between `WsIo` and the socket, so idle
//! connections hold no read buffer and writes never block inside tungstenite.

use std::io::{self, Read, Write};
use tungstenite::protocol::WebSocketConfig;

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

/// tungstenite's read chunk: small, because every connection has one (tungstenite's 128 KiB
/// default would cost 128 KiB per connection).
pub const WS_READ_CHUNK_BYTES: usize = 512;

pub fn config(frame_bytes_max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_CHUNK_BYTES)
        // Write straight through to `WsIo::tx`; our own queue limit bounds it.
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(frame_bytes_max))
        .max_frame_size(Some(frame_bytes_max))
}

/// The in-memory stream tungstenite reads from and writes to.
#[derive(Default)]
pub struct WsIo {
    pub rx: Vec<u8>,
    pub rx_pos: usize,
    pub tx: Vec<u8>,
}

impl WsIo {
    pub fn new(leftover: Vec<u8>) -> WsIo {
        WsIo {
            rx: leftover,
            rx_pos: 0,
            tx: Vec::new(),
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.rx_pos == self.rx.len() {
            self.rx.clear();
            self.rx_pos = 0;
        }
        self.rx.extend_from_slice(bytes);
    }

    /// Releases buffer memory once everything was consumed / written, so idle connections
    /// cost no buffer.
    pub fn compact(&mut self) {
        if self.rx_pos == self.rx.len() {
            self.rx = Vec::new();
            self.rx_pos = 0;
        }
        if self.tx.is_empty() && self.tx.capacity() > 0 {
            self.tx = Vec::new();
        }
    }
}

impl Read for WsIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.rx[self.rx_pos..];
        if avail.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.rx_pos += n;
        Ok(n)
    }
}

impl Write for WsIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Appends one unmasked, final binary frame (server to client frames are never masked). Used for
/// the data path so an encoded frame is copied once, straight into the socket buffer.
pub fn write_binary_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len();
    out.reserve(len + 10);
    out.push(0x82); // FIN + binary opcode
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

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::{Role, WebSocketContext};
    use tungstenite::Message;

    #[test]
    fn raw_frames_parse_as_binary_messages() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut io = WsIo::default();
            write_binary_frame(&mut io.tx, &payload);
            let mut client = WebSocketContext::new(Role::Client, Some(config(1 << 20)));
            let mut cio = WsIo::new(std::mem::take(&mut io.tx));
            match client.read(&mut cio).unwrap() {
                Message::Binary(b) => assert_eq!(&b[..], &payload[..]),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn partial_input_would_block_then_completes() {
        // A masked client frame "hello" fed byte by byte.
        let mut client = WebSocketContext::new(Role::Client, None);
        let mut cio = WsIo::default();
        client
            .write(&mut cio, Message::binary(b"hello".to_vec()))
            .unwrap();
        client.flush(&mut cio).unwrap();
        let wire = std::mem::take(&mut cio.tx);
        let mut server = WebSocketContext::new(Role::Server, Some(config(1024)));
        let mut io = WsIo::default();
        for (i, b) in wire.iter().enumerate() {
            io.feed(&[*b]);
            match server.read(&mut io) {
                Ok(Message::Binary(m)) => {
                    assert_eq!(i, wire.len() - 1);
                    assert_eq!(&m[..], b"hello");
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("{other:?}"),
            }
        }
    }
}
