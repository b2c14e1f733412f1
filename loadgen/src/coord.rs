//! The coordinator of `run`: splits the scenario over worker processes (its own binary, hidden
//! `worker` subcommand), starts them together, prints live progress, merges their counters and
//! HdrHistograms, and runs sweeps.
//!
//! ```text
//!  Scenario ─► Layout ─► spawn K × `switchboard-loadgen worker` ─► spec ─►┐
//!  /metrics (before) ◄──── all "connected" ◄──────────────────────────────┘
//!  /metrics (connected) ─► go ─► ticks (per second, per worker) ─► merged row ─► stderr line
//!                              results ─► merged Record ─► RunResult ─► report.{json,md,html}
//!  sweep: rates ascending, `sweep_repeat` full runs each (fresh users) = one Step; the step
//!         passes when every run passed its checks and the median e2e p95 is under the limit;
//!         stop after the first failing rate
//!  step:  after each run `early_stop` asks whether the step can still pass; if not, its
//!         remaining runs are skipped (runs.len() < repeats, `Step::stop` says why)
//! ```
//!
//! A repeated step stops early once its verdict is a failure whatever the remaining runs
//! measure: a run failed a check (lost, duplicates, order, gaps, missing receipts, errors,
//! dropped connections: correctness is never a vote), or ⌈N/2⌉ runs had e2e p95 at or over
//! `knee_p95_ms` (then the median, the middle one for odd N and the upper middle for even N, is
//! over the limit too). A step that can still pass runs all N. The half-knee runs are a
//! measurement, not a verdict, and always run N times.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::metrics::{self, Scrape};
use crate::proto::{Record, WorkerSpec, LINE_BYTES_MAX, PROTOCOL_VERSION};
use crate::report::latency_histogram;
use crate::run_report::phase_name;
use crate::scenario::{Layout, Scenario};
use crate::sys;
use crate::worker::phase;

const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// Slack on top of the scenario's own times before the coordinator gives up on a worker.
const WORKER_SLACK: Duration = Duration::from_secs(60);

/// Pause between sweep steps so the server finishes closing the previous step's connections.
const SWEEP_PAUSE: Duration = Duration::from_secs(3);

/// Options that are not part of the scenario.
#[derive(Clone, Debug, Default)]
pub struct RunOpts {
    /// Print a progress line each second on stderr.
    pub progress: bool,
    /// The server's pid, to report its CPU time (from /proc).
    pub server_pid: Option<u32>,
    /// Sweep: go on after a failing rate.
    pub sweep_all: bool,
    /// The command that starts one worker, split on whitespace, `{i}` replaced by the worker's
    /// index (e.g. `ssh loadgen{i} /usr/local/bin/switchboard-loadgen worker`); `None`: this
    /// binary with `worker`.
    pub worker_cmd: Option<String>,
}

/// The program and arguments that start worker `i`.
pub fn worker_command(
    template: Option<&str>,
    i: u32,
) -> Result<(std::path::PathBuf, Vec<String>), String> {
    match template {
        None => {
            let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
            Ok((exe, vec!["worker".to_string()]))
        }
        Some(t) => {
            let mut words = t
                .split_whitespace()
                .map(|w| w.replace("{i}", &i.to_string()));
            let program = words.next().ok_or("--worker-cmd is empty")?;
            Ok((program.into(), words.collect()))
        }
    }
}

/// One second of the run, merged over workers.
#[derive(Clone, Debug)]
pub struct Row {
    pub sec: u64,
    pub phase: u64,
    pub conns: u64,
    pub sends: u64,
    pub acks: u64,
    pub deliveries: u64,
    pub receipts: u64,
    pub errors: u64,
    pub e2e: Histogram<u64>,
    pub ack: Histogram<u64>,
}

impl Row {
    fn from_record(r: &Record) -> Row {
        Row {
            sec: r.num("sec"),
            phase: r.num("phase"),
            conns: r.num("conns"),
            sends: r.num("sends"),
            acks: r.num("acks"),
            deliveries: r.num("deliveries"),
            receipts: r.num("receipts"),
            errors: r.num("errors"),
            e2e: r
                .hists
                .get("e2e")
                .cloned()
                .unwrap_or_else(latency_histogram),
            ack: r
                .hists
                .get("ack")
                .cloned()
                .unwrap_or_else(latency_histogram),
        }
    }
}

/// What the server's /metrics said at three points (each `None` if the scrape failed).
#[derive(Clone, Debug, Default)]
pub struct ServerView {
    pub before: Option<Scrape>,
    pub connected: Option<Scrape>,
    pub end: Option<Scrape>,
    /// Server CPU seconds (user + system) during the message phase, with `--server-pid`.
    pub cpu_s: Option<f64>,
}

/// Where the machine's CPU time went during the message phase (go → last result). On a box
/// shared by the server, the load generator and anything else, a latency figure means little
/// without it: a burst of another process shows up as the server's p99.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseCpu {
    /// Busy CPU seconds of the whole machine (`/proc/stat`).
    pub machine_s: Option<f64>,
    /// The irq + softirq part of `machine_s` (loopback packet processing included). With
    /// tick-based accounting (`CONFIG_IRQ_TIME_ACCOUNTING` off, the common case) a tick that
    /// lands in an interrupt is *also* charged to the task it interrupted, so this overlaps the
    /// processes' figures: a breakdown, not a separate share.
    pub irq_s: Option<f64>,
    /// CPUs of the machine.
    pub cpus: usize,
    /// CPU seconds of the worker processes over the same phase (`/proc/PID/stat`).
    pub client_s: Option<f64>,
}

impl PhaseCpu {
    /// CPU seconds of everything else: other processes, kernel threads outside the server's
    /// process (its io_uring workers are inside) and interrupts that hit an idle CPU. Needs the
    /// server's CPU time of the phase.
    pub fn other_s(&self, server_s: Option<f64>) -> Option<f64> {
        Some((self.machine_s? - server_s? - self.client_s?).max(0.0))
    }
}

/// One complete run (one sweep step).
#[derive(Clone, Debug)]
pub struct RunResult {
    pub scenario: Scenario,
    pub started_at: String,
    pub workers: usize,
    pub first_user: u64,
    pub connections_target: u64,
    /// Merged `result` records of all workers.
    pub result: Record,
    pub timeline: Vec<Row>,
    pub server: ServerView,
    /// CPU seconds of all worker processes together (their whole life, connecting included).
    pub client_cpu_s: f64,
    /// The machine's CPU time during the message phase.
    pub phase_cpu: PhaseCpu,
    /// Wall time of the message phase (go → last result).
    pub run_s: f64,
    /// Why the run failed its checks (empty: passed).
    pub failures: Vec<String>,
}

