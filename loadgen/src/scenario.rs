//! The scenario of a `run`: who connects, who talks to whom, how fast, for how long. Pure data
//! plus the arithmetic that splits it over worker processes; no I/O.
//!
//! ```text
//!  defaults ─► --scenario FILE (TOML) ─► command-line flags ─► Scenario::validate ─► Layout
//!                                                                                   │
//!       worker k: users [offset_k, offset_k + users_k), connections users_k × devices,
//!                 rate × users_k / users, source addresses [ip_first_k, ip_first_k + ips_k)
//! ```
//!
//! Every conversation stays inside one worker (a user's contacts are its ring neighbours among
//! the worker's users), so each worker checks correctness on its own and the coordinator only
//! adds counts and merges histograms. That is also what lets workers run on other hosts.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_wire::limits::PAYLOAD_BYTES_MAX;

use crate::simple::PAYLOAD_HEADER_BYTES;

/// Sockets one worker process holds at most by default: below the 20,000 open-file hard limit of
/// the development machines, with room for the process's own files.
pub const CONNS_PER_WORKER_DEFAULT: u64 = 15_000;

/// Most worker processes: each is a full event loop; more than this on one box is a mistake.
pub const WORKERS_MAX: u32 = 64;

/// Connections per loopback source address. Below half of the default local port range
/// (32768-60999): past that, Linux's connect() port search scans thousands of ports per call.
pub const CONNECTIONS_PER_SOURCE_IP_MAX: u64 = 10_000;

/// Loopback source addresses 127.0.0.1 ..= 127.0.0.250.
pub const SOURCE_IPS_MAX: u32 = 250;

/// Devices per user: each message's delivery set is tracked in a 16-bit mask (sender's other
/// devices + the peer's devices).
pub const DEVICES_PER_USER_MAX: u32 = 8;

/// Messages one worker may schedule in a run: each costs a 32-byte record kept until the end
/// (for the lost/duplicate check), so this bounds that at 1.6 GB per worker.
pub const MESSAGES_PER_WORKER_MAX: u64 = 50_000_000;

/// Largest rate accepted, messages per second (a typo guard, far above what one box does).
pub const RATE_MAX: f64 = 10_000_000.0;

/// Most runs per sweep rate (`sweep_repeat`): each is a full run, so a sweep takes this many
/// times longer; past 9 a capacity question wants a longer `duration`, not more repeats.
pub const SWEEP_REPEAT_MAX: u32 = 9;

/// Largest group size: what one `CreateGroup` can name (the server may allow fewer:
/// `group_members_max`).
pub const GROUP_SIZE_MAX: u32 = switchboard_wire::limits::GROUP_USERS_MAX as u32;

// A payload must at least hold the header that carries the message id and scheduled time.
const _: () = assert!(PAYLOAD_HEADER_BYTES <= PAYLOAD_BYTES_MAX);
const _: () = assert!(2 * DEVICES_PER_USER_MAX <= 16);

/// How send times are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Exactly 1/rate apart.
    Constant,
    /// Exponential gaps with mean 1/rate (a Poisson process): bursts like real users make.
    Poisson,
}

/// A discrete distribution `value:weight,value:weight` (a bare `value` has weight 1). Used for
/// payload sizes and group sizes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dist {
    /// `(value, weight)`, weights > 0.
    pub items: Vec<(u32, u32)>,
}

impl Dist {
    pub fn fixed(v: u32) -> Dist {
        Dist {
            items: vec![(v, 1)],
        }
    }

