#![recursion_limit = "256"]
//! `switchboard-loadgen`: drives a Switchboard server over real loopback sockets and reports
//! what it measured.
//!
//! ```text
//!  run:    coordinator ─► K worker processes (epoll, ~15K conns each) ─► open-loop sends at
//!          scheduled times ─► ack / delivery / receipt latencies + correctness checks
//!          ─► merged HdrHistograms ─► report.{json,md,html}; --sweep finds the knee
//!  plan:   report.json + demand ─► boxes, cores, limiting resource (Markdown)
//!  idle:   N × (TCP connect ─► GET /v1/ws + Bearer ─► 101) ─► hold (answer Pings) ─► Close
//!          /metrics RSS before ─┘            /metrics RSS after open + settle ─► bytes per connection
//!  simple: P × [sender Client ─Send (≤ W unacked)─► server ─Message─► recipient Client ─Delivered─►]
//!          send→SendAck and send→Message latencies ─► hdrhistogram ─► p50 … max, lost/dup/order
//! ```
//!
//! Tokens are minted from the server's `token.secret`, so no login round trip is needed. Only
//! loopback targets are accepted: this tool is for measuring one box.
//!
//! This file is the command line; the modules are the library (`src/lib.rs`), so the fuzz
//! targets in `loadgen/fuzz/` can drive its byte parsers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use switchboard_loadgen::report::parse_duration;
use switchboard_loadgen::{coord, idle, plan, run_report, scenario, simple, sys, worker};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchboard-loadgen",
    version,
    about = "Load generator for Switchboard: open-loop scenarios, sweeps, reports, capacity plans, idle-connection memory.",
    long_about = "Load generator for Switchboard.\n\n\
run    open-loop scenario (flags or --scenario FILE): N connections over worker processes, \
messages sent at scheduled times (constant or Poisson) at --rate, latency from the scheduled time \
(send->delivery, send->SendAck, send->delivered Receipt, connect), correctness checks (lost, \
duplicates, order, gaps), live progress, --report DIR (json, md, html), --sweep RATES for the knee.\n\
plan   capacity planning from a report.json.\n\
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

