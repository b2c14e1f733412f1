//! Push notifications for devices with no connection (issue 5).
//!
//! ```text
//!  engine core (glommio) ──try_send──► [bounded channel] ──► push thread (tokio, current-thread)
//!   message durable, user offline                              │ Registry (tokens, mutes; durable)
//!   read cursor moved                                          │ PushQueue (sans-IO: collapse,
//!  HTTP handler ──register/mute + oneshot reply──►             │   badge, backoff, limits)
//!                                                              ├─► sinks: webhook │ FCM v1 │ APNs
//!                                                              └─► DeadLetterLog (durable)
//! ```
//!
//! `queue`, `registry`, `log` and `dlq` are plain code tested without a runtime; `sinks`,
//! `http`, `jwt` and `service` do the network I/O on one dedicated thread so the glommio
//! reactors never wait on a push service.

pub mod config;
pub mod dlq;
pub mod http;
pub mod jwt;
pub mod log;
pub mod model;
pub mod queue;
pub mod registry;
pub mod service;
pub mod sinks;

pub use config::PushConfig;
pub use model::{Notification, Outcome, Platform, Target};
pub use queue::{DeadLetter, MessageEvent};
pub use service::{PushError, PushHandle, PushService};