    pub fn parse(s: &str) -> Result<Dist, String> {
        let mut items = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (v, w) = match part.split_once(':') {
                Some((v, w)) => (v.trim(), w.trim()),
                None => (part, "1"),
            };
            let v: u32 = v
                .parse()
                .map_err(|_| format!("{part:?}: value is not a whole number"))?;
            let w: u32 = w
                .parse()
                .map_err(|_| format!("{part:?}: weight is not a whole number"))?;
            if w == 0 {
                return Err(format!("{part:?}: weight 0"));
            }
            items.push((v, w));
        }
        if items.is_empty() {
            return Err(format!(
                "{s:?}: empty distribution (try 100 or 100:90,4000:10)"
            ));
        }
        Ok(Dist { items })
    }

    pub fn total_weight(&self) -> u64 {
        self.items.iter().map(|&(_, w)| u64::from(w)).sum()
    }

    /// The value for a uniform draw `r` in `0..total_weight()`.
    pub fn pick(&self, r: u64) -> u32 {
        let mut r = r % self.total_weight().max(1);
        for &(v, w) in &self.items {
            if r < u64::from(w) {
                return v;
            }
            r -= u64::from(w);
        }
        self.items[self.items.len() - 1].0
    }

    pub fn mean(&self) -> f64 {
        let t = self.total_weight() as f64;
        self.items
            .iter()
            .map(|&(v, w)| f64::from(v) * f64::from(w))
            .sum::<f64>()
            / t
    }

    pub fn min(&self) -> u32 {
        self.items.iter().map(|&(v, _)| v).min().unwrap_or(0)
    }

    pub fn max(&self) -> u32 {
        self.items.iter().map(|&(v, _)| v).max().unwrap_or(0)
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [(v, _)] = self.items[..] {
            return write!(f, "{v}");
        }
        for (i, (v, w)) in self.items.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{v}:{w}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Dist {
    type Error = String;
    fn try_from(s: String) -> Result<Dist, String> {
        Dist::parse(&s)
    }
}

impl From<Dist> for String {
    fn from(d: Dist) -> String {
        d.to_string()
    }
}

/// Durations as `500ms` / `30s` / `2m` strings in TOML.
mod dur {
    use super::Duration;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::report::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// One run's scenario. Every field has a default; a TOML file (`--scenario`) sets any of them
/// and command-line flags override the file. See loadgen/README.md for the table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Free text naming the scenario in reports. Default `"default"`.
    pub name: String,
    /// `ws://HOST:PORT` of the server (loopback only). `mqtt://` is reserved for the broker
    /// comparison (not implemented yet). Default `ws://127.0.0.1:7070`.
    pub target: String,
    /// The server's `<data_dir>/token.secret`; tokens are minted from it. No default: required.
    pub secret_file: Option<PathBuf>,
    /// Users; 0 = connections / devices_per_user. Default 0.
    pub users: u64,
    /// Devices (connections) per user, 1..=8. Every device of a user receives the user's
    /// messages; the sender's other devices receive what it sends. Default 1.
    pub devices_per_user: u32,
    /// Connections; 0 = users × devices_per_user. Default 1000.
    pub connections: u64,
    /// Each user talks to its `contacts_per_user` nearest neighbours on each side of a ring of the
    /// worker's users (so 2 × this many chats per user). Default 1.
    pub contacts_per_user: u32,
    /// Loopback source addresses (127.0.0.1, .2, …) to connect from; 0 = one per 10,000
    /// connections. Default 0.
    pub source_ips: u32,
    /// Connections opened per second (all workers together); 0 = as fast as possible.
    /// Default 5000.
    pub connect_rate: f64,
    /// Limit on TCP connect + upgrade of one connection. Default 10s.
    #[serde(with = "dur")]
    pub connect_timeout: Duration,
    /// Percent of messages sent 1:1. Default 100.
    pub direct_pct: f64,
    /// Percent of messages sent to groups (needs a target with groups). Default 0.
    pub group_pct: f64,
    /// Group size distribution (members, creator included), e.g. `"10:80,100:20"`.
    /// Default `"100"`.
    pub group_sizes: Dist,
    /// Groups per user: each worker creates ⌈its users × this / mean group size⌉ groups of
    /// consecutive users (spread evenly over its users) when `group_pct` > 0. Default 1.
    pub groups_per_user: f64,
    /// Payload size distribution (bytes, at least 24: the header), e.g. `"100:90,4000:10"`.
    /// Default `"100"`.
    pub payload_bytes: Dist,
    /// Target send rate, messages per second over all workers. Default 1000.
    pub rate: f64,
    /// `poisson` or `constant` send times. Default `poisson`.
    pub arrival: Arrival,
    /// Sends before the measurement starts; checked for correctness, left out of latencies and
    /// throughput. Default 5s.
    #[serde(with = "dur")]
    pub warmup: Duration,
    /// Measured sending time after the warm-up. Default 30s.
    #[serde(with = "dur")]
    pub duration: Duration,
    /// After the last send, how long to wait for outstanding acks, deliveries and receipts.
    /// Default 10s.
    #[serde(with = "dur")]
    pub drain: Duration,
    /// Recipients send a `Delivered` cursor after each read that brought messages (the full
    /// receipt flow); senders measure send → `Receipt`. Default true.
    pub receipts: bool,
    /// Worker processes; 0 = automatic (`auto_workers`: enough for `conns_per_worker_max`, and
    /// one per CPU when the users allow). Default 0.
    pub workers: u32,
    /// Most connections per worker when `workers` is 0. Default 15000.
    pub conns_per_worker_max: u64,
    /// Rates to sweep (each a full run with fresh users); empty = one run at `rate`.
    pub sweep: Vec<f64>,
    /// The knee: the highest swept rate with p95 e2e latency below this, no errors, nothing lost.
    /// Default 100.
    pub knee_p95_ms: f64,
    /// Runs per sweep rate (1..=`SWEEP_REPEAT_MAX`), each a full fresh run: a step passes when
    /// every run passed its checks and the median e2e p95 is under `knee_p95_ms`. Default 1.
    pub sweep_repeat: u32,
    /// After a sweep finds its knee, run one more step at half the knee's offered rate (the
    /// latency a box shows with 2× headroom) and report it beside the sweep. Default false.
    pub half_knee: bool,
    /// Seed of every random choice (send times, senders, peers, sizes). Default 1.
    pub seed: u64,
    /// First user id; 0 = a fresh block derived from the clock (so chats start empty). Default 0.
    pub first_user: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "default".into(),
            target: "ws://127.0.0.1:7070".into(),
            secret_file: None,
            users: 0,
            devices_per_user: 1,
            connections: 1000,
            contacts_per_user: 1,
            source_ips: 0,
            connect_rate: 5000.0,
            connect_timeout: Duration::from_secs(10),
            direct_pct: 100.0,
            group_pct: 0.0,
            group_sizes: Dist::fixed(100),
            groups_per_user: 1.0,
            payload_bytes: Dist::fixed(100),
            rate: 1000.0,
            arrival: Arrival::Poisson,
            warmup: Duration::from_secs(5),
            duration: Duration::from_secs(30),
            drain: Duration::from_secs(10),
            receipts: true,
            workers: 0,
            conns_per_worker_max: CONNS_PER_WORKER_DEFAULT,
            sweep: Vec::new(),
            knee_p95_ms: 100.0,
            sweep_repeat: 1,
            half_knee: false,
            seed: 1,
            first_user: 0,
        }
    }
}

