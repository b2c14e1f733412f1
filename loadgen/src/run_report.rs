//! The report directory of `run`: report.json (schema in loadgen/README.md), report.md and
//! report.html (inline SVG plots). Built from `coord::RunResult`s; no I/O except the final writes.
//!
//! ```text
//!  RunResult (or a Sweep)            ─► json() ─► report.json ─► `plan` reads it back
//!                                     ─► markdown() ─► report.md
//!                                     ─► html() + svg::render ─► report.html
//! ```

use std::fmt::Write;
use std::path::Path;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::coord::{Row, RunResult, Spread, Step, Sweep};
use crate::metrics::Buckets;
use crate::report::human_bytes;
use crate::svg::{self, Axis, Chart, Series};
use crate::worker::phase;

/// `schema` field of report.json; bump on incompatible changes.
pub const SCHEMA: &str = "switchboard-loadgen/report/v1";

/// Percentiles listed in the HDR distribution of report.json.
pub const HDR_PERCENTILES: [f64; 14] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.995, 99.999, 100.0,
];

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0, "p50": null, "p95": null, "p99": null, "p999": null, "max": null, "mean": null});
    }
    let q = |p: f64| round3(ms(h.value_at_quantile(p)));
    json!({
        "count": h.len(),
        "p50": q(0.50),
        "p95": q(0.95),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": round3(ms(h.max())),
        "mean": round3(h.mean() / 1000.0),
    })
}

fn hdr_json(h: &Histogram<u64>) -> Value {
    Value::Array(
        HDR_PERCENTILES
            .iter()
            .filter(|_| !h.is_empty())
            .map(|&p| json!([p, round3(ms(h.value_at_quantile(p / 100.0)))]))
            .collect(),
    )
}

fn by_prefix(r: &RunResult, prefix: &str) -> Value {
    let mut m = Map::new();
    for (k, v) in r.result.nums.iter().filter(|(k, _)| k.starts_with(prefix)) {
        m.insert(k[prefix.len()..].to_string(), json!(v));
    }
    Value::Object(m)
}

fn row_json(row: &Row) -> Value {
    let q = |h: &Histogram<u64>, p: f64| {
        if h.is_empty() {
            Value::Null
        } else {
            json!(round3(ms(h.value_at_quantile(p))))
        }
    };
    json!({
        "t": row.sec,
        "phase": phase_name(row.phase),
        "conns": row.conns,
        "sends": row.sends,
        "acks": row.acks,
        "deliveries": row.deliveries,
        "receipts": row.receipts,
        "errors": row.errors,
        "e2e_p50_ms": q(&row.e2e, 0.5),
        "e2e_p99_ms": q(&row.e2e, 0.99),
        "e2e_p999_ms": q(&row.e2e, 0.999),
        "e2e_max_ms": if row.e2e.is_empty() { Value::Null } else { json!(round3(ms(row.e2e.max()))) },
        "ack_p50_ms": q(&row.ack, 0.5),
        "ack_p99_ms": q(&row.ack, 0.99),
    })
}

pub fn phase_name(p: u64) -> &'static str {
    match p {
        phase::CONNECT => "connect",
        phase::WAIT => "wait",
        phase::WARMUP => "warmup",
        phase::MEASURE => "measure",
        _ => "drain",
    }
}

/// Server RSS after connecting, and (RSS after connecting − RSS before) / connections.
pub fn server_memory(r: &RunResult) -> (Option<u64>, Option<f64>) {
    let est = r.result.num("conns_established");
    let rss = r.server.connected.map(|s| s.rss_bytes);
    let per = match (r.server.before, r.server.connected) {
        (Some(b), Some(a)) if est > 0 => {
            Some((a.rss_bytes as f64 - b.rss_bytes as f64) / est as f64)
        }
        _ => None,
    };
    (rss, per)
}

/// The server's group commits during the message phase (warm-up, measured window and drain):
/// fsync latency and records per commit, from its `/metrics` histograms (connected → end).
pub fn server_commits(r: &RunResult) -> Option<(Buckets, Buckets)> {
    let (a, e) = (r.server.connected?, r.server.end?);
    Some((
        e.fsync_us.since(&a.fsync_us)?,
        e.commit_batch.since(&a.commit_batch)?,
    ))
}

/// The server's back-pressure during the message phase (connected → end): connections it
/// stopped reading because their shard was under pressure, and the shards' pressure episodes.
pub fn server_throttles(r: &RunResult) -> Option<(u64, u64)> {
    let (a, e) = (r.server.connected?, r.server.end?);
    Some((
        e.conn_throttles_total
            .saturating_sub(a.conn_throttles_total),
        e.pressure_episodes_total
            .saturating_sub(a.pressure_episodes_total),
    ))
}

fn throttles_json(r: &RunResult) -> Value {
    match server_throttles(r) {
        Some((conns, episodes)) => json!({
            "conn_throttles": conns,
            "pressure_episodes": episodes,
        }),
        None => Value::Null,
    }
}

/// The server's latency split during the message phase (connected → end, from its `/metrics`
/// histograms): per group commit, oldest record staged → effects handed on; and how late each
/// core's 10 ms reactor lag probe ran.
pub fn server_waits(r: &RunResult) -> Option<(Buckets, Buckets)> {
    let (a, e) = (r.server.connected?, r.server.end?);
    Some((
        e.commit_wait_us.since(&a.commit_wait_us)?,
        e.reactor_lag_us.since(&a.reactor_lag_us)?,
    ))
}

fn waits_json(r: &RunResult) -> Value {
    let Some((w, l)) = server_waits(r) else {
        return Value::Null;
    };
    let q = |b: &Buckets| {
        let mut m = quantiles_json("", b);
        m.insert("count".into(), json!(b.count));
        Value::Object(m)
    };
    json!({ "commit_wait_us": q(&w), "reactor_lag_us": q(&l) })
}

/// `{prefix}mean`, `{prefix}p50_le`, `{prefix}p99_le`, `{prefix}p999_le` of a histogram.
fn quantiles_json(prefix: &str, b: &Buckets) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(format!("{prefix}mean"), json!(b.mean().map(round3)));
    for (k, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
        m.insert(format!("{prefix}{k}_le"), le_json(b.quantile_le(q)));
    }
    m
}

fn le_json(v: Option<u64>) -> Value {
    match v {
        None => Value::Null,
        Some(u64::MAX) => json!("+Inf"),
        Some(b) => json!(b),
    }
}

/// "mean … µs, p50 … µs, p99 … µs, p99.9 … µs (bucket bounds)" of a microsecond histogram.
fn us_quantiles(b: &Buckets) -> String {
    format!(
        "mean {} µs, p50 {} µs, p99 {} µs, p99.9 {} µs (bucket bounds)",
        opt(b.mean().map(|m| format!("{m:.0}"))),
        le_text(b.quantile_le(0.5)),
        le_text(b.quantile_le(0.99)),
        le_text(b.quantile_le(0.999)),
    )
}

