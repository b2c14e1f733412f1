//! The server's one configuration struct. Every field has a documented default and the
//! trade-off it controls; `validate()` runs right after loading. `switchboard serve --print-config`
//! prints the effective values as TOML.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default port for the embedded single-box setup (WebSocket, HTTP metrics, echo all share it).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// Longest `idle_timeout` (and so `ping_interval`) accepted: 7 days. Each connection keeps its
/// receive and ping times as wrapping u32 milliseconds of its core's clock (4 bytes each in
/// every connection's shared state), which compare correctly for gaps under 24 days.
pub const CONN_TIMEOUT_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// Largest `conn_send_queue_bytes_max` accepted: the queued byte count is a u32 per connection.
pub const CONN_SEND_QUEUE_BYTES_MAX_MAX: usize = u32::MAX as usize;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address every core's listener binds (SO_REUSEPORT: the kernel spreads connections over
    /// cores). Default `127.0.0.1:7070`; use `0.0.0.0:7070` to serve other hosts.
    pub listen: SocketAddr,
    /// Listen backlog per core. Default 4096. Larger absorbs connect storms (a reconnecting
    /// fleet) at the cost of kernel memory for half-open connections; capped by `net.core.somaxconn`.
    pub listen_backlog: u32,
    /// Reactor (glommio executor) count, one per core. 0 = one per available CPU. Default 0.
    pub cores: usize,
    /// Pin each reactor to its own CPU (`Placement::Fixed`). Default true. Turned off
    /// automatically when `cores` exceeds the CPU count (tests that want many shards on a small box).
    pub pin_cores: bool,
    /// Where the embedded store keeps its logs. Default `./data`.
    pub data_dir: PathBuf,
    /// Secret for signing session tokens (HMAC-SHA256), at least 32 bytes. Default: empty,
    /// meaning read `<data_dir>/token.secret`, creating it with 32 random bytes on first start.
    pub token_secret: String,
    /// Largest WebSocket message accepted, bytes. Default 65 KiB + 1 KiB (a 64 KiB payload plus its
    /// envelope); cannot exceed the protocol's `FRAME_BYTES_MAX`.
    pub frame_bytes_max: usize,
    /// Bytes queued towards one connection (not yet written to its socket) before the server
    /// closes it as a slow consumer with close code 4002. Default 1 MiB. The worst-case memory
    /// of a stuck connection; messages are durable, so the client loses nothing: it reconnects
    /// and syncs. At most `CONN_SEND_QUEUE_BYTES_MAX_MAX` (4 GiB − 1).
    pub conn_send_queue_bytes_max: usize,
    /// Sends a connection may have in flight (sent to the owning core, not yet answered) before the
    /// server stops reading that socket. Default 256. Back-pressure towards a fast sender.
    pub conn_inflight_sends_max: usize,
    /// Time allowed from TCP accept to a complete HTTP request head. Default 10 s.
    #[serde(with = "duration_secs")]
    pub handshake_timeout: Duration,
    /// Interval of server WebSocket pings. Default 25 s (below common 30 s NAT/proxy idle timers).
    #[serde(with = "duration_secs")]
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long is closed. Default 60 s;
    /// must exceed `ping_interval` so a live client always answers in time, and be at most
    /// `CONN_TIMEOUT_MAX` (7 days).
    #[serde(with = "duration_secs")]
    pub idle_timeout: Duration,
    /// Connections one core accepts before answering new ones with HTTP 503. Default 100_000.
    /// Each idle authenticated connection costs a few KiB of user memory plus kernel socket memory.
    pub conns_per_core_max: usize,
    /// Enable `GET /v1/echo`: an unauthenticated WebSocket echo on the same framing code, for
    /// conformance suites (Autobahn|Testsuite). Default false; never enable it in production.
    pub echo_endpoint: bool,
    /// Most records in one group commit (one write + one fdatasync). Default 1024. Larger batches
    /// amortise the fsync further but delay every message in the batch.
    pub commit_batch_records_max: usize,
    /// Extra time the committer waits to fill a batch when records were already waiting as its
    /// previous commit finished (sustained load), microseconds; an idle shard commits at once, so
    /// a lone message never pays it. Default 300: on the development VM (AMD host, 12.5K–25K
    /// msgs/s 1:1 with receipts) it cut commits by ~44% and machine CPU by ~14%, and at 25K
    /// msgs/s e2e p99 from 45–55 ms to 18–26 ms (`benches/results/dev-2vcpu-epyc/README.md`).
    /// 0: batches form only while the previous fsync runs.
    pub commit_delay_us: u64,
    /// Records waiting for the committer on one shard before new sends get `Overloaded`.
    /// Default 16_384. Bounds the memory of a shard whose disk cannot keep up.
    pub shard_pending_records_max: usize,
    /// Back-pressure before that limit. Default true: once a quarter of
    /// `shard_pending_records_max` records wait on a shard, a connection that sends to it is not
    /// read again until they are down to an eighth (`owner::pressure_marks`), so a fast sender
    /// waits in TCP instead of reading `Overloaded` errors. Each refused send costs a read, a
    /// decode and an error frame on both sides: at 80K msgs/s offered on the development VM
    /// (1:1, 2K connections) the server acked 42.7K msgs/s and refused 440K sends without it,
    /// 60–78K msgs/s and refused 0–2.8K with it. False: no throttling, only the limit.
    pub shard_pressure_throttle: bool,
    /// Messages per chat one `Sync` round returns before answering `more = true`. Default 1000.
    pub sync_chat_messages_max: usize,
    /// Payload bytes one `Sync` round sends (split evenly over the shards) before answering
    /// `more = true`. Default 256 KiB. Keeps a sync inside the connection's send queue: the
    /// client asks for the next round after it has read this one.
    pub sync_round_bytes_max: usize,
    /// Batches in flight on each core-to-core channel. Default 128 (Seastar's queue length).
    pub mesh_channel_batches_max: usize,
    /// Items in one core-to-core batch. Default 256.
    pub mesh_batch_items_max: usize,
    /// Items waiting in a core's outbox towards one other core before producers wait. Default 8192.
    pub mesh_outbox_items_max: usize,
    /// Devices of one user connected at once. Default 5. A further device's upgrade is answered
    /// 409; a device that reconnects replaces its own older connection and does not count twice.
    pub devices_per_user_max: usize,
    /// Largest group, members (creator included). Default 1024, at most the protocol's
    /// `GROUP_USERS_MAX` and the store's `CHAT_MEMBERS_MAX`. Fan-out work per message grows with it.
    pub group_members_max: usize,
    /// Typing notices are not forwarded in groups with more members than this. Default 20: in
    /// big groups they are noise and cost O(members) frames per keystroke burst.
    pub typing_group_members_max: usize,
    /// At most one forwarded "typing" per user and chat per this interval, ms. Default 2000.
    pub typing_throttle_ms: u64,
    /// How long after sending an author may edit a message, seconds. Default 900 (15 min).
    pub edit_window_secs: u64,
    /// How long after sending an author may delete a message for everyone, seconds. Default
    /// 172_800 (48 h).
    pub delete_window_secs: u64,
    /// Size of the embedded store's log segments. Default 64 MiB.
    pub segment_bytes_max: u64,
    /// Preallocate log segments: each new segment is zero-filled (real writes) and synced in the
    /// background before the roll that uses it, so a commit's `fdatasync` flushes data only (no
    /// size or extent metadata, no journal commit): ~0.64× the append time on ext4 in one run (see
    /// `benches/results/dev-2vcpu/log-append-prealloc.md`). Default true. Costs: every log byte
    /// is written twice (zeros, then records) and each shard keeps one spare segment
    /// (`segment_bytes_max`, 64 MiB) on disk. A fresh shard's first segment is not preallocated.
    pub preallocate_segments: bool,
    /// Dedup entries (sender, client_msg_id) kept per shard; a retry older than the newest this
    /// many sends is stored again. Default 1_000_000 (~80 MB per shard at worst).
    pub dedup_entries_max: usize,
    /// Push notifications (`[push]`): sinks (webhook, FCM, APNs), retry policy and limits.
    /// No sink configured: jobs for that platform go to the dead-letter log. See
    /// `switchboard_push::PushConfig`.
    pub push: switchboard_push::PushConfig,
    /// Browser origins (`https://web.example.com`) allowed to call the HTTP API and to open
    /// WebSockets; checked before `101`. Requests without an `Origin` header (native clients)
    /// are not affected. `"*"` allows any origin (development only). Default empty: no browser
    /// origin is allowed. At most 64 entries.
    pub allowed_origins: Vec<String>,
    /// Lifetime of the session tokens `POST /v1/auth/verify` and `/refresh` mint, seconds.
    /// Default 2_592_000 (30 days). Also how long a logout's revocation entry is kept.
    pub token_ttl_s: u64,
    /// How login codes are sent: `"log"` (written to stderr, development only) or `"webhook"`
    /// (JSON POST to `sms_webhook_url`, signed with `sms_webhook_secret`). Default `"log"`.
    pub sms: String,
    /// The SMS gateway webhook, `http://host:port/path` (plain HTTP: run a local relay for an
    /// https gateway). Used with `sms = "webhook"`.
    pub sms_webhook_url: String,
    /// Secret for the webhook's `x-switchboard-signature` (HMAC-SHA256). Required with
    /// `sms = "webhook"`, at least 16 bytes.
    pub sms_webhook_secret: String,
    /// Messages (sends, group changes, edits, deletes, reactions) one user may send: a burst of
    /// this many, default 60 ... (rate limits are kept per core: a user whose devices are
    /// connected to several cores gets up to that many times the rate).
    pub messages_per_user_burst: u32,
    /// ... then this many per second, default 1 (1..=1000). Over the limit the frame is answered
    /// with an `Error` frame `RATE_LIMITED` carrying its `client_msg_id`; nothing is stored and
    /// the client retries with the same id.
    pub messages_per_user_refill_per_s: u64,
    /// Frames of any kind on one connection: a burst of this many, default 200 ...
    pub frames_per_conn_burst: u32,
    /// ... then this many per second, default 50 (1..=1000). Over it: `RATE_LIMITED`.
    pub frames_per_conn_refill_per_s: u64,
    /// New connections from one source address (IPv6: per /64), per core: burst, default 30 ...
    pub connects_per_addr_burst: u32,
    /// ... then this many per second, default 1 (1..=1000). Over it: HTTP 429 and close.
    pub connects_per_addr_refill_per_s: u64,
    /// Apply the per-address connection limit to loopback addresses too. Default false: behind
    /// a local reverse proxy every client has the proxy's address (and the load generator runs
    /// on the same box).
    pub rate_limit_loopback: bool,
    /// PEM certificate chain (leaf first) for https/wss on the same listener; with `tls_key`.
    /// Default none: plain only. Connections are told apart by their first byte.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Submission entries of each of a reactor's three io_uring rings (glommio `ring_depth`).
    /// Default 4096. Every idle connection keeps one socket poll armed in its core's main ring,
    /// and the kernel finds the target of each cancellation by walking one bucket of a hash
    /// table whose size follows the ring size (8 buckets at glommio's default 128, 256 from
    /// 4096 entries). glommio cancels and re-arms a preemption timer on every reactor turn, so
    /// with small rings each turn walked ~1/8 of all connections' polls. Costs ~0.4 MiB of
    /// ring memory per ring (three per core).
    pub io_ring_entries: usize,
    /// How long a reactor with nothing to do keeps polling before it parks (sleeps in the
    /// kernel), microseconds. Default 0 (park at once). A park and the wake-up after it cost
    /// a timer arm and cancel, an `eventfd` write by the waking core, two context switches and,
    /// on a VM, an exit to wake the halted vCPU; at moderate load work arrives within
    /// microseconds and a short spin skips all of it. While it spins the reactor yields its CPU
    /// to any other runnable thread and parks once one ran (glommio patch 5), so it does not
    /// keep a CPU from another thread (the load generator, the fsync workers) for longer than
    /// one poll.
    /// Cost: an idle server burns up to this long per wake-up (200 µs: ~1% of a core idle on
    /// the dev box), and busy CPU under load rises 7–9 %. Measured on the dev box
    /// (`benches/results/dev-2vcpu-epyc/spin.md`): 200 µs halved 1:1 p99 at 15K msgs/s on fresh
    /// servers but showed no gain on a long-lived server, hence not the default.
    pub spin_before_park_us: u64,
    /// Largest media object `POST /v1/media` accepts, bytes (413 over it). Default 104_857_600
    /// (100 MiB); at most 5 GiB (an upload is streamed, so memory does not grow with it).
    pub media_bytes_max: u64,
    /// Where media bytes live: `"local"` (default: `<data_dir>/media`, served by this server) or
    /// `"s3"` (clients PUT/GET straight to an S3-compatible store with presigned SigV4 URLs;
    /// the `media_s3_*` settings are then required). Metadata is under `<data_dir>/media` either
    /// way.
    pub media_backend: String,
    /// S3 endpoint, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:9000`.
    pub media_s3_endpoint: String,
    pub media_s3_bucket: String,
    /// Default `"us-east-1"`.
    pub media_s3_region: String,
    pub media_s3_access_key: String,
    pub media_s3_secret_key: String,
    /// Path-style URLs (`endpoint/bucket/key`, most self-hosted stores) rather than
    /// virtual-hosted (`bucket.endpoint/key`, AWS). Default true.
    pub media_s3_path_style: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            listen_backlog: 4096,
            cores: 0,
            pin_cores: true,
            data_dir: PathBuf::from("data"),
            token_secret: String::new(),
            frame_bytes_max: switchboard_wire::limits::FRAME_BYTES_MAX,
            conn_send_queue_bytes_max: 1024 * 1024,
            conn_inflight_sends_max: 256,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            conns_per_core_max: 100_000,
            echo_endpoint: false,
            commit_batch_records_max: 1024,
            commit_delay_us: 300,
            shard_pending_records_max: 16_384,
            shard_pressure_throttle: true,
            sync_chat_messages_max: 1000,
            sync_round_bytes_max: 256 * 1024,
            mesh_channel_batches_max: 128,
            mesh_batch_items_max: 256,
            mesh_outbox_items_max: 8192,
            devices_per_user_max: 5,
            group_members_max: 1024,
            typing_group_members_max: 20,
            typing_throttle_ms: 2000,
            edit_window_secs: 900,
            delete_window_secs: 172_800,
            segment_bytes_max: 64 * 1024 * 1024,
            preallocate_segments: true,
            dedup_entries_max: 1_000_000,
            push: switchboard_push::PushConfig::default(),
            allowed_origins: Vec::new(),
            token_ttl_s: 30 * 86_400,
            sms: "log".into(),
            sms_webhook_url: String::new(),
            sms_webhook_secret: String::new(),
            messages_per_user_burst: 60,
            messages_per_user_refill_per_s: 1,
            frames_per_conn_burst: 200,
            frames_per_conn_refill_per_s: 50,
            connects_per_addr_burst: 30,
            connects_per_addr_refill_per_s: 1,
            rate_limit_loopback: false,
            tls_cert: None,
            tls_key: None,
            io_ring_entries: 4096,
            spin_before_park_us: 0,
            media_bytes_max: switchboard_media::MEDIA_BYTES_MAX_DEFAULT,
            media_backend: "local".into(),
            media_s3_endpoint: String::new(),
            media_s3_bucket: String::new(),
            media_s3_region: "us-east-1".into(),
            media_s3_access_key: String::new(),
            media_s3_secret_key: String::new(),
            media_s3_path_style: true,
        }
    }
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}
impl std::error::Error for ConfigError {}

