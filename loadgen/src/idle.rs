//! `idle`: what an idle, authenticated WebSocket connection costs the server (and the kernel).
//!
//! ```text
//!  /metrics, sockstat ─► baseline
//!  T opener threads: connect ─► GET /v1/ws + Bearer ─► 101 ─► channel ─┐
//!  main thread: owns every socket, sweeps them each second ◄──────────┘  (answers Ping / Close)
//!  all open ─► /metrics ─► settle ─► /metrics, sockstat ─► hold ─► Close all ─► /metrics
//! ```
//!
//! Bytes per connection = (server RSS after settle − RSS before) / connections established.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::metrics::{self, Scrape};
use crate::report::{self, human_bytes, Json, LatencySummary};
use crate::sys::{self, KernelView};
use crate::token::Minter;
use crate::ws_raw::{self, IdleConn, OpenError, SweepStats};

/// Descriptors the process needs besides the held sockets: stdio, the metrics scrape, /proc
/// reads, the JSON file, and slack.
pub const FDS_RESERVED: usize = 64;

/// Interval between sweeps of every held socket (reads that answer Pings). Far below the
/// server's 25 s ping interval and 60 s idle timeout.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Time the close phase waits for the server to answer Close and drop TCP.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Time after closing everything before the last scrape, so the server has run its cleanup.
const AFTER_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Connections per loopback source address when `--source-ips` is 0 (auto). Below half of the
/// default local port range (32768-60999): past that, Linux's connect() port search scans
/// thousands of ports per call (see `ws_raw::connect_from`).
pub const CONNECTIONS_PER_SOURCE_IP_MAX: usize = 10_000;

/// Most loopback source addresses (127.0.0.1 ..= 127.0.0.250).
pub const SOURCE_IPS_MAX: usize = 250;

/// Error messages kept verbatim for the report (the rest are only counted by kind).
const ERROR_SAMPLES_MAX: usize = 5;

const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct IdleArgs {
    pub target: SocketAddr,
    pub connections: usize,
    pub secret_file: PathBuf,
    pub hold: Duration,
    /// Connections opened per second; 0: as fast as the opener threads go.
    pub ramp_per_s: f64,
    pub threads: usize,
    pub settle: Duration,
    pub first_user: u64,
    /// Loopback source addresses to spread connections over; 0: one per
    /// `CONNECTIONS_PER_SOURCE_IP_MAX` connections.
    pub source_ips: usize,
    pub connect_timeout: Duration,
    /// Stop opening after this many failures.
    pub errors_max: usize,
    /// Stop opening after this long.
    pub open_time_max: Duration,
    pub json: Option<PathBuf>,
}

/// Opener threads' output: one per attempted connection.
type Opened = Result<(IdleConn, Duration), OpenError>;

#[derive(Default)]
struct Errors {
    total: u64,
    by_kind: BTreeMap<String, u64>,
    samples: Vec<String>,
}

impl Errors {
    fn add(&mut self, kind: String, message: String) {
        self.total += 1;
        *self.by_kind.entry(kind).or_default() += 1;
        if self.samples.len() < ERROR_SAMPLES_MAX {
            self.samples.push(message);
        }
    }

    fn json(&self) -> Json {
        Json::obj([
            ("total", Json::U(self.total)),
            (
                "by_kind",
                Json::Obj(
                    self.by_kind
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::U(*v)))
                        .collect(),
                ),
            ),
            (
                "samples",
                Json::Arr(self.samples.iter().map(|s| Json::s(s.clone())).collect()),
            ),
        ])
    }
}

/// Held connections plus what happened to the ones that ended.
struct Held {
    conns: Vec<IdleConn>,
    stats: SweepStats,
    /// Connections that ended before this side closed them (server Close, EOF, error).
    dropped: Errors,
    sweeps: u64,
}

impl Held {
    /// Reads every socket once; removes the ones that ended.
    fn sweep(&mut self) {
        self.sweeps += 1;
        let mut i = 0;
        while i < self.conns.len() {
            let seed = self.sweeps ^ ((i as u64) << 20);
            match self.conns[i].sweep(&mut self.stats, seed) {
                Ok(()) => i += 1,
                Err(ended) => {
                    let (kind, message) = match ended {
                        ws_raw::Ended::Closed(code) => (
                            format!("server close {code}"),
                            format!("server sent Close {code}"),
                        ),
                        ws_raw::Ended::Eof => ("eof".to_string(), "TCP EOF".to_string()),
                        ws_raw::Ended::Error(e) => ("error".to_string(), e),
                    };
                    self.dropped.add(kind, message);
                    self.conns.swap_remove(i);
                }
            }
        }
    }
}

