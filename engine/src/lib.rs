//! Switchboard: a thread-per-core messaging server.
//!
//! ```text
//!            ┌──────────── core 0 (glommio, pinned) ────────────┐   ┌── core 1 ──┐
//!  client ──►│ listener ─► conn task ─► decode ─► route(owner) ─┼──►│ shard: stage │
//!            │        ▲                                         │   │ group commit │
//!            │        └── ConnShared.queue ◄── Deliver / ToConn ◄──┼─┤ effects      │
//!            └──────────────────────────────────────────────────┘   └──────────────┘
//! ```
//!
//! See ARCHITECTURE.md for the code map and the life of a message.

pub mod accounts;
pub mod accounts_svc;
pub mod api_http;
pub mod api_push;
pub mod calls;
pub mod config;
pub mod conn;
pub mod core;
pub mod http;
pub mod media_svc;
pub mod mesh;
pub mod metrics;
pub mod msg;
pub mod notify;
pub mod owner;
pub mod presence;
pub mod push_hook;
pub mod server;
pub mod shard;
pub mod token;
pub mod transport;
pub mod ws;