/// Flags of `run`; each overrides the scenario file (see loadgen/README.md for defaults).
#[derive(clap::Args, Debug, Default)]
struct RunFlags {
    /// Scenario file (TOML); flags given here override it.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// ws://HOST:PORT of the server (loopback). [default: ws://127.0.0.1:7070]
    #[arg(long)]
    target: Option<String>,
    /// The server's <data_dir>/token.secret (tokens are minted from it).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// The server's data directory: shorthand for --secret-file DIR/token.secret.
    #[arg(long, conflicts_with = "secret_file")]
    data_dir: Option<PathBuf>,
    /// Connections (users x devices). [default: 1000]
    #[arg(long)]
    connections: Option<u64>,
    /// Users (0: connections / devices-per-user).
    #[arg(long)]
    users: Option<u64>,
    /// Devices per user, 1..=8. [default: 1]
    #[arg(long)]
    devices_per_user: Option<u32>,
    /// Ring neighbours on each side each user talks to. [default: 1]
    #[arg(long)]
    contacts_per_user: Option<u32>,
    /// Target send rate, messages/s over all workers. [default: 1000]
    #[arg(long)]
    rate: Option<f64>,
    /// Send times: poisson or constant. [default: poisson]
    #[arg(long)]
    arrival: Option<String>,
    /// Measured time after the warm-up (30s, 2m). [default: 30s]
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Warm-up, excluded from latencies and throughput. [default: 5s]
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Longest wait for outstanding acks/deliveries/receipts after sending stops. [default: 10s]
    #[arg(long, value_parser = parse_duration)]
    drain: Option<Duration>,
    /// Payload sizes: 100 or 100:90,4000:10 (value:weight). [default: 100]
    #[arg(long)]
    payload_bytes: Option<String>,
    /// Percent of messages to groups (needs a target with groups). [default: 0]
    #[arg(long)]
    group_pct: Option<f64>,
    /// Group sizes: 10:80,100:20. [default: 100]
    #[arg(long)]
    group_sizes: Option<String>,
    /// Connections opened per second, all workers together (0: unlimited). [default: 5000]
    #[arg(long)]
    connect_rate: Option<f64>,
    /// Limit on connect + upgrade per connection. [default: 10s]
    #[arg(long, value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    /// Loopback source addresses (0: one per 10,000 connections, at least one per worker).
    #[arg(long)]
    source_ips: Option<u32>,
    /// Worker processes (0: enough for --conns-per-worker-max, and one per CPU when the users
    /// allow, at most 16). [default: 0]
    #[arg(long)]
    workers: Option<u32>,
    /// Most connections per worker when --workers is 0. [default: 15000]
    #[arg(long)]
    conns_per_worker_max: Option<u64>,
    /// Turn the receipt flow off (recipients send no Delivered cursors).
    #[arg(long)]
    no_receipts: bool,
    /// Rates to sweep, e.g. 10000,20000,40000: one full run each, then the knee.
    #[arg(long, value_delimiter = ',')]
    sweep: Option<Vec<f64>>,
    /// Sweep every rate even after one fails the knee test.
    #[arg(long)]
    sweep_all: bool,
    /// Runs per sweep rate (1..=9): the knee test uses the median e2e p95 and every run must
    /// pass its checks; the half-knee run is repeated too. Needs a sweep (--sweep or the file's
    /// `sweep`): N > 1 without one is an error. Overrides the file. [default: 1]
    #[arg(long)]
    sweep_repeat: Option<u32>,
    /// The knee's p95 e2e latency limit in ms. [default: 100]
    #[arg(long)]
    knee_p95_ms: Option<f64>,
    /// After the sweep, run one more step at half the knee's rate and report its latency.
    #[arg(long)]
    half_knee: bool,
    /// Seed of all random choices. [default: 1]
    #[arg(long)]
    seed: Option<u64>,
    /// First user id (0: a fresh block from the clock).
    #[arg(long)]
    first_user: Option<u64>,
    /// Scenario name shown in reports.
    #[arg(long)]
    name: Option<String>,
    /// Write report.json, report.md and report.html into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The server's pid, to report its CPU time (read from /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Command that starts one worker instead of this binary's `worker` subcommand, split on
    /// spaces, `{i}` = worker index: e.g. "ssh lg{i} /usr/local/bin/switchboard-loadgen worker".
    #[arg(long)]
    worker_cmd: Option<String>,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Print the effective scenario as TOML and exit.
    #[arg(long)]
    print_scenario: bool,
}

impl RunFlags {
    fn scenario(&self) -> Result<scenario::Scenario, String> {
        let mut s = match &self.scenario {
            Some(p) => scenario::Scenario::from_toml(
                &std::fs::read_to_string(p).map_err(|e| format!("read {}: {e}", p.display()))?,
            )
            .map_err(|e| format!("{}: {e}", p.display()))?,
            None => scenario::Scenario::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { s.$f = v.clone(); } )* };
        }
        set!(
            target,
            connections,
            users,
            devices_per_user,
            contacts_per_user,
            rate,
            duration,
            warmup,
            drain,
            group_pct,
            connect_rate,
            connect_timeout,
            source_ips,
            workers,
            conns_per_worker_max,
            knee_p95_ms,
            sweep_repeat,
            seed,
            first_user,
            name
        );
        if self.half_knee {
            s.half_knee = true;
        }
        if let Some(d) = &self.data_dir {
            s.secret_file = Some(d.join("token.secret"));
        }
        if let Some(f) = &self.secret_file {
            s.secret_file = Some(f.clone());
        }
        if let Some(a) = &self.arrival {
            s.arrival = match a.as_str() {
                "poisson" => scenario::Arrival::Poisson,
                "constant" => scenario::Arrival::Constant,
                other => return Err(format!("--arrival {other:?}: poisson or constant")),
            };
        }
        if let Some(p) = &self.payload_bytes {
            s.payload_bytes =
                scenario::Dist::parse(p).map_err(|e| format!("--payload-bytes {e}"))?;
        }
        if let Some(g) = &self.group_sizes {
            s.group_sizes = scenario::Dist::parse(g).map_err(|e| format!("--group-sizes {e}"))?;
        }
        if self.group_pct.is_some() {
            s.direct_pct = 100.0 - s.group_pct;
        }
        if self.no_receipts {
            s.receipts = false;
        }
        if let Some(r) = &self.sweep {
            s.sweep = r.clone();
        }
        // A relative secret path must survive the workers' own working directory (same here).
        if let Some(p) = &s.secret_file {
            if p.is_relative() {
                if let Ok(abs) = std::fs::canonicalize(p) {
                    s.secret_file = Some(abs);
                }
            }
        }
        Ok(s)
    }
}