fn delta_per(after: u64, before: u64, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (after as f64 - before as f64) / n as f64
}

fn scrape_json(s: &Scrape) -> Json {
    Json::obj([
        ("rss_bytes", Json::U(s.rss_bytes)),
        ("connections", Json::U(s.connections)),
        ("connections_rejected_total", Json::U(s.rejected_total)),
        ("http_unauthorized_total", Json::U(s.unauthorized_total)),
    ])
}

fn kernel_json(k: &KernelView) -> Json {
    Json::obj([
        ("sockets_used", Json::U(k.sockets_used)),
        ("tcp_inuse", Json::U(k.tcp_inuse)),
        ("tcp_time_wait", Json::U(k.tcp_time_wait)),
        ("tcp_mem_pages", Json::U(k.tcp_mem_pages)),
        ("slab_bytes", Json::U(k.slab_bytes)),
    ])
}

/// The source addresses connection `i` uses `sources[i % len]` of.
fn source_addresses(target: SocketAddr, n: usize, requested: usize) -> Result<Vec<IpAddr>, String> {
    let count = match requested {
        0 => n.div_ceil(CONNECTIONS_PER_SOURCE_IP_MAX).max(1),
        k => k,
    };
    match target.ip() {
        IpAddr::V4(_) if count <= SOURCE_IPS_MAX => Ok((0..count)
            .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + k as u8)))
            .collect()),
        IpAddr::V4(_) => Err(format!("--source-ips must be at most {SOURCE_IPS_MAX}")),
        IpAddr::V6(v6) if count == 1 => Ok(vec![IpAddr::V6(v6)]),
        IpAddr::V6(_) => Err(format!(
            "IPv6 has a single loopback address: {count} source addresses are impossible; \
             use an IPv4 target or at most {CONNECTIONS_PER_SOURCE_IP_MAX} connections"
        )),
    }
}

/// Checks that this process can hold `n` sockets, raising the soft fd limit to the hard one.
fn check_capacity(n: usize, sources: usize) -> Result<(), String> {
    let limit = sys::raise_fd_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let need = n + FDS_RESERVED;
    if need as u64 > limit {
        return Err(format!(
            "{n} connections need about {need} file descriptors in this process but its limit is \
             {limit}; lower --connections (or run several loadgen processes)"
        ));
    }
    if let Some((lo, hi)) = sys::ephemeral_ports() {
        let ports = (hi.saturating_sub(lo) + 1) as usize;
        let per_source = n.div_ceil(sources);
        if per_source > ports {
            return Err(format!(
                "{per_source} connections from one source address need as many local ports but \
                 net.ipv4.ip_local_port_range has {ports} ({lo}-{hi}); raise --source-ips"
            ));
        }
    }
    Ok(())
}