impl RunResult {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn hist(&self, name: &str) -> Histogram<u64> {
        self.result
            .hists
            .get(name)
            .cloned()
            .unwrap_or_else(latency_histogram)
    }

    pub fn measure_s(&self) -> f64 {
        self.scenario.duration.as_secs_f64()
    }

    pub fn throughput(&self) -> f64 {
        self.result.num("acks_window") as f64 / self.measure_s()
    }

    pub fn deliveries_per_s(&self) -> f64 {
        self.result.num("deliveries_window") as f64 / self.measure_s()
    }

    pub fn errors_total(&self) -> u64 {
        self.result
            .nums
            .iter()
            .filter(|(k, _)| k.starts_with("err."))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn connect_errors_total(&self) -> u64 {
        self.result
            .nums
            .iter()
            .filter(|(k, _)| k.starts_with("cerr."))
            .map(|(_, v)| v)
            .sum()
    }

    /// The knee test of a sweep step: passed every check and p95 e2e under the limit.
    pub fn under_knee(&self) -> bool {
        let p95_ms = self.hist("e2e").value_at_quantile(0.95) as f64 / 1000.0;
        self.ok() && self.result.num("lost") == 0 && p95_ms < self.scenario.knee_p95_ms
    }
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
}

enum Event {
    Line(usize, String),
    Eof(usize),
}

fn default_first_user() -> u64 {
    // A fresh block of ten million user ids per wall-clock second, so consecutive runs against
    // one data directory start empty chats (seq 1), which the gap check relies on.
    (sys::unix_now_s() % 1_000_000) * 10_000_000 + 1
}

/// RFC 3339 UTC time of now (no time-zone database needed).
pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

pub fn rfc3339(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let rem = unix_s % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// CPU seconds (user + system) of a process, from /proc/PID/stat.
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz)
}

/// Resident set of a process, from /proc/PID/status.
pub fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The server's numbers: `/metrics` for Switchboard; for an MQTT broker (or when the scrape
/// fails) only the RSS of `--server-pid` from /proc.
fn server_scrape(target: SocketAddr, mqtt: bool, pid: Option<u32>) -> Option<Scrape> {
    let scraped = if mqtt {
        None
    } else {
        metrics::scrape(target, METRICS_TIMEOUT).ok()
    };
    scraped.or_else(|| {
        pid.and_then(proc_rss_bytes).map(|rss| Scrape {
            rss_bytes: rss,
            at: Some(Instant::now()),
            ..Scrape::default()
        })
    })
}

fn children_cpu_s() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn spawn_workers(
    layout: &Layout,
    sc: &Scenario,
    first_user: u64,
    worker_cmd: Option<&str>,
) -> Result<(Vec<WorkerProc>, mpsc::Receiver<Event>), String> {
    let run_id =
        switchboard_wire::splitmix64(sys::unix_now_s() ^ (u64::from(std::process::id()) << 32));
    // Unbounded on purpose, and bounded by its producers: each worker writes one line per
    // second plus two. A bounded channel would let a slow coordinator block a worker's stdout
    // write and stall its event loop, which would show up as latency that is not the server's.
    let (tx, rx) = mpsc::channel();
    let mut procs = Vec::with_capacity(layout.shares.len());
    for share in &layout.shares {
        let (program, args) = worker_command(worker_cmd, share.index)?;
        let mut child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn worker {}: {e}", program.display()))?;
        let mut stdin = child.stdin.take().ok_or("worker stdin")?;
        let stdout = child.stdout.take().ok_or("worker stdout")?;
        let spec = WorkerSpec {
            scenario: sc.clone(),
            share: share.clone(),
            first_user,
            // TOML integers are i64: keep the id below 2^63.
            run_id: switchboard_wire::splitmix64(run_id ^ u64::from(share.index)) >> 1,
        };
        writeln!(stdin, "{}", spec.line()).map_err(|e| format!("send spec: {e}"))?;
        let k = share.index as usize;
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("worker-{k}-stdout"))
            .spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut line = String::new();
                loop {
                    line.clear();
                    match Read::take(&mut reader, LINE_BYTES_MAX as u64).read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if tx
                                .send(Event::Line(k, line.trim_end().to_string()))
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
                let _ = tx.send(Event::Eof(k));
            })
            .map_err(|e| format!("spawn reader: {e}"))?;
        procs.push(WorkerProc { child, stdin });
    }
    Ok((procs, rx))
}

fn tell_all(procs: &mut [WorkerProc], cmd: &str) {
    for p in procs.iter_mut() {
        // A worker that already exited has closed its stdin; its outcome is reported elsewhere.
        let _ = writeln!(p.stdin, "{cmd}");
        let _ = p.stdin.flush();
    }
}

fn reap(procs: &mut Vec<WorkerProc>) {
    let until = Instant::now() + Duration::from_secs(10);
    for p in procs.iter_mut() {
        loop {
            match p.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
            }
        }
    }
    procs.clear();
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn progress_line(row: &Row, target: u64) -> String {
    let (p50, p99) = if row.e2e.is_empty() {
        (0.0, 0.0)
    } else {
        (
            ms(row.e2e.value_at_quantile(0.5)),
            ms(row.e2e.value_at_quantile(0.99)),
        )
    };
    format!(
        "[{:>4}s {:<7}] conns {}/{} | sends/s {} acks/s {} deliveries/s {} | e2e p50 {p50:.2} ms p99 {p99:.2} ms | errors {}",
        row.sec,
        phase_name(row.phase),
        row.conns,
        target,
        row.sends,
        row.acks,
        row.deliveries,
        row.errors
    )
}

