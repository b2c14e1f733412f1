//! `plan`: capacity-planning arithmetic from a measured report.json. Prints Markdown that shows
//! every step, so the reader can redo it with other assumptions.
//!
//! ```text
//!  report.json ─► measured: knee msgs/s per box, server cores, server bytes per connection,
//!                 server index bytes per stored message
//!  --users, --msgs-per-user-day, --peak-factor, --headroom, devices, online share, box memory,
//!  --history-days
//!      ─► boxes for throughput, boxes for connections (memory, descriptors), boxes for memory
//!         (connections + stored history's index) ─► max ─► limiting
//! ```

use std::fmt::Write;
use std::path::Path;

use serde_json::Value;

/// What the plan needs from a report.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Messages per second one box sustains (the knee of a sweep, else the run's throughput).
    pub msgs_per_s: f64,
    /// Whether `msgs_per_s` is a sweep knee (true) or just the rate one run achieved.
    pub is_knee: bool,
    pub server_cores: u64,
    /// Server user-space bytes per idle connection (RSS delta / connections).
    pub bytes_per_connection: Option<f64>,
    /// Server CPU seconds per acked message, when the run knew the server's pid.
    pub cpu_s_per_msg: Option<f64>,
    /// Heap bytes of the server's in-memory log index per stored message (report.json
    /// `server_index.bytes_per_message`): stored history costs memory until there is retention.
    pub index_bytes_per_message: Option<f64>,
    pub connections: u64,
    pub source: String,
    /// The report is a sweep in which no rate passed: `msgs_per_s` is only the best a failing
    /// step achieved.
    pub sweep_without_knee: bool,
}

impl Measured {
    pub fn from_report(v: &Value, source: &str) -> Result<Measured, String> {
        let knee = v["sweep"]["knee_throughput_msgs_per_s"].as_f64();
        let sweep_without_knee = v["sweep"].is_object() && knee.is_none();
        let (msgs_per_s, is_knee) = match knee {
            Some(k) => (k, true),
            None if sweep_without_knee => (
                v["sweep"]["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["throughput_msgs_per_s"].as_f64())
                    .fold(0.0, f64::max),
                false,
            ),
            None => (
                v["throughput_msgs_per_s"]
                    .as_f64()
                    .ok_or("report has no throughput_msgs_per_s")?,
                false,
            ),
        };
        if msgs_per_s.is_nan() || msgs_per_s <= 0.0 {
            return Err("the report's throughput is 0: nothing to plan with".into());
        }
        let acked = v["messages_acked"].as_f64().unwrap_or(0.0);
        let cpu = v["server_cpu_s"].as_f64();
        Ok(Measured {
            msgs_per_s,
            is_knee,
            server_cores: v["server_cores"].as_u64().filter(|&c| c > 0).unwrap_or(1),
            bytes_per_connection: v["bytes_per_connection"].as_f64().filter(|b| *b > 0.0),
            cpu_s_per_msg: cpu.filter(|_| acked > 0.0).map(|c| c / acked),
            index_bytes_per_message: v["server_index"]["bytes_per_message"]
                .as_f64()
                .filter(|b| *b > 0.0),
            connections: v["connections_established"].as_u64().unwrap_or(0),
            source: source.to_string(),
            sweep_without_knee,
        })
    }
}

/// The planner's inputs besides the measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct Demand {
    pub users: f64,
    pub msgs_per_user_day: f64,
    pub peak_factor: f64,
    /// Share of capacity kept free (0.3 = plan to 70 %).
    pub headroom: f64,
    pub devices_per_user: f64,
    /// Share of devices connected at the peak.
    pub online_share: f64,
    /// Memory of one box, bytes.
    pub box_memory_bytes: f64,
    /// Kernel memory per connection (socket, file, epoll/io_uring entries), bytes.
    pub kernel_bytes_per_connection: f64,
    /// Connections one server process may hold (its open-file limit).
    pub conns_per_box_max: f64,
    /// Server bytes per connection when the report has none.
    pub bytes_per_connection_default: f64,
    /// Server bytes per connection given on the command line; overrides the report.
    pub bytes_per_connection: Option<f64>,
    /// Days of sent messages the servers keep (the embedded store keeps all; its index holds
    /// every one in memory). 0 leaves stored history out of the plan.
    pub history_days: f64,
}