fn le_text(v: Option<u64>) -> String {
    match v {
        None => "–".into(),
        Some(u64::MAX) => "> the last bucket".into(),
        Some(b) => format!("≤ {b}"),
    }
}

fn commits_json(r: &RunResult) -> Value {
    let Some((f, b)) = server_commits(r) else {
        return Value::Null;
    };
    let mut m = quantiles_json("fsync_us_", &f);
    m.insert("commits".into(), json!(f.count));
    m.insert(
        "records_per_commit_mean".into(),
        json!(b.mean().map(round3)),
    );
    Value::Object(m)
}

/// The report of one run (the fields of issue 4 plus the detail behind them).
pub fn run_json(r: &RunResult) -> Value {
    let res = &r.result;
    let (rss, per_conn) = server_memory(r);
    let persisted = match (r.server.before, r.server.end) {
        (Some(b), Some(e)) => json!(e
            .messages_persisted_total
            .saturating_sub(b.messages_persisted_total)),
        _ => Value::Null,
    };
    json!({
        "schema": SCHEMA,
        "scenario": serde_json::to_value(&r.scenario).unwrap_or(Value::Null),
        "started_at": r.started_at,
        "rate_target": r.scenario.rate,
        "warmup_s": r.scenario.warmup.as_secs_f64(),
        "duration_s": r.scenario.duration.as_secs_f64(),
        "drain_s": res.num("drain_ns") as f64 / 1e9,
        "run_s": round3(r.run_s),
        "workers": r.workers,
        "first_user": r.first_user,
        "connections_target": r.connections_target,
        "connections_established": res.num("conns_established"),
        "connections_open_at_end": res.num("conns_open_at_end"),
        "connections_dropped": res.num("conns_dropped"),
        "connect_errors": r.connect_errors_total(),
        "connect_errors_by_kind": by_prefix(r, "cerr."),
        "connect_s": res.num("connect_ms") as f64 / 1e3,
        "messages_sent": res.num("sent"),
        "messages_acked": res.num("acked"),
        "messages_delivered": res.num("deliveries"),
        "messages_errored": res.num("errored"),
        "messages_unsent": res.num("unsent"),
        "receipts_received": res.num("receipts"),
        "messages_receipted": res.num("receipted"),
        "throughput_msgs_per_s": round3(r.throughput()),
        "deliveries_per_s": round3(r.deliveries_per_s()),
        "sends_per_s": round3(res.num("sends_window") as f64 / r.measure_s()),
        "latency_ms": {
            "e2e": latency_json(&r.hist("e2e")),
            "ack": latency_json(&r.hist("ack")),
            "receipt": latency_json(&r.hist("receipt")),
            "connect": latency_json(&r.hist("connect")),
            "send_lag": latency_json(&r.hist("send_lag")),
            "read_lag": latency_json(&r.hist("read_lag")),
        },
        "lost": res.num("lost"),
        "duplicates": res.num("duplicates"),
        "order_violations": res.num("order_violations"),
        "gaps": res.num("gaps"),
        "unacked": res.num("unacked"),
        "delivered_unacked": res.num("delivered_unacked"),
        "receipts_missing": res.num("receipts_missing"),
        "foreign_payloads": res.num("foreign"),
        "duplicate_acks": res.num("duplicate_acks"),
        "unknown_acks": res.num("unknown_acks"),
        "errors": r.errors_total(),
        "errors_by_kind": by_prefix(r, "err."),
        "server_rss_bytes": rss,
        "server_rss_bytes_before": r.server.before.map(|s| s.rss_bytes),
        "server_rss_bytes_end": r.server.end.map(|s| s.rss_bytes),
        "bytes_per_connection": per_conn.map(|v| v.round()),
        "server_connections_gauge": r.server.connected.map(|s| s.connections),
        "server_cores": r.server.connected.or(r.server.before).map(|s| s.cores),
        "server_messages_persisted": persisted,
        "server_index": index_json(r),
        "server_cpu_s": r.server.cpu_s.map(round3),
        "server_commits": commits_json(r),
        "server_waits": waits_json(r),
        "server_throttles": throttles_json(r),
        "client_cpu_s": round3(r.client_cpu_s),
        "client_rss_bytes": res.num("client_rss_bytes"),
        "phase_cpu": phase_cpu_json(r),
        "ok": r.ok(),
        "failures": r.failures,
        "timeline": r.timeline.iter().map(row_json).collect::<Vec<_>>(),
        "hdr_ms": {
            "e2e": hdr_json(&r.hist("e2e")),
            "ack": hdr_json(&r.hist("ack")),
            "receipt": hdr_json(&r.hist("receipt")),
        },
    })
}

/// The server's in-memory log index at the end of the run (all its stored history, earlier
/// runs' included): `{messages, bytes, bytes_per_message}`, null without a scrape or a message.
/// `plan --history-days` sizes memory for stored history with `bytes_per_message`.
fn index_json(r: &RunResult) -> Value {
    match r.server.end {
        Some(e) if e.index_messages > 0 => json!({
            "messages": e.index_messages,
            "bytes": e.index_bytes,
            "bytes_per_message": round3(e.index_bytes as f64 / e.index_messages as f64),
        }),
        _ => Value::Null,
    }
}

/// Where the machine's CPU went during the message phase: `{machine_s, cpus, server_s,
/// client_s, irq_s, other_s}` (seconds; null where unknown).
fn phase_cpu_json(r: &RunResult) -> Value {
    let p = &r.phase_cpu;
    json!({
        "machine_s": p.machine_s.map(round3),
        "cpus": p.cpus,
        "server_s": r.server.cpu_s.map(round3),
        "client_s": p.client_s.map(round3),
        "irq_s": p.irq_s.map(round3),
        "other_s": p.other_s(r.server.cpu_s).map(round3),
    })
}

/// One run of a sweep step (or of the half-knee runs) in report.json.
fn run_step_json(s: &RunResult) -> Value {
    json!({
        "rate": s.scenario.rate,
        "throughput_msgs_per_s": round3(s.throughput()),
        "deliveries_per_s": round3(s.deliveries_per_s()),
        "latency_ms": {
            "e2e": latency_json(&s.hist("e2e")),
            "ack": latency_json(&s.hist("ack")),
            "receipt": latency_json(&s.hist("receipt")),
        },
        "lost": s.result.num("lost"),
        "errors": s.errors_total(),
        "ok": s.ok(),
        "under_knee": s.under_knee(),
        "failures": s.failures,
        "server_cpu_s": s.server.cpu_s.map(round3),
        "server_commits": commits_json(s),
        "server_waits": waits_json(s),
        "server_throttles": throttles_json(s),
        "client_cpu_s": round3(s.client_cpu_s),
        "run_s": round3(s.run_s),
        "phase_cpu": phase_cpu_json(s),
        "server_rss_bytes": server_memory(s).0,
        "bytes_per_connection": server_memory(s).1.map(f64::round),
    })
}