/// Runs one scenario at its `rate` with fresh workers.
pub fn run_once(sc: &Scenario, opts: &RunOpts) -> Result<RunResult, String> {
    sc.check_target_support()?;
    let layout = sc.layout()?;
    let first_user = if sc.first_user == 0 {
        default_first_user()
    } else {
        sc.first_user
    };
    let target: SocketAddr = layout.target;
    let k = layout.shares.len();
    let started_at = rfc3339_now();
    if opts.progress {
        eprintln!(
            "run: {} at {:.0} msgs/s ({:?}), {} connections ({} users x {} devices) over {k} worker(s), warm-up {:?}, duration {:?}, drain {:?}",
            sc.target, sc.rate, sc.arrival, layout.connections, layout.users, sc.devices_per_user, sc.warmup, sc.duration, sc.drain
        );
    }
    let mqtt = crate::scenario::parse_target(&sc.target)?.is_mqtt();
    let mut server = ServerView {
        before: server_scrape(target, mqtt, opts.server_pid),
        ..ServerView::default()
    };
    let cpu_children_before = children_cpu_s();
    let (mut procs, events) = spawn_workers(&layout, sc, first_user, opts.worker_cmd.as_deref())?;
    let mut phase_cpu = PhaseCpu::default();
    let result = drive(
        sc,
        &layout,
        opts,
        &mut procs,
        &events,
        &mut server,
        &mut phase_cpu,
    );
    if result.is_err() {
        tell_all(&mut procs, "stop");
    }
    drop(events);
    // Workers close their connections themselves after the result; give them the time.
    for p in procs.iter_mut() {
        let _ = p.stdin.flush();
    }
    reap(&mut procs);
    let (merged, timeline, run_s) = result?;
    server.end = server_scrape(target, mqtt, opts.server_pid);
    let client_cpu_s = children_cpu_s() - cpu_children_before;
    let mut r = RunResult {
        scenario: sc.clone(),
        started_at,
        workers: k,
        first_user,
        connections_target: layout.connections,
        result: merged,
        timeline,
        server,
        client_cpu_s,
        phase_cpu,
        run_s,
        failures: Vec::new(),
    };
    r.failures = failures(&r);
    Ok(r)
}

/// The checks a run must pass; each failure as a sentence.
pub fn failures(r: &RunResult) -> Vec<String> {
    let mut f = Vec::new();
    let res = &r.result;
    let est = res.num("conns_established");
    if est < r.connections_target {
        f.push(format!(
            "only {est} of {} connections established ({} connect errors)",
            r.connections_target,
            r.connect_errors_total()
        ));
    }
    for name in [
        "lost",
        "duplicates",
        "order_violations",
        "gaps",
        "unacked",
        "delivered_unacked",
        "receipts_missing",
        "foreign",
        "duplicate_acks",
        "unknown_acks",
        "conns_dropped",
    ] {
        let v = res.num(name);
        if v > 0 {
            f.push(format!("{name} = {v}"));
        }
    }
    let errors = r.errors_total();
    if errors > 0 {
        let kinds: Vec<String> = res
            .nums
            .iter()
            .filter(|(k, _)| k.starts_with("err."))
            .map(|(k, v)| format!("{}={v}", &k[4..]))
            .collect();
        f.push(format!("{errors} errors ({})", kinds.join(", ")));
    }
    f
}

type Driven = (Record, Vec<Row>, f64);

fn drive(
    sc: &Scenario,
    layout: &Layout,
    opts: &RunOpts,
    procs: &mut [WorkerProc],
    events: &mpsc::Receiver<Event>,
    server: &mut ServerView,
    phase_cpu: &mut PhaseCpu,
) -> Result<Driven, String> {
    let k = procs.len();
    let target = layout.target;
    let ramp_s = if sc.connect_rate > 0.0 {
        layout.connections as f64 / sc.connect_rate
    } else {
        0.0
    };
    let connect_limit = Duration::from_secs_f64(ramp_s) + 2 * sc.connect_timeout + WORKER_SLACK;
    // A worker behind schedule may send late for up to `drain` after the window (`RunEnd`).
    let run_limit = sc.warmup + sc.duration + 2 * sc.drain + WORKER_SLACK;

    // ---------------------------------------------------------------- connect
    let mut connected: Vec<Option<Record>> = vec![None; k];
    let mut connect_ticks: BTreeMap<u64, (usize, Record)> = BTreeMap::new();
    let deadline = Instant::now() + connect_limit;
    while connected.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "workers did not finish connecting within {connect_limit:?}"
            ));
        }
        match events.recv_timeout(left) {
            Ok(Event::Line(w, line)) => {
                if line.starts_with("hello") {
                    if line != format!("hello v{PROTOCOL_VERSION}") {
                        return Err(format!(
                            "worker {w}: protocol {line:?}, expected v{PROTOCOL_VERSION}"
                        ));
                    }
                    continue;
                }
                if let Some(text) = line.strip_prefix("fail ") {
                    return Err(format!("worker {w} failed: {text}"));
                }
                let rec = Record::decode(&line).map_err(|e| format!("worker {w}: {e}"))?;
                match rec.kind.as_str() {
                    "connected" => connected[w] = Some(rec),
                    "tick" => {
                        let e = connect_ticks
                            .entry(rec.num("sec"))
                            .or_insert_with(|| (0, Record::new("tick")));
                        e.1.merge(&rec)?;
                        e.0 += 1;
                        if e.0 == k && opts.progress {
                            let mut row = Row::from_record(&e.1);
                            // Merging added the workers' `sec` and `phase` fields up.
                            row.sec = rec.num("sec");
                            row.phase = phase::CONNECT;
                            let errs = e.1.num("connect_errors");
                            eprintln!(
                                "[{:>4}s connect] conns {}/{} | connect errors {errs}",
                                row.sec, row.conns, layout.connections
                            );
                        }
                    }
                    other => {
                        return Err(format!(
                            "worker {w}: unexpected {other} record while connecting"
                        ))
                    }
                }
            }
            Ok(Event::Eof(w)) => return Err(format!("worker {w} exited while connecting")),
            Err(_) => {
                return Err(format!(
                    "workers did not finish connecting within {connect_limit:?}"
                ))
            }
        }
    }
    let established: u64 = connected
        .iter()
        .flatten()
        .map(|r| r.num("established"))
        .sum();
    // Let the server settle its per-connection allocations before the RSS scrape.
    std::thread::sleep(Duration::from_millis(500));
    let mqtt = crate::scenario::parse_target(&sc.target)?.is_mqtt();
    server.connected = server_scrape(target, mqtt, opts.server_pid);
    if opts.progress {
        let rss = server.connected.map_or("n/a".to_string(), |s| {
            crate::report::human_bytes(s.rss_bytes as f64)
        });
        eprintln!(
            "connected: {established}/{} established; server RSS {rss}; go",
            layout.connections
        );
    }

    // ---------------------------------------------------------------- run
    let cpu_before = opts.server_pid.and_then(proc_cpu_s);
    let machine_before = sys::machine_ticks();
    let workers_cpu = |procs: &[WorkerProc]| -> Option<f64> {
        // A worker that already exited is a zombie until `reap`: its times are still readable.
        procs.iter().map(|p| proc_cpu_s(p.child.id())).sum()
    };
    let client_before = workers_cpu(procs);
    tell_all(procs, "go");
    let go = Instant::now();
    let deadline = go + run_limit;
    let mut results: Vec<Option<Record>> = vec![None; k];
    let mut ticks: BTreeMap<u64, (usize, Record)> = BTreeMap::new();
    let mut timeline = Vec::new();
    while results.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("workers did not finish within {run_limit:?}"));
        }
        match events.recv_timeout(left) {
            Ok(Event::Line(w, line)) => {
                if let Some(text) = line.strip_prefix("fail ") {
                    return Err(format!("worker {w} failed: {text}"));
                }
                let rec = Record::decode(&line).map_err(|e| format!("worker {w}: {e}"))?;
                match rec.kind.as_str() {
                    "tick" => {
                        let sec = rec.num("sec");
                        let ph = rec.num("phase");
                        let e = ticks.entry(sec).or_insert_with(|| (0, Record::new("tick")));
                        e.1.merge(&rec)?;
                        e.0 += 1;
                        if e.0 == k {
                            let (_, merged) = ticks.remove(&sec).expect("just seen");
                            let mut row = Row::from_record(&merged);
                            // Merging added the workers' `sec` and `phase` up. Workers agree on
                            // the phase of a second up to clock skew; keep the last one reported.
                            row.sec = sec;
                            row.phase = ph;
                            if opts.progress {
                                eprintln!("{}", progress_line(&row, layout.connections));
                            }
                            timeline.push(row);
                        }
                    }
                    "result" => results[w] = Some(rec),
                    other => return Err(format!("worker {w}: unexpected {other} record")),
                }
            }
            Ok(Event::Eof(w)) => {
                if results[w].is_none() {
                    return Err(format!("worker {w} exited without a result"));
                }
            }
            Err(_) => return Err(format!("workers did not finish within {run_limit:?}")),
        }
    }
    let run_s = go.elapsed().as_secs_f64();
    server.cpu_s = match (cpu_before, opts.server_pid.and_then(proc_cpu_s)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let hz = sys::clock_ticks_per_s();
    let machine_after = sys::machine_ticks();
    *phase_cpu = PhaseCpu {
        machine_s: machine_before
            .zip(machine_after)
            .map(|(a, b)| b.busy.saturating_sub(a.busy) as f64 / hz),
        irq_s: machine_before
            .zip(machine_after)
            .map(|(a, b)| b.irq.saturating_sub(a.irq) as f64 / hz),
        cpus: machine_after.map_or(0, |m| m.cpus),
        client_s: client_before
            .zip(workers_cpu(procs))
            .map(|(a, b)| (b - a).max(0.0)),
    };
    // Seconds some worker did not report (it finished early): keep what arrived.
    for (sec, (n, rec)) in ticks {
        let mut row = Row::from_record(&rec);
        row.sec = sec;
        row.phase = rec.num("phase") / n as u64;
        timeline.push(row);
    }
    timeline.sort_by_key(|r| r.sec);
    let mut merged = Record::new("result");
    for r in results.iter().flatten() {
        merged.merge(r)?;
    }
    // Connect results come from the `connected` records (same numbers, kept for the histogram).
    Ok((merged, timeline, run_s))
}