/// What the target speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Switchboard(SocketAddr),
    /// An MQTT 3.1.1 broker, for the side-by-side comparison (1:1 only, QoS 1).
    Mqtt(SocketAddr),
}

impl TargetKind {
    pub fn addr(&self) -> SocketAddr {
        match self {
            TargetKind::Switchboard(a) | TargetKind::Mqtt(a) => *a,
        }
    }

    pub fn is_mqtt(&self) -> bool {
        matches!(self, TargetKind::Mqtt(_))
    }
}

/// Parses `ws://HOST:PORT[/path]` (or `HOST:PORT`) or `mqtt://HOST:PORT` and insists on a
/// loopback address.
pub fn parse_target(s: &str) -> Result<TargetKind, String> {
    if s.starts_with("wss://") || s.starts_with("mqtts://") {
        return Err(format!("{s}: TLS is not supported; use ws:// or mqtt://"));
    }
    let (mqtt, rest) = match s.strip_prefix("mqtt://") {
        Some(r) => (true, r),
        None => (false, s.strip_prefix("ws://").unwrap_or(s)),
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{s}: not a HOST:PORT address: {e}"))?
        .find(|a| a.is_ipv4())
        .or_else(|| hostport.to_socket_addrs().ok()?.next())
        .ok_or_else(|| format!("{s}: resolves to no address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address; this load generator only targets this machine"
        ));
    }
    Ok(if mqtt {
        TargetKind::Mqtt(addr)
    } else {
        TargetKind::Switchboard(addr)
    })
}

