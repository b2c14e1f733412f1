//! `[push]` in the server config. Every sink is optional; a platform whose sink is not
//! configured sends its jobs to the dead-letter log (replay them once it is).

use crate::queue::QueueLimits;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Commands (message events, registrations) waiting for the push thread. Over it the engine
/// drops the push event (counted) rather than wait: the message itself is durable.
pub const PUSH_COMMANDS_MAX: usize = 16_384;
/// One sink request (connect + TLS + response), ms.
pub const SINK_REQUEST_TIMEOUT_MS: u64 = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    /// Generic webhook sink for `platform: webhook` tokens.
    pub webhook: Option<WebhookConfig>,
    /// Firebase Cloud Messaging HTTP v1 for `platform: fcm`.
    pub fcm: Option<FcmConfig>,
    /// Apple Push Notification service (HTTP/2) for `platform: apns`.
    pub apns: Option<ApnsConfig>,
    /// Extra trusted root certificates (PEM) for the sinks, besides the Mozilla roots (a private
    /// gateway, or a test server's certificate).
    pub ca_file: Option<PathBuf>,
    /// Per request, ms. Default 10000.
    pub request_timeout_ms: u64,
    /// Bound of the engine → push thread channel. Default 16384.
    pub commands_max: usize,
    /// Attempts per job before the dead-letter log. Default 6.
    pub attempts_max: u32,
    /// First retry delay, doubled per attempt (with jitter). Default 1000 ms.
    pub backoff_base_ms: u64,
    /// Longest retry delay. Default 300000 ms.
    pub backoff_max_ms: u64,
    /// How long a new job waits for more messages of the same chat. Default 250 ms.
    pub collapse_delay_ms: u64,
    /// Jobs queued at once. Default 100000.
    pub jobs_max: usize,
    /// Requests to push services at once. Default 256.
    pub in_flight_max: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        let q = QueueLimits::default();
        PushConfig {
            webhook: None,
            fcm: None,
            apns: None,
            ca_file: None,
            request_timeout_ms: SINK_REQUEST_TIMEOUT_MS,
            commands_max: PUSH_COMMANDS_MAX,
            attempts_max: q.attempts_max,
            backoff_base_ms: q.backoff_base_ms,
            backoff_max_ms: q.backoff_max_ms,
            collapse_delay_ms: q.collapse_delay_ms,
            jobs_max: q.jobs_max,
            in_flight_max: q.in_flight_max,
        }
    }
}

impl PushConfig {
    pub fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            jobs_max: self.jobs_max,
            in_flight_max: self.in_flight_max,
            attempts_max: self.attempts_max,
            backoff_base_ms: self.backoff_base_ms,
            backoff_max_ms: self.backoff_max_ms,
            collapse_delay_ms: self.collapse_delay_ms,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.attempts_max == 0 || self.in_flight_max == 0 || self.commands_max == 0 {
            return Err("push.attempts_max, in_flight_max, commands_max must be > 0".into());
        }
        if self.backoff_base_ms == 0 || self.backoff_base_ms > self.backoff_max_ms {
            return Err("push.backoff_base_ms must be in 1..=backoff_max_ms".into());
        }
        if self.request_timeout_ms == 0 {
            return Err("push.request_timeout_ms must be > 0".into());
        }
        if let Some(w) = &self.webhook {
            if w.secret.len() < 16 {
                return Err("push.webhook.secret must be at least 16 bytes".into());
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL that receives `POST`s.
    pub url: String,
    /// HMAC-SHA256 key of `x-switchboard-signature` (same scheme as the SMS webhook).
    pub secret: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    /// The Firebase service-account JSON (`project_id`, `client_email`, `private_key`,
    /// `token_uri`).
    pub service_account_file: PathBuf,
    /// Default `https://fcm.googleapis.com`.
    #[serde(default = "default_fcm_endpoint")]
    pub endpoint: String,
    /// Overrides the service account's `token_uri`.
    #[serde(default)]
    pub token_uri: Option<String>,
}

fn default_fcm_endpoint() -> String {
    "https://fcm.googleapis.com".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    /// The `.p8` signing key (PKCS#8 PEM, P-256).
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// Default `https://api.push.apple.com` (sandbox: `https://api.sandbox.push.apple.com`).
    /// `http://` speaks HTTP/2 without TLS (prior knowledge), for tests.
    #[serde(default = "default_apns_endpoint")]
    pub endpoint: String,
}

fn default_apns_endpoint() -> String {
    "https://api.push.apple.com".into()
}