/// Median, min and max of one figure over a step's runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` without values. For an even count the median is the worse of the two middle
    /// values (conservative): the higher one when `higher_is_worse` (latency), else the lower
    /// one (throughput).
    pub fn of(values: impl IntoIterator<Item = f64>, higher_is_worse: bool) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(Spread {
            median: v[if higher_is_worse { n / 2 } else { (n - 1) / 2 }],
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// The e2e p95 the knee test looks at, ms (0 for a run without deliveries, as before repeats).
pub fn e2e_p95_ms(r: &RunResult) -> f64 {
    ms(r.hist("e2e").value_at_quantile(0.95))
}

/// Why a repeated step stopped before its last run: its verdict was already a failure.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    /// Run `run` (1-based) failed a check (or lost messages): the step fails whatever follows.
    Checks { run: usize },
    /// `over` runs had e2e p95 at or over `limit_ms`: enough that the median of all the
    /// step's runs is over the limit whatever the remaining runs measure.
    Latency { over: usize, limit_ms: f64 },
}

impl Stop {
    /// The reason as report text, e.g. "run 1 failed its checks".
    pub fn reason(&self, repeats: usize) -> String {
        match *self {
            Stop::Checks { run } => format!("run {run} failed its checks"),
            Stop::Latency { over, limit_ms } => format!(
                "{over} runs had e2e p95 ≥ {limit_ms} ms, so the median of {repeats} cannot be under it"
            ),
        }
    }
}

/// One finished run as the early-stop decision sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunVerdict {
    /// Passed every check and lost nothing (what `Step::under_knee` asks of every run).
    pub checks_ok: bool,
    /// The run's e2e p95, ms.
    pub p95_ms: f64,
}

impl RunVerdict {
    pub fn of(r: &RunResult) -> RunVerdict {
        RunVerdict {
            checks_ok: r.ok() && r.result.num("lost") == 0,
            p95_ms: e2e_p95_ms(r),
        }
    }
}

/// Runs at or over the limit that decide the median of `repeats` runs: the median is the
/// value at sorted index `repeats / 2` (the middle one, or the upper middle for even counts),
/// so it is over the limit once `repeats - repeats / 2` = ⌈repeats/2⌉ runs are.
pub fn over_limit_deciding(repeats: usize) -> usize {
    repeats - repeats / 2
}

/// After the runs `done` of a step of `repeats` runs: `Some` when the step can no longer pass
/// (a run failed its checks, or enough runs had p95 ≥ `limit_ms` that the median will be over
/// it) and runs remain to skip; `None` while it can still pass or when every run has run.
pub fn early_stop(repeats: usize, limit_ms: f64, done: &[RunVerdict]) -> Option<Stop> {
    if done.len() >= repeats {
        return None;
    }
    if let Some(k) = done.iter().position(|v| !v.checks_ok) {
        return Some(Stop::Checks { run: k + 1 });
    }
    let over = done.iter().filter(|v| v.p95_ms >= limit_ms).count();
    (over >= over_limit_deciding(repeats)).then_some(Stop::Latency { over, limit_ms })
}

