//! A blocking Rust client for Switchboard, used by the integration tests, the examples and the
//! load generator.
//!
//! ```text
//!  Client::send(&ClientFrame) ──► wire::Encoder ──► WebSocket binary message ──► TCP ──► server
//!  server ──► TCP ──► WebSocket (Pings answered here) ──► wire::decode_server ──► ServerFrame
//!                                                               │
//!                              Message / SendAck ──► Cursors (new / duplicate / gap)
//!                                                               │
//!       frames not matching what a call waits for ──► bounded stash ──► Client::recv
//! ```
//!
//! One [`Client`] is one TCP connection, one WebSocket and one thread: `std::net` sockets with
//! timeouts, `tungstenite` for the WebSocket protocol, no runtime. The server authenticates the
//! upgrade request (`GET /v1/ws`) with `Authorization: Bearer <token>` or `?token=`; a missing or
//! bad token is answered with HTTP 401, reported as [`ClientError::Rejected`].
//!
//! [`Cursors`] is the sans-IO part: per chat, the highest contiguous seq this device received.
//! It supplies the cursors of a `Sync` and counts duplicates and gaps, so tests can assert that
//! the server delivered every message exactly once.
//!
//! ```no_run
//! use std::time::Duration;
//! use switchboard_client::{Client, ClientConfig, ClientError};
//! use switchboard_wire::{ServerFrame, Target, UserId};
//!
//! fn main() -> Result<(), ClientError> {
//!     let timeout = Duration::from_secs(5);
//!     let mut alice = Client::connect("127.0.0.1:7070", "alice-token")?;
//!     let mut bob = Client::connect_with(&ClientConfig {
//!         token_in_query: true,
//!         ..ClientConfig::new("127.0.0.1:7070", "bob-token")
//!     })?;
//!
//!     // Alice writes to Bob; the ack says where the message landed.
//!     let ack = alice.send_and_wait_ack(Target::Peer(UserId(2)), b"hello", timeout)?;
//!
//!     // Bob receives it live...
//!     while let Some(frame) = bob.recv(timeout)? {
//!         if let ServerFrame::Message(m) = frame {
//!             assert_eq!((m.chat, m.seq), (ack.chat, ack.seq));
//!             bob.mark_read(m.chat, m.seq)?;
//!             break;
//!         }
//!     }
//!     // ...and a sync afterwards has nothing new.
//!     assert!(bob.sync(timeout)?.is_empty());
//!     assert_eq!(bob.cursors().duplicates() + bob.cursors().gaps(), 0);
//!
//!     alice.close()?;
//!     bob.close()
//! }
//! ```

mod client;
mod cursors;
mod error;
mod msg_id;

pub use client::{Client, ClientConfig, READ_BUFFER_BYTES, STASH_FRAMES_MAX, WS_PATH};
pub use cursors::{Cursors, Observed, OUT_OF_ORDER_SEQS_PER_CHAT_MAX};
pub use error::ClientError;
pub use msg_id::new_client_msg_id;
