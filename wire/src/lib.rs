//! The Switchboard wire protocol.
//!
//! ```text
//!  WebSocket binary message ──► codec::decode_client ──► verify (bounded) ──► ClientFrame
//!  ServerFrame ──► codec::Encoder ──► one FlatBuffers Envelope ──► WebSocket binary message
//!  ChatEvent ──► codec::encode_event ──► "SWE1" buffer ──► Message.payload (ContentKind::Event)
//!  Message.payload / log record ──► codec::decode_event ──► verify (bounded) ──► ChatEvent
//! ```
//!
//! `schema/switchboard.fbs` is the source of truth; `src/switchboard_generated.rs` is generated
//! from it by `wire/regen.sh` (flatc 25.12.19) and committed. A test fails when the two disagree.
//! Nothing here does I/O.

pub mod codec;
pub mod frames;
pub mod ids;
pub mod limits;

#[allow(clippy::all, unused_imports, dead_code, non_camel_case_types, mismatched_lifetime_syntaxes)]
#[rustfmt::skip]
mod switchboard_generated;

/// The generated FlatBuffers types (`switchboard.wire.fb`).
pub use switchboard_generated::switchboard::wire::fb;

pub use codec::{
    decode_client, decode_event, decode_server, encode_event, DecodeError, Encoder,
    EVENT_IDENTIFIER,
};
pub use frames::*;
pub use ids::*;