/// One worker's share of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Share {
    /// 0-based worker index.
    pub index: u32,
    /// The worker's users are `first_user + user_offset ..` (`users` of them).
    pub user_offset: u64,
    pub users: u64,
    /// `users × devices_per_user`.
    pub connections: u64,
    /// Messages per second this worker schedules.
    pub rate: f64,
    /// Connections per second this worker opens (0: unlimited).
    pub connect_rate: f64,
    /// Source addresses 127.0.0.(ip_first) ..= 127.0.0.(ip_first + ips - 1).
    pub ip_first: u32,
    pub ips: u32,
}

/// A validated scenario split over workers.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub target: SocketAddr,
    pub users: u64,
    pub connections: u64,
    pub shares: Vec<Share>,
}

impl Scenario {
    /// Checks the scenario as given (a sweep or one run) and splits a run over workers: what
    /// `run` calls before connecting. On top of `layout`'s checks (which every single run of a
    /// sweep passes again, with the sweep removed), `sweep_repeat` > 1 needs a sweep to repeat.
    pub fn validate(&self) -> Result<Layout, String> {
        check_sweep_repeat(self.sweep_repeat)?;
        if self.sweep_repeat > 1 && self.sweep.is_empty() {
            return Err(format!(
                "sweep_repeat (--sweep-repeat) is {} but there is no sweep: it runs each rate of a \
                 sweep (--sweep R1,R2,... or sweep = [...]) that many times; a run at --rate alone \
                 runs once (drop sweep_repeat, or give the rate as a one-rate sweep)",
                self.sweep_repeat
            ));
        }
        self.layout()
    }

