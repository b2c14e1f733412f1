//! The byte transport under one client connection: plain TCP, or TLS (rustls through
//! `api::tls::TlsSession`) on the same listener, told apart by the first byte (0x16, a TLS
//! handshake record, cannot start an HTTP request). The HTTP API loop (`api_http.rs`) and the
//! WebSocket loop (at its read and write call sites only) see this narrow interface: read what
//! arrived (handed to a closure, appended to a buffer, or — for the WebSocket loop — left in
//! the core's read scratch by `read_to_scratch`), write all, close.
//!
//! ```text
//!  socket ──read──► core.read_scratch ──(TLS: feed_ciphertext, take_plaintext)──► caller
//!  caller's bytes ──(TLS: write_plaintext, take_ciphertext)──write──► socket
//! ```
//!
//! Cancellation: the WebSocket loop drops a pending read when another event wins. A plain read
//! is cancel-safe (glommio polls readiness, then reads synchronously). A TLS read keeps what it
//! decrypted in `plaintext` (taken first on the next call) and the handshake bytes it still
//! has to send in `pending_out`, written before anything else, so nothing is lost.

use crate::core::Core;
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use switchboard_api::tls::TlsSession;

/// TLS bytes buffered towards the socket before a write waits for it to drain: the session's
/// own send buffer bound (`api::tls::TLS_SEND_BUFFER_BYTES_MAX`) plus one record of framing.
const TLS_WRITE_CHUNK_BYTES: usize = 64 * 1024;

/// Reads from the socket into the core's shared scratch buffer. The buffer is borrowed only
/// inside `poll`, never across a suspension, so every idle connection of the core shares one
/// buffer.
pub struct ReadScratch<'a> {
    pub stream: &'a mut TcpStream,
    pub core: &'a Core,
}

impl Future for ReadScratch<'_> {
    type Output = std::io::Result<usize>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut scratch = this.core.read_scratch.borrow_mut();
        Pin::new(&mut *this.stream).poll_read(cx, &mut scratch[..])
    }
}

struct Tls {
    session: TlsSession,
    /// Ciphertext produced but not yet written (handshake replies, alerts).
    pending_out: Vec<u8>,
    plaintext: Vec<u8>,
    /// How much of `plaintext` a caller has taken (`read_to_scratch` hands it out in pieces of
    /// at most the scratch buffer's size).
    plain_taken: usize,
}

impl Tls {
    /// Copies the next untaken plaintext to the start of the core's read scratch.
    fn copy_to_scratch(&mut self, core: &Core) -> usize {
        let mut scratch = core.read_scratch.borrow_mut();
        let rest = &self.plaintext[self.plain_taken..];
        let n = rest.len().min(scratch.len());
        scratch[..n].copy_from_slice(&rest[..n]);
        self.plain_taken += n;
        n
    }
}

/// One connection's transport.
pub struct Transport {
    stream: TcpStream,
    tls: Option<Box<Tls>>,
}

impl Transport {
    pub fn plain(stream: TcpStream) -> Transport {
        Transport { stream, tls: None }
    }

