//! Shared reporting pieces: latency summaries from hdrhistogram, a minimal JSON value (one file
//! per run, no serde_json in the workspace), and duration parsing for the command line.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency a histogram tracks, microseconds (one hour); larger values are clamped.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A latency histogram with microsecond resolution and 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static bounds are valid")
}

/// The fixed set of latency numbers every report prints.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    /// One line: `n=.. p50=.. p90=.. p99=.. p999=.. max=.. mean=..` (µs).
    pub fn line(&self) -> String {
        format!(
            "n={} p50={} p90={} p99={} p999={} max={} mean={:.0}",
            self.count,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.mean_us
        )
    }

    pub fn json(&self) -> Json {
        Json::obj([
            ("count", Json::U(self.count)),
            ("p50_us", Json::U(self.p50_us)),
            ("p90_us", Json::U(self.p90_us)),
            ("p99_us", Json::U(self.p99_us)),
            ("p999_us", Json::U(self.p999_us)),
            ("max_us", Json::U(self.max_us)),
            ("mean_us", Json::F(self.mean_us)),
        ])
    }
}

/// A JSON value, enough for flat reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Bool(bool),
    U(u64),
    F(f64),
    S(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn obj<const N: usize>(fields: [(&str, Json); N]) -> Json {
        Json::Obj(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    pub fn s(v: impl Into<String>) -> Json {
        Json::S(v.into())
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, indent: usize) {
        match self {
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::U(v) => {
                let _ = write!(out, "{v}");
            }
            // JSON has no NaN or infinity.
            Json::F(v) if !v.is_finite() => out.push_str("null"),
            Json::F(v) => {
                let _ = write!(out, "{v}");
            }
            Json::S(s) => write_str(out, s),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    item.write(out, indent);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                if fields.is_empty() {
                    out.push_str("{}");
                    return;
                }
                out.push_str("{\n");
                for (i, (k, v)) in fields.iter().enumerate() {
                    out.push_str(&"  ".repeat(indent + 1));
                    write_str(out, k);
                    out.push_str(": ");
                    v.write(out, indent + 1);
                    if i + 1 < fields.len() {
                        out.push(',');
                    }
                    out.push('\n');
                }
                out.push_str(&"  ".repeat(indent));
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

pub fn write_json(path: &Path, value: &Json) -> Result<(), String> {
    std::fs::write(path, value.render()).map_err(|e| format!("write {}: {e}", path.display()))
}

/// Parses `500ms`, `20s`, `2m`, `1h` or a plain number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit_s) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 500ms, 20s, 2m)"))?;
    if !v.is_finite() || v < 0.0 || v * unit_s > 86_400.0 {
        return Err(format!("duration {s:?} out of range (0 to 24h)"));
    }
    Ok(Duration::from_secs_f64(v * unit_s))
}

/// Bytes as a short human string (KiB/MiB with one decimal).
pub fn human_bytes(b: f64) -> String {
    let a = b.abs();
    if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if a >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("48h").is_err());
    }

    #[test]
    fn json_renders() {
        let v = Json::obj([
            ("a", Json::U(1)),
            ("b", Json::s("x\"y\n")),
            ("c", Json::Arr(vec![Json::F(1.5), Json::F(f64::NAN)])),
            ("d", Json::obj([("e", Json::Bool(true)), ("f", Json::U(2))])),
        ]);
        assert_eq!(
            v.render(),
            "{\n  \"a\": 1,\n  \"b\": \"x\\\"y\\n\",\n  \"c\": [1.5, null],\n  \"d\": {\n    \"e\": true,\n    \"f\": 2\n  }\n}\n"
        );
    }

    #[test]
    fn latency_summary() {
        let mut h = latency_histogram();
        for v in 1..=1000u64 {
            h.record(v).expect("in range");
        }
        h.saturating_record(u64::MAX);
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1001);
        assert_eq!(s.p50_us, 501);
        assert!(s.max_us >= LATENCY_US_MAX);
        assert_eq!(LatencySummary::of(&latency_histogram()).count, 0);
    }
}