    /// Checks every field of one run and splits it over workers (the sweep, if any, only for
    /// its rates; `validate` checks what needs the whole scenario).
    pub fn layout(&self) -> Result<Layout, String> {
        let kind = parse_target(&self.target)?;
        let target = kind.addr();
        if self.secret_file.is_none() && !kind.is_mqtt() {
            return Err(
                "no token secret: give --secret-file (the server's <data_dir>/token.secret) \
                        or --data-dir, or secret_file in the scenario"
                    .into(),
            );
        }
        let d = u64::from(self.devices_per_user);
        if d == 0 || self.devices_per_user > DEVICES_PER_USER_MAX {
            return Err(format!(
                "devices_per_user must be 1..={DEVICES_PER_USER_MAX}"
            ));
        }
        let (users, connections) = match (self.users, self.connections) {
            (0, 0) => return Err("give connections or users".into()),
            (0, c) if c % d != 0 => {
                return Err(format!(
                    "connections {c} is not a multiple of devices_per_user {d}"
                ))
            }
            (0, c) => (c / d, c),
            (u, 0) => (u, u * d),
            (u, c) if u * d != c => {
                return Err(format!(
                    "users {u} × devices_per_user {d} = {} but connections is {c}",
                    u * d
                ))
            }
            (u, c) => (u, c),
        };
        if !(self.rate > 0.0 && self.rate <= RATE_MAX) {
            return Err(format!("rate must be in (0, {RATE_MAX}] messages/s"));
        }
        if self.sweep.iter().any(|r| !(*r > 0.0 && *r <= RATE_MAX)) {
            return Err(format!("every sweep rate must be in (0, {RATE_MAX}]"));
        }
        check_sweep_repeat(self.sweep_repeat)?;
        if !(self.connect_rate >= 0.0 && self.connect_rate.is_finite()) {
            return Err("connect_rate must be >= 0".into());
        }
        if (self.direct_pct + self.group_pct - 100.0).abs() > 1e-9
            || self.direct_pct < 0.0
            || self.group_pct < 0.0
        {
            return Err(format!(
                "direct_pct ({}) + group_pct ({}) must be 100",
                self.direct_pct, self.group_pct
            ));
        }
        if self.group_sizes.min() < 2 || self.group_sizes.max() > GROUP_SIZE_MAX {
            return Err(format!("group sizes must be 2..={GROUP_SIZE_MAX}"));
        }
        if !(self.groups_per_user > 0.0 && self.groups_per_user <= 100.0) {
            return Err("groups_per_user must be in (0, 100]".into());
        }
        let (pmin, pmax) = (self.payload_bytes.min(), self.payload_bytes.max());
        if (pmin as usize) < PAYLOAD_HEADER_BYTES || pmax as usize > PAYLOAD_BYTES_MAX {
            return Err(format!(
                "payload sizes must be {PAYLOAD_HEADER_BYTES}..={PAYLOAD_BYTES_MAX} bytes (the \
                 first {PAYLOAD_HEADER_BYTES} carry the message id and scheduled time)"
            ));
        }
        if self.duration.is_zero() {
            return Err("duration must be > 0".into());
        }
        if self.knee_p95_ms.is_nan() || self.knee_p95_ms <= 0.0 {
            return Err("knee_p95_ms must be > 0".into());
        }
        if self.seed > i64::MAX as u64 || self.first_user > i64::MAX as u64 {
            return Err("seed and first_user must be below 2^63 (TOML integers are i64)".into());
        }
        if self.conns_per_worker_max == 0 {
            return Err("conns_per_worker_max must be > 0".into());
        }
        let need = u64::from(self.contacts_per_user) + 1;
        let workers = match self.workers {
            0 => {
                let group_max = if self.group_pct > 0.0 {
                    u64::from(self.group_sizes.max())
                } else {
                    0
                };
                auto_workers(
                    connections.div_ceil(self.conns_per_worker_max),
                    users / need.max(2).max(group_max),
                    machine_cpus(),
                )
            }
            w => u64::from(w),
        };
        if workers == 0 || workers > u64::from(WORKERS_MAX) {
            return Err(format!("workers must be 1..={WORKERS_MAX} (got {workers})"));
        }
        let per_worker_users_min = users / workers;
        if self.contacts_per_user == 0 || per_worker_users_min < need.max(2) {
            return Err(format!(
                "each worker needs at least {} users for contacts_per_user {} (it has {per_worker_users_min}); \
                 use fewer workers or more users",
                need.max(2),
                self.contacts_per_user
            ));
        }
        if self.group_pct > 0.0 && u64::from(self.group_sizes.max()) > per_worker_users_min {
            return Err(format!(
                "groups of up to {} members need that many users in every worker (they have \
                 {per_worker_users_min}): a group never spans workers",
                self.group_sizes.max()
            ));
        }
        let top_rate = self.sweep.iter().copied().fold(self.rate, f64::max);
        let seconds = (self.warmup + self.duration).as_secs_f64();
        let msgs_per_worker = top_rate * seconds / workers as f64;
        if msgs_per_worker > MESSAGES_PER_WORKER_MAX as f64 {
            return Err(format!(
                "{msgs_per_worker:.0} messages per worker is over {MESSAGES_PER_WORKER_MAX} (each is \
                 tracked to the end): shorten the run or add workers"
            ));
        }
        let ips_total = if self.source_ips == 0 {
            // At least one per worker so each worker's share stays small.
            (connections.div_ceil(CONNECTIONS_PER_SOURCE_IP_MAX)).max(workers)
        } else {
            u64::from(self.source_ips).max(workers)
        };
        if ips_total > u64::from(SOURCE_IPS_MAX) {
            return Err(format!("at most {SOURCE_IPS_MAX} source addresses"));
        }
        if target.is_ipv6() && ips_total > 1 {
            return Err(
                "IPv6 has one loopback address: use an IPv4 target for several workers or \
                        more than 10,000 connections"
                    .into(),
            );
        }
        let mut shares = Vec::with_capacity(workers as usize);
        let (mut offset, mut ip_next) = (0u64, 1u32);
        for k in 0..workers {
            let u = users / workers + u64::from(k < users % workers);
            let ips = (ips_total / workers + u64::from(k < ips_total % workers)) as u32;
            let frac = u as f64 / users as f64;
            shares.push(Share {
                index: k as u32,
                user_offset: offset,
                users: u,
                connections: u * d,
                rate: self.rate * frac,
                connect_rate: self.connect_rate * frac,
                ip_first: ip_next,
                ips,
            });
            offset += u;
            ip_next += ips;
        }
        Ok(Layout {
            target,
            users,
            connections,
            shares,
        })
    }