/// Stored history's share of memory (with a measured index cost and `history_days` > 0).
#[derive(Clone, Debug, PartialEq)]
pub struct History {
    pub stored_messages: f64,
    pub index_bytes: f64,
    /// Boxes whose usable memory holds every connection plus the index.
    pub boxes_for_memory: u64,
    /// Index growth of the whole fleet per day.
    pub index_bytes_per_day: f64,
    /// Days of history the planned boxes hold next to their connections.
    pub days_to_full: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub avg_msgs_per_s: f64,
    pub peak_msgs_per_s: f64,
    pub usable_msgs_per_box: f64,
    pub boxes_for_throughput: u64,
    pub connections: f64,
    pub bytes_per_connection: f64,
    pub conns_per_box_by_memory: f64,
    pub conns_per_box: f64,
    pub boxes_for_connections: u64,
    pub history: Option<History>,
    pub boxes: u64,
    pub cores: u64,
    pub limiting: &'static str,
}

pub fn plan(m: &Measured, d: &Demand) -> Result<Plan, String> {
    if !(0.0..1.0).contains(&d.headroom) {
        return Err("--headroom must be in [0, 1)".into());
    }
    if !(d.users > 0.0 && d.msgs_per_user_day >= 0.0 && d.peak_factor >= 1.0) {
        return Err("--users must be > 0, --msgs-per-user-day >= 0, --peak-factor >= 1".into());
    }
    if !(d.online_share > 0.0 && d.online_share <= 1.0) {
        return Err("--online-share must be in (0, 1]".into());
    }
    if d.history_days.is_nan() || d.history_days < 0.0 {
        return Err("--history-days must be >= 0".into());
    }
    let avg = d.users * d.msgs_per_user_day / 86_400.0;
    let peak = avg * d.peak_factor;
    let usable = m.msgs_per_s * (1.0 - d.headroom);
    let boxes_tp = (peak / usable).ceil().max(1.0) as u64;
    let conns = d.users * d.devices_per_user * d.online_share;
    let bpc = d
        .bytes_per_connection
        .or(m.bytes_per_connection)
        .unwrap_or(d.bytes_per_connection_default);
    let by_mem = d.box_memory_bytes * (1.0 - d.headroom) / (bpc + d.kernel_bytes_per_connection);
    let per_box = by_mem.min(d.conns_per_box_max);
    let boxes_conn = (conns / per_box).ceil().max(1.0) as u64;
    let usable_mem = d.box_memory_bytes * (1.0 - d.headroom);
    let conns_mem = conns * (bpc + d.kernel_bytes_per_connection);
    let history = m
        .index_bytes_per_message
        .filter(|_| d.history_days > 0.0)
        .map(|b| {
            let per_day = d.users * d.msgs_per_user_day * b;
            let stored = d.users * d.msgs_per_user_day * d.history_days;
            let index = stored * b;
            let boxes_mem = ((conns_mem + index) / usable_mem).ceil().max(1.0) as u64;
            let fleet = boxes_tp.max(boxes_conn).max(boxes_mem) as f64;
            History {
                stored_messages: stored,
                index_bytes: index,
                boxes_for_memory: boxes_mem,
                index_bytes_per_day: per_day,
                days_to_full: if per_day > 0.0 {
                    (fleet * usable_mem - conns_mem) / per_day
                } else {
                    f64::INFINITY
                },
            }
        });
    let boxes_mem = history.as_ref().map_or(0, |h| h.boxes_for_memory);
    let boxes = boxes_tp.max(boxes_conn).max(boxes_mem);
    let limiting = if boxes_mem > boxes_tp.max(boxes_conn) {
        "memory (connections + stored history's index)"
    } else if boxes_tp >= boxes_conn {
        "message throughput (CPU, disk fsync)"
    } else if by_mem < d.conns_per_box_max {
        "connections (memory)"
    } else {
        "connections (open-file limit per process)"
    };
    Ok(Plan {
        avg_msgs_per_s: avg,
        peak_msgs_per_s: peak,
        usable_msgs_per_box: usable,
        boxes_for_throughput: boxes_tp,
        connections: conns,
        bytes_per_connection: bpc,
        conns_per_box_by_memory: by_mem,
        conns_per_box: per_box,
        boxes_for_connections: boxes_conn,
        history,
        boxes,
        cores: boxes * m.server_cores,
        limiting,
    })
}