    /// A TLS server connection; `first` holds ciphertext already read from the socket.
    pub fn tls(
        stream: TcpStream,
        config: Arc<rustls::ServerConfig>,
        first: &[u8],
    ) -> Result<Transport, switchboard_api::tls::TlsError> {
        let mut session = TlsSession::new(config)?;
        session.feed_ciphertext(first)?;
        Ok(Transport {
            stream,
            tls: Some(Box::new(Tls {
                session,
                pending_out: Vec::new(),
                plaintext: Vec::new(),
                plain_taken: 0,
            })),
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Waits for bytes and hands them to `f` (the plaintext, for TLS), mutable so the WebSocket
    /// parser unmasks in place. Returns how many; `Ok(0)`: the peer closed.
    pub async fn read_with(
        &mut self,
        core: &Core,
        f: impl FnOnce(&mut [u8]),
    ) -> std::io::Result<usize> {
        if self.tls.is_none() {
            let n = ReadScratch {
                stream: &mut self.stream,
                core,
            }
            .await?;
            f(&mut core.read_scratch.borrow_mut()[..n]);
            return Ok(n);
        }
        // Boxed: every idle connection's task holds the plain read's state, and the TLS read's
        // (handshake writes included) is several times larger.
        Box::pin(self.read_tls(core, f)).await
    }

    async fn read_tls(&mut self, core: &Core, f: impl FnOnce(&mut [u8])) -> std::io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            unreachable!("read_tls on a plain transport");
        };
        loop {
            if tls.plain_taken < tls.plaintext.len() {
                let rest = &mut tls.plaintext[tls.plain_taken..];
                let n = rest.len();
                f(rest);
                tls.plain_taken = tls.plaintext.len();
                return Ok(n);
            }
            tls.plaintext.clear();
            tls.plain_taken = 0;
            tls.session.take_plaintext(&mut tls.plaintext);
            if !tls.plaintext.is_empty() {
                continue;
            }
            if tls.session.peer_closed() {
                return Ok(0);
            }
            // Handshake replies first (cancel-safe: written bytes are drained as they go).
            tls.session.take_ciphertext(&mut tls.pending_out);
            write_drain(&mut self.stream, &mut tls.pending_out).await?;
            let n = ReadScratch {
                stream: &mut self.stream,
                core,
            }
            .await?;
            if n == 0 {
                tls.session.feed_eof();
                return Ok(0);
            }
            let fed = tls
                .session
                .feed_ciphertext(&core.read_scratch.borrow()[..n]);
            if let Err(e) = fed {
                // Send the alert rustls queued, then fail the connection.
                tls.session.take_ciphertext(&mut tls.pending_out);
                let _ = write_drain(&mut self.stream, &mut tls.pending_out).await;
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ));
            }
        }
    }

    /// Waits for bytes and leaves them at the start of the core's shared read scratch; returns
    /// how many (`Ok(0)`: the peer closed). The WebSocket loop's read: for a plain connection its
    /// future is as small as a socket read. (The idle chat connection's wait polls
    /// `poll_read_plain_to_scratch` instead.)
    pub async fn read_to_scratch(&mut self, core: &Core) -> std::io::Result<usize> {
        if self.tls.is_none() {
            return ReadScratch {
                stream: &mut self.stream,
                core,
            }
            .await;
        }
        Box::pin(self.read_tls_to_scratch(core)).await
    }

    /// `read_to_scratch` for a plain connection, as a poll for hand-written futures: `None` for a
    /// TLS connection (use `read_to_scratch`). Cancel-safe like every plain read.
    pub fn poll_read_plain_to_scratch(
        &mut self,
        cx: &mut Context<'_>,
        core: &Core,
    ) -> Option<Poll<std::io::Result<usize>>> {
        if self.tls.is_some() {
            return None;
        }
        let mut read = ReadScratch {
            stream: &mut self.stream,
            core,
        };
        Some(Pin::new(&mut read).poll(cx))
    }

    async fn read_tls_to_scratch(&mut self, core: &Core) -> std::io::Result<usize> {
        let pending = self
            .tls
            .as_deref()
            .is_some_and(|t| t.plain_taken < t.plaintext.len());
        if !pending {
            // Decrypts the next bytes into `plaintext` without taking them.
            let n = self.read_tls(core, |_| ()).await?;
            if n == 0 {
                return Ok(0);
            }
            if let Some(tls) = self.tls.as_deref_mut() {
                tls.plain_taken = 0;
            }
        }
        Ok(self
            .tls
            .as_deref_mut()
            .map_or(0, |tls| tls.copy_to_scratch(core)))
    }

    /// Waits for bytes and appends them to `out`.
    pub async fn read(&mut self, core: &Core, out: &mut Vec<u8>) -> std::io::Result<usize> {
        self.read_with(core, |b| out.extend_from_slice(b)).await
    }

    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.tls.is_none() {
            return self.stream.write_all(data).await;
        }
        Box::pin(self.write_all_tls(data)).await
    }

    async fn write_all_tls(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        let Some(tls) = self.tls.as_deref_mut() else {
            unreachable!("write_all_tls on a plain transport");
        };
        loop {
            let n = tls.session.write_plaintext(data);
            data = &data[n..];
            tls.session.take_ciphertext(&mut tls.pending_out);
            if data.is_empty() || tls.pending_out.len() >= TLS_WRITE_CHUNK_BYTES || n == 0 {
                write_drain(&mut self.stream, &mut tls.pending_out).await?;
            }
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    /// Closes the connection (with `close_notify` for TLS).
    pub async fn close(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.session.close();
            tls.session.take_ciphertext(&mut tls.pending_out);
            // Boxed like the other TLS paths: the connection task's size counts every state.
            let _ = Box::pin(write_drain(&mut self.stream, &mut tls.pending_out)).await;
        }
        let _ = self.stream.close().await;
    }
}

/// Writes `buf` to the socket, removing what was written as it goes.
async fn write_drain(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    use futures_lite::AsyncWriteExt as _;
    while !buf.is_empty() {
        let n = stream.write(buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf.drain(..n);
    }
    Ok(())
}