fn spread_json(st: &Step, pick: impl Fn(&Spread) -> f64) -> Value {
    let lat = |q: f64| st.e2e_ms(q).map(|s| round3(pick(&s)));
    json!({
        "throughput_msgs_per_s": round3(pick(&st.throughput())),
        "e2e_p50_ms": lat(0.5),
        "e2e_p95_ms": lat(0.95),
        "e2e_p99_ms": lat(0.99),
    })
}

/// One sweep step (or the half-knee runs) in report.json: the representative run's fields (the
/// run whose e2e p95 is the median) with the step's verdict (`ok`, `under_knee`, `failures`,
/// `lost`, `errors` over all runs), plus `repeats`, every run under `runs` and the
/// `median`/`min`/`max` of throughput and e2e p50/p95/p99 over the runs.
fn step_json(st: &Step) -> Value {
    let mut v = run_step_json(st.representative());
    if let Value::Object(m) = &mut v {
        m.insert("lost".into(), json!(st.lost()));
        m.insert("errors".into(), json!(st.errors_total()));
        m.insert("ok".into(), json!(st.ok()));
        m.insert("under_knee".into(), json!(st.under_knee()));
        m.insert("failures".into(), json!(st.failures()));
        m.insert("repeats".into(), json!(st.repeats()));
        m.insert("stopped_early".into(), json!(st.runs.len() < st.repeats()));
        m.insert("stop_reason".into(), json!(st.stop_text()));
        m.insert(
            "runs".into(),
            Value::Array(st.runs.iter().map(run_step_json).collect()),
        );
        m.insert("median".into(), spread_json(st, |s| s.median));
        m.insert("min".into(), spread_json(st, |s| s.min));
        m.insert("max".into(), spread_json(st, |s| s.max));
    }
    v
}

/// report.json of a sweep: the knee step's representative run at the top (the last step's when
/// none passed), every step under `sweep.steps`, the half-knee runs under `sweep.half_knee` (null
/// without).
pub fn sweep_json(sw: &Sweep) -> Value {
    let steps = &sw.steps;
    let knee = sw.knee;
    let main = knee.unwrap_or(steps.len().saturating_sub(1));
    let mut top = steps
        .get(main)
        .map(|s| run_json(s.representative()))
        .unwrap_or_else(|| json!({}));
    let step_vals: Vec<Value> = steps.iter().map(step_json).collect();
    let knee_step = knee.map(|k| &steps[k]);
    if let Value::Object(m) = &mut top {
        m.insert(
            "sweep".into(),
            json!({
                "knee_p95_ms": steps.first().map_or(100.0, |s| s.runs[0].scenario.knee_p95_ms),
                "repeats": sw.repeats(),
                "knee_rate": knee_step.map(Step::rate),
                // The median (for an even count the lower middle) over the knee's runs.
                "knee_throughput_msgs_per_s": knee_step.map(|s| round3(s.throughput().median)),
                "report_step": main,
                "steps": step_vals,
                "half_knee": sw.half_knee.as_ref().map(step_json),
            }),
        );
    }
    top
}

fn lat_row(name: &str, h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("| {name} | 0 | – | – | – | – | – |\n");
    }
    let q = |p: f64| format!("{:.2}", ms(h.value_at_quantile(p)));
    format!(
        "| {name} | {} | {} | {} | {} | {} | {:.2} |\n",
        h.len(),
        q(0.5),
        q(0.95),
        q(0.99),
        q(0.999),
        ms(h.max())
    )
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("n/a".into(), |v| v.to_string())
}