impl Config {
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Checks every field and the relationships between them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |s: &str| Err(ConfigError(s.to_string()));
        if self.frame_bytes_max < 1024
            || self.frame_bytes_max > switchboard_wire::limits::FRAME_BYTES_MAX
        {
            return err("frame_bytes_max must be within 1 KiB ..= FRAME_BYTES_MAX (65 KiB)");
        }
        if self.conn_send_queue_bytes_max < switchboard_wire::limits::SERVER_FRAME_BYTES_MAX {
            return err(
                "conn_send_queue_bytes_max must hold at least one largest server frame (512 KiB)",
            );
        }
        if self.sync_round_bytes_max == 0
            || self.conn_send_queue_bytes_max
                < 2 * self.sync_round_bytes_max + switchboard_wire::limits::SERVER_FRAME_BYTES_MAX
        {
            return err(
                "conn_send_queue_bytes_max must hold two sync rounds plus one largest frame",
            );
        }
        if self.idle_timeout <= self.ping_interval {
            return err("idle_timeout must be longer than ping_interval");
        }
        if self.idle_timeout > CONN_TIMEOUT_MAX {
            return err("idle_timeout must be at most 7 days (CONN_TIMEOUT_MAX)");
        }
        if self.conn_send_queue_bytes_max > CONN_SEND_QUEUE_BYTES_MAX_MAX {
            return err("conn_send_queue_bytes_max must be below 4 GiB");
        }
        if self.handshake_timeout.is_zero() || self.ping_interval.is_zero() {
            return err("handshake_timeout and ping_interval must be positive");
        }
        if self.conns_per_core_max == 0 || self.conn_inflight_sends_max == 0 {
            return err("conns_per_core_max and conn_inflight_sends_max must be positive");
        }
        if self.commit_batch_records_max == 0
            || self.shard_pending_records_max < self.commit_batch_records_max
        {
            return err("need 0 < commit_batch_records_max <= shard_pending_records_max");
        }
        if self.mesh_channel_batches_max == 0
            || self.mesh_batch_items_max == 0
            || self.mesh_outbox_items_max == 0
        {
            return err("mesh_* limits must be positive");
        }
        if !(1..=32_768).contains(&self.io_ring_entries) {
            return err("io_ring_entries must be within 1 ..= 32768");
        }
        if self.commit_delay_us > 1_000_000 {
            return err("commit_delay_us must be at most 1 s");
        }
        if self.spin_before_park_us > 1_000_000 {
            return err("spin_before_park_us must be at most 1 s");
        }
        if self.devices_per_user_max == 0 {
            return err("devices_per_user_max must be positive");
        }
        if self.group_members_max < 2
            || self.group_members_max > switchboard_wire::limits::GROUP_USERS_MAX
            || self.group_members_max > switchboard_storage::CHAT_MEMBERS_MAX
        {
            return err("group_members_max must be within 2 ..= 1024");
        }
        if self.segment_bytes_max < 1024 * 1024 {
            return err("segment_bytes_max must be at least 1 MiB");
        }
        if self.cores > 256 {
            return err("cores must be at most 256");
        }
        if !self.token_secret.is_empty() && self.token_secret.len() < 32 {
            return err("token_secret must be at least 32 characters");
        }
        let origins: Vec<&str> = self.allowed_origins.iter().map(String::as_str).collect();
        if let Err(e) = switchboard_api::origin::OriginPolicy::new(&origins) {
            return Err(ConfigError(format!("allowed_origins: {e}")));
        }
        for (burst, per_s, name) in [
            (
                self.messages_per_user_burst,
                self.messages_per_user_refill_per_s,
                "messages_per_user",
            ),
            (
                self.frames_per_conn_burst,
                self.frames_per_conn_refill_per_s,
                "frames_per_conn",
            ),
            (
                self.connects_per_addr_burst,
                self.connects_per_addr_refill_per_s,
                "connects_per_addr",
            ),
        ] {
            if burst == 0 || !(1..=1000).contains(&per_s) {
                return Err(ConfigError(format!(
                    "{name}: burst must be positive and refill_per_s within 1..=1000"
                )));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return err("tls_cert and tls_key go together");
        }
        if self.token_ttl_s < 60 || self.token_ttl_s > 365 * 86_400 {
            return err("token_ttl_s must be within 60 ..= 31_536_000");
        }
        match self.sms.as_str() {
            "log" => {}
            "webhook" => {
                if crate::api_http::parse_http_url(&self.sms_webhook_url).is_none() {
                    return err("sms_webhook_url must be http://host:port/path");
                }
                if self.sms_webhook_secret.len() < 16 {
                    return err("sms_webhook_secret must be at least 16 bytes");
                }
            }
            _ => return err("sms must be \"log\" or \"webhook\""),
        }
        if self.media_bytes_max == 0
            || self.media_bytes_max > crate::media_svc::MEDIA_BODY_BYTES_CAP
        {
            return err("media_bytes_max must be within 1 ..= 5 GiB");
        }
        match self.media_backend.as_str() {
            "local" => {}
            "s3" => {
                if let Err(e) = switchboard_media::S3Store::new(&crate::media_svc::s3_config(self))
                {
                    return Err(ConfigError(format!("media_s3_*: {e}")));
                }
            }
            _ => return err("media_backend must be \"local\" or \"s3\""),
        }
        if self.sync_chat_messages_max == 0 || self.dedup_entries_max == 0 {
            return err("sync_chat_messages_max and dedup_entries_max must be positive");
        }
        self.push.validate().map_err(ConfigError)?;
        Ok(())
    }

    /// A rate limit from its config pair (validated).
    pub fn rate(burst: u32, per_s: u64) -> switchboard_api::ratelimit::Rate {
        switchboard_api::ratelimit::Rate::per_second(burst, per_s)
    }

    /// The number of reactors to run.
    pub fn effective_cores(&self) -> usize {
        if self.cores == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.cores
        }
    }
}

mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        if !(0.0..=86_400.0 * 365.0).contains(&secs) {
            return Err(serde::de::Error::custom("duration out of range"));
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_roundtrip_as_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.listen, c.listen);
        assert_eq!(back.idle_timeout, c.idle_timeout);
    }

    #[test]
    fn bad_relationships_are_rejected() {
        let mut c = Config {
            idle_timeout: Duration::from_secs(5),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        c = Config {
            frame_bytes_max: 10 * 1024 * 1024,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        c = Config {
            idle_timeout: CONN_TIMEOUT_MAX + Duration::from_secs(1),
            ..Config::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.0.contains("7 days"), "{}", e.0);
        c.idle_timeout = CONN_TIMEOUT_MAX;
        c.validate().unwrap();
        c = Config {
            token_secret: "short".into(),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        assert!(toml::from_str::<Config>("no_such_field = 1").is_err());
    }
}
