//! Switchboard's HTTP-side services, sans-IO: everything here is a pure state machine or
//! function (no sockets, no runtime, no clock: `now` comes in as an argument), so the engine's
//! connection tasks wire it to glommio sockets and everything is tested without a reactor.
//!
//! ```text
//!  socket ─► tls::TlsSession ─► http1::Conn ─► router::Router ─► handlers (engine)
//!   bytes     (rustls, memory)   (requests)     (method+path)      │
//!                                                                  ├─ otp::Otp ─► accounts::AccountStore
//!                                                                  │    └─ otp::SmsSender (log | webhook)
//!                                                                  ├─ keys::KeyDirectory  E2E prekeys
//!                                                                  ├─ sign                media URLs, webhooks
//!                                                                  └─ ratelimit           token buckets
//! ```
//!
//! The HTTP API these pieces serve is described in `api/README.md`.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod http1;
pub mod keys;
pub mod origin;
pub mod otp;
pub mod ratelimit;
pub mod router;
pub mod sign;
pub mod tls;