    /// Fails when the scenario asks for something the target cannot do. Every Switchboard
    /// target speaks groups (protocol v1.1); the MQTT comparison is 1:1 only and has no
    /// receipts (the caller turns them off for MQTT).
    pub fn check_target_support(&self) -> Result<(), String> {
        let kind = parse_target(&self.target)?;
        if kind.is_mqtt() && self.group_pct > 0.0 {
            return Err(
                "group traffic is not supported against an MQTT broker: the comparison \
                        runs the 1:1 scenario only (set group_pct = 0)"
                    .into(),
            );
        }
        if kind.is_mqtt() && self.receipts {
            return Err("MQTT has no delivered receipts: run with --no-receipts".into());
        }
        Ok(())
    }

    /// Groups a worker with `users` users creates (0 without group traffic).
    pub fn groups_for(&self, users: u64) -> u64 {
        if self.group_pct <= 0.0 {
            return 0;
        }
        ((users as f64 * self.groups_per_user / self.group_sizes.mean()).ceil() as u64).max(1)
    }

    /// This scenario with `rate` as the rate and no sweep (one step of a sweep).
    pub fn at_rate(&self, rate: f64) -> Scenario {
        Scenario {
            rate,
            sweep: Vec::new(),
            ..self.clone()
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a Scenario always serializes")
    }

    pub fn from_toml(text: &str) -> Result<Scenario, String> {
        toml::from_str(text).map_err(|e| format!("scenario: {e}"))
    }
}

/// Worker processes when the scenario says `workers = 0`: enough for the sockets
/// (`by_fds` = ⌈connections / conns_per_worker_max⌉), and at least one per CPU of this machine
/// (capped at `AUTO_WORKERS_BY_CPU_MAX` in all) as long as every worker still gets the users its
/// conversations need (`fit`: users / the fewest users one worker may have).
///
/// Why one per CPU: a worker is one event-loop thread. On a box it shares with the server, one
/// thread competes with every reactor thread for CPU time and falls behind long before the
/// machine is busy. Measured on the 2-vCPU development VM, 1:1 with receipts, 2K connections:
/// at 20K msgs/s one worker was 5.9 ms late sending (p50) and read 9.5 ms after the bytes
/// arrived, e2e p95 51.9 ms; two workers: 0.11 / 0.18 ms, e2e p95 6.5 ms, for 34 % more client
/// CPU. Those delays are the load generator's, yet every latency charges them to the server.
pub fn auto_workers(by_fds: u64, fit: u64, cpus: u64) -> u64 {
    let by_cpus = cpus.min(u64::from(AUTO_WORKERS_BY_CPU_MAX)).min(fit).max(1);
    by_fds.max(by_cpus)
}

/// CPUs `auto_workers` counts: this machine's; in unit tests always 2 (the development machines'),
/// so a layout is the same wherever the tests run.
fn machine_cpus() -> u64 {
    if cfg!(test) {
        return 2;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

/// The most workers `auto_workers` starts for CPUs alone (more for sockets when needed).
pub const AUTO_WORKERS_BY_CPU_MAX: u32 = 16;

/// `sweep_repeat` must be 1..=`SWEEP_REPEAT_MAX`.
pub fn check_sweep_repeat(n: u32) -> Result<(), String> {
    if (1..=SWEEP_REPEAT_MAX).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "sweep_repeat (--sweep-repeat) is {n}: it must be 1..={SWEEP_REPEAT_MAX} runs per sweep rate"
        ))
    }
}

