//! The load generator end to end: a real `switchboard serve` process, `switchboard-loadgen run`
//! as a child (with its worker processes), and the report it writes read back.
//!
//! The server binary is the workspace's `target/<profile>/switchboard`, next to this package's
//! binary. `cargo test -p switchboard-loadgen` does not build it (only the `switchboard`
//! library, a dev-dependency), so before the first server starts the harness runs `cargo build
//! -p switchboard` with the same cargo, profile and target directory, once per test process:
//! 0.2 s on the development box when it is already up to date, and never a stale binary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

/// One server and its load at a time: the tests assert latency (a knee at p95 < 100 ms), and
/// three servers with their load generators on a 2-CPU box at once pushed p95 past 200 ms.
static LOAD: Mutex<()> = Mutex::new(());

struct Server {
    child: Child,
    addr: String,
    dir: PathBuf,
    // Released after `drop` has stopped the server (fields drop after `Drop::drop`).
    _serial: MutexGuard<'static, ()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server binary `target/<profile>/switchboard` next to this package's binary, built (or
/// found up to date) by `cargo build -p switchboard` once per test process: `cargo test -p
/// switchboard-loadgen` alone builds only the `switchboard` library, so an existing binary could
/// be from older sources. Every test that starts a server waits for that one build; if it
/// fails, each of them fails with cargo's stderr.
fn server_binary() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(build_server)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn build_server() -> Result<PathBuf, String> {
    let lg = Path::new(env!("CARGO_BIN_EXE_switchboard-loadgen"));
    let bin = lg.with_file_name("switchboard");
    // target/<profile>/switchboard-loadgen: build with that profile into that target dir.
    let profile_dir = lg.parent().ok_or("loadgen binary has no directory")?;
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .ok_or("profile directory name")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace above loadgen/")?;
    let mut c = Command::new(env!("CARGO"));
    // Not the variables cargo set for this test process: build scripts that read them (ring's
    // reads CARGO_MANIFEST_DIR) would see them changed and rebuild half the tree, every time
    // and again for the next plain `cargo build`. Cargo's own settings (CARGO_HOME,
    // CARGO_TARGET_DIR, CARGO_BUILD_*, CARGO_PROFILE_*, ...) stay.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k == "OUT_DIR"
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_MANIFEST_LINKS",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&k)
        {
            c.env_remove(k);
        }
    }
    c.args([
        "build",
        "--quiet",
        "-p",
        "switchboard",
        "--bin",
        "switchboard",
    ])
    .arg("--manifest-path")
    .arg(workspace.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            c.arg("--release");
        }
        p => {
            c.args(["--profile", p]);
        }
    }
    let cmd = std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let out = c
        .output()
        .map_err(|e| format!("running `{cmd}` for the server binary: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the server binary failed ({}): `{cmd}`\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "server binary {} built or up to date in {:.1} s",
        bin.display(),
        started.elapsed().as_secs_f64()
    );
    if !bin.exists() {
        return Err(format!(
            "cargo built the server but there is no {}",
            bin.display()
        ));
    }
    Ok(bin)
}

fn start_server(name: &str) -> Server {
    // A test that failed while holding the lock poisons it; the next one still runs alone.
    let serial = LOAD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("sb-loadgen-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    // The simulated users send faster than the per-user limit a person needs (as in run.sh).
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        "messages_per_user_burst = 1000000\nmessages_per_user_refill_per_s = 1000\n\
         frames_per_conn_burst = 1000000\nframes_per_conn_refill_per_s = 1000\n",
    )
    .expect("config");
    let mut child = Command::new(server_binary())
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .args(["--listen", "127.0.0.1:0", "--cores", "1", "--data-dir"])
        .arg(dir.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn switchboard");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read server banner");
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
        .to_string();
    Server {
        child,
        addr,
        dir,
        _serial: serial,
    }
}

/// Runs `switchboard-loadgen run` against `s` with `args`; returns its exit code and the
/// parsed report.json.
fn loadgen(s: &Server, report: &str, args: &[&str]) -> (i32, serde_json::Value) {
    let out_dir = s.dir.join(report);
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-loadgen"))
        .arg("run")
        .arg("--target")
        .arg(format!("ws://{}", s.addr))
        .arg("--data-dir")
        .arg(s.dir.join("data"))
        .arg("--report")
        .arg(&out_dir)
        .args([
            "--quiet",
            "--warmup",
            "1s",
            "--duration",
            "2s",
            "--drain",
            "5s",
        ])
        .args(args)
        .output()
        .expect("run switchboard-loadgen");
    let code = out.status.code().expect("exit code");
    let text = std::fs::read_to_string(out_dir.join("report.json")).unwrap_or_else(|e| {
        panic!(
            "no report.json ({e}); exit {code}; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let md = std::fs::read_to_string(out_dir.join("report.md")).expect("report.md");
    let html = std::fs::read_to_string(out_dir.join("report.html")).expect("report.html");
    assert!(md.starts_with("# Switchboard load report"), "{md}");
    assert!(html.contains("<svg"), "report.html has no plots");
    let v: serde_json::Value = serde_json::from_str(&text).expect("report.json parses");
    // Reported beside the JSON for a failing assertion's context.
    assert_eq!(v["schema"], "switchboard-loadgen/report/v1", "{text}");
    (code, v)
}

fn num(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{} is not a number: {x}", path.join(".")))
}

/// A fresh server (named `name`, report under `name/`) and a sweep of 100 and 200 msgs/s over 40
/// connections, with `extra` flags; returns the server (keep it alive), exit code and report.
fn small_sweep(name: &str, extra: &[&str]) -> (Server, i32, serde_json::Value) {
    let s = start_server(name);
    let mut args = vec![
        "--connections",
        "40",
        "--contacts-per-user",
        "2",
        "--sweep",
        "100,200",
    ];
    args.extend_from_slice(extra);
    let (code, v) = loadgen(&s, name, &args);
    (s, code, v)
}

#[test]
fn a_sweep_finds_its_knee_and_measures_half_of_it_over_real_sockets() {
    let (s, code, v) = small_sweep("sweep", &["--half-knee"]);
    assert_eq!(code, 0, "{v:#}");
    // Both rates are far below this server's knee: the knee is the top one and the half-knee
    // run is a separate run at half its offered rate.
    assert_eq!(num(&v, &["sweep", "knee_rate"]), 200.0, "{v:#}");
    assert_eq!(
        v["sweep"]["steps"].as_array().map(Vec::len),
        Some(2),
        "{v:#}"
    );
    let half = &v["sweep"]["half_knee"];
    assert_eq!(num(half, &["rate"]), 100.0, "{v:#}");
    assert_eq!(half["ok"], true, "{v:#}");
    assert_eq!(num(half, &["lost"]), 0.0);
    assert!(num(half, &["throughput_msgs_per_s"]) > 50.0, "{half:#}");
    assert!(num(half, &["latency_ms", "e2e", "p99"]) > 0.0, "{half:#}");
    // The top of the report is the knee step, with the correctness checker's counts.
    assert_eq!(num(&v, &["connections_established"]), 40.0);
    assert!(num(&v, &["messages_delivered"]) > 0.0);
    for k in ["lost", "duplicates", "order_violations", "connect_errors"] {
        assert_eq!(num(&v, &[k]), 0.0, "{k}: {v:#}");
    }
    // Every acknowledged message went through a group commit the server's /metrics counted.
    let commits = &v["server_commits"];
    assert!(num(commits, &["commits"]) > 0.0, "{commits:#}");
    assert!(num(commits, &["fsync_us_mean"]) > 0.0, "{commits:#}");
    assert!(
        num(commits, &["records_per_commit_mean"]) >= 1.0,
        "{commits:#}"
    );
    assert!(!commits["fsync_us_p99_le"].is_null(), "{commits:#}");
    // The server's log index holds every message it stored (all steps), at least a location each.
    let index = &v["server_index"];
    assert!(
        num(index, &["messages"]) >= num(&v, &["messages_acked"]),
        "{index:#}"
    );
    assert!(num(index, &["bytes_per_message"]) >= 12.0, "{index:#}");
    // The latency split: the server's commit waits and reactor lag, and the client's read lag
    // (kernel receive timestamps), each with samples from the knee step's message phase.
    let waits = &v["server_waits"];
    assert!(num(waits, &["commit_wait_us", "count"]) > 0.0, "{waits:#}");
    assert!(num(waits, &["reactor_lag_us", "count"]) > 0.0, "{waits:#}");
    assert!(!waits["commit_wait_us"]["p99_le"].is_null(), "{waits:#}");
    // The server's back-pressure counters were scraped (a light sweep never needs them: 0s).
    let throttles = &v["server_throttles"];
    assert!(throttles["conn_throttles"].is_u64(), "{throttles:#}");
    assert!(throttles["pressure_episodes"].is_u64(), "{throttles:#}");
    let read_lag = &v["latency_ms"]["read_lag"];
    assert!(num(read_lag, &["count"]) > 0.0, "{read_lag:#}");
    assert!(
        num(read_lag, &["p50"]) <= num(&v, &["latency_ms", "e2e", "max"]),
        "a read's lag is part of its frames' latency: {v:#}"
    );
    let md = std::fs::read_to_string(s.dir.join("sweep/report.md")).expect("report.md");
    assert!(md.contains("| read lag (newest bytes"), "{md}");
    assert!(md.contains("| server reactor lag ("), "{md}");
    assert!(
        md.contains("| server group commits (message phase) |"),
        "{md}"
    );
    let line = md
        .lines()
        .find(|l| l.starts_with("At half the knee"))
        .unwrap_or_else(|| panic!("no half-knee line in\n{md}"));
    assert!(line.contains("100 msgs/s offered"), "{line}");
    assert!(md.contains("| server log index at the end"), "{md}");
    // `plan` from this report sizes memory for stored history with the measured index cost.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard-loadgen"))
        .args(["plan", "--report"])
        .arg(s.dir.join("sweep/report.json"))
        .args([
            "--users",
            "1000000",
            "--msgs-per-user-day",
            "50",
            "--peak-factor",
            "3",
            "--box-memory-gib",
            "16",
            "--history-days",
            "90",
        ])
        .output()
        .expect("plan");
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}");
    assert!(
        plan.contains("stored   = users × msgs/user/day × days     = 1,000,000 × 50 × 90 = 4,500,000,000 messages"),
        "{plan}"
    );
    assert!(
        plan.contains("for memory with 90 days of history"),
        "{plan}"
    );
}

/// A one-rate sweep (20 connections, 50 msgs/s) under a p95 limit of 1 µs, which no real round
/// trip meets, with `extra` flags; returns the exit code and report.json.
fn sweep_over_any_limit(name: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let s = start_server(name);
    let mut args = vec![
        "--connections",
        "20",
        "--sweep",
        "50",
        "--knee-p95-ms",
        "0.001",
    ];
    args.extend_from_slice(extra);
    loadgen(&s, "sweep", &args)
}

#[test]
fn a_sweep_with_no_rate_under_the_limit_fails_its_exit_code() {
    // No knee, so no half-knee run either.
    let (code, v) = sweep_over_any_limit("nokneee", &["--half-knee"]);
    assert_eq!(code, 1, "{v:#}");
    assert!(v["sweep"]["knee_rate"].is_null(), "{v:#}");
    assert!(v["sweep"]["half_knee"].is_null(), "{v:#}");
    // The run itself was fine: only the latency limit failed.
    assert_eq!(num(&v, &["lost"]), 0.0, "{v:#}");
}

#[test]
fn a_repeated_step_stops_once_its_median_is_over_the_limit() {
    // Of 3 runs, the first 2 over the limit decide the median, so the third never runs.
    let (code, v) = sweep_over_any_limit("stopearly", &["--sweep-repeat", "3"]);
    assert_eq!(code, 1, "{v:#}");
    assert_eq!(num(&v, &["sweep", "repeats"]), 3.0, "{v:#}");
    let st = &v["sweep"]["steps"][0];
    assert_eq!(num(st, &["repeats"]), 3.0, "asked for: {st:#}");
    assert_eq!(st["runs"].as_array().map(Vec::len), Some(2), "ran: {st:#}");
    assert_eq!(st["under_knee"], false, "{st:#}");
    assert_eq!(st["ok"], true, "only the latency limit failed: {st:#}");
}

#[test]
fn a_repeated_sweep_reports_every_run_and_the_median_over_real_sockets() {
    let (s, code, v) = small_sweep("repeat", &["--sweep-repeat", "2"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(num(&v, &["sweep", "repeats"]), 2.0, "{v:#}");
    assert_eq!(num(&v, &["sweep", "knee_rate"]), 200.0, "{v:#}");
    let steps = v["sweep"]["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{v:#}");
    for st in steps {
        assert_eq!(num(st, &["repeats"]), 2.0, "{st:#}");
        let runs = st["runs"].as_array().expect("runs");
        assert_eq!(runs.len(), 2, "{st:#}");
        for r in runs {
            assert_eq!(r["ok"], true, "{r:#}");
            assert_eq!(num(r, &["rate"]), num(st, &["rate"]));
        }
        // Upper median of two = the worse run; min/max are the two runs' values.
        let p95s: Vec<f64> = runs
            .iter()
            .map(|r| num(r, &["latency_ms", "e2e", "p95"]))
            .collect();
        let (lo, hi) = (p95s[0].min(p95s[1]), p95s[0].max(p95s[1]));
        assert_eq!(num(st, &["median", "e2e_p95_ms"]), hi, "{st:#}");
        assert_eq!(num(st, &["min", "e2e_p95_ms"]), lo, "{st:#}");
        assert_eq!(num(st, &["max", "e2e_p95_ms"]), hi, "{st:#}");
        assert_eq!(num(st, &["latency_ms", "e2e", "p95"]), hi, "representative");
        let tps: Vec<f64> = runs
            .iter()
            .map(|r| num(r, &["throughput_msgs_per_s"]))
            .collect();
        assert_eq!(
            num(st, &["median", "throughput_msgs_per_s"]),
            tps[0].min(tps[1]),
            "lower median of throughput: {st:#}"
        );
        for k in ["e2e_p50_ms", "e2e_p99_ms"] {
            let (m, a, b) = (
                num(st, &["median", k]),
                num(st, &["min", k]),
                num(st, &["max", k]),
            );
            assert!(a <= m && m <= b && a > 0.0, "{k}: {st:#}");
        }
        assert_eq!(st["under_knee"], true, "{st:#}");
    }
    let md = std::fs::read_to_string(s.dir.join("repeat/report.md")).expect("report.md");
    assert!(md.contains("p95 median (min–max)"), "{md}");
}

/// `run` against a port nothing listens on, with `extra` flags: for scenarios refused before any
/// connection is tried. Returns the exit code and stderr.
fn refused_run(extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-loadgen"))
        .args([
            "run",
            "--target",
            "ws://127.0.0.1:9",
            "--secret-file",
            "/nonexistent/token.secret",
            "--quiet",
        ])
        .args(extra)
        .output()
        .expect("run switchboard-loadgen");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sweep_repeat_out_of_range_is_refused_before_connecting() {
    for n in ["0", "10"] {
        let (code, err) = refused_run(&["--sweep", "100", "--sweep-repeat", n]);
        assert_eq!(code, Some(2), "{n}: {err}");
        assert!(
            err.contains(&format!("sweep_repeat (--sweep-repeat) is {n}")) && err.contains("1..=9"),
            "{n}: {err}"
        );
    }
}

#[test]
fn sweep_repeat_without_a_sweep_is_refused_before_connecting() {
    // No --sweep: nothing to repeat, so it is an error rather than a silent single run.
    let (code, err) = refused_run(&["--rate", "100", "--sweep-repeat", "3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("sweep_repeat (--sweep-repeat) is 3 but there is no sweep"),
        "{err}"
    );
}
