//! `switchboard-loadgen`: drives a Switchboard server over real loopback sockets and reports
//! what it measured.
//!
//! ```text
//!  idle:   N × (TCP connect ─► GET /v1/ws + Bearer ─► 101) ─► hold (answer Pings) ─► Close
//!          /metrics RSS before ─┘            /metrics RSS after open + settle ─► bytes per connection
//!  simple: P × [sender Client ─Send (≤ W unacked)─► server ─Message─► recipient Client ─Delivered─►]
//!          send→SendAck and send→Message latencies ─► hdrhistogram ─► p50 … max, lost/dup/order
//! ```
//!
//! Tokens are minted from the server's `token.secret`, so no login round trip is needed. Only
//! loopback targets are accepted: this tool is for measuring one box.

mod idle;
mod metrics;
mod report;
mod simple;
mod sys;
mod token;
mod ws_raw;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::report::parse_duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchboard-loadgen",
    version,
    about = "Load generator for Switchboard (skeleton): idle-connection memory and closed-loop message latency.",
    long_about = "Load generator for Switchboard (skeleton).\n\n\
idle   opens N authenticated WebSocket connections (distinct users, device 1) with a raw RFC 6455 \
upgrade each, holds them (answering server Pings), and reports the server's RSS per connection \
from GET /metrics, plus this process's and the kernel's view.\n\
simple runs P sender/recipient pairs of blocking clients; each sender keeps up to W sends unacked \
(CLOSED LOOP) and the recipient acknowledges with Delivered cursors. It reports acked msgs/s, \
deliveries/s, send->SendAck and send->Message latency percentiles, and lost / duplicate / \
out-of-order messages (exit status 1 if any).\n\n\
Tokens are minted from the server's <data_dir>/token.secret (--secret-file). Targets must be \
loopback addresses. Exit status: 0 clean run, 1 the run saw errors or anomalies, 2 the run \
could not start. See loadgen/README.md."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Parses a `host:port` and insists on a loopback address.
fn parse_target(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("{s:?} is not an ip:port address: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; this load generator only targets this machine"
        ));
    }
    Ok(addr)
}

