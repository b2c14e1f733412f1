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
    /// Server cores: the number of `switchboard_connections{core=…}` series.
    pub cores: u64,
    /// When the scrape's response was complete.
    pub at: Option<Instant>,
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
                cores: 2,
                at: None,
            }
        );
    }
}
