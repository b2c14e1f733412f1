//! Scraping the server's `GET /metrics` (Prometheus text) for the few numbers a run reports.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Largest `/metrics` response read. The server's is a few KiB per core.
pub const METRICS_RESPONSE_BYTES_MAX: usize = 4 << 20;

/// The numbers taken from one scrape. Per-core series are summed over cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scrape {
    /// `switchboard_process_rss_bytes`.
    pub rss_bytes: u64,
    /// `switchboard_connections`: open WebSocket connections.
    pub connections: u64,
    /// `switchboard_connections_rejected_total`.
    pub rejected_total: u64,
    /// `switchboard_http_unauthorized_total`.
    pub unauthorized_total: u64,
    /// `switchboard_messages_persisted_total`.
    pub messages_persisted_total: u64,
    /// `switchboard_slow_consumer_closes_total`.
    pub slow_consumer_closes_total: u64,
    /// `switchboard_conn_throttles_total`: times a connection stopped being read because it sent
    /// to a shard under pressure (the server's back-pressure before `Overloaded`).
    pub conn_throttles_total: u64,
    /// `switchboard_shard_pressure_episodes_total`: times a shard came under pressure.
    pub pressure_episodes_total: u64,
    /// `switchboard_store_index_messages`: durable messages the shards' in-memory log indexes
    /// locate (all of the server's stored history).
    pub index_messages: u64,
    /// `switchboard_store_index_bytes`: those indexes' estimated heap bytes.
    pub index_bytes: u64,
    /// Server cores: the number of `switchboard_connections{core=…}` series.
    pub cores: u64,
    /// `switchboard_fsync_latency_us`: group commit write + fdatasync, microseconds.
    pub fsync_us: Buckets,
    /// `switchboard_commit_batch_records`: records per group commit.
    pub commit_batch: Buckets,
    /// `switchboard_commit_wait_us`: per group commit, its oldest record staged → its effects
    /// (acks, deliveries) handed on, microseconds.
    pub commit_wait_us: Buckets,
    /// `switchboard_reactor_lag_us`: how late each core's 10 ms probe timer ran, microseconds.
    pub reactor_lag_us: Buckets,
    /// When the scrape's response was complete.
    pub at: Option<Instant>,
}

/// Most buckets kept of one Prometheus histogram (the server's have ≤ 13 with `+Inf`).
pub const BUCKETS_MAX: usize = 16;

/// One Prometheus histogram summed over cores: cumulative counts per upper bound (`le`, ascending;
/// `u64::MAX` for `+Inf`), `_sum` and `_count`. Bounds past `BUCKETS_MAX` are dropped (and the
/// quantiles then report the last kept bound or `+Inf`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buckets {
    pub le: [u64; BUCKETS_MAX],
    pub cumulative: [u64; BUCKETS_MAX],
    pub len: usize,
    pub sum: u64,
    pub count: u64,
}

impl Buckets {
    fn add_bucket(&mut self, le: u64, v: u64) {
        let at = self.le[..self.len].partition_point(|&b| b < le);
        if at < self.len && self.le[at] == le {
            self.cumulative[at] += v;
            return;
        }
        if self.len == BUCKETS_MAX {
            return;
        }
        self.le.copy_within(at..self.len, at + 1);
        self.cumulative.copy_within(at..self.len, at + 1);
        self.le[at] = le;
        self.cumulative[at] = v;
        self.len += 1;
    }

    /// What was observed between `earlier` and `self` (same server, same bounds); `None` when
    /// the bounds differ or a counter went backwards (a restarted server).
    pub fn since(&self, earlier: &Buckets) -> Option<Buckets> {
        if earlier.len != 0
            && (earlier.len != self.len || earlier.le[..self.len] != self.le[..self.len])
        {
            return None;
        }
        let mut d = *self;
        for i in 0..self.len {
            let before = if earlier.len == 0 {
                0
            } else {
                earlier.cumulative[i]
            };
            d.cumulative[i] = self.cumulative[i].checked_sub(before)?;
        }
        d.sum = self.sum.checked_sub(earlier.sum)?;
        d.count = self.count.checked_sub(earlier.count)?;
        Some(d)
    }