/// `run`: one run or a sweep; writes the report; `Ok(true)` when every check passed.
fn cmd_run(flags: &RunFlags) -> Result<bool, String> {
    let sc = flags.scenario()?;
    if flags.print_scenario {
        print!("{}", sc.to_toml());
        return Ok(true);
    }
    let mut sc = sc;
    if scenario::parse_target(&sc.target)?.is_mqtt() && sc.receipts {
        eprintln!("note: MQTT has no delivered receipts; the receipt flow is off for this target");
        sc.receipts = false;
    }
    sc.validate()?;
    sc.check_target_support()?;
    let opts = coord::RunOpts {
        progress: !flags.quiet,
        server_pid: flags.server_pid,
        sweep_all: flags.sweep_all,
        worker_cmd: flags.worker_cmd.clone(),
    };
    let (json, md, html, ok) = if sc.sweep.is_empty() {
        let r = coord::run_once(&sc, &opts)?;
        let out = (
            run_report::run_json(&r),
            run_report::markdown(&r, None),
            run_report::html(&r, None),
            r.ok(),
        );
        println!("{}", out.1);
        out
    } else {
        let sw = coord::sweep(&sc, &opts)?;
        let out = (
            run_report::sweep_json(&sw),
            run_report::markdown(sw.main_step(), Some(&sw)),
            run_report::html(sw.main_step(), Some(&sw)),
            // A sweep passes when it found a knee (the steps above it fail by design) and its
            // half-knee run, when asked for, passed its checks.
            sw.knee.is_some() && sw.half_knee.as_ref().is_none_or(|h| h.ok()),
        );
        println!("{}", out.1);
        out
    };
    if let Some(dir) = &flags.report {
        run_report::write_all(dir, &json, &md, &html)?;
        eprintln!("report written to {}", dir.display());
    }
    Ok(ok)
}