fn n(v: f64) -> String {
    // Thousands separators for readability.
    let s = format!("{:.0}", v);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

pub fn markdown(m: &Measured, d: &Demand, p: &Plan) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# Capacity plan\n");
    let _ = writeln!(
        o,
        "Measured in `{}`: **{} msgs/s per box** ({}), on {} server core(s); server memory {} per connection.\n",
        m.source,
        n(m.msgs_per_s),
        if m.is_knee {
            "the sweep's knee: highest rate with p95 under the limit, no errors, nothing lost"
        } else if m.sweep_without_knee {
            "WARNING: no swept rate passed the knee test; this is the best throughput a FAILING \
             step achieved, an upper bound at unacceptable latency"
        } else {
            "the throughput of a single run, NOT a knee: run a sweep to know the real limit"
        },
        m.server_cores,
        match (d.bytes_per_connection, m.bytes_per_connection) {
            (Some(b), _) => format!("{} B (given with --bytes-per-connection)", n(b)),
            (None, Some(b)) => format!(
                "{} B (measured in the report, {} connections)",
                n(b),
                n(m.connections as f64)
            ),
            (None, None) => format!(
                "{} B (assumed: the report has none; give --bytes-per-connection)",
                n(d.bytes_per_connection_default)
            ),
        }
    );
    let _ = writeln!(o, "## Messages\n");
    let _ = writeln!(o, "```text");
    let _ = writeln!(
        o,
        "average  = users × msgs/user/day / 86,400 s = {} × {} / 86,400 = {} msgs/s",
        n(d.users),
        n(d.msgs_per_user_day),
        n(p.avg_msgs_per_s)
    );
    let _ = writeln!(
        o,
        "peak     = average × peak factor            = {} × {} = {} msgs/s",
        n(p.avg_msgs_per_s),
        d.peak_factor,
        n(p.peak_msgs_per_s)
    );
    let _ = writeln!(
        o,
        "per box  = measured × (1 − headroom)        = {} × (1 − {}) = {} msgs/s",
        n(m.msgs_per_s),
        d.headroom,
        n(p.usable_msgs_per_box)
    );
    let _ = writeln!(
        o,
        "boxes    = ⌈peak / per box⌉                 = ⌈{} / {}⌉ = {}",
        n(p.peak_msgs_per_s),
        n(p.usable_msgs_per_box),
        p.boxes_for_throughput
    );
    if let Some(c) = m.cpu_s_per_msg {
        let cores = p.peak_msgs_per_s * c / (1.0 - d.headroom);
        let _ = writeln!(
            o,
            "cross-check: server CPU per message = {:.1} µs → peak needs {:.1} cores at {}% busy",
            c * 1e6,
            cores,
            ((1.0 - d.headroom) * 100.0).round()
        );
    }
    let _ = writeln!(o, "```\n");
    let _ = writeln!(o, "## Connections\n");
    let _ = writeln!(o, "```text");
    let _ = writeln!(
        o,
        "online   = users × devices × online share   = {} × {} × {} = {} connections",
        n(d.users),
        d.devices_per_user,
        d.online_share,
        n(p.connections)
    );
    let _ = writeln!(
        o,
        "memory   = box memory × (1 − headroom) / (server + kernel bytes per conn)\n         = {} × (1 − {}) / ({} + {}) = {} connections per box",
        n(d.box_memory_bytes),
        d.headroom,
        n(p.bytes_per_connection),
        n(d.kernel_bytes_per_connection),
        n(p.conns_per_box_by_memory)
    );
    let _ = writeln!(
        o,
        "per box  = min(memory, open-file limit)     = min({}, {}) = {}",
        n(p.conns_per_box_by_memory),
        n(d.conns_per_box_max),
        n(p.conns_per_box)
    );
    let _ = writeln!(
        o,
        "boxes    = ⌈online / per box⌉               = ⌈{} / {}⌉ = {}",
        n(p.connections),
        n(p.conns_per_box),
        p.boxes_for_connections
    );
    let _ = writeln!(o, "```\n");
    let _ = writeln!(o, "## Stored history\n");
    match (&p.history, m.index_bytes_per_message) {
        (Some(h), Some(b)) => {
            let _ = writeln!(o, "```text");
            let _ = writeln!(
                o,
                "stored   = users × msgs/user/day × days     = {} × {} × {} = {} messages",
                n(d.users),
                n(d.msgs_per_user_day),
                d.history_days,
                n(h.stored_messages)
            );
            let _ = writeln!(
                o,
                "index    = stored × {b:.1} B (measured)       = {} B, growing {} B per day",
                n(h.index_bytes),
                n(h.index_bytes_per_day)
            );
            let _ = writeln!(
                o,
                "boxes    = ⌈(online × (server + kernel bytes per conn) + index) / (box memory × (1 − headroom))⌉\n         = ⌈({} × {} + {}) / {}⌉ = {}",
                n(p.connections),
                n(p.bytes_per_connection + d.kernel_bytes_per_connection),
                n(h.index_bytes),
                n(d.box_memory_bytes * (1.0 - d.headroom)),
                h.boxes_for_memory
            );
            let _ = writeln!(
                o,
                "full in  = (boxes × usable memory − connections' memory) / growth per day = {:.0} days",
                h.days_to_full
            );
            let _ = writeln!(o, "```\n");
            let _ = writeln!(
                o,
                "The embedded store keeps every stored message's location in memory and has no \
                 retention yet: plan memory for the days of history kept (`--history-days`), and \
                 past them, the boxes fill in the days shown.\n"
            );
        }
        (None, Some(_)) => {
            let _ = writeln!(o, "Left out (`--history-days 0`).\n");
        }
        (_, None) => {
            let _ = writeln!(
                o,
                "Not planned: the report has no `server_index` (an MQTT run, a server without \
                 `/metrics`, or a report made before it was measured). Stored history costs \
                 server memory (the log index) on top of the connections.\n"
            );
        }
    }
    let _ = writeln!(o, "## Result\n");
    let _ = writeln!(
        o,
        "**{} box(es), {} cores** (boxes like the measured one, {} core(s) each). Limiting resource: **{}** \
         ({} boxes for throughput vs {} for connections{}).\n",
        p.boxes,
        p.cores,
        m.server_cores,
        p.limiting,
        p.boxes_for_throughput,
        p.boxes_for_connections,
        p.history.as_ref().map_or(String::new(), |h| format!(
            " vs {} for memory with {} days of history",
            h.boxes_for_memory, d.history_days
        ))
    );
    let _ = writeln!(
        o,
        "Assumptions to check: the measured box ran the load generator too (the server alone does \
         more); the kernel bytes per connection ({} B) are an input, see tuning/README.md for the \
         measured figure; fan-out (groups, several devices) multiplies deliveries, not sends — \
         measure a scenario with the real mix before trusting the throughput line.",
        n(d.kernel_bytes_per_connection)
    );
    o
}