/// One sweep rate (or the half-knee run), measured `sweep_repeat` times in a row, each a full
/// fresh run. Correctness is never a vote: one run failing a check fails the step. Latency is
/// judged on the median e2e p95 over the runs (the upper median for an even count). A step
/// whose verdict is already a failure stops early (`stop`): then `runs` holds fewer than
/// `repeats` runs.
#[derive(Clone, Debug)]
pub struct Step {
    /// The runs in the order they ran; never empty.
    pub runs: Vec<RunResult>,
    /// Runs asked for (`sweep_repeat`); more than `runs.len()` when the step stopped early.
    requested: usize,
    /// Why the step stopped before `requested` runs.
    stop: Option<Stop>,
}

impl Step {
    /// A step whose every run ran.
    pub fn new(runs: Vec<RunResult>) -> Step {
        let requested = runs.len();
        Step::stopped(runs, requested, None)
    }

    /// A step of `requested` runs of which `runs` ran (all of them unless `stop`).
    pub fn stopped(runs: Vec<RunResult>, requested: usize, stop: Option<Stop>) -> Step {
        assert!(!runs.is_empty(), "a step has at least one run");
        assert!(
            runs.len() <= requested && (stop.is_some() || runs.len() == requested),
            "{} runs of {requested} without a stop",
            runs.len()
        );
        Step {
            runs,
            requested,
            stop,
        }
    }

    pub fn rate(&self) -> f64 {
        self.runs[0].scenario.rate
    }

    /// Runs asked for (`sweep_repeat`); `runs.len()` is less when the step stopped early.
    pub fn repeats(&self) -> usize {
        self.requested
    }

    /// "stopped after k of N runs: <reason>" for a step that stopped early.
    pub fn stop_text(&self) -> Option<String> {
        self.stop.map(|s| {
            format!(
                "stopped after {} of {} runs: {}",
                self.runs.len(),
                self.requested,
                s.reason(self.requested)
            )
        })
    }

    /// Index of the run whose e2e p95 is the median (the upper one for an even count; on
    /// equal p95s the earlier run).
    pub fn representative_index(&self) -> usize {
        let mut idx: Vec<usize> = (0..self.runs.len()).collect();
        idx.sort_by(|&a, &b| {
            e2e_p95_ms(&self.runs[a])
                .total_cmp(&e2e_p95_ms(&self.runs[b]))
                .then(a.cmp(&b))
        });
        idx[idx.len() / 2]
    }

    /// The run a report details for this step: the one whose e2e p95 is the median.
    pub fn representative(&self) -> &RunResult {
        &self.runs[self.representative_index()]
    }

    /// The median e2e p95 over the runs, ms: the step's latency verdict.
    pub fn median_p95_ms(&self) -> f64 {
        e2e_p95_ms(self.representative())
    }

    /// Every run passed every check.
    pub fn ok(&self) -> bool {
        self.runs.iter().all(RunResult::ok)
    }

    /// Messages lost over all runs.
    pub fn lost(&self) -> u64 {
        self.runs.iter().map(|r| r.result.num("lost")).sum()
    }

    /// Errors over all runs.
    pub fn errors_total(&self) -> u64 {
        self.runs.iter().map(RunResult::errors_total).sum()
    }

    /// The knee test: every run passed its checks and lost nothing, and the median e2e p95 is
    /// under the limit. A step that stopped early never passes.
    pub fn under_knee(&self) -> bool {
        self.stop.is_none()
            && self
                .runs
                .iter()
                .all(|r| r.ok() && r.result.num("lost") == 0)
            && self.median_p95_ms() < self.runs[0].scenario.knee_p95_ms
    }

    /// Every run's failed checks; with repeats each prefixed by its run ("run 2/3: …").
    pub fn failures(&self) -> Vec<String> {
        let n = self.requested;
        if n == 1 {
            return self.runs[0].failures.clone();
        }
        self.runs
            .iter()
            .enumerate()
            .flat_map(|(k, r)| {
                r.failures
                    .iter()
                    .map(move |f| format!("run {}/{n}: {f}", k + 1))
            })
            .collect()
    }

    /// Median, min and max over the runs of one figure (`None` values skipped).
    pub fn spread(
        &self,
        higher_is_worse: bool,
        f: impl Fn(&RunResult) -> Option<f64>,
    ) -> Option<Spread> {
        Spread::of(self.runs.iter().filter_map(f), higher_is_worse)
    }

    /// Achieved throughput over the runs (median: the lower middle one for an even count).
    pub fn throughput(&self) -> Spread {
        self.spread(false, |r| Some(r.throughput()))
            .expect("a step has at least one run")
    }

    /// An e2e latency quantile over the runs, ms (`None` when no run delivered anything).
    pub fn e2e_ms(&self, q: f64) -> Option<Spread> {
        self.spread(true, |r| {
            let h = r.hist("e2e");
            (!h.is_empty()).then(|| ms(h.value_at_quantile(q)))
        })
    }
}

/// What a sweep measured: every step in ascending rate order, the knee (index of the highest
/// passing step) and, with `half_knee`, the runs at half the knee's offered rate.
pub struct Sweep {
    pub steps: Vec<Step>,
    pub knee: Option<usize>,
    pub half_knee: Option<Step>,
}

impl Sweep {
    /// The step a report details: the knee, else the last step.
    pub fn main(&self) -> &Step {
        &self.steps[self.knee.unwrap_or(self.steps.len() - 1)]
    }

    /// The run a report details: the main step's representative run.
    pub fn main_step(&self) -> &RunResult {
        self.main().representative()
    }

    /// Runs per rate.
    pub fn repeats(&self) -> usize {
        self.steps.first().map_or(1, Step::repeats)
    }
}

fn checks_text(failures: &[String]) -> String {
    if failures.is_empty() {
        "checks ok".to_string()
    } else {
        failures.join("; ")
    }
}

fn knee_text(pass: bool) -> &'static str {
    if pass {
        "under the knee"
    } else {
        "over the knee"
    }
}

fn spread_text(s: Option<Spread>) -> String {
    s.map_or("–".into(), |s| {
        format!("{:.2} ms ({:.2}–{:.2})", s.median, s.min, s.max)
    })
}