    /// The smallest bucket bound at or below which a `q` share of the observations fall
    /// (`u64::MAX`: only `+Inf` holds them); `None` without observations.
    pub fn quantile_le(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        (0..self.len)
            .find(|&i| self.cumulative[i] >= want)
            .map(|i| self.le[i])
            .or(Some(u64::MAX))
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }
}

/// `GET /metrics` from `addr` over a fresh connection (the server closes it after the response).
pub fn scrape(addr: SocketAddr, timeout: Duration) -> Result<Scrape, String> {
    let err = |what: &str, e: std::io::Error| format!("GET /metrics from {addr}: {what}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| err("connect", e))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| err("setsockopt", e))?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| err("write", e))?;
    let mut response = Vec::with_capacity(16 * 1024);
    stream
        .take(METRICS_RESPONSE_BYTES_MAX as u64)
        .read_to_end(&mut response)
        .map_err(|e| err("read", e))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET /metrics from {addr}: no complete response head"))?;
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("GET /metrics from {addr}: {status:?}"));
    }
    let mut s = parse(body);
    s.at = Some(Instant::now());
    Ok(s)
}

/// Sums the series of interest over cores. Unknown lines are ignored.
pub fn parse(body: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        // Gauges are integers here; a float rendering would still parse via f64.
        let Some(value) = value
            .parse::<u64>()
            .ok()
            .or_else(|| value.parse::<f64>().ok().map(|f| f as u64))
        else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        for (base, h) in [
            ("switchboard_fsync_latency_us", &mut s.fsync_us),
            ("switchboard_commit_batch_records", &mut s.commit_batch),
            ("switchboard_commit_wait_us", &mut s.commit_wait_us),
            ("switchboard_reactor_lag_us", &mut s.reactor_lag_us),
        ] {
            match name.strip_prefix(base) {
                Some("_bucket") => {
                    let le = series
                        .split_once("le=\"")
                        .and_then(|(_, rest)| rest.split('"').next());
                    match le {
                        Some("+Inf") => h.add_bucket(u64::MAX, value),
                        Some(b) => {
                            if let Ok(b) = b.parse::<u64>() {
                                h.add_bucket(b, value);
                            }
                        }
                        None => {}
                    }
                }
                Some("_sum") => h.sum += value,
                Some("_count") => h.count += value,
                _ => {}
            }
        }
        if name == "switchboard_connections" && series.contains("core=") {
            s.cores += 1;
        }
        let slot = match name {
            "switchboard_process_rss_bytes" => &mut s.rss_bytes,
            "switchboard_connections" => &mut s.connections,
            "switchboard_connections_rejected_total" => &mut s.rejected_total,
            "switchboard_http_unauthorized_total" => &mut s.unauthorized_total,
            "switchboard_messages_persisted_total" => &mut s.messages_persisted_total,
            "switchboard_slow_consumer_closes_total" => &mut s.slow_consumer_closes_total,
            "switchboard_conn_throttles_total" => &mut s.conn_throttles_total,
            "switchboard_shard_pressure_episodes_total" => &mut s.pressure_episodes_total,
            "switchboard_store_index_messages" => &mut s.index_messages,
            "switchboard_store_index_bytes" => &mut s.index_bytes,
            _ => continue,
        };
        *slot += value;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cores_and_ignores_lookalikes() {
        let body = "# HELP switchboard_connections Open connections.\n\
# TYPE switchboard_connections gauge\n\
switchboard_connections{core=\"0\"} 10\n\
switchboard_connections{core=\"1\"} 12\n\
switchboard_connections_accepted_total{core=\"0\"} 99\n\
switchboard_connections_rejected_total{core=\"1\"} 3\n\
switchboard_http_unauthorized_total{core=\"0\"} 1\n\
switchboard_messages_persisted_total{core=\"0\"} 5\n\
switchboard_messages_persisted_total{core=\"1\"} 6\n\
switchboard_process_rss_bytes 123456\n\
switchboard_store_index_messages{core=\"0\"} 700\n\
switchboard_store_index_messages{core=\"1\"} 300\n\
switchboard_store_index_bytes{core=\"0\"} 9000\n\
switchboard_store_index_bytes{core=\"1\"} 4000\n\
switchboard_conn_throttles_total{core=\"0\"} 40\n\
switchboard_conn_throttles_total{core=\"1\"} 2\n\
switchboard_shard_pressure_episodes_total{core=\"1\"} 7\n\
garbage line\n";
        let s = parse(body);
        assert_eq!(
            s,
            Scrape {
                rss_bytes: 123_456,
                connections: 22,
                rejected_total: 3,
                unauthorized_total: 1,
                messages_persisted_total: 11,
                slow_consumer_closes_total: 0,
                index_messages: 1000,
                index_bytes: 13_000,
                conn_throttles_total: 42,
                pressure_episodes_total: 7,
                cores: 2,
                at: None,
                ..Scrape::default()
            }
        );
    }

    #[test]
    fn histograms_sum_over_cores_and_give_bucket_quantiles() {
        let body = "switchboard_fsync_latency_us_bucket{core=\"0\",le=\"100\"} 1\n\
switchboard_fsync_latency_us_bucket{core=\"0\",le=\"250\"} 8\n\
switchboard_fsync_latency_us_bucket{core=\"0\",le=\"+Inf\"} 10\n\
switchboard_fsync_latency_us_sum{core=\"0\"} 2000\n\
switchboard_fsync_latency_us_count{core=\"0\"} 10\n\
switchboard_fsync_latency_us_bucket{core=\"1\",le=\"100\"} 0\n\
switchboard_fsync_latency_us_bucket{core=\"1\",le=\"250\"} 80\n\
switchboard_fsync_latency_us_bucket{core=\"1\",le=\"+Inf\"} 90\n\
switchboard_fsync_latency_us_sum{core=\"1\"} 18000\n\
switchboard_fsync_latency_us_count{core=\"1\"} 90\n\
switchboard_commit_batch_records_bucket{core=\"0\",le=\"4\"} 3\n\
switchboard_commit_batch_records_bucket{core=\"0\",le=\"1\"} 2\n\
switchboard_commit_batch_records_count{core=\"0\"} 3\n\
switchboard_commit_wait_us_bucket{core=\"1\",le=\"1000\"} 4\n\
switchboard_commit_wait_us_count{core=\"1\"} 4\n\
switchboard_reactor_lag_us_bucket{core=\"0\",le=\"50\"} 7\n\
switchboard_reactor_lag_us_bucket{core=\"1\",le=\"50\"} 2\n\
switchboard_reactor_lag_us_count{core=\"0\"} 7\n";
        let s = parse(body);
        let f = s.fsync_us;
        assert_eq!(&f.le[..f.len], &[100, 250, u64::MAX]);
        assert_eq!(&f.cumulative[..f.len], &[1, 88, 100]);
        assert_eq!((f.sum, f.count), (20_000, 100));
        assert_eq!(f.quantile_le(0.01), Some(100));
        assert_eq!(f.quantile_le(0.5), Some(250));
        assert_eq!(f.quantile_le(0.88), Some(250));
        assert_eq!(f.quantile_le(0.89), Some(u64::MAX));
        assert_eq!(f.mean(), Some(200.0));
        // Buckets sorted by bound whatever the line order.
        assert_eq!(&s.commit_batch.le[..2], &[1, 4]);
        assert_eq!((s.commit_wait_us.le[0], s.commit_wait_us.count), (1000, 4));
        assert_eq!(s.reactor_lag_us.cumulative[0], 9, "summed over cores");

        let earlier = parse(
            "switchboard_fsync_latency_us_bucket{core=\"0\",le=\"100\"} 1\n\
switchboard_fsync_latency_us_bucket{core=\"0\",le=\"250\"} 1\n\
switchboard_fsync_latency_us_bucket{core=\"0\",le=\"+Inf\"} 1\n\
switchboard_fsync_latency_us_sum{core=\"0\"} 50\n\
switchboard_fsync_latency_us_count{core=\"0\"} 1\n",
        );
        let d = f.since(&earlier.fsync_us).expect("same bounds");
        assert_eq!(&d.cumulative[..d.len], &[0, 87, 99]);
        assert_eq!((d.sum, d.count), (19_950, 99));
        assert_eq!(d.quantile_le(0.5), Some(250));
        // A restarted server (counters went down) gives no delta.
        assert_eq!(earlier.fsync_us.since(&f), None);
        assert_eq!(Buckets::default().quantile_le(0.5), None);
    }
}