pub fn run(report: &Path, d: &Demand) -> Result<String, String> {
    let text =
        std::fs::read_to_string(report).map_err(|e| format!("read {}: {e}", report.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", report.display()))?;
    let m = Measured::from_report(&v, &report.display().to_string())?;
    let p = plan(&m, d)?;
    Ok(markdown(&m, d, &p))
}

/// MemTotal of this machine, bytes (24 GiB if unreadable).
pub fn mem_total_bytes() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(24.0 * 1024.0 * 1024.0 * 1024.0, |kb| kb * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn demand() -> Demand {
        Demand {
            users: 10_000_000.0,
            msgs_per_user_day: 40.0,
            peak_factor: 3.0,
            headroom: 0.3,
            devices_per_user: 1.5,
            online_share: 0.5,
            box_memory_bytes: 24.0 * 1024.0 * 1024.0 * 1024.0,
            kernel_bytes_per_connection: 4096.0,
            conns_per_box_max: 1_000_000.0,
            bytes_per_connection_default: 8192.0,
            bytes_per_connection: None,
            history_days: 30.0,
        }
    }

    #[test]
    fn reads_knee_or_throughput() {
        let v = json!({"throughput_msgs_per_s": 50000.0, "server_cores": 2,
                       "bytes_per_connection": 5400.0, "connections_established": 19000,
                       "server_cpu_s": 20.0, "messages_acked": 1000000,
                       "sweep": {"knee_throughput_msgs_per_s": 40000.0}});
        let m = Measured::from_report(&v, "r.json").expect("measured");
        assert_eq!(m.msgs_per_s, 40000.0);
        assert!(m.is_knee);
        assert_eq!(m.cpu_s_per_msg, Some(20e-6));
        let v = json!({"throughput_msgs_per_s": 50000.0, "sweep": {"knee_throughput_msgs_per_s": null,
                       "steps": [{"throughput_msgs_per_s": 900.0}, {"throughput_msgs_per_s": 1200.0}]}});
        let m = Measured::from_report(&v, "r.json").expect("measured");
        assert!(m.sweep_without_knee && !m.is_knee);
        assert_eq!(m.msgs_per_s, 1200.0);
        let v = json!({"throughput_msgs_per_s": 50000.0});
        let m = Measured::from_report(&v, "r.json").expect("measured");
        assert!(!m.is_knee);
        assert_eq!(m.server_cores, 1);
        assert!(Measured::from_report(&json!({}), "x").is_err());
    }

    #[test]
    fn arithmetic_and_limiting_resource() {
        let m = Measured {
            msgs_per_s: 40_000.0,
            is_knee: true,
            server_cores: 2,
            bytes_per_connection: Some(5400.0),
            cpu_s_per_msg: None,
            index_bytes_per_message: None,
            connections: 19_000,
            source: "r".into(),
            sweep_without_knee: false,
        };
        let d = demand();
        let p = plan(&m, &d).expect("plan");
        // 10M × 40 / 86400 = 4629.6 avg, × 3 = 13889 peak; 28000 per box → 1 box.
        assert!((p.avg_msgs_per_s - 4629.63).abs() < 0.01);
        assert_eq!(p.boxes_for_throughput, 1);
        // 7.5M connections; 24 GiB × 0.7 / 9496 B = 1.9M by memory → 1M by fds → 8 boxes.
        assert_eq!(p.boxes_for_connections, 8);
        assert_eq!(p.boxes, 8);
        assert_eq!(p.cores, 16);
        assert!(p.limiting.contains("open-file"));
        let md = markdown(&m, &d, &p);
        assert!(md.contains("4,630 msgs/s"), "{md}");
        assert!(md.contains("**8 box(es), 16 cores**"), "{md}");

        let busy = Demand {
            msgs_per_user_day: 2000.0,
            ..demand()
        };
        let p = plan(&m, &busy).expect("plan");
        assert!(p.boxes_for_throughput > p.boxes_for_connections);
        assert!(p.limiting.contains("throughput"));
        assert!(plan(
            &m,
            &Demand {
                headroom: 1.0,
                ..demand()
            }
        )
        .is_err());
        let given = Demand {
            bytes_per_connection: Some(100_000.0),
            ..demand()
        };
        let p = plan(&m, &given).expect("plan");
        assert_eq!(p.bytes_per_connection, 100_000.0);
        assert!(markdown(&m, &given, &p).contains("--bytes-per-connection"));
    }

    #[test]
    fn stored_history_adds_memory_and_can_limit() {
        let v = json!({"throughput_msgs_per_s": 50000.0,
                       "server_index": {"messages": 1000, "bytes": 35000, "bytes_per_message": 35.0}});
        let m = Measured::from_report(&v, "r.json").expect("measured");
        assert_eq!(m.index_bytes_per_message, Some(35.0));
        let m = Measured {
            msgs_per_s: 40_000.0,
            is_knee: true,
            bytes_per_connection: Some(5400.0),
            ..m
        };
        let d = demand();
        let p = plan(&m, &d).expect("plan");
        let h = p.history.clone().expect("history planned");
        // 10M × 40 × 30 = 12e9 messages × 35 B = 420 GB; 7.5M × 9496 B = 71.2 GB of
        // connections; (71.2 + 420) GB / (24 GiB × 0.7 = 18.04 GB) = 27.2 → 28 boxes.
        assert_eq!(h.stored_messages, 12e9);
        assert_eq!(h.index_bytes, 420e9);
        assert_eq!(h.boxes_for_memory, 28);
        assert_eq!(p.boxes, 28);
        assert!(p.limiting.contains("history"), "{}", p.limiting);
        // 28 × 18.04 GB − 71.2 GB = 433.8 GB of room at 14 GB per day: 31 days.
        assert!((h.days_to_full - 30.98).abs() < 0.1, "{}", h.days_to_full);
        let md = markdown(&m, &d, &p);
        assert!(md.contains("12,000,000,000 messages"), "{md}");
        assert!(md.contains("for memory with 30 days of history"), "{md}");

        // A week of history: still memory, 98 GB of index + 71.2 GB of connections → 10 boxes.
        let week = Demand {
            history_days: 7.0,
            ..demand()
        };
        let p = plan(&m, &week).expect("plan");
        assert_eq!(p.history.as_ref().map(|h| h.boxes_for_memory), Some(10));
        assert_eq!(p.boxes, 10);
        let p = plan(
            &m,
            &Demand {
                history_days: 0.0,
                ..demand()
            },
        )
        .expect("plan");
        assert!(p.history.is_none());
        assert_eq!(p.boxes, 8);
        assert!(plan(
            &m,
            &Demand {
                history_days: -1.0,
                ..demand()
            }
        )
        .is_err());
        // Without a measured index cost the plan says so instead of guessing.
        let none = Measured {
            index_bytes_per_message: None,
            ..m
        };
        let p = plan(&none, &d).expect("plan");
        assert!(p.history.is_none());
        assert!(markdown(&none, &d, &p).contains("Not planned"));
    }

    #[test]
    fn thousands() {
        assert_eq!(n(0.0), "0");
        assert_eq!(n(999.0), "999");
        assert_eq!(n(1000.0), "1,000");
        assert_eq!(n(1234567.4), "1,234,567");
    }
}
