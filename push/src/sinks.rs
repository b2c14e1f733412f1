//! The three sinks. Each turns a (target, notification) into one request and maps the answer
//! to an [`Outcome`]: delivered, invalid token (forget it), retry (network, 429, 5xx, expired
//! credentials) or permanent (the request itself is wrong; dead-letter it).
//!
//! ```text
//!  webhook: POST url  {user_id, device_id, token, notification}  x-switchboard-signature (HMAC)
//!  FCM v1:  service-account JWT (RS256) ─► POST token_uri ─► access token (cached to expiry)
//!           POST {endpoint}/v1/projects/{project}/messages:send   404/UNREGISTERED → invalid
//!  APNs:    provider JWT (ES256, kid, iss=team; refreshed every 50 min)
//!           HTTP/2 POST {endpoint}/3/device/{token}  apns-topic/-push-type/-collapse-id
//!           410, BadDeviceToken, Unregistered → invalid
//! ```

use crate::config::{ApnsConfig, FcmConfig, PushConfig, WebhookConfig};
use crate::http::{request, HttpClient, Response};
use crate::jwt::{Es256, Rs256};
use crate::model::{Notification, Outcome, Platform, Target};
use hyper::{Method, StatusCode};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// OAuth2 scope for FCM sends.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Lifetime asked for the FCM assertion (Google's maximum).
pub const FCM_ASSERTION_TTL_S: u64 = 3600;
/// An access token is renewed this long before it expires.
pub const FCM_TOKEN_EARLY_REFRESH_S: u64 = 60;
/// APNs provider tokens: Apple rejects tokens older than 60 min and refreshes more often than
/// every 20 min; 50 min sits in between.
pub const APNS_TOKEN_REFRESH_S: u64 = 50 * 60;
const _: () = assert!(APNS_TOKEN_REFRESH_S > 20 * 60 && APNS_TOKEN_REFRESH_S < 60 * 60);
/// `apns-collapse-id` may be at most 64 bytes.
pub const APNS_COLLAPSE_ID_BYTES_MAX: usize = 64;

pub struct Sinks {
    client: Arc<HttpClient>,
    webhook: Option<WebhookConfig>,
    fcm: Option<FcmSink>,
    apns: Option<ApnsSink>,
}

impl Sinks {
    pub fn new(cfg: &PushConfig) -> Result<Sinks, String> {
        let ca = match &cfg.ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?),
            None => None,
        };
        let client = Arc::new(HttpClient::new(
            ca.as_deref(),
            Duration::from_millis(cfg.request_timeout_ms),
        )?);
        Ok(Sinks {
            webhook: cfg.webhook.clone(),
            fcm: cfg.fcm.as_ref().map(FcmSink::new).transpose()?,
            apns: cfg.apns.as_ref().map(ApnsSink::new).transpose()?,
            client,
        })
    }

    pub async fn send(&self, now_unix_s: u64, target: &Target, n: &Notification) -> Outcome {
        match target.platform {
            Platform::Webhook => match &self.webhook {
                Some(w) => webhook(&self.client, w, now_unix_s, target, n).await,
                None => not_configured(target.platform),
            },
            Platform::Fcm => match &self.fcm {
                Some(f) => f.send(&self.client, now_unix_s, target, n).await,
                None => not_configured(target.platform),
            },
            Platform::Apns => match &self.apns {
                Some(a) => a.send(&self.client, now_unix_s, target, n).await,
                None => not_configured(target.platform),
            },
        }
    }
}

fn not_configured(p: Platform) -> Outcome {
    Outcome::Permanent {
        error: format!("no {} sink configured", p.as_str()),
    }
}

fn status_error(r: &Response) -> String {
    let body = String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).into_owned();
    format!("HTTP {}: {}", r.status.as_u16(), body)
}

/// Network errors, timeouts, 408, 429 and 5xx are worth retrying.
fn retry_or_permanent(r: &Response) -> Outcome {
    let s = r.status;
    if s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
    {
        Outcome::Retry {
            error: status_error(r),
            retry_after_ms: r.retry_after_ms(),
        }
    } else {
        Outcome::Permanent {
            error: status_error(r),
        }
    }
}

fn transport(e: String) -> Outcome {
    Outcome::Retry {
        error: e,
        retry_after_ms: None,
    }
}