/// Runs `idle`. `Ok(true)`: every connection was established and held.
pub fn run(args: &IdleArgs) -> Result<bool, String> {
    if args.connections == 0 || args.threads == 0 {
        return Err("--connections and --threads must be at least 1".into());
    }
    let sources = source_addresses(args.target, args.connections, args.source_ips)?;
    check_capacity(args.connections, sources.len())?;
    let minter = Minter::from_secret_file(&args.secret_file)?;
    let settle = args.settle.min(args.hold);
    let ramp = if args.ramp_per_s > 0.0 {
        format!("{} conn/s", args.ramp_per_s)
    } else {
        "unlimited".to_string()
    };
    println!(
        "idle: target {}, {} connections (users {}..={}, device 1) from {} source address(es) {}.., {} opener threads, ramp {ramp}, hold {:?}",
        args.target,
        args.connections,
        args.first_user,
        args.first_user + args.connections as u64 - 1,
        sources.len(),
        sources[0],
        args.threads,
        args.hold
    );
    let sources = Arc::new(sources);

    let kernel_before = KernelView::read();
    let client_rss_before = sys::self_rss_bytes();
    let before = metrics::scrape(args.target, METRICS_TIMEOUT)?;

    // ---------------------------------------------------------------- open
    // Tokens outlive the whole run by an hour.
    let expires = sys::unix_now_s()
        + args.open_time_max.as_secs()
        + args.hold.as_secs()
        + CLOSE_WAIT.as_secs()
        + 3600;
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Bounded: openers wait if the main thread falls behind (it only sweeps once a second).
    let (tx, rx) = mpsc::sync_channel::<Opened>(4096);
    let open_start = Instant::now();
    let mut openers = Vec::with_capacity(args.threads);
    for t in 0..args.threads {
        let (next, stop, tx, minter) = (next.clone(), stop.clone(), tx.clone(), minter.clone());
        let sources = sources.clone();
        let (n, first_user, target) = (args.connections, args.first_user, args.target);
        let (ramp, timeout) = (args.ramp_per_s, args.connect_timeout);
        let opener = std::thread::Builder::new()
            .name(format!("opener-{t}"))
            .spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || stop.load(Ordering::Relaxed) {
                    return;
                }
                if ramp > 0.0 {
                    let due = open_start + Duration::from_secs_f64(i as f64 / ramp);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                let token = minter.mint(first_user + i as u64, 1, expires);
                let t0 = Instant::now();
                let source = sources[i % sources.len()];
                let result = ws_raw::open(target, source, &token, first_user + i as u64, timeout)
                    .map(|(stream, leftover)| (IdleConn::new(stream, leftover), t0.elapsed()));
                if tx.send(result).is_err() {
                    return;
                }
            })
            .map_err(|e| format!("spawn opener thread: {e}"))?;
        openers.push(opener);
    }
    drop(tx);

    let mut held = Held {
        conns: Vec::with_capacity(args.connections),
        stats: SweepStats::default(),
        dropped: Errors::default(),
        sweeps: 0,
    };
    let mut open_errors = Errors::default();
    let mut handshake_us = report::latency_histogram();
    let mut last_sweep = Instant::now();
    let mut last_progress = Instant::now();
    let mut opened = 0u64;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok((conn, latency))) => {
                opened += 1;
                handshake_us.saturating_record(latency.as_micros() as u64);
                held.conns.push(conn);
            }
            Ok(Err(e)) => {
                open_errors.add(e.kind(), e.to_string());
                if open_errors.total as usize >= args.errors_max {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if open_start.elapsed() >= args.open_time_max {
            stop.store(true, Ordering::Relaxed);
        }
        if last_sweep.elapsed() >= SWEEP_INTERVAL {
            held.sweep();
            last_sweep = Instant::now();
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            println!(
                "  ... {opened} open, {} errors, {:.1} s",
                open_errors.total,
                open_start.elapsed().as_secs_f64()
            );
            last_progress = Instant::now();
        }
    }
    for o in openers {
        o.join()
            .map_err(|_| "an opener thread panicked".to_string())?;
    }
    let open_time = open_start.elapsed();
    let stopped_early = stop.load(Ordering::Relaxed);

    // ---------------------------------------------------------------- measure
    held.sweep();
    let established = held.conns.len();
    let after_open = metrics::scrape(args.target, METRICS_TIMEOUT)?;
    let hold_start = Instant::now();
    let mut after_settle = None;
    let mut kernel_after = None;
    let mut client_rss_after = 0;
    let mut fds_held = 0;
    while hold_start.elapsed() < args.hold {
        if after_settle.is_none() && hold_start.elapsed() >= settle {
            after_settle = Some(metrics::scrape(args.target, METRICS_TIMEOUT)?);
            kernel_after = Some(KernelView::read());
            client_rss_after = sys::self_rss_bytes();
            fds_held = sys::open_fds();
        }
        held.sweep();
        let mut wake = SWEEP_INTERVAL.min(args.hold.saturating_sub(hold_start.elapsed()));
        if after_settle.is_none() {
            wake = wake.min(settle.saturating_sub(hold_start.elapsed()));
        }
        std::thread::sleep(wake.max(Duration::from_millis(1)));
    }
    let after_settle = match after_settle {
        Some(s) => s,
        None => metrics::scrape(args.target, METRICS_TIMEOUT)?,
    };
    let kernel_after = kernel_after.unwrap_or_else(KernelView::read);
    if client_rss_after == 0 {
        client_rss_after = sys::self_rss_bytes();
        fds_held = sys::open_fds();
    }
    held.sweep();
    let held_to_end = held.conns.len();

    // ---------------------------------------------------------------- close
    let close_start = Instant::now();
    let mut close_not_sent = 0u64;
    for (i, c) in held.conns.iter_mut().enumerate() {
        if !c.send_close(i as u64) {
            close_not_sent += 1;
        }
    }
    let mut closed_clean = 0u64;
    let mut close_errors = Errors::default();
    while !held.conns.is_empty() && close_start.elapsed() < CLOSE_WAIT {
        let mut i = 0;
        while i < held.conns.len() {
            match held.conns[i].sweep(&mut held.stats, i as u64) {
                Ok(()) => i += 1,
                Err(ended) => {
                    match ended {
                        ws_raw::Ended::Eof if held.conns[i].close_received.is_some() => {
                            closed_clean += 1
                        }
                        ws_raw::Ended::Eof => close_errors.add(
                            "server dropped TCP without echoing Close".into(),
                            "TCP EOF before the server's Close".into(),
                        ),
                        ws_raw::Ended::Closed(code) => close_errors
                            .add(format!("close {code}"), format!("server sent Close {code}")),
                        ws_raw::Ended::Error(e) => close_errors.add("error".into(), e),
                    }
                    held.conns.swap_remove(i);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let close_unanswered = held.conns.len();
    held.conns = Vec::new();
    let close_time = close_start.elapsed();
    std::thread::sleep(AFTER_CLOSE_WAIT);
    let after_close = metrics::scrape(args.target, METRICS_TIMEOUT)?;

    // ---------------------------------------------------------------- report
    let n = established;
    let rss_per_conn = delta_per(after_settle.rss_bytes, before.rss_bytes, n);
    let rss_per_conn_at_open = delta_per(after_open.rss_bytes, before.rss_bytes, n);
    let client_per_conn = delta_per(client_rss_after, client_rss_before, n);
    let page = sys::page_bytes();
    let tcp_mem_per_conn = delta_per(
        kernel_after.tcp_mem_pages * page,
        kernel_before.tcp_mem_pages * page,
        n,
    );
    let slab_per_conn = delta_per(kernel_after.slab_bytes, kernel_before.slab_bytes, n);
    let handshake = LatencySummary::of(&handshake_us);
    let rate = opened as f64 / open_time.as_secs_f64().max(1e-9);

    println!(
        "opened {established} / {} in {:.2} s ({rate:.0} conn/s){}; open errors {}",
        args.connections,
        open_time.as_secs_f64(),
        if stopped_early {
            " [stopped early]"
        } else {
            ""
        },
        open_errors.total
    );
    for (kind, count) in &open_errors.by_kind {
        println!("  open error {kind}: {count}");
    }
    for s in &open_errors.samples {
        println!("  e.g. {s}");
    }
    println!(
        "handshake latency (TCP connect + upgrade), us: {}",
        handshake.line()
    );
    println!(
        "server connections gauge: before {} -> after open {} -> after {:.1} s {} -> after close {}",
        before.connections,
        after_open.connections,
        settle.as_secs_f64(),
        after_settle.connections,
        after_close.connections
    );
    println!(
        "server RSS: before {}, after open {}, after {:.1} s {}, after close {}",
        human_bytes(before.rss_bytes as f64),
        human_bytes(after_open.rss_bytes as f64),
        settle.as_secs_f64(),
        human_bytes(after_settle.rss_bytes as f64),
        human_bytes(after_close.rss_bytes as f64),
    );
    println!(
        "server RSS per connection: {rss_per_conn:.0} B (after settle), {rss_per_conn_at_open:.0} B (right after open)"
    );
    println!(
        "client (this process): RSS {} -> {} ({client_per_conn:.0} B per connection), {fds_held} fds open",
        human_bytes(client_rss_before as f64),
        human_bytes(client_rss_after as f64),
    );
    println!(
        "kernel, machine-wide (loopback: both ends of each connection are here): TCP inuse {} -> {}, \
         TCP mem {} -> {} pages ({tcp_mem_per_conn:.0} B buffers per connection), \
         Slab {} -> {} ({slab_per_conn:.0} B per connection, i.e. two sockets)",
        kernel_before.tcp_inuse,
        kernel_after.tcp_inuse,
        kernel_before.tcp_mem_pages,
        kernel_after.tcp_mem_pages,
        human_bytes(kernel_before.slab_bytes as f64),
        human_bytes(kernel_after.slab_bytes as f64),
    );
    println!(
        "hold {:.1} s: {held_to_end} still open at the end; dropped by the server {}; pings answered {}, pongs not sent {}, unexpected data frames {}",
        args.hold.as_secs_f64(),
        held.dropped.total,
        held.stats.pings_answered,
        held.stats.pongs_not_sent,
        held.stats.unexpected_frames
    );
    for (kind, count) in &held.dropped.by_kind {
        println!("  dropped {kind}: {count}");
    }
    println!(
        "close: {closed_clean} clean (server answered Close, then EOF), {} other, \
         {close_unanswered} unanswered after {:.1} s, {close_not_sent} Close frames not sent; took {:.2} s",
        close_errors.total,
        CLOSE_WAIT.as_secs_f64(),
        close_time.as_secs_f64()
    );
    for (kind, count) in &close_errors.by_kind {
        println!("  close {kind}: {count}");
    }
    for s in &close_errors.samples {
        println!("  e.g. {s}");
    }

    let ok = established == args.connections
        && held.dropped.total == 0
        && held_to_end == established
        && held.stats.pongs_not_sent == 0;
    if let Some(path) = &args.json {
        let json = Json::obj([
            ("mode", Json::s("idle")),
            ("target", Json::s(args.target.to_string())),
            ("connections_requested", Json::U(args.connections as u64)),
            ("connections_established", Json::U(established as u64)),
            ("first_user", Json::U(args.first_user)),
            ("opener_threads", Json::U(args.threads as u64)),
            ("source_ips", Json::U(sources.len() as u64)),
            ("ramp_per_s", Json::F(args.ramp_per_s)),
            ("hold_s", Json::F(args.hold.as_secs_f64())),
            ("settle_s", Json::F(settle.as_secs_f64())),
            ("open_s", Json::F(open_time.as_secs_f64())),
            ("open_rate_per_s", Json::F(rate)),
            ("open_stopped_early", Json::Bool(stopped_early)),
            ("open_errors", open_errors.json()),
            ("handshake_latency", handshake.json()),
            ("server_before", scrape_json(&before)),
            ("server_after_open", scrape_json(&after_open)),
            ("server_after_settle", scrape_json(&after_settle)),
            ("server_after_close", scrape_json(&after_close)),
            ("server_rss_bytes_per_connection", Json::F(rss_per_conn)),
            (
                "server_rss_bytes_per_connection_at_open",
                Json::F(rss_per_conn_at_open),
            ),
            ("client_rss_before", Json::U(client_rss_before)),
            ("client_rss_after", Json::U(client_rss_after)),
            ("client_rss_bytes_per_connection", Json::F(client_per_conn)),
            ("client_fds_held", Json::U(fds_held as u64)),
            ("kernel_before", kernel_json(&kernel_before)),
            ("kernel_after", kernel_json(&kernel_after)),
            ("page_bytes", Json::U(page)),
            (
                "kernel_tcp_mem_bytes_per_connection",
                Json::F(tcp_mem_per_conn),
            ),
            ("kernel_slab_bytes_per_connection", Json::F(slab_per_conn)),
            ("held_to_end", Json::U(held_to_end as u64)),
            ("dropped_during_hold", held.dropped.json()),
            ("pings_answered", Json::U(held.stats.pings_answered)),
            ("pongs_not_sent", Json::U(held.stats.pongs_not_sent)),
            ("unexpected_frames", Json::U(held.stats.unexpected_frames)),
            ("closed_clean", Json::U(closed_clean)),
            ("close_errors", close_errors.json()),
            ("close_unanswered", Json::U(close_unanswered as u64)),
            ("ok", Json::Bool(ok)),
        ]);
        report::write_json(path, &json)?;
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_spread_over_loopback() {
        let v4: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let v6: SocketAddr = "[::1]:1".parse().expect("addr");
        let ips = |n, k| source_addresses(v4, n, k).expect("sources");
        assert_eq!(ips(100, 0), vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))]);
        assert_eq!(ips(19_000, 0).len(), 2);
        assert_eq!(ips(5, 3)[2], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),);
        assert!(source_addresses(v4, 1, SOURCE_IPS_MAX + 1).is_err());
        assert_eq!(source_addresses(v6, 100, 0).expect("v6").len(), 1);
        assert!(source_addresses(v6, 19_000, 0).is_err());
    }
}
