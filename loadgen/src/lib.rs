#![recursion_limit = "256"]
//! The load generator's modules, as a library: the `switchboard-loadgen` binary (`src/main.rs`)
//! is their command line, and the cargo-fuzz targets in `loadgen/fuzz/` drive the parsers of
//! bytes that come from the server under test (`ws_raw`: WebSocket frames and the upgrade
//! response; `mqtt`: MQTT packets). See `src/main.rs` for the architecture.

pub mod check;
pub mod coord;
pub mod idle;
pub mod metrics;
pub mod mqtt;
pub mod plan;
pub mod poll;
pub mod proto;
pub mod report;
pub mod run_report;
pub mod scenario;
pub mod sched;
pub mod simple;
pub mod svg;
pub mod sys;
pub mod token;
pub mod worker;
pub mod ws_raw;