/// report.md of one run (or the main step of a sweep, with the sweep table when given).
pub fn markdown(r: &RunResult, sweep: Option<&Sweep>) -> String {
    let res = &r.result;
    let sc = &r.scenario;
    let (rss, per_conn) = server_memory(r);
    let mut o = String::new();
    let _ = writeln!(o, "# Switchboard load report: {}\n", sc.name);
    let _ = writeln!(
        o,
        "Started {} against `{}`. **{}**{}\n",
        r.started_at,
        sc.target,
        if r.ok() { "PASS" } else { "FAIL" },
        if r.ok() {
            String::new()
        } else {
            format!(": {}", r.failures.join("; "))
        }
    );
    if let Some(sw @ Sweep { steps, knee, .. }) = sweep {
        let knee = *knee;
        let n = sw.repeats();
        if n == 1 {
            let _ = writeln!(
                o,
                "Sweep of {} rates; this page details the {} step ({:.0} msgs/s offered); every step is in the Sweep table.\n",
                steps.len(),
                if knee.is_some() { "knee" } else { "last (no rate passed)" },
                r.scenario.rate
            );
        } else {
            let _ = writeln!(
                o,
                "Sweep of {} rates, each run {n} times (a step passes when every run passed its checks and the median e2e p95 is under the limit); this page details one run of the {} step ({:.0} msgs/s offered): the run whose e2e p95 is the median. Every step is in the Sweep table.\n",
                steps.len(),
                if knee.is_some() { "knee" } else { "last (no rate passed)" },
                r.scenario.rate
            );
        }
    }
    let _ = writeln!(o, "## Scenario\n");
    let _ = writeln!(o, "| setting | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| connections | {} ({} users × {} devices), {} worker process(es) |",
        r.connections_target,
        r.connections_target / u64::from(sc.devices_per_user),
        sc.devices_per_user,
        r.workers
    );
    let _ = writeln!(
        o,
        "| message mix | {}% 1:1, {}% group (sizes {}, {} groups of ≈{} per user) |",
        sc.direct_pct,
        sc.group_pct,
        sc.group_sizes,
        res.num("groups"),
        sc.groups_per_user
    );
    let _ = writeln!(
        o,
        "| contacts per user | {} on each side of a ring |",
        sc.contacts_per_user
    );
    let _ = writeln!(o, "| payload bytes | {} |", sc.payload_bytes);
    let _ = writeln!(
        o,
        "| target rate | {:.0} msgs/s, {:?} arrivals (open loop) |",
        sc.rate, sc.arrival
    );
    let _ = writeln!(
        o,
        "| warm-up / measured / drain limit | {:?} / {:?} / {:?} |",
        sc.warmup, sc.duration, sc.drain
    );
    let _ = writeln!(
        o,
        "| receipts | {} |",
        if sc.receipts {
            "Delivered cursor after every read that brought messages"
        } else {
            "off"
        }
    );
    let _ = writeln!(o, "| connect ramp | {} conns/s |\n", sc.connect_rate);
    let _ = writeln!(o, "## Results\n");
    let _ = writeln!(o, "| metric | value |\n|---|---|");
    let _ = writeln!(
        o,
        "| throughput (SendAcks received in the measured window / duration) | **{:.0} msgs/s** |",
        r.throughput()
    );
    let _ = writeln!(
        o,
        "| deliveries (to recipient devices, same window) | {:.0} /s |",
        r.deliveries_per_s()
    );
    let _ = writeln!(
        o,
        "| messages sent / acked / delivered | {} / {} / {} |",
        res.num("sent"),
        res.num("acked"),
        res.num("deliveries")
    );
    let _ = writeln!(
        o,
        "| connections established | {} of {} ({} connect errors) in {:.1} s |",
        res.num("conns_established"),
        r.connections_target,
        r.connect_errors_total(),
        res.num("connect_ms") as f64 / 1e3
    );
    let _ = writeln!(
        o,
        "| server RSS after connecting | {} |",
        rss.map_or("n/a".into(), |b| human_bytes(b as f64))
    );
    let _ = writeln!(
        o,
        "| server RSS per connection (delta / connections) | {} |",
        per_conn.map_or("n/a".into(), |b| format!("{b:.0} B"))
    );
    let _ = writeln!(
        o,
        "| server log index at the end (stored history held in memory; no retention) | {} |",
        r.server
            .end
            .filter(|e| e.index_messages > 0)
            .map_or("n/a".into(), |e| format!(
                "{} for {} messages ({:.1} B per message)",
                human_bytes(e.index_bytes as f64),
                e.index_messages,
                e.index_bytes as f64 / e.index_messages as f64
            ))
    );
    let _ = writeln!(
        o,
        "| server CPU (message phase) | {} |",
        opt(r.server.cpu_s.map(|c| format!("{c:.1} s")))
    );
    if let Some((f, b)) = server_commits(r) {
        let _ = writeln!(
            o,
            "| server group commits (message phase) | {} commits, {} records each on average; write + fdatasync mean {} µs, p50 {} µs, p99 {} µs, p99.9 {} µs (bucket bounds) |",
            f.count,
            opt(b.mean().map(|m| format!("{m:.1}"))),
            opt(f.mean().map(|m| format!("{m:.0}"))),
            le_text(f.quantile_le(0.5)),
            le_text(f.quantile_le(0.99)),
            le_text(f.quantile_le(0.999)),
        );
    }
    if let Some((conns, episodes)) = server_throttles(r) {
        let _ = writeln!(
            o,
            "| server back-pressure (message phase: shards under pressure, connections not read until it passed) | {episodes} pressure episodes, {conns} connection throttles |"
        );
    }
    if let Some((w, l)) = server_waits(r).filter(|(w, l)| w.count > 0 || l.count > 0) {
        let _ = writeln!(
            o,
            "| server commit wait (a commit's oldest record staged → its acks and deliveries handed on) | {} |",
            us_quantiles(&w)
        );
        let _ = writeln!(
            o,
            "| server reactor lag (how late a 10 ms timer ran on a core: the wait of anything that became ready there) | {} samples; {} |",
            l.count,
            us_quantiles(&l)
        );
    }
    let _ = writeln!(
        o,
        "| load generator CPU (all workers, connecting included) | {:.1} s |",
        r.client_cpu_s
    );
    let p = &r.phase_cpu;
    let _ = writeln!(
        o,
        "| machine CPU (message phase, {} CPUs over {:.1} s) | busy {}: server {}, load generator {}, everything else {}; interrupts (irq + softirq, mostly inside those) {} |",
        p.cpus,
        r.run_s,
        opt(p.machine_s.map(|c| format!("{c:.1} s"))),
        opt(r.server.cpu_s.map(|c| format!("{c:.1} s"))),
        opt(p.client_s.map(|c| format!("{c:.1} s"))),
        opt(p.other_s(r.server.cpu_s).map(|c| format!("{c:.1} s"))),
        opt(p.irq_s.map(|c| format!("{c:.1} s"))),
    );
    let _ = writeln!(
        o,
        "| drain took | {:.2} s |\n",
        res.num("drain_ns") as f64 / 1e9
    );
    let _ = writeln!(o, "Latency in ms, measured from the **scheduled** send time (no coordinated omission), warm-up excluded:\n");
    let _ = writeln!(
        o,
        "| latency | count | p50 | p95 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|"
    );
    o.push_str(&lat_row("send → delivery (e2e)", &r.hist("e2e")));
    o.push_str(&lat_row("send → SendAck", &r.hist("ack")));
    o.push_str(&lat_row("send → delivered Receipt", &r.hist("receipt")));
    o.push_str(&lat_row("connect + upgrade", &r.hist("connect")));
    o.push_str(&lat_row(
        "send lag (client late vs schedule)",
        &r.hist("send_lag"),
    ));
    o.push_str(&lat_row(
        "read lag (newest bytes in the socket → client read them; per read, a lower bound)",
        &r.hist("read_lag"),
    ));
    let _ = writeln!(o, "\n## Correctness\n");
    let _ = writeln!(o, "| check | count |\n|---|---|");
    for (k, what) in [
        (
            "lost",
            "acked, never delivered to an expected device by the end of the drain",
        ),
        ("duplicates", "a device received the same message twice"),
        (
            "order_violations",
            "a device received a chat's seq after a higher one",
        ),
        (
            "gaps",
            "seqs missing below the highest a device saw in a chat",
        ),
        ("unacked", "sent, never answered"),
        ("delivered_unacked", "delivered but never acked"),
        (
            "receipts_missing",
            "acked, no delivered receipt reached the sender",
        ),
        (
            "conns_dropped",
            "connections the server closed during the run",
        ),
    ] {
        let _ = writeln!(o, "| {k} ({what}) | {} |", res.num(k));
    }
    let _ = writeln!(o, "| errors | {} |", r.errors_total());
    for (k, v) in res
        .nums
        .iter()
        .filter(|(k, _)| k.starts_with("err.") || k.starts_with("cerr."))
    {
        let _ = writeln!(o, "| &nbsp; {k} | {v} |");
    }
    if let Some(sw) = sweep {
        sweep_markdown(&mut o, sw);
    }
    let _ = writeln!(
        o,
        "\nEverything ran on one machine: the load generator's workers, the server and the kernel's \
         loopback share the CPUs, so the figures are a lower bound for the server alone."
    );
    o
}

fn verdict(s: &Step) -> String {
    let v = verdict_only(s);
    match s.stop_text() {
        Some(t) => format!("{v}; {t}"),
        None => v,
    }
}