fn default_first_user() -> u64 {
    // A fresh block of a million user ids per second of wall-clock time, so consecutive runs
    // against one data directory start empty 1:1 chats (seq 1) instead of continuing old ones.
    (sys::unix_now_s() % 1_000_000) * 1_000_000 + 1
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold N idle authenticated WebSocket connections; report server RSS per connection.
    #[command(
        long_about = "Opens --connections authenticated WebSocket connections (users \
--first-user.., device 1) from --threads opener threads, each doing a blocking TCP connect and a raw \
HTTP/1.1 upgrade (checking 101 and Sec-WebSocket-Accept), then hands the socket to the main thread, \
which owns all of them (no thread per connection) and reads them non-blocking once a second to \
answer Pings and notice drops. After all are open it scrapes /metrics right away and again after \
--settle, holds for --hold, then closes every connection with a Close handshake and scrapes once \
more.\n\nPrints: connections established, errors by kind, handshake latency, server connection gauge, \
server RSS before/after and bytes per connection = (RSS after settle - RSS before) / established, \
this process's RSS and fd count, and /proc/net/sockstat + Slab from /proc/meminfo before/after \
(machine-wide; on loopback both ends of each connection count).\n\nOne process can hold at most \
RLIMIT_NOFILE - 64 connections (checked up front)."
    )]
    Idle {
        /// Server address (loopback ip:port).
        #[arg(long, value_parser = parse_target)]
        target: SocketAddr,
        /// Connections to open and hold.
        #[arg(long)]
        connections: usize,
        /// The server's <data_dir>/token.secret, to mint tokens.
        #[arg(long)]
        secret_file: PathBuf,
        /// How long to hold the connections once all are open (500ms, 20s, 2m).
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        hold: Duration,
        /// Connections opened per second; 0 = as fast as the opener threads go.
        #[arg(long, default_value_t = 0.0)]
        ramp: f64,
        /// Threads doing blocking connects and upgrades.
        #[arg(long, default_value_t = 4)]
        threads: usize,
        /// Delay after the last connection before the "settled" scrape (capped by --hold).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        settle: Duration,
        /// First user id; connection i authenticates as user first_user + i. Default: a fresh
        /// block derived from the clock.
        #[arg(long)]
        first_user: Option<u64>,
        /// Loopback source addresses (127.0.0.1, .2, ...) to spread connections over, so the
        /// kernel's local-port search stays cheap; 0 = one per 10,000 connections.
        #[arg(long, default_value_t = 0)]
        source_ips: usize,
        /// Limit on each TCP connect and on each upgrade response.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        connect_timeout: Duration,
        /// Stop opening connections after this many failures.
        #[arg(long, default_value_t = 100)]
        max_errors: usize,
        /// Stop opening connections after this long.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        open_time_max: Duration,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Closed-loop send/deliver latency between P sender/recipient pairs.
    #[command(
        long_about = "P pairs of blocking clients (sender user first_user+2i, recipient \
first_user+2i+1, device 1), one thread each. Each sender sends --messages text messages to its \
recipient's 1:1 chat, keeping at most --window unacked (CLOSED LOOP: when the server slows down, so \
does the offered load, and latencies exclude the queueing a fixed-rate client would see). Each \
payload starts with a 24-byte header: magic, pair, counter, send timestamp (ns since a process-wide \
Instant); the rest is filler up to --payload-bytes.\n\nThe sender records send->SendAck latency (the \
server acks after the group commit's fdatasync). The recipient records send->Message latency, checks \
for duplicates and order, and sends a Delivered cursor every --delivered-every messages. Senders \
stop after --messages or --duration; recipients then wait up to --drain for the rest.\n\nPrints \
acked msgs/s and deliveries/s (count / time from start to the last ack / delivery), p50 p90 p99 \
p999 max of both latencies in microseconds, and lost (acked but not delivered), duplicates, order \
violations. Exit status 1 if any of those or any error is non-zero."
    )]
    Simple {
        /// Server address (loopback ip:port).
        #[arg(long, value_parser = parse_target)]
        target: SocketAddr,
        /// The server's <data_dir>/token.secret, to mint tokens.
        #[arg(long)]
        secret_file: PathBuf,
        /// Sender/recipient pairs (two threads and two connections each).
        #[arg(long, default_value_t = 1)]
        pairs: usize,
        /// Messages each sender sends.
        #[arg(long, default_value_t = 10_000)]
        messages: usize,
        /// Most unacked sends per sender.
        #[arg(long, default_value_t = 32)]
        window: usize,
        /// Payload size, at least 24 (the header).
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// The recipient sends a Delivered cursor after this many messages.
        #[arg(long, default_value_t = 32)]
        delivered_every: usize,
        /// Senders stop sending after this long even if --messages are not all sent.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        /// After its sender stops, how long a recipient waits for missing messages.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        drain: Duration,
        /// A sender gives up when no SendAck arrives for this long.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        ack_timeout: Duration,
        /// First user id. Default: a fresh block derived from the clock.
        #[arg(long)]
        first_user: Option<u64>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Idle {
            target,
            connections,
            secret_file,
            hold,
            ramp,
            threads,
            settle,
            first_user,
            source_ips,
            connect_timeout,
            max_errors,
            open_time_max,
            json,
        } => idle::run(&idle::IdleArgs {
            target,
            connections,
            secret_file,
            hold,
            ramp_per_s: ramp,
            threads,
            settle,
            first_user: first_user.unwrap_or_else(default_first_user),
            source_ips,
            connect_timeout,
            errors_max: max_errors,
            open_time_max,
            json,
        }),
        Cmd::Simple {
            target,
            secret_file,
            pairs,
            messages,
            window,
            payload_bytes,
            delivered_every,
            duration,
            drain,
            ack_timeout,
            first_user,
            json,
        } => simple::run(&simple::SimpleArgs {
            target,
            secret_file,
            pairs,
            messages,
            window,
            payload_bytes,
            delivered_every,
            duration,
            drain,
            ack_timeout,
            first_user: first_user.unwrap_or_else(default_first_user),
            json,
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("switchboard-loadgen: the run saw errors or anomalies (see above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("switchboard-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn only_loopback_targets() {
        assert!(parse_target("127.0.0.1:7070").is_ok());
        assert!(parse_target("[::1]:7070").is_ok());
        assert!(parse_target("10.0.0.1:7070").is_err());
        assert!(parse_target("localhost:7070").is_err());
    }
}