/// `127.0.0.n` for a 1-based source address index (IPv6 targets use `::1`).
pub fn source_ip(target: SocketAddr, n: u32) -> IpAddr {
    match target {
        SocketAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, n.clamp(1, 254) as u8)),
        SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_workers_take_one_per_cpu_when_the_users_fit() {
        // 2K connections on 2 CPUs: two workers (one would do for the sockets).
        assert_eq!(auto_workers(1, 666, 2), 2);
        // Sockets need more than the CPUs give.
        assert_eq!(auto_workers(7, 100, 2), 7);
        // Too few users to split: 100-member groups over 150 users stay in one worker.
        assert_eq!(auto_workers(1, 1, 2), 1);
        assert_eq!(auto_workers(1, 0, 2), 1);
        // A big box: capped.
        assert_eq!(
            auto_workers(1, 10_000, 96),
            u64::from(AUTO_WORKERS_BY_CPU_MAX)
        );
        // The layout uses it: 40 connections with 2 contacts each split as the CPUs allow.
        let sc = Scenario {
            connections: 40,
            ..base()
        };
        let l = sc.layout().expect("layout");
        assert_eq!(l.shares.len(), 2, "{l:?}");
    }

    fn base() -> Scenario {
        Scenario {
            secret_file: Some("/x".into()),
            ..Scenario::default()
        }
    }

    #[test]
    fn dist_parse_pick_and_roundtrip() {
        let d = Dist::parse("100:90, 4000:10").expect("parse");
        assert_eq!(d.items, vec![(100, 90), (4000, 10)]);
        assert_eq!(d.total_weight(), 100);
        assert_eq!(d.pick(0), 100);
        assert_eq!(d.pick(89), 100);
        assert_eq!(d.pick(90), 4000);
        assert_eq!(d.pick(199), 4000);
        assert!((d.mean() - 490.0).abs() < 1e-9);
        assert_eq!(Dist::parse(&d.to_string()), Ok(d));
        assert_eq!(Dist::parse("7"), Ok(Dist::fixed(7)));
        assert!(Dist::parse("").is_err());
        assert!(Dist::parse("1:0").is_err());
        assert!(Dist::parse("x").is_err());
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("ws://127.0.0.1:7070"),
            Ok(TargetKind::Switchboard(
                "127.0.0.1:7070".parse().expect("addr")
            ))
        );
        assert!(parse_target("127.0.0.2:1/v1/ws").is_ok());
        assert!(parse_target("ws://localhost:7070").is_ok());
        assert!(parse_target("ws://10.0.0.1:7070").is_err());
        let mqtt = parse_target("mqtt://127.0.0.1:1883").expect("mqtt");
        assert!(mqtt.is_mqtt());
        assert!(parse_target("mqtt://10.1.1.1:1883").is_err());
        let s = Scenario {
            target: "mqtt://127.0.0.1:1883".into(),
            secret_file: None,
            ..Scenario::default()
        };
        assert!(s.layout().is_ok(), "no secret needed for MQTT");
        assert!(s.check_target_support().is_err(), "receipts must be off");
        let s = Scenario {
            receipts: false,
            ..s
        };
        assert!(s.check_target_support().is_ok());
        assert!(Scenario {
            group_pct: 10.0,
            direct_pct: 90.0,
            ..s
        }
        .check_target_support()
        .is_err());
    }

    #[test]
    fn layout_splits_users_rates_and_addresses() {
        let s = Scenario {
            connections: 40_000,
            devices_per_user: 2,
            rate: 1000.0,
            ..base()
        };
        let l = s.layout().expect("layout");
        assert_eq!((l.users, l.connections), (20_000, 40_000));
        // 40,000 / 15,000 → 3 workers; 4 source addresses over 3 workers.
        assert_eq!(l.shares.len(), 3);
        assert_eq!(
            l.shares.iter().map(|s| s.users).collect::<Vec<_>>(),
            vec![6667, 6667, 6666]
        );
        assert_eq!(l.shares.iter().map(|s| s.connections).sum::<u64>(), 40_000);
        let rate: f64 = l.shares.iter().map(|s| s.rate).sum();
        assert!((rate - 1000.0).abs() < 1e-6);
        assert_eq!(l.shares[1].user_offset, 6667);
        assert_eq!(
            l.shares
                .iter()
                .map(|s| (s.ip_first, s.ips))
                .collect::<Vec<_>>(),
            vec![(1, 2), (3, 1), (4, 1)]
        );
        assert!(l
            .shares
            .iter()
            .all(|s| s.connections <= CONNS_PER_WORKER_DEFAULT));
    }

    #[test]
    fn layout_rejects_bad_scenarios() {
        let bad = |s: Scenario| s.layout().expect_err("should fail");
        bad(Scenario {
            secret_file: None,
            ..base()
        });
        bad(Scenario {
            connections: 1001,
            devices_per_user: 2,
            ..base()
        });
        bad(Scenario {
            users: 10,
            connections: 30,
            devices_per_user: 2,
            ..base()
        });
        bad(Scenario {
            direct_pct: 50.0,
            ..base()
        });
        bad(Scenario {
            payload_bytes: Dist::fixed(10),
            ..base()
        });
        bad(Scenario {
            connections: 4,
            workers: 3,
            ..base()
        });
        bad(Scenario {
            rate: 0.0,
            ..base()
        });
        for n in [0, SWEEP_REPEAT_MAX + 1] {
            let e = bad(Scenario {
                sweep_repeat: n,
                ..base()
            });
            assert!(e.contains("sweep_repeat") && e.contains("1..=9"), "{e}");
        }
        for n in [1, SWEEP_REPEAT_MAX] {
            let ok = Scenario {
                sweep_repeat: n,
                ..base()
            };
            assert!(ok.layout().is_ok(), "sweep_repeat {n}");
        }
        bad(Scenario {
            target: "ws://8.8.8.8:80".into(),
            ..base()
        });
    }

    #[test]
    fn sweep_repeat_without_a_sweep_is_refused() {
        for n in [2, 3, SWEEP_REPEAT_MAX] {
            let lone = Scenario {
                sweep_repeat: n,
                ..base()
            };
            let e = lone.validate().expect_err("nothing to repeat");
            assert!(
                e.contains(&format!(
                    "sweep_repeat (--sweep-repeat) is {n} but there is no sweep"
                )),
                "{e}"
            );
            // A sweep makes it valid; one run per rate needs no sweep.
            let swept = Scenario {
                sweep: vec![100.0, 200.0],
                ..lone.clone()
            };
            assert!(swept.validate().is_ok(), "sweep_repeat {n} with a sweep");
            // Every run of that sweep (the sweep removed, `sweep_repeat` kept) still lays out.
            assert!(swept.at_rate(100.0).layout().is_ok());
        }
        assert!(base().validate().is_ok(), "sweep_repeat 1 without a sweep");
        // Out of range is still the range error, with or without a sweep.
        let e = Scenario {
            sweep_repeat: 0,
            ..base()
        }
        .validate()
        .expect_err("0 runs");
        assert!(e.contains("1..=9"), "{e}");
        let file = Scenario::from_toml("sweep_repeat = 3\n").expect("parse");
        assert!(
            Scenario {
                secret_file: Some("/x".into()),
                ..file
            }
            .validate()
            .is_err(),
            "TOML sweep_repeat without sweep = [...]"
        );
    }

    #[test]
    fn groups_fit_in_a_worker() {
        let s = Scenario {
            direct_pct: 80.0,
            group_pct: 20.0,
            group_sizes: Dist::parse("10:50,100:50").expect("dist"),
            ..base()
        };
        assert!(s.layout().is_ok());
        assert!(s.check_target_support().is_ok());
        // 1000 users × 1 group each / mean size 55 → 19 groups.
        assert_eq!(s.groups_for(1000), 19);
        assert_eq!(base().groups_for(1000), 0);
        let too_big = Scenario {
            connections: 50,
            ..s.clone()
        };
        assert!(too_big.layout().is_err());
        let over_limit = Scenario {
            group_sizes: Dist::fixed(2000),
            ..s
        };
        assert!(over_limit.layout().is_err());
    }

    #[test]
    fn toml_roundtrip_and_defaults() {
        let s = Scenario::from_toml(
            "name = \"x\"\nconnections = 2000\nrate = 5000\nduration = \"10s\"\n\
             payload_bytes = \"100:9,1000:1\"\narrival = \"constant\"\nsweep = [1000, 2000]\n",
        )
        .expect("parse");
        assert_eq!(s.connections, 2000);
        assert_eq!(s.duration, Duration::from_secs(10));
        assert_eq!(s.arrival, Arrival::Constant);
        assert_eq!(s.warmup, Scenario::default().warmup);
        assert_eq!(s.sweep_repeat, 1, "one run per rate unless asked");
        let r = Scenario::from_toml("sweep_repeat = 3\n").expect("parse");
        assert_eq!(r.sweep_repeat, 3);
        assert_eq!(Scenario::from_toml(&s.to_toml()), Ok(s));
        assert!(Scenario::from_toml("no_such_key = 1").is_err());
    }
}