fn verdict_only(s: &Step) -> String {
    if s.under_knee() {
        "under the knee".into()
    } else if s.ok() {
        "p95 over the limit".into()
    } else if s.repeats() == 1 {
        "failed checks".into()
    } else {
        let failed: Vec<String> = s
            .runs
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.ok())
            .map(|(k, _)| (k + 1).to_string())
            .collect();
        format!("failed checks (run {})", failed.join(", "))
    }
}

fn spread_cell(s: Option<Spread>) -> String {
    s.map_or("–".into(), |s| {
        format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max)
    })
}

/// The Sweep section of report.md: the knee, one row per step, the half-knee runs.
fn sweep_markdown(o: &mut String, sw: &Sweep) {
    let (steps, knee) = (&sw.steps, sw.knee);
    let n = sw.repeats();
    let _ = writeln!(o, "\n## Sweep\n");
    let limit = steps
        .first()
        .map_or(100.0, |s| s.runs[0].scenario.knee_p95_ms);
    let _ = writeln!(
        o,
        "Knee = the highest rate with {}e2e p95 < {limit} ms, no errors and nothing lost{}: **{}**.\n",
        if n > 1 { "median " } else { "" },
        if n > 1 {
            format!(" in any of its {n} runs")
        } else {
            String::new()
        },
        knee.map_or("none of the rates passed".to_string(), |k| format!(
            "{:.0} msgs/s offered, {:.0} msgs/s achieved{}",
            steps[k].rate(),
            steps[k].throughput().median,
            if n > 1 { " (median)" } else { "" }
        ))
    );
    if n == 1 {
        let _ = writeln!(o, "| offered msgs/s | achieved msgs/s | e2e p50 | p95 | p99 | p99.9 | max | lost | errors | verdict |\n|---|---|---|---|---|---|---|---|---|---|");
        for st in steps {
            let s = &st.runs[0];
            let h = s.hist("e2e");
            let q = |p: f64| {
                if h.is_empty() {
                    "–".to_string()
                } else {
                    format!("{:.2}", ms(h.value_at_quantile(p)))
                }
            };
            let _ = writeln!(
                o,
                "| {:.0} | {:.0} | {} | {} | {} | {} | {:.2} | {} | {} | {} |",
                s.scenario.rate,
                s.throughput(),
                q(0.5),
                q(0.95),
                q(0.99),
                q(0.999),
                ms(h.max()),
                s.result.num("lost"),
                s.errors_total(),
                verdict(st)
            );
        }
    } else {
        let _ = writeln!(
            o,
            "Each rate ran {n} times (fewer where the verdict says the step stopped early: it could no longer pass); figures are the median over the runs (for an even count the worse middle one: the higher latency, the lower throughput) with min–max in brackets; lost and errors are summed over the runs.\n"
        );
        let _ = writeln!(o, "| offered msgs/s | achieved msgs/s median (min–max) | e2e p50 median | p95 median (min–max) | p99 median (min–max) | lost | errors | verdict |\n|---|---|---|---|---|---|---|---|");
        for st in steps {
            let tp = st.throughput();
            let _ = writeln!(
                o,
                "| {:.0} | {:.0} ({:.0}–{:.0}) | {} | {} | {} | {} | {} | {} |",
                st.rate(),
                tp.median,
                tp.min,
                tp.max,
                st.e2e_ms(0.5)
                    .map_or("–".into(), |s| format!("{:.2}", s.median)),
                spread_cell(st.e2e_ms(0.95)),
                spread_cell(st.e2e_ms(0.99)),
                st.lost(),
                st.errors_total(),
                verdict(st)
            );
        }
    }
    let Some(hk) = &sw.half_knee else {
        return;
    };
    let checks = if hk.ok() {
        "checks passed".to_string()
    } else {
        format!("FAILED: {}", hk.failures().join("; "))
    };
    if hk.repeats() == 1 {
        let h = &hk.runs[0];
        let e2e = h.hist("e2e");
        let rc = h.hist("receipt");
        let q = |hist: &Histogram<u64>, p: f64| {
            if hist.is_empty() {
                "–".to_string()
            } else {
                format!("{:.2}", ms(hist.value_at_quantile(p)))
            }
        };
        let _ = writeln!(
            o,
            "\nAt half the knee (a separate run at {:.0} msgs/s offered, {:.0} achieved; {checks}): \
             e2e p50 {} ms, p95 {} ms, **p99 {} ms**, p99.9 {} ms; send → delivered receipt p99 {} ms.",
            h.scenario.rate,
            h.throughput(),
            q(&e2e, 0.5),
            q(&e2e, 0.95),
            q(&e2e, 0.99),
            q(&e2e, 0.999),
            q(&rc, 0.99),
        );
    } else {
        let med = |q: f64| {
            hk.e2e_ms(q)
                .map_or("–".into(), |s| format!("{:.2}", s.median))
        };
        let range = |q: f64| {
            hk.e2e_ms(q)
                .map_or("–".into(), |s| format!("{:.2}–{:.2}", s.min, s.max))
        };
        let tp = hk.throughput();
        let _ = writeln!(
            o,
            "\nAt half the knee ({} separate runs at {:.0} msgs/s offered, median {:.0} achieved ({:.0}–{:.0}); {checks}): \
             e2e p50 {} ms, p95 {} ms ({}), **p99 {} ms** ({}) (medians over the runs, min–max in brackets).",
            hk.repeats(),
            hk.rate(),
            tp.median,
            tp.min,
            tp.max,
            med(0.5),
            med(0.95),
            range(0.95),
            med(0.99),
            range(0.99),
        );
    }
}

fn phase_marks(r: &RunResult) -> Vec<(f64, String)> {
    let w = r.scenario.warmup.as_secs_f64();
    let d = r.scenario.duration.as_secs_f64();
    vec![(w, "measure".into()), (w + d, "drain".into())]
}

fn timeline_series(rows: &[Row], name: &str, f: impl Fn(&Row) -> Option<f64>) -> Series {
    Series {
        name: name.into(),
        points: rows
            .iter()
            .filter_map(|r| f(r).map(|v| (r.sec as f64 + 1.0, v)))
            .collect(),
        labels: Vec::new(),
        whiskers: Vec::new(),
    }
}

fn q_ms(h: &Histogram<u64>, p: f64) -> Option<f64> {
    (!h.is_empty()).then(|| ms(h.value_at_quantile(p)))
}

/// The HDR percentile distribution: x = log10(1 / (1 − p)).
fn hdr_series(name: &str, h: &Histogram<u64>) -> Series {
    let mut points = Vec::new();
    if !h.is_empty() {
        for v in h.iter_quantiles(4) {
            let p = v.quantile_iterated_to().min(0.99999);
            points.push((
                (1.0 / (1.0 - p)).log10(),
                ms(v.value_iterated_to()).max(0.001),
            ));
            if p >= 0.99999 {
                break;
            }
        }
    }
    Series {
        name: name.into(),
        points,
        labels: Vec::new(),
        whiskers: Vec::new(),
    }
}

