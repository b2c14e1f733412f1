//! Metrics: one block of relaxed atomics per core, written only by that core and read by whichever
//! core serves `GET /metrics` (Prometheus text format). No locks on the message path.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use switchboard_wire::ErrorCode;

/// Upper bounds (microseconds) of the fsync latency histogram buckets.
pub const FSYNC_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 512_000,
];
/// Upper bounds (microseconds) of the commit wait histogram buckets: the fsync buckets, since a
/// commit with records waits at least for its write + fdatasync (a reply-only batch, with no
/// records, can be shorter).
pub const COMMIT_WAIT_BUCKETS_US: [u64; 12] = FSYNC_BUCKETS_US;
/// Upper bounds (microseconds) of the reactor lag histogram buckets.
pub const REACTOR_LAG_BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000,
];
/// How often each core's reactor lag probe asks to be woken (`server.rs`): 100 wake-ups a second
/// per core, a few microseconds each.
pub const REACTOR_LAG_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);
/// Upper bounds (records) of the commit batch size histogram buckets.
pub const BATCH_BUCKETS: [u64; 8] = [1, 2, 4, 16, 64, 256, 1024, 4096];
/// Error codes counted individually (others count under "other").
pub const COUNTED_ERRORS: [ErrorCode; 14] = [
    ErrorCode::Unknown,
    ErrorCode::MalformedFrame,
    ErrorCode::UnsupportedFrame,
    ErrorCode::FrameTooLarge,
    ErrorCode::PayloadTooLarge,
    ErrorCode::InvalidArgument,
    ErrorCode::TooManyCursors,
    ErrorCode::UnknownChat,
    ErrorCode::NotMember,
    ErrorCode::ClientMsgIdReused,
    ErrorCode::SelfChat,
    ErrorCode::RateLimited,
    ErrorCode::Overloaded,
    ErrorCode::Internal,
];