/// The stderr line after a sweep step (`half: false`) or the half-knee runs (`half: true`).
/// With one run per rate exactly the line from before repeats.
fn step_summary(step: &Step, half: bool) -> String {
    let rate = step.rate();
    let n = step.repeats();
    if n == 1 {
        let r = &step.runs[0];
        return if half {
            format!(
                "== half the knee, {rate:.0} msgs/s: throughput {:.0}/s, e2e p99 {:.2} ms, {}",
                r.throughput(),
                ms(r.hist("e2e").value_at_quantile(0.99)),
                checks_text(&r.failures),
            )
        } else {
            format!(
                "== {rate:.0} msgs/s: throughput {:.0}/s, e2e p95 {:.2} ms, p99 {:.2} ms, {} -> {}",
                r.throughput(),
                ms(r.hist("e2e").value_at_quantile(0.95)),
                ms(r.hist("e2e").value_at_quantile(0.99)),
                checks_text(&r.failures),
                knee_text(step.under_knee())
            )
        };
    }
    let tp = step.throughput();
    let head = format!(
        "== {}{rate:.0} msgs/s, median of {} runs (min–max): throughput {:.0}/s ({:.0}–{:.0}), e2e p95 {}, p99 {}, {}",
        if half { "half the knee, " } else { "" },
        step.runs.len(),
        tp.median,
        tp.min,
        tp.max,
        spread_text(step.e2e_ms(0.95)),
        spread_text(step.e2e_ms(0.99)),
        checks_text(&step.failures()),
    );
    let head = match step.stop_text() {
        Some(t) => format!("{head} ({t})"),
        None => head,
    };
    if half {
        head
    } else {
        format!("{head} -> {}", knee_text(step.under_knee()))
    }
}

/// `n` fresh runs at `rate` in a row (`SWEEP_PAUSE` before each, except before the very first
/// run of a sweep); `header(k)` is the progress line before run `k` (1-based). With `judged`
/// (a sweep step, not the half-knee runs) the step stops as soon as `early_stop` says it can
/// no longer pass.
fn repeated(
    sc: &Scenario,
    rate: f64,
    opts: &RunOpts,
    pause_first: bool,
    judged: bool,
    header: impl Fn(usize) -> String,
) -> Result<Step, String> {
    let n = sc.sweep_repeat.max(1) as usize;
    let mut runs = Vec::with_capacity(n);
    let mut verdicts = Vec::with_capacity(n);
    for k in 1..=n {
        if pause_first || k > 1 {
            std::thread::sleep(SWEEP_PAUSE);
        }
        if opts.progress {
            eprintln!("{}", header(k));
        }
        let r = run_once(&sc.at_rate(rate), opts)?;
        if opts.progress && n > 1 {
            eprintln!(
                "== {rate:.0} msgs/s, run {k}/{n}: throughput {:.0}/s, e2e p95 {:.2} ms, p99 {:.2} ms, {}",
                r.throughput(),
                e2e_p95_ms(&r),
                ms(r.hist("e2e").value_at_quantile(0.99)),
                checks_text(&r.failures),
            );
        }
        verdicts.push(RunVerdict::of(&r));
        runs.push(r);
        if judged {
            if let Some(stop) = early_stop(n, sc.knee_p95_ms, &verdicts) {
                return Ok(Step::stopped(runs, n, Some(stop)));
            }
        }
    }
    Ok(Step::new(runs))
}