fn hdr_ticks() -> Vec<(f64, String)> {
    ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
        .map(|(i, l)| (i as f64, l.to_string()))
        .collect()
}

pub fn charts(r: &RunResult, sweep: Option<&Sweep>) -> Vec<String> {
    let mut out = Vec::new();
    let rows = &r.timeline;
    if let Some(sw @ Sweep { steps, .. }) = sweep {
        let limit = steps
            .first()
            .map_or(100.0, |s| s.runs[0].scenario.knee_p95_ms);
        let n = sw.repeats();
        let mut series = Vec::new();
        for (name, p) in [("e2e p50", 0.5), ("e2e p95", 0.95), ("e2e p99", 0.99)] {
            // Each step at its median throughput and median latency (one run: that run's).
            let with: Vec<(&Step, Spread)> = steps
                .iter()
                .filter_map(|s| s.e2e_ms(p).map(|l| (s, l)))
                .collect();
            let x = |s: &Step| s.throughput().median;
            series.push(Series {
                name: name.into(),
                points: with.iter().map(|(s, l)| (x(s), l.median)).collect(),
                // The offered rate next to each p95 point: past the knee achieved throughput
                // falls while the offered rate rises, and the curve turns back.
                labels: if p == 0.95 {
                    with.iter()
                        .map(|(s, _)| format!("{} offered", svg::fmt_num(s.rate())))
                        .collect()
                } else {
                    Vec::new()
                },
                // With repeats, the min–max of the latency over each step's runs.
                whiskers: if n > 1 {
                    with.iter().map(|(s, l)| (x(s), l.min, l.max)).collect()
                } else {
                    Vec::new()
                },
            });
        }
        out.push(svg::render(&Chart {
            title: if n > 1 {
                format!("Sweep: achieved throughput vs end-to-end latency (median of {n} runs, min–max bars)")
            } else {
                "Sweep: achieved throughput vs end-to-end latency".into()
            },
            x: Axis::linear("achieved msgs/s (acks in the measured window)"),
            y: Axis::log("latency (ms, log)"),
            series,
            vmarks: Vec::new(),
            hline: Some((limit, format!("p95 limit {limit} ms"))),
        }));
    }
    out.push(svg::render(&Chart {
        title: "End-to-end latency per second (send → delivery)".into(),
        x: Axis::linear("seconds since go"),
        y: Axis::log("latency (ms, log)"),
        series: vec![
            timeline_series(rows, "p50", |r| q_ms(&r.e2e, 0.5)),
            timeline_series(rows, "p99", |r| q_ms(&r.e2e, 0.99)),
            timeline_series(rows, "p99.9", |r| q_ms(&r.e2e, 0.999)),
            timeline_series(rows, "max", |r| {
                (!r.e2e.is_empty()).then(|| ms(r.e2e.max()))
            }),
            timeline_series(rows, "ack p99", |r| q_ms(&r.ack, 0.99)),
        ],
        vmarks: phase_marks(r),
        hline: None,
    }));
    out.push(svg::render(&Chart {
        title: "Throughput per second".into(),
        x: Axis::linear("seconds since go"),
        y: Axis::linear("per second"),
        series: vec![
            timeline_series(rows, "sends", |r| Some(r.sends as f64)),
            timeline_series(rows, "acks", |r| Some(r.acks as f64)),
            timeline_series(rows, "deliveries", |r| Some(r.deliveries as f64)),
            timeline_series(rows, "receipts", |r| Some(r.receipts as f64)),
        ],
        vmarks: phase_marks(r),
        hline: None,
    }));
    out.push(svg::render(&Chart {
        title: "Latency by percentile (HDR distribution, measured window)".into(),
        x: Axis {
            label: "percentile".into(),
            log: false,
            ticks: Some(hdr_ticks()),
        },
        y: Axis::log("latency (ms, log)"),
        series: vec![
            hdr_series("e2e", &r.hist("e2e")),
            hdr_series("ack", &r.hist("ack")),
            hdr_series("receipt", &r.hist("receipt")),
            hdr_series("connect", &r.hist("connect")),
        ],
        vmarks: Vec::new(),
        hline: None,
    }));
    out
}