#[derive(Subcommand)]
enum Cmd {
    /// Open-loop load: scenario, workers, latency from scheduled send times, checks, reports.
    #[command(
        long_about = "Runs a scenario (defaults < --scenario FILE < flags) against a Switchboard \
server: opens --connections authenticated WebSocket connections over worker processes (this binary \
re-executed; ~15K sockets each), then sends 1:1 messages at scheduled times (--rate, poisson or \
constant; open loop: the schedule never waits for the server) for --warmup + --duration, then \
drains. Latency is measured from each message's scheduled time: send->delivery at every recipient \
device, send->SendAck, send->delivered Receipt (recipients send a Delivered cursor after each read), \
and connect+upgrade. Each payload carries a unique message id; the run fails (exit 1) on any lost \
(acked, not delivered by the end of the drain), duplicate, out-of-order or missing-seq message, \
missing receipt, error or dropped connection.\n\nTokens: minted from the server's \
<data_dir>/token.secret (--secret-file or --data-dir), the same HMAC format `switchboard token` \
prints, so no login round trip and no process per token.\n\n--sweep R1,R2,...: one full run per \
rate (fresh users each), ascending, stopping after the first rate over the knee (p95 e2e >= \
--knee-p95-ms, or any error, or anything lost); the report shows the throughput-vs-latency curve. \
--sweep-repeat N runs each rate N times: the step's verdict uses the median p95 (the upper one for \
even N) and fails if any run fails a check; a rate stops before its N-th run once it cannot pass \
(a failed check, or half the runs, rounded up, with p95 at or over the limit).\n\n\
--report DIR writes report.json (schema in loadgen/README.md), report.md and report.html."
    )]
    Run(Box<RunFlags>),
    /// Capacity planning from a report.json (Markdown with the arithmetic shown).
    Plan {
        /// report.json of a run or (better) a sweep.
        #[arg(long)]
        report: PathBuf,
        /// Registered users.
        #[arg(long)]
        users: f64,
        /// Messages each user sends per day.
        #[arg(long)]
        msgs_per_user_day: f64,
        /// Peak rate / average rate.
        #[arg(long)]
        peak_factor: f64,
        /// Share of capacity kept free (0.3 = plan for 70 % busy).
        #[arg(long, default_value_t = 0.3)]
        headroom: f64,
        /// Devices (connections) per user.
        #[arg(long, default_value_t = 1.0)]
        devices_per_user: f64,
        /// Share of devices connected at the peak.
        #[arg(long, default_value_t = 1.0)]
        online_share: f64,
        /// Memory of one box in GiB (default: this machine's).
        #[arg(long)]
        box_memory_gib: Option<f64>,
        /// Kernel memory per connection in bytes (socket, file, epoll/io_uring); the default is
        /// the figure measured on the development box (tuning/README.md).
        #[arg(long, default_value_t = 5030.0)]
        kernel_bytes_per_connection: f64,
        /// Connections one server process may hold (its LimitNOFILE).
        #[arg(long, default_value_t = 1_000_000.0)]
        conns_per_box_max: f64,
        /// Server bytes per connection, overriding the report's (e.g. the `idle` measurement,
        /// which is cleaner than a sweep step's RSS delta).
        #[arg(long)]
        bytes_per_connection: Option<f64>,
        /// Days of sent messages the servers keep. The embedded store keeps every message and its
        /// index holds each one's location in memory (the report's `server_index`), so stored
        /// history needs memory next to the connections; 0 leaves it out.
        #[arg(long, default_value_t = 30.0)]
        history_days: f64,
    },
    /// (internal) A worker process of `run`: reads its spec on stdin, reports on stdout.
    #[command(hide = true)]
    Worker,
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
        Cmd::Run(flags) => cmd_run(&flags),
        Cmd::Worker => match worker::main() {
            Ok(()) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchboard-loadgen worker: {e}");
                return ExitCode::from(2);
            }
        },
        Cmd::Plan {
            report,
            users,
            msgs_per_user_day,
            peak_factor,
            headroom,
            devices_per_user,
            online_share,
            box_memory_gib,
            kernel_bytes_per_connection,
            conns_per_box_max,
            bytes_per_connection,
            history_days,
        } => {
            let d = plan::Demand {
                users,
                msgs_per_user_day,
                peak_factor,
                headroom,
                devices_per_user,
                online_share,
                box_memory_bytes: box_memory_gib
                    .map_or_else(plan::mem_total_bytes, |g| g * 1024.0 * 1024.0 * 1024.0),
                kernel_bytes_per_connection,
                conns_per_box_max,
                bytes_per_connection_default: 8192.0,
                bytes_per_connection,
                history_days,
            };
            plan::run(&report, &d).map(|md| {
                print!("{md}");
                true
            })
        }
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
    fn run_flags_override_the_scenario_file() {
        let dir = std::env::temp_dir().join(format!("sb-loadgen-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let file = dir.join("s.toml");
        std::fs::write(&file, "rate = 5\nconnections = 10\nname = \"file\"\n").expect("write");
        let cli = Cli::try_parse_from([
            "x",
            "run",
            "--scenario",
            file.to_str().expect("utf8"),
            "--rate",
            "7",
            "--payload-bytes",
            "100:3,200:1",
            "--sweep",
            "1,2",
            "--group-pct",
            "10",
            "--data-dir",
            "/srv/d",
            "--sweep-repeat",
            "3",
        ])
        .expect("parse");
        let Cmd::Run(flags) = cli.cmd else {
            panic!("not run")
        };
        let s = flags.scenario().expect("scenario");
        assert_eq!(s.rate, 7.0);
        assert_eq!(s.connections, 10);
        assert_eq!(s.name, "file");
        assert_eq!(s.sweep, vec![1.0, 2.0]);
        assert_eq!(s.sweep_repeat, 3);
        assert_eq!((s.direct_pct, s.group_pct), (90.0, 10.0));
        assert_eq!(s.payload_bytes.items, vec![(100, 3), (200, 1)]);
        assert_eq!(s.secret_file, Some(PathBuf::from("/srv/d/token.secret")));
        std::fs::remove_dir_all(&dir).expect("rmdir");
    }

    #[test]
    fn only_loopback_targets() {
        assert!(parse_target("127.0.0.1:7070").is_ok());
        assert!(parse_target("[::1]:7070").is_ok());
        assert!(parse_target("10.0.0.1:7070").is_err());
        assert!(parse_target("localhost:7070").is_err());
    }
}