/// A sweep: `sweep_repeat` runs per rate, ascending (fewer when a rate's verdict is a failure
/// before its last run: `early_stop`); stops after the first rate that fails the knee test
/// unless `sweep_all`. With `half_knee` and a knee found, then runs `sweep_repeat`
/// times more at half the knee's offered rate (fresh runs, not a swept step: the latency at 2×
/// headroom).
pub fn sweep(sc: &Scenario, opts: &RunOpts) -> Result<Sweep, String> {
    crate::scenario::check_sweep_repeat(sc.sweep_repeat)?;
    let n = sc.sweep_repeat as usize;
    let mut rates = sc.sweep.clone();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let mut steps: Vec<Step> = Vec::with_capacity(rates.len());
    let mut knee = None;
    for (i, &rate) in rates.iter().enumerate() {
        let step = repeated(sc, rate, opts, i > 0, true, |k| {
            let head = format!("== sweep step {}/{}: {rate:.0} msgs/s", i + 1, rates.len());
            if n > 1 {
                format!("{head} (run {k}/{n})")
            } else {
                head
            }
        })?;
        let pass = step.under_knee();
        if opts.progress {
            eprintln!("{}", step_summary(&step, false));
        }
        steps.push(step);
        if pass {
            knee = Some(steps.len() - 1);
        } else if !opts.sweep_all {
            break;
        }
    }
    let half_knee = match knee {
        Some(k) if sc.half_knee => {
            let rate = steps[k].rate() / 2.0;
            let step = repeated(sc, rate, opts, true, false, |k| {
                let head = format!("== half the knee: {rate:.0} msgs/s");
                if n > 1 {
                    format!("{head} (run {k}/{n})")
                } else {
                    head
                }
            })?;
            if opts.progress {
                eprintln!("{}", step_summary(&step, true));
            }
            Some(step)
        }
        _ => None,
    };
    Ok(Sweep {
        steps,
        knee,
        half_knee,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_commands() {
        let (p, a) = worker_command(Some("ssh host{i} /bin/lg worker"), 3).expect("cmd");
        assert_eq!(p, std::path::PathBuf::from("ssh"));
        assert_eq!(a, vec!["host3", "/bin/lg", "worker"]);
        let (_, a) = worker_command(None, 0).expect("own binary");
        assert_eq!(a, vec!["worker"]);
        assert!(worker_command(Some("  "), 0).is_err());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn progress_line_reads_well() {
        let mut r = Record::new("tick");
        r.set("sec", 12);
        r.set("phase", phase::MEASURE);
        r.set("conns", 100);
        r.set("sends", 5000);
        let mut h = latency_histogram();
        h.record(1500).expect("in range");
        r.hists.insert("e2e".into(), h);
        let line = progress_line(&Row::from_record(&r), 100);
        assert!(line.contains("measure"), "{line}");
        assert!(line.contains("conns 100/100"), "{line}");
        assert!(line.contains("sends/s 5000"), "{line}");
        assert!(line.contains("p50 1.50 ms"), "{line}");
    }

    #[test]
    fn other_cpu_is_what_neither_side_used() {
        let p = PhaseCpu {
            machine_s: Some(30.0),
            irq_s: Some(4.0),
            cpus: 2,
            client_s: Some(8.0),
        };
        // Interrupt ticks are also charged to the interrupted process: not subtracted again.
        assert_eq!(p.other_s(Some(15.0)), Some(7.0));
        assert_eq!(p.other_s(None), None, "unknown without the server's CPU");
        // Tick rounding can make the parts exceed the whole by a tick or two.
        assert_eq!(p.other_s(Some(22.5)), Some(0.0));
        assert_eq!(PhaseCpu::default().other_s(Some(1.0)), None);
    }

    #[test]
    fn failures_name_every_anomaly() {
        let mut r = run(1000.0, 1.0, &[]);
        r.result.set("lost", 2);
        r.result.set("err.server_Overloaded", 3);
        let f = failures(&r);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].contains("lost = 2"));
        assert!(f[1].contains("server_Overloaded=3"));
        assert!(!r.under_knee() || !failures(&r).is_empty());
    }

    /// A run at `rate` whose e2e p95 is `p95_ms` (all samples equal), with `failures`.
    fn run(rate: f64, p95_ms: f64, failures: &[&str]) -> RunResult {
        let mut res = Record::new("result");
        res.set("conns_established", 10);
        res.set("acks_window", (rate * 30.0) as u64);
        let mut h = latency_histogram();
        h.record((p95_ms * 1000.0) as u64).expect("in range");
        res.hists.insert("e2e".into(), h);
        RunResult {
            scenario: Scenario {
                rate,
                ..Scenario::default()
            },
            started_at: String::new(),
            workers: 1,
            first_user: 1,
            connections_target: 10,
            result: res,
            timeline: Vec::new(),
            server: ServerView::default(),
            client_cpu_s: 0.0,
            phase_cpu: PhaseCpu::default(),
            run_s: 0.0,
            failures: failures.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn spread_takes_the_worse_middle_for_even_counts() {
        let s = Spread::of([3.0, 1.0, 2.0], true).expect("values");
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(
            Spread::of([3.0, 1.0, 2.0], false).expect("values").median,
            2.0
        );
        // Even: latency takes the higher middle value, throughput the lower one.
        assert_eq!(
            Spread::of([4.0, 1.0, 3.0, 2.0], true).expect("v").median,
            3.0
        );
        assert_eq!(
            Spread::of([4.0, 1.0, 3.0, 2.0], false).expect("v").median,
            2.0
        );
        assert_eq!(Spread::of([10.0, 20.0], true).expect("v").median, 20.0);
        assert_eq!(Spread::of([7.0], true).expect("v").median, 7.0);
        assert_eq!(Spread::of([], true), None);
    }

    #[test]
    fn a_step_judges_latency_on_the_median_p95() {
        // Odd: 50, 150, 90 ms -> median 90 < 100 although one run is over the limit.
        let odd = Step::new(vec![
            run(1000.0, 50.0, &[]),
            run(1000.0, 150.0, &[]),
            run(1000.0, 90.0, &[]),
        ]);
        assert_eq!(odd.representative_index(), 2);
        assert!((odd.median_p95_ms() - 90.0).abs() < 0.1);
        assert!(odd.under_knee());
        // Odd, the other way: two of three over the limit.
        let over = Step::new(vec![
            run(1000.0, 50.0, &[]),
            run(1000.0, 150.0, &[]),
            run(1000.0, 120.0, &[]),
        ]);
        assert!(!over.under_knee());
        assert!(over.ok(), "over the knee, but every check passed");
        // Even: the upper median (the worse one) decides: 50 and 150 -> 150 -> fails.
        let even = Step::new(vec![run(1000.0, 150.0, &[]), run(1000.0, 50.0, &[])]);
        assert_eq!(even.representative_index(), 0);
        assert!(!even.under_knee());
        let even_ok = Step::new(vec![
            run(1000.0, 80.0, &[]),
            run(1000.0, 20.0, &[]),
            run(1000.0, 99.0, &[]),
            run(1000.0, 300.0, &[]),
        ]);
        assert_eq!(
            even_ok.representative_index(),
            2,
            "upper median of 4 = 3rd lowest"
        );
        assert!(even_ok.under_knee());
    }

    #[test]
    fn one_failing_repeat_fails_the_step_even_when_the_median_passes() {
        let mut lost = run(1000.0, 10.0, &["lost = 3"]);
        lost.result.set("lost", 3);
        let st = Step::new(vec![run(1000.0, 10.0, &[]), lost, run(1000.0, 12.0, &[])]);
        assert!(st.median_p95_ms() < st.runs[0].scenario.knee_p95_ms);
        assert!(!st.ok());
        assert!(!st.under_knee());
        assert_eq!(st.lost(), 3);
        assert_eq!(st.failures(), vec!["run 2/3: lost = 3".to_string()]);
        // Lost messages alone (even without a failure sentence) fail the step, as before.
        let mut quiet = run(1000.0, 10.0, &[]);
        quiet.result.set("lost", 1);
        assert!(!Step::new(vec![run(1000.0, 10.0, &[]), quiet]).under_knee());
        // Any other failed check (errors, duplicates, ...) likewise.
        let errs = Step::new(vec![
            run(1000.0, 10.0, &[]),
            run(1000.0, 10.0, &["2 errors (server_Overloaded=2)"]),
        ]);
        assert!(!errs.ok() && !errs.under_knee());
    }

    #[test]
    fn one_run_per_step_is_the_run_itself() {
        for (p95, fails) in [(10.0, &[][..]), (150.0, &[][..]), (10.0, &["gaps = 1"][..])] {
            let r = run(2000.0, p95, fails);
            let st = Step::new(vec![r.clone()]);
            assert_eq!(st.under_knee(), r.under_knee());
            assert_eq!(st.ok(), r.ok());
            assert_eq!(st.failures(), r.failures);
            assert_eq!(st.representative_index(), 0);
            assert_eq!(st.throughput().median, r.throughput());
            let line = step_summary(&st, false);
            assert!(
                line.starts_with("== 2000 msgs/s: throughput 2000/s, e2e p95"),
                "{line}"
            );
            assert!(!line.contains("median"), "{line}");
        }
        let two = Step::new(vec![run(2000.0, 10.0, &[]), run(2000.0, 30.0, &[])]);
        let line = step_summary(&two, false);
        assert!(line.contains("median of 2 runs"), "{line}");
        // The upper median of two (the worse run), with both ends (HdrHistogram rounds up).
        assert!(line.contains("e2e p95 30.0"), "{line}");
        assert!(line.contains(" ms (10.0"), "{line}");
        assert!(line.ends_with("-> under the knee"), "{line}");
    }

    fn v(checks_ok: bool, p95_ms: f64) -> RunVerdict {
        RunVerdict { checks_ok, p95_ms }
    }

    const OVER: RunVerdict = RunVerdict {
        checks_ok: true,
        p95_ms: 150.0,
    };
    const UNDER: RunVerdict = RunVerdict {
        checks_ok: true,
        p95_ms: 50.0,
    };

    #[test]
    fn early_stop_with_an_odd_count_waits_for_a_majority_over_the_limit() {
        assert_eq!(over_limit_deciding(3), 2);
        assert_eq!(early_stop(3, 100.0, &[]), None);
        assert_eq!(early_stop(3, 100.0, &[OVER]), None, "2 more could pass");
        assert_eq!(
            early_stop(3, 100.0, &[OVER, OVER]),
            Some(Stop::Latency {
                over: 2,
                limit_ms: 100.0
            })
        );
        // At the limit counts as over (the knee test wants p95 < limit).
        assert!(early_stop(3, 100.0, &[v(true, 100.0), OVER]).is_some());
        // The last run decides nothing early: every run has run.
        assert_eq!(early_stop(3, 100.0, &[UNDER, OVER, OVER]), None);
        assert_eq!(
            early_stop(1, 100.0, &[OVER]),
            None,
            "one run is never early"
        );
        // 5 runs: 2 over is not enough, 3 is.
        assert_eq!(early_stop(5, 100.0, &[OVER, UNDER, OVER]), None);
        assert!(early_stop(5, 100.0, &[OVER, UNDER, OVER, OVER]).is_some());
    }

    #[test]
    fn early_stop_with_an_even_count_uses_the_upper_median() {
        // The upper median of 2 is the worse run: one run over decides it.
        assert_eq!(over_limit_deciding(2), 1);
        assert_eq!(
            early_stop(2, 100.0, &[OVER]),
            Some(Stop::Latency {
                over: 1,
                limit_ms: 100.0
            })
        );
        assert_eq!(early_stop(2, 100.0, &[UNDER]), None);
        // Of 4: the 3rd lowest, so 2 over decide it, 1 does not.
        assert_eq!(over_limit_deciding(4), 2);
        assert_eq!(early_stop(4, 100.0, &[OVER, UNDER]), None);
        assert_eq!(early_stop(4, 100.0, &[UNDER, OVER, UNDER]), None);
        assert!(early_stop(4, 100.0, &[UNDER, OVER, OVER]).is_some());
    }

    #[test]
    fn early_stop_on_a_failed_check_at_once() {
        let failed = v(false, 5.0);
        assert_eq!(
            early_stop(3, 100.0, &[failed]),
            Some(Stop::Checks { run: 1 }),
            "the first run failed its checks although its p95 is fine"
        );
        assert_eq!(
            early_stop(9, 100.0, &[UNDER, failed]),
            Some(Stop::Checks { run: 2 })
        );
        // A failed check outranks latency.
        assert_eq!(
            early_stop(2, 100.0, &[v(false, 500.0)]),
            Some(Stop::Checks { run: 1 })
        );
        // What counts as a failed check is what fails `under_knee`: failures or lost messages.
        let mut quiet_loss = run(1000.0, 10.0, &[]);
        quiet_loss.result.set("lost", 1);
        assert!(!RunVerdict::of(&quiet_loss).checks_ok);
        assert!(!RunVerdict::of(&run(1000.0, 10.0, &["duplicates = 1"])).checks_ok);
        let fine = RunVerdict::of(&run(1000.0, 10.0, &[]));
        assert!(fine.checks_ok && (fine.p95_ms - 10.0).abs() < 0.1);
    }

    #[test]
    fn early_stop_only_when_no_remaining_runs_could_pass_the_step() {
        // Exhaustively for up to 6 runs, each under or over the limit: a prefix stops the step
        // exactly when every way of finishing it fails the step's own knee test.
        for n in 1..=6usize {
            let pass: Vec<bool> = (0..1u32 << n)
                .map(|mask| {
                    let runs = (0..n)
                        .map(|i| run(1000.0, if mask >> i & 1 == 1 { 150.0 } else { 50.0 }, &[]))
                        .collect();
                    Step::new(runs).under_knee()
                })
                .collect();
            for k in 1..n {
                for prefix in 0..1u32 << k {
                    let done: Vec<RunVerdict> = (0..k)
                        .map(|i| if prefix >> i & 1 == 1 { OVER } else { UNDER })
                        .collect();
                    let can_pass =
                        (0..1u32 << (n - k)).any(|rest| pass[(prefix | rest << k) as usize]);
                    assert_eq!(
                        early_stop(n, 100.0, &done).is_some(),
                        !can_pass,
                        "n {n}, first {k} runs over-mask {prefix:b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_stopped_step_reports_what_ran_and_why() {
        let st = Step::stopped(
            vec![run(1000.0, 150.0, &[]), run(1000.0, 120.0, &[])],
            3,
            early_stop(3, 100.0, &[OVER, OVER]),
        );
        assert_eq!((st.repeats(), st.runs.len()), (3, 2));
        assert!(st.ok(), "every run that ran passed its checks");
        assert!(!st.under_knee());
        assert_eq!(
            st.stop_text().as_deref(),
            Some(
                "stopped after 2 of 3 runs: 2 runs had e2e p95 ≥ 100 ms, so the median of 3 \
                 cannot be under it"
            )
        );
        let line = step_summary(&st, false);
        assert!(line.contains("median of 2 runs"), "{line}");
        assert!(line.contains("(stopped after 2 of 3 runs: "), "{line}");
        assert!(line.ends_with("-> over the knee"), "{line}");
        // A failed check on the first run: run numbers count the runs asked for.
        let st = Step::stopped(
            vec![run(1000.0, 10.0, &["lost = 4"])],
            3,
            Some(Stop::Checks { run: 1 }),
        );
        assert_eq!(st.failures(), vec!["run 1/3: lost = 4".to_string()]);
        assert_eq!(
            st.stop_text().as_deref(),
            Some("stopped after 1 of 3 runs: run 1 failed its checks")
        );
        assert!(!st.under_knee());
        // A sweep of stopped steps still has N runs per rate.
        let sw = Sweep {
            steps: vec![st],
            knee: None,
            half_knee: None,
        };
        assert_eq!(sw.repeats(), 3);
        // Every run ran: no stop.
        let full = Step::new(vec![run(1000.0, 10.0, &[]), run(1000.0, 20.0, &[])]);
        assert_eq!(
            (full.repeats(), full.stop, full.stop_text()),
            (2, None, None)
        );
    }
}