/// report.html: the Markdown report's numbers as HTML tables plus the charts.
pub fn html(r: &RunResult, sweep: Option<&Sweep>) -> String {
    let md = markdown(r, sweep);
    let mut charts = String::new();
    for c in self::charts(r, sweep) {
        let _ = write!(charts, "<figure>{c}</figure>");
    }
    let mut body = String::new();
    let mut in_table = false;
    for line in md.lines() {
        if line.starts_with('|') {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
                continue;
            }
            if !in_table {
                body.push_str("<table>");
                in_table = true;
                body.push_str("<tr>");
                for c in &cells {
                    let _ = write!(body, "<th>{}</th>", inline(c));
                }
                body.push_str("</tr>");
                continue;
            }
            body.push_str("<tr>");
            for c in &cells {
                let _ = write!(body, "<td>{}</td>", inline(c));
            }
            body.push_str("</tr>");
            continue;
        }
        if in_table {
            body.push_str("</table>");
            in_table = false;
        }
        if let Some(h) = line.strip_prefix("## ") {
            if h == "Scenario" {
                // The plots come right after the verdict, before the detail.
                let _ = write!(body, "<h2>Plots</h2>{charts}");
            }
            let _ = write!(body, "<h2>{}</h2>", inline(h));
        } else if let Some(h) = line.strip_prefix("# ") {
            let _ = write!(body, "<h1>{}</h1>", inline(h));
        } else if !line.trim().is_empty() {
            let _ = write!(body, "<p>{}</p>", inline(line));
        }
    }
    if in_table {
        body.push_str("</table>");
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Switchboard load report: {}</title>\
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}}\
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}\
th{{background:#f4f4f4}}figure{{margin:1em 0}}code{{background:#f4f4f4}}</style></head><body>\
{body}</body></html>\n",
        esc(&r.scenario.name)
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Markdown `**bold**` and `` `code` `` to HTML, escaping the rest.
fn inline(s: &str) -> String {
    let s = esc(s).replace("&amp;nbsp;", "&nbsp;");
    let mut out = String::new();
    let mut bold = false;
    let mut code = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '*' && chars.peek() == Some(&'*') {
            chars.next();
            out.push_str(if bold { "</b>" } else { "<b>" });
            bold = !bold;
        } else if c == '`' {
            out.push_str(if code { "</code>" } else { "<code>" });
            code = !code;
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes report.json, report.md and report.html into `dir`.
pub fn write_all(dir: &Path, json: &Value, md: &str, html: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let w = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("write {}: {e}", p.display()))
    };
    let pretty = serde_json::to_string_pretty(json).map_err(|e| format!("report.json: {e}"))?;
    w("report.json", &(pretty + "\n"))?;
    w("report.md", md)?;
    w("report.html", html)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::{PhaseCpu, ServerView};
    use crate::metrics::Scrape;
    use crate::proto::Record;
    use crate::report::latency_histogram;
    use crate::scenario::Scenario;

    fn sample(rate: f64, e2e_us: u64) -> RunResult {
        let mut res = Record::new("result");
        res.set("conns_established", 100);
        res.set("sent", 1000);
        res.set("acked", 1000);
        res.set("deliveries", 1000);
        res.set("acks_window", (rate * 30.0) as u64);
        res.set("deliveries_window", (rate * 30.0) as u64);
        let mut h = latency_histogram();
        for i in 0..1000 {
            h.record(e2e_us + i).expect("in range");
        }
        res.hists.insert("e2e".into(), h.clone());
        res.hists.insert("ack".into(), h);
        let mut row_h = latency_histogram();
        row_h.record(e2e_us).expect("in range");
        let timeline = (0..40)
            .map(|s| Row {
                sec: s,
                phase: phase::MEASURE,
                conns: 100,
                sends: rate as u64,
                acks: rate as u64,
                deliveries: rate as u64,
                receipts: 0,
                errors: 0,
                e2e: row_h.clone(),
                ack: row_h.clone(),
            })
            .collect();
        RunResult {
            scenario: Scenario {
                rate,
                ..Scenario::default()
            },
            started_at: "2026-01-01T00:00:00Z".into(),
            workers: 1,
            first_user: 1,
            connections_target: 100,
            result: res,
            timeline,
            server: ServerView {
                before: Some(Scrape {
                    rss_bytes: 1_000_000,
                    cores: 2,
                    ..Scrape::default()
                }),
                connected: Some(Scrape {
                    rss_bytes: 1_500_000,
                    cores: 2,
                    ..Scrape::default()
                }),
                end: None,
                cpu_s: None,
            },
            client_cpu_s: 1.0,
            phase_cpu: PhaseCpu {
                machine_s: Some(70.0),
                irq_s: Some(5.0),
                cpus: 2,
                client_s: Some(20.0),
            },
            run_s: 40.0,
            failures: Vec::new(),
        }
    }

    #[test]
    fn json_has_the_issue_fields() {
        let r = sample(1000.0, 2000);
        let j = run_json(&r);
        for k in [
            "scenario",
            "started_at",
            "duration_s",
            "connections_target",
            "connections_established",
            "connect_errors",
            "messages_sent",
            "messages_acked",
            "messages_delivered",
            "throughput_msgs_per_s",
            "deliveries_per_s",
            "lost",
            "duplicates",
            "order_violations",
            "server_rss_bytes",
            "bytes_per_connection",
        ] {
            assert!(j.get(k).is_some(), "missing {k}");
        }
        for l in ["e2e", "ack", "receipt", "connect"] {
            for p in ["p50", "p95", "p99", "p999", "max"] {
                assert!(
                    j["latency_ms"][l].get(p).is_some(),
                    "missing latency_ms.{l}.{p}"
                );
            }
        }
        assert_eq!(j["bytes_per_connection"], json!(5000.0));
        assert_eq!(j["throughput_msgs_per_s"], json!(1000.0));
        assert_eq!(j["server_cores"], json!(2));
        assert!((j["latency_ms"]["e2e"]["p50"].as_f64().expect("p50") - 2.5).abs() < 0.01);
        // The machine's CPU split: the rest is unknown while the server's CPU is.
        assert_eq!(j["phase_cpu"]["machine_s"], json!(70.0));
        assert_eq!(j["phase_cpu"]["other_s"], Value::Null);
        let mut known = r.clone();
        known.server.cpu_s = Some(30.0);
        let j = run_json(&known);
        assert_eq!(j["phase_cpu"]["other_s"], json!(20.0));
        assert!(
            markdown(&known, None).contains("everything else 20.0 s"),
            "{}",
            markdown(&known, None)
        );
    }

    #[test]
    fn sweep_report_and_html() {
        let steps = vec![
            sample(1000.0, 2000),
            sample(2000.0, 5000),
            sample(4000.0, 300_000),
        ];
        assert!(steps[1].under_knee() && !steps[2].under_knee());
        let mut sw = Sweep {
            steps: steps.into_iter().map(|r| Step::new(vec![r])).collect(),
            knee: Some(1),
            half_knee: None,
        };
        let j = sweep_json(&sw);
        assert_eq!(j["sweep"]["knee_rate"], json!(2000.0));
        assert_eq!(j["sweep"]["steps"].as_array().expect("steps").len(), 3);
        assert_eq!(j["sweep"]["half_knee"], Value::Null);
        assert_eq!(j["rate_target"], json!(2000.0));
        let md = markdown(sw.main_step(), Some(&sw));
        assert!(md.contains("## Sweep") && md.contains("under the knee"));
        assert!(!md.contains("half the knee"));
        let h = html(sw.main_step(), Some(&sw));
        assert_eq!(h.matches("<svg").count(), 4);
        assert!(h.contains("<table>") && !h.contains("NaN"));
        assert!(h.contains("<b>PASS</b>"));

        // The half-knee run is reported beside the steps, with its own p99.
        sw.half_knee = Some(Step::new(vec![sample(1000.0, 7000)]));
        let j = sweep_json(&sw);
        assert_eq!(j["sweep"]["half_knee"]["rate"], json!(1000.0));
        assert_eq!(j["sweep"]["steps"].as_array().expect("steps").len(), 3);
        let p99 = j["sweep"]["half_knee"]["latency_ms"]["e2e"]["p99"]
            .as_f64()
            .expect("half-knee p99");
        let md = markdown(sw.main_step(), Some(&sw));
        let line = md
            .lines()
            .find(|l| l.starts_with("At half the knee"))
            .expect("half-knee line");
        assert!(line.contains("1000 msgs/s offered"), "{line}");
        assert!(line.contains(&format!("**p99 {p99:.2} ms**")), "{line}");
    }

    #[test]
    fn one_run_per_rate_reports_as_before() {
        let sw = Sweep {
            steps: vec![Step::new(vec![sample(1000.0, 2000)])],
            knee: Some(0),
            half_knee: None,
        };
        let j = sweep_json(&sw);
        let st = &j["sweep"]["steps"][0];
        assert_eq!(st["repeats"], json!(1));
        assert_eq!(st["runs"].as_array().map(Vec::len), Some(1));
        // The step's fields are its only run's, and median = min = max = that run.
        let mut only = st["runs"][0].clone();
        let mut top = st.clone();
        for k in [
            "repeats",
            "stopped_early",
            "stop_reason",
            "runs",
            "median",
            "min",
            "max",
        ] {
            top.as_object_mut().expect("object").remove(k);
        }
        only.as_object_mut().expect("object");
        assert_eq!(top, only);
        assert_eq!(st["median"], st["min"]);
        assert_eq!(st["median"], st["max"]);
        assert_eq!(st["median"]["e2e_p95_ms"], st["latency_ms"]["e2e"]["p95"]);
        let md = markdown(sw.main_step(), Some(&sw));
        assert!(md.contains("| offered msgs/s | achieved msgs/s | e2e p50 | p95 | p99 |"));
        assert!(!md.contains("median"), "{md}");
        let h = html(sw.main_step(), Some(&sw));
        assert!(!h.contains("whisker") && !h.contains("median of"));
    }

    #[test]
    fn repeated_steps_report_median_and_spread() {
        // Three runs per rate: p95 ≈ 2.95, 5.95 and 3.95 ms at 1000; the middle is 3.95 ms.
        let a = Step::new(vec![
            sample(1000.0, 2000),
            sample(1100.0, 5000),
            sample(900.0, 3000),
        ]);
        // At 2000 one run failed its checks although the median p95 is fine.
        let mut bad = sample(2000.0, 4000);
        bad.failures = vec!["lost = 1".into()];
        bad.result.set("lost", 1);
        let b = Step::new(vec![sample(2000.0, 4000), bad, sample(2000.0, 6000)]);
        assert!(a.under_knee() && !b.under_knee());
        let sw = Sweep {
            steps: vec![a, b],
            knee: Some(0),
            half_knee: Some(Step::new(vec![
                sample(500.0, 1000),
                sample(500.0, 9000),
                sample(500.0, 2000),
            ])),
        };
        let j = sweep_json(&sw);
        assert_eq!(j["sweep"]["repeats"], json!(3));
        let s0 = &j["sweep"]["steps"][0];
        assert_eq!(s0["repeats"], json!(3));
        assert_eq!(s0["runs"].as_array().map(Vec::len), Some(3));
        let p95 = |v: &Value| v.as_f64().expect("number");
        assert!(
            (p95(&s0["median"]["e2e_p95_ms"]) - 3.95).abs() < 0.01,
            "{s0:#}"
        );
        assert!(
            (p95(&s0["min"]["e2e_p95_ms"]) - 2.95).abs() < 0.01,
            "{s0:#}"
        );
        assert!(
            (p95(&s0["max"]["e2e_p95_ms"]) - 5.95).abs() < 0.01,
            "{s0:#}"
        );
        assert_eq!(s0["median"]["throughput_msgs_per_s"], json!(1000.0));
        assert_eq!(s0["min"]["throughput_msgs_per_s"], json!(900.0));
        // The step's detail fields are the median run's (the one at 900 msgs/s achieved).
        assert_eq!(s0["latency_ms"]["e2e"]["p95"], s0["median"]["e2e_p95_ms"]);
        assert_eq!(s0["throughput_msgs_per_s"], json!(900.0));
        assert_eq!(
            j["throughput_msgs_per_s"],
            json!(900.0),
            "top = knee's median run"
        );
        assert_eq!(j["sweep"]["knee_throughput_msgs_per_s"], json!(1000.0));
        // Correctness is not a vote: the failing run fails the step, whichever run is detailed.
        let s1 = &j["sweep"]["steps"][1];
        assert_eq!(s1["ok"], json!(false));
        assert_eq!(s1["under_knee"], json!(false));
        assert_eq!(s1["lost"], json!(1));
        assert_eq!(s1["failures"], json!(["run 2/3: lost = 1"]));
        assert_eq!(s1["runs"][0]["ok"], json!(true));
        let hk = &j["sweep"]["half_knee"];
        assert_eq!(hk["runs"].as_array().map(Vec::len), Some(3));
        assert!(
            (p95(&hk["median"]["e2e_p99_ms"]) - 2.99).abs() < 0.01,
            "{hk:#}"
        );

        let md = markdown(sw.main_step(), Some(&sw));
        assert!(md.contains("each run 3 times"), "{md}");
        assert!(
            md.contains("| p95 median (min–max) | p99 median (min–max) |"),
            "{md}"
        );
        assert!(md.contains("| 1000 | 1000 (900–1100) |"), "{md}");
        assert!(md.contains("| 3.95 (2.95–5.95) |"), "{md}");
        assert!(md.contains("failed checks (run 2)"), "{md}");
        let line = md
            .lines()
            .find(|l| l.starts_with("At half the knee"))
            .expect("half-knee line");
        assert!(line.contains("3 separate runs at 500 msgs/s"), "{line}");
        assert!(line.contains("**p99 2.99 ms** (1.99–9.99)"), "{line}");
        let h = html(sw.main_step(), Some(&sw));
        assert!(h.contains("median of 3 runs"));
        // One min–max bar per step for p50, p95 and p99.
        assert_eq!(h.matches(r#"class="whisker""#).count(), 6, "{h}");
        assert!(!h.contains("NaN"));
    }

    #[test]
    fn a_step_stopped_early_says_so_in_json_and_markdown() {
        let stopped = Step::stopped(
            vec![sample(3000.0, 150_000), sample(3000.0, 120_000)],
            3,
            Some(crate::coord::Stop::Latency {
                over: 2,
                limit_ms: 100.0,
            }),
        );
        let full = Step::new(vec![
            sample(1000.0, 2000),
            sample(1000.0, 3000),
            sample(1000.0, 4000),
        ]);
        let sw = Sweep {
            steps: vec![full, stopped],
            knee: Some(0),
            half_knee: None,
        };
        let j = sweep_json(&sw);
        let (s0, s1) = (&j["sweep"]["steps"][0], &j["sweep"]["steps"][1]);
        assert_eq!(s0["stopped_early"], json!(false));
        assert_eq!(s0["stop_reason"], Value::Null);
        assert_eq!(s1["stopped_early"], json!(true));
        assert_eq!(s1["repeats"], json!(3));
        assert_eq!(s1["runs"].as_array().map(Vec::len), Some(2));
        assert!(
            s1["stop_reason"]
                .as_str()
                .is_some_and(|t| t.starts_with("stopped after 2 of 3 runs")),
            "{s1:#}"
        );
        let md = markdown(sw.main_step(), Some(&sw));
        let row = md
            .lines()
            .find(|l| l.starts_with("| 3000 |"))
            .expect("the stopped step's row");
        assert!(
            row.contains("p95 over the limit; stopped after 2 of 3 runs"),
            "{row}"
        );
    }
}
