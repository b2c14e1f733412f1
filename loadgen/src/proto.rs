//! The coordinator ↔ worker protocol: UTF-8 lines over the worker's stdin and stdout, so a
//! worker can be a child process here or `ssh host switchboard-loadgen worker` elsewhere.
//!
//! ```text
//!  coordinator ─► worker (stdin)            worker ─► coordinator (stdout)
//!   spec <base64(TOML WorkerSpec)>            hello v1
//!   go                  (after all connected) connected k=v …            (once, after the ramp)
//!   stop                (abort)               tick k=v … h.NAME=<b64> …  (each second)
//!                                             result k=v … h.NAME=<b64>  (once, last line)
//!                                             fail <text>                (fatal, last line)
//! ```
//!
//! A record is `KIND key=value …`: values are unsigned integers, except keys starting with `h.`,
//! whose value is an HdrHistogram in the standard V2 serialization (the format of
//! HdrHistogram's Java/C/Go ports), base64 encoded, so histograms merge exactly.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::scenario::{Scenario, Share};

/// Version of this protocol, in the `hello` line.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest line either side accepts (a record with a few full histograms is a few KiB).
pub const LINE_BYTES_MAX: usize = 4 << 20;

/// What a worker is told to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The whole scenario (the worker uses its share of it).
    pub scenario: Scenario,
    pub share: Share,
    /// User ids are `first_user + share.user_offset + i`.
    pub first_user: u64,
    /// High half of every client_msg_id of this run (the low half is the message index).
    pub run_id: u64,
}

impl WorkerSpec {
    pub fn line(&self) -> String {
        let toml = toml::to_string(self).expect("a WorkerSpec always serializes");
        format!("spec {}", STANDARD.encode(toml))
    }

    pub fn from_line(line: &str) -> Result<WorkerSpec, String> {
        let b64 = line
            .strip_prefix("spec ")
            .ok_or_else(|| format!("expected a spec line, got {:?}", clip(line)))?;
        let bytes = STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("spec: bad base64: {e}"))?;
        let text = String::from_utf8(bytes).map_err(|e| format!("spec: not UTF-8: {e}"))?;
        toml::from_str(&text).map_err(|e| format!("spec: {e}"))
    }
}

/// One `KIND k=v … h.NAME=…` record.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub kind: String,
    pub nums: BTreeMap<String, u64>,
    pub hists: BTreeMap<String, Histogram<u64>>,
}

/// Keys are `[A-Za-z0-9_.:-]`; anything else becomes `_` (error kinds come from free text).
pub fn key(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.:-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

impl Record {
    pub fn new(kind: &str) -> Record {
        Record {
            kind: kind.to_string(),
            ..Record::default()
        }
    }

    pub fn num(&self, k: &str) -> u64 {
        self.nums.get(k).copied().unwrap_or(0)
    }

    pub fn set(&mut self, k: &str, v: u64) {
        self.nums.insert(key(k), v);
    }

    pub fn encode(&self) -> String {
        let mut out = self.kind.clone();
        for (k, v) in &self.nums {
            out.push_str(&format!(" {k}={v}"));
        }
        let mut buf = Vec::new();
        for (k, h) in &self.hists {
            buf.clear();
            V2Serializer::new()
                .serialize(h, &mut buf)
                .expect("serializing into a Vec cannot fail");
            out.push_str(&format!(" h.{k}={}", STANDARD.encode(&buf)));
        }
        out
    }

    pub fn decode(line: &str) -> Result<Record, String> {
        let mut words = line.split_ascii_whitespace();
        let kind = words.next().ok_or("empty record")?;
        let mut r = Record::new(kind);
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("record {kind}: {:?} is not key=value", clip(w)))?;
            if let Some(name) = k.strip_prefix("h.") {
                let bytes = STANDARD
                    .decode(v)
                    .map_err(|e| format!("histogram {name}: bad base64: {e}"))?;
                let h: Histogram<u64> = Deserializer::new()
                    .deserialize(&mut &bytes[..])
                    .map_err(|e| format!("histogram {name}: {e:?}"))?;
                r.hists.insert(name.to_string(), h);
            } else {
                let v: u64 = v
                    .parse()
                    .map_err(|_| format!("record {kind}: {k}={:?} is not a number", clip(v)))?;
                r.nums.insert(k.to_string(), v);
            }
        }
        Ok(r)
    }

    /// Adds `other`'s numbers and histograms into this one (same kind assumed).
    pub fn merge(&mut self, other: &Record) -> Result<(), String> {
        for (k, v) in &other.nums {
            *self.nums.entry(k.clone()).or_default() += v;
        }
        for (k, h) in &other.hists {
            match self.hists.get_mut(k) {
                Some(mine) => mine
                    .add(h)
                    .map_err(|e| format!("merge histogram {k}: {e:?}"))?,
                None => {
                    self.hists.insert(k.clone(), h.clone());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::latency_histogram;

    #[test]
    fn record_roundtrip_and_merge() {
        let mut r = Record::new("tick");
        r.set("sec", 3);
        r.set("err.server close 4002", 2);
        let mut h = latency_histogram();
        for v in [10u64, 20, 30_000] {
            h.record(v).expect("in range");
        }
        r.hists.insert("e2e".into(), h.clone());
        r.hists.insert("empty".into(), latency_histogram());
        let line = r.encode();
        assert!(!line.contains('\n'));
        let back = Record::decode(&line).expect("decode");
        assert_eq!(back.kind, "tick");
        assert_eq!(back.num("sec"), 3);
        assert_eq!(back.num("err.server_close_4002"), 2);
        assert_eq!(back.hists["e2e"], h);
        assert!(back.hists["empty"].is_empty());

        let mut m = back.clone();
        m.merge(&back).expect("merge");
        assert_eq!(m.num("sec"), 6);
        assert_eq!(m.hists["e2e"].len(), 6);
        assert_eq!(m.hists["e2e"].max(), h.max());

        assert!(Record::decode("").is_err());
        assert!(Record::decode("tick a").is_err());
        assert!(Record::decode("tick a=x").is_err());
        assert!(Record::decode("tick h.e2e=!!").is_err());
    }

    #[test]
    fn spec_roundtrip() {
        let s = WorkerSpec {
            scenario: Scenario::default(),
            share: Share {
                index: 1,
                user_offset: 10,
                users: 10,
                connections: 20,
                rate: 123.5,
                connect_rate: 0.0,
                ip_first: 2,
                ips: 1,
            },
            first_user: 1_000_001,
            run_id: 77,
        };
        let line = s.line();
        assert!(!line.contains('\n'));
        assert_eq!(WorkerSpec::from_line(&line), Ok(s));
        assert!(WorkerSpec::from_line("go").is_err());
    }
}