async fn webhook(
    client: &HttpClient,
    cfg: &WebhookConfig,
    now_unix_s: u64,
    t: &Target,
    n: &Notification,
) -> Outcome {
    let body = serde_json::to_vec(&serde_json::json!({
        "user_id": t.user,
        "device_id": t.device,
        "token": t.token,
        "notification": n,
    }))
    .expect("json");
    let sig = switchboard_api::sign::webhook_signature(cfg.secret.as_bytes(), now_unix_s, &body);
    let req = match request(
        Method::POST,
        &cfg.url,
        &[
            ("content-type", "application/json".into()),
            ("x-switchboard-timestamp", now_unix_s.to_string()),
            ("x-switchboard-signature", sig),
        ],
        body,
    ) {
        Ok(r) => r,
        Err(e) => return Outcome::Permanent { error: e },
    };
    match client.send(req, false).await {
        Err(e) => transport(e),
        Ok(r) if r.status.is_success() => Outcome::Delivered,
        Ok(r) if r.status == StatusCode::NOT_FOUND || r.status == StatusCode::GONE => {
            Outcome::InvalidToken
        }
        Ok(r) => retry_or_permanent(&r),
    }
}

#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    token_uri: String,
}

struct FcmSink {
    project_id: String,
    client_email: String,
    token_uri: String,
    endpoint: String,
    key: Rs256,
    /// (access token, when to renew). A tokio mutex so one exchange serves every waiting send.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl FcmSink {
    fn new(cfg: &FcmConfig) -> Result<FcmSink, String> {
        let raw = std::fs::read(&cfg.service_account_file)
            .map_err(|e| format!("{}: {e}", cfg.service_account_file.display()))?;
        let sa: ServiceAccount = serde_json::from_slice(&raw)
            .map_err(|e| format!("{}: {e}", cfg.service_account_file.display()))?;
        Ok(FcmSink {
            key: Rs256::from_pem(&sa.private_key)?,
            project_id: sa.project_id,
            client_email: sa.client_email,
            token_uri: cfg.token_uri.clone().unwrap_or(sa.token_uri),
            endpoint: cfg.endpoint.trim_end_matches('/').to_owned(),
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// A valid access token, from the cache or a new JWT-bearer exchange.
    async fn access_token(&self, client: &HttpClient, now_unix_s: u64) -> Result<String, Outcome> {
        let mut cached = self.token.lock().await;
        if let Some((tok, renew_at)) = cached.as_ref() {
            if Instant::now() < *renew_at {
                return Ok(tok.clone());
            }
        }
        let assertion = self.key.sign(&serde_json::json!({
            "iss": self.client_email,
            "scope": FCM_SCOPE,
            "aud": self.token_uri,
            "iat": now_unix_s,
            "exp": now_unix_s + FCM_ASSERTION_TTL_S,
        }));
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let req = request(
            Method::POST,
            &self.token_uri,
            &[(
                "content-type",
                "application/x-www-form-urlencoded".to_owned(),
            )],
            form.into_bytes(),
        )
        .map_err(|error| Outcome::Permanent { error })?;
        let r = client.send(req, false).await.map_err(transport)?;
        if !r.status.is_success() {
            return Err(match retry_or_permanent(&r) {
                Outcome::Permanent { error } => Outcome::Permanent {
                    error: format!("OAuth token exchange: {error}"),
                },
                other => other,
            });
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: u64,
        }
        let t: TokenResponse = serde_json::from_slice(&r.body).map_err(|e| Outcome::Retry {
            error: format!("OAuth token response: {e}"),
            retry_after_ms: None,
        })?;
        let life = t.expires_in.saturating_sub(FCM_TOKEN_EARLY_REFRESH_S);
        *cached = Some((
            t.access_token.clone(),
            Instant::now() + Duration::from_secs(life),
        ));
        Ok(t.access_token)
    }

    async fn send(
        &self,
        client: &HttpClient,
        now_unix_s: u64,
        t: &Target,
        n: &Notification,
    ) -> Outcome {
        let token = match self.access_token(client, now_unix_s).await {
            Ok(t) => t,
            Err(o) => return o,
        };
        let body = serde_json::to_vec(&serde_json::json!({
            "message": {
                "token": t.token,
                "notification": {"title": n.title, "body": n.body},
                "data": {
                    "chat_id": n.chat.to_string(),
                    "count": n.count.to_string(),
                    "badge": n.badge.to_string(),
                    "last_seq": n.last_seq.to_string(),
                },
                "android": {
                    "collapse_key": n.collapse_id,
                    "notification": {"tag": n.collapse_id, "notification_count": n.badge},
                },
            }
        }))
        .expect("json");
        let url = format!(
            "{}/v1/projects/{}/messages:send",
            self.endpoint, self.project_id
        );
        let req = match request(
            Method::POST,
            &url,
            &[
                ("content-type", "application/json".into()),
                ("authorization", format!("Bearer {token}")),
            ],
            body,
        ) {
            Ok(r) => r,
            Err(e) => return Outcome::Permanent { error: e },
        };
        match client.send(req, false).await {
            Err(e) => transport(e),
            Ok(r) if r.status.is_success() => Outcome::Delivered,
            Ok(r)
                if r.status == StatusCode::NOT_FOUND
                    || String::from_utf8_lossy(&r.body).contains("UNREGISTERED") =>
            {
                Outcome::InvalidToken
            }
            Ok(r) if r.status == StatusCode::UNAUTHORIZED => {
                // The access token was revoked or expired early: get a new one next time.
                *self.token.lock().await = None;
                Outcome::Retry {
                    error: status_error(&r),
                    retry_after_ms: None,
                }
            }
            Ok(r) => retry_or_permanent(&r),
        }
    }
}

struct ApnsSink {
    cfg: ApnsConfig,
    endpoint: String,
    key: Es256,
    /// (provider token, issued at).
    token: std::sync::Mutex<Option<(String, Instant)>>,
}

impl ApnsSink {
    fn new(cfg: &ApnsConfig) -> Result<ApnsSink, String> {
        let pem = std::fs::read_to_string(&cfg.key_file)
            .map_err(|e| format!("{}: {e}", cfg.key_file.display()))?;
        Ok(ApnsSink {
            key: Es256::from_pem(&pem, &cfg.key_id)?,
            endpoint: cfg.endpoint.trim_end_matches('/').to_owned(),
            cfg: cfg.clone(),
            token: std::sync::Mutex::new(None),
        })
    }

    fn provider_token(&self, now_unix_s: u64) -> String {
        let mut cached = self.token.lock().expect("apns token");
        if let Some((tok, at)) = cached.as_ref() {
            if at.elapsed() < Duration::from_secs(APNS_TOKEN_REFRESH_S) {
                return tok.clone();
            }
        }
        let tok = self
            .key
            .sign(&serde_json::json!({"iss": self.cfg.team_id, "iat": now_unix_s}));
        *cached = Some((tok.clone(), Instant::now()));
        tok
    }

    async fn send(
        &self,
        client: &HttpClient,
        now_unix_s: u64,
        t: &Target,
        n: &Notification,
    ) -> Outcome {
        let body = serde_json::to_vec(&serde_json::json!({
            "aps": {
                "alert": {"title": n.title, "body": n.body},
                "badge": n.badge,
                "sound": "default",
                "thread-id": n.collapse_id,
            },
            "chat_id": n.chat,
            "count": n.count,
            "last_seq": n.last_seq,
        }))
        .expect("json");
        let mut collapse = n.collapse_id.clone();
        collapse.truncate(APNS_COLLAPSE_ID_BYTES_MAX);
        let url = format!("{}/3/device/{}", self.endpoint, t.token);
        let req = match request(
            Method::POST,
            &url,
            &[
                (
                    "authorization",
                    format!("bearer {}", self.provider_token(now_unix_s)),
                ),
                ("apns-topic", self.cfg.topic.clone()),
                ("apns-push-type", "alert".into()),
                ("apns-priority", "10".into()),
                ("apns-collapse-id", collapse),
                ("content-type", "application/json".into()),
            ],
            body,
        ) {
            Ok(r) => r,
            Err(e) => return Outcome::Permanent { error: e },
        };
        let r = match client.send(req, true).await {
            Err(e) => return transport(e),
            Ok(r) => r,
        };
        if r.status.is_success() {
            return Outcome::Delivered;
        }
        #[derive(Deserialize, Default)]
        struct Reason {
            #[serde(default)]
            reason: String,
        }
        let reason = serde_json::from_slice::<Reason>(&r.body)
            .unwrap_or_default()
            .reason;
        match (r.status.as_u16(), reason.as_str()) {
            (410, _) | (_, "BadDeviceToken" | "Unregistered" | "DeviceTokenNotForTopic") => {
                Outcome::InvalidToken
            }
            (403, "ExpiredProviderToken" | "InvalidProviderToken") => {
                *self.token.lock().expect("apns token") = None;
                Outcome::Retry {
                    error: status_error(&r),
                    retry_after_ms: None,
                }
            }
            _ => retry_or_permanent(&r),
        }
    }
}
