//! The byte transport under one client connection: plain TCP now, TLS next to it (same
//! listener). The HTTP API loop (`api_http.rs`) and, at its read/write call sites, the WebSocket
//! loop see only this narrow interface: read what arrived (appended to a buffer), write all.
//!
//! ```text
//!  socket ──read──► core.read_scratch ──► (TLS: decrypt) ──► caller's buffer
//!  caller's bytes ──► (TLS: encrypt) ──write_all──► socket
//! ```

use crate::core::Core;
use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

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

/// One connection's transport.
pub struct Transport {
    pub stream: TcpStream,
}

impl Transport {
    pub fn plain(stream: TcpStream) -> Transport {
        Transport { stream }
    }

    /// Waits for bytes and appends them to `out`. `Ok(0)`: the peer closed.
    pub async fn read(&mut self, core: &Core, out: &mut Vec<u8>) -> std::io::Result<usize> {
        let n = ReadScratch {
            stream: &mut self.stream,
            core,
        }
        .await?;
        out.extend_from_slice(&core.read_scratch.borrow()[..n]);
        Ok(n)
    }

    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(data).await
    }

    pub async fn close(&mut self) {
        let _ = self.stream.close().await;
    }
}