pub struct Histogram<const N: usize> {
    buckets: [AtomicU64; N],
    inf: AtomicU64,
    sum: AtomicU64,
    count: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            inf: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    pub fn observe(&self, bounds: &[u64; N], v: u64) {
        match bounds.iter().position(|b| v <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Relaxed),
            None => self.inf.fetch_add(1, Relaxed),
        };
        self.sum.fetch_add(v, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

#[derive(Default)]
pub struct CoreMetrics {
    pub connections: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub http_unauthorized: AtomicU64,
    /// Connections served by the HTTP API loop (not upgrades).
    pub http_connections: AtomicU64,
    /// HTTP API requests (heads) received.
    pub http_requests: AtomicU64,
    /// HTTP API responses with a status >= 400.
    pub http_errors: AtomicU64,
    /// WebSocket frames or messages refused by a rate limit, and connects refused per address.
    pub rate_limited: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_persisted: AtomicU64,
    /// The core's shard store's in-memory index (`EmbeddedStore::index_memory`), set after each
    /// group commit: durable messages it locates and its estimated heap bytes. Grows with stored
    /// history (there is no retention yet).
    pub store_index_messages: AtomicU64,
    pub store_index_bytes: AtomicU64,
    pub records_persisted: AtomicU64,
    pub deliveries: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    /// Times a connection stopped being read because it sent to a shard under pressure
    /// (back-pressure; it is read again when the shard's pressure is off).
    pub conn_throttles: AtomicU64,
    /// Times one of this core's shards came under pressure (`Owner::pressure`).
    pub shard_pressure_episodes: AtomicU64,
    pub fsync_us: Histogram<12>,
    pub commit_batch_records: Histogram<8>,
    /// Per group commit: from when its oldest record was staged to when its effects (acks,
    /// deliveries, receipts) were handed on, microseconds. What a send waits for in the server
    /// beyond reading and routing.
    pub commit_wait_us: Histogram<12>,
    /// How late the core's lag probe woke (`REACTOR_LAG_PROBE_INTERVAL` timer), microseconds: the
    /// delay any ready socket or message on this core sees before its task runs (the reactor busy
    /// with other tasks, or its thread waiting for a CPU).
    pub reactor_lag_us: Histogram<12>,
    /// Items waiting in this core's outbox towards each core (index = destination).
    pub mesh_outbox_depth: Vec<AtomicU64>,
    pub mesh_items_sent: AtomicU64,
    pub errors: [AtomicU64; 15],
}

impl CoreMetrics {
    pub fn new(cores: usize) -> CoreMetrics {
        CoreMetrics {
            mesh_outbox_depth: (0..cores).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    pub fn error(&self, code: ErrorCode) {
        let i = COUNTED_ERRORS
            .iter()
            .position(|c| *c == code)
            .unwrap_or(COUNTED_ERRORS.len());
        self.errors[i].fetch_add(1, Relaxed);
    }
}

fn counter(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    all: &[CoreMetrics],
    f: impl Fn(&CoreMetrics) -> u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (i, m) in all.iter().enumerate() {
        let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", f(m));
    }
}

fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[u64; N],
    all: &[CoreMetrics],
    f: impl Fn(&CoreMetrics) -> &Histogram<N>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (i, m) in all.iter().enumerate() {
        let h = f(m);
        let mut cumulative = 0;
        for (b, bound) in bounds.iter().enumerate() {
            cumulative += h.buckets[b].load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{core=\"{i}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += h.inf.load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{core=\"{i}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(out, "{name}_sum{{core=\"{i}\"}} {}", h.sum.load(Relaxed));
        let _ = writeln!(
            out,
            "{name}_count{{core=\"{i}\"}} {}",
            h.count.load(Relaxed)
        );
    }
}

/// Renders every core's metrics plus process-wide gauges.
pub fn render(all: &[CoreMetrics]) -> String {
    let mut out = String::with_capacity(8192);
    counter(
        &mut out,
        "switchboard_connections",
        "Open WebSocket connections.",
        "gauge",
        all,
        |m| m.connections.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_connections_accepted_total",
        "TCP connections accepted.",
        "counter",
        all,
        |m| m.connections_accepted.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_connections_rejected_total",
        "Connections refused (per-core limit).",
        "counter",
        all,
        |m| m.connections_rejected.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_http_unauthorized_total",
        "Upgrades answered 401.",
        "counter",
        all,
        |m| m.http_unauthorized.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_http_connections_total",
        "Connections served by the HTTP API.",
        "counter",
        all,
        |m| m.http_connections.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_http_requests_total",
        "HTTP API requests.",
        "counter",
        all,
        |m| m.http_requests.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_http_errors_total",
        "HTTP API responses with status >= 400.",
        "counter",
        all,
        |m| m.http_errors.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_rate_limited_total",
        "Frames, messages and connection attempts refused by a rate limit.",
        "counter",
        all,
        |m| m.rate_limited.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_frames_in_total",
        "WebSocket data frames received.",
        "counter",
        all,
        |m| m.frames_in.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_frames_out_total",
        "WebSocket data frames sent.",
        "counter",
        all,
        |m| m.frames_out.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_bytes_in_total",
        "Bytes read from client sockets.",
        "counter",
        all,
        |m| m.bytes_in.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_bytes_out_total",
        "Bytes written to client sockets.",
        "counter",
        all,
        |m| m.bytes_out.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_messages_persisted_total",
        "Messages made durable.",
        "counter",
        all,
        |m| m.messages_persisted.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_store_index_messages",
        "Durable messages in the shard's in-memory log index (one location each; no retention).",
        "gauge",
        all,
        |m| m.store_index_messages.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_store_index_bytes",
        "Estimated heap bytes of the shard's in-memory log index (grows with stored history).",
        "gauge",
        all,
        |m| m.store_index_bytes.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_records_persisted_total",
        "Log records made durable.",
        "counter",
        all,
        |m| m.records_persisted.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_deliveries_total",
        "Live message frames queued to recipient connections.",
        "counter",
        all,
        |m| m.deliveries.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_slow_consumer_closes_total",
        "Connections closed because their send queue was full.",
        "counter",
        all,
        |m| m.slow_consumer_closes.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_conn_throttles_total",
        "Times a connection stopped being read because it sent to a shard under pressure (too many records waiting for its group commit); it is read again when the pressure is off.",
        "counter",
        all,
        |m| m.conn_throttles.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_shard_pressure_episodes_total",
        "Times a shard came under pressure: staged records reached half of shard_pending_records_max (off again at a quarter).",
        "counter",
        all,
        |m| m.shard_pressure_episodes.load(Relaxed),
    );
    counter(
        &mut out,
        "switchboard_mesh_items_sent_total",
        "Items sent to other cores.",
        "counter",
        all,
        |m| m.mesh_items_sent.load(Relaxed),
    );
    histogram(
        &mut out,
        "switchboard_fsync_latency_us",
        "Group commit write+fdatasync latency, microseconds.",
        &FSYNC_BUCKETS_US,
        all,
        |m| &m.fsync_us,
    );
    histogram(
        &mut out,
        "switchboard_commit_batch_records",
        "Records per group commit.",
        &BATCH_BUCKETS,
        all,
        |m| &m.commit_batch_records,
    );
    histogram(
        &mut out,
        "switchboard_commit_wait_us",
        "Group commit: oldest record staged to effects handed on, microseconds.",
        &COMMIT_WAIT_BUCKETS_US,
        all,
        |m| &m.commit_wait_us,
    );
    histogram(
        &mut out,
        "switchboard_reactor_lag_us",
        "How late the core's 10 ms lag probe timer ran, microseconds.",
        &REACTOR_LAG_BUCKETS_US,
        all,
        |m| &m.reactor_lag_us,
    );
    let _ = writeln!(out, "# HELP switchboard_mesh_outbox_depth Items waiting towards another core.\n# TYPE switchboard_mesh_outbox_depth gauge");
    for (i, m) in all.iter().enumerate() {
        for (d, g) in m.mesh_outbox_depth.iter().enumerate() {
            if d != i {
                let _ = writeln!(
                    out,
                    "switchboard_mesh_outbox_depth{{core=\"{i}\",dest=\"{d}\"}} {}",
                    g.load(Relaxed)
                );
            }
        }
    }
    let _ = writeln!(out, "# HELP switchboard_errors_total Error frames sent, by code.\n# TYPE switchboard_errors_total counter");
    for (i, m) in all.iter().enumerate() {
        for (k, c) in m.errors.iter().enumerate() {
            let name = COUNTED_ERRORS
                .get(k)
                .and_then(|c| c.variant_name())
                .unwrap_or("Other");
            let _ = writeln!(
                out,
                "switchboard_errors_total{{core=\"{i}\",code=\"{name}\"}} {}",
                c.load(Relaxed)
            );
        }
    }
    let rss = process_rss_bytes();
    let _ = writeln!(out, "# HELP switchboard_process_rss_bytes Resident set size of the server process.\n# TYPE switchboard_process_rss_bytes gauge\nswitchboard_process_rss_bytes {rss}");
    out
}

/// The process's resident set size from /proc/self/statm (0 if unavailable).
pub fn process_rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let all = vec![CoreMetrics::new(2), CoreMetrics::new(2)];
        all[1].frames_in.fetch_add(5, Relaxed);
        all[0].fsync_us.observe(&FSYNC_BUCKETS_US, 300);
        all[0].error(ErrorCode::NotMember);
        all[1].commit_wait_us.observe(&COMMIT_WAIT_BUCKETS_US, 700);
        all[1].reactor_lag_us.observe(&REACTOR_LAG_BUCKETS_US, 60);
        let text = render(&all);
        assert!(
            text.contains("switchboard_frames_in_total{core=\"1\"} 5"),
            "{text}"
        );
        assert!(text.contains("switchboard_fsync_latency_us_bucket{core=\"0\",le=\"500\"} 1"));
        assert!(text.contains("switchboard_fsync_latency_us_bucket{core=\"0\",le=\"250\"} 0"));
        assert!(text.contains("switchboard_errors_total{core=\"0\",code=\"NotMember\"} 1"));
        assert!(text.contains("switchboard_process_rss_bytes "));
        assert!(text.contains("switchboard_commit_wait_us_bucket{core=\"1\",le=\"1000\"} 1"));
        assert!(text.contains("switchboard_commit_wait_us_bucket{core=\"1\",le=\"500\"} 0"));
        assert!(text.contains("switchboard_reactor_lag_us_bucket{core=\"1\",le=\"100\"} 1"));
        assert!(text.contains("switchboard_reactor_lag_us_bucket{core=\"1\",le=\"50\"} 0"));
    }
}
