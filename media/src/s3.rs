//! The S3-compatible backend: clients move the bytes straight to and from the object store with
//! presigned SigV4 URLs (`rusty-s3`, sans-IO: no HTTP client, no runtime in the server).
//!
//! ```text
//!  POST /v1/media ─► S3Store::upload_target ─► PUT https://s3/…/media/<id>?X-Amz-…
//!                    signed headers: content-length = declared size,
//!                                    x-amz-checksum-sha256 = declared digest, content-type
//!  POST /v1/media/{id}/url ─► S3Store::download_target ─► GET https://s3/…/media/<id>?X-Amz-…
//! ```
//!
//! The declared size and digest are enforced by the object store, not by us: `content-length`
//! is a signed header (another length breaks the signature), and S3 checks the body against
//! `x-amz-checksum-sha256` before storing it. Expiry (`X-Amz-Expires`, at most 7 days in SigV4)
//! and tampering are refused by the store's signature check.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use crate::{MediaMeta, MediaStore, Target};

/// Longest validity SigV4 allows for a presigned URL (7 days).
pub const PRESIGN_TTL_S_MAX: u64 = 7 * 24 * 60 * 60;
/// Object keys live under this prefix, so the bucket can be shared with other data.
pub const OBJECT_KEY_PREFIX: &str = "media/";

/// Where the objects live and the credentials the server signs with.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:9000`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// `true`: `endpoint/bucket/key` (MinIO, most self-hosted stores); `false`: virtual-hosted
    /// `bucket.endpoint/key` (AWS).
    #[serde(default = "yes")]
    pub path_style: bool,
}

fn yes() -> bool {
    true
}

/// Why an [`S3Config`] is unusable.
#[derive(Debug, PartialEq, Eq)]
pub struct S3ConfigError(pub String);

impl std::fmt::Display for S3ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad S3 configuration: {}", self.0)
    }
}

impl std::error::Error for S3ConfigError {}

/// Presigns requests against one bucket.
#[derive(Clone, Debug)]
pub struct S3Store {
    bucket: Bucket,
    credentials: Credentials,
}

/// The object key of a media id.
pub fn object_key(media_id: &str) -> String {
    format!("{OBJECT_KEY_PREFIX}{media_id}")
}

fn timestamp(now_unix_s: u64) -> jiff::Timestamp {
    // Unix seconds from our clock are far inside jiff's range (year 9999).
    jiff::Timestamp::from_second(now_unix_s as i64)
        .unwrap_or_else(|e| unreachable!("unix time {now_unix_s} out of range: {e}"))
}

impl S3Store {
    pub fn new(cfg: &S3Config) -> Result<Self, S3ConfigError> {
        let endpoint: url::Url = cfg
            .endpoint
            .parse()
            .map_err(|e| S3ConfigError(format!("endpoint {:?}: {e}", cfg.endpoint)))?;
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, cfg.bucket.clone(), cfg.region.clone())
            .map_err(|e| S3ConfigError(format!("bucket: {e}")))?;
        if cfg.access_key.is_empty() || cfg.secret_key.is_empty() {
            return Err(S3ConfigError("empty access or secret key".to_owned()));
        }
        Ok(S3Store {
            bucket,
            credentials: Credentials::new(cfg.access_key.clone(), cfg.secret_key.clone()),
        })
    }

    fn ttl(ttl_s: u64) -> Duration {
        assert!(
            ttl_s <= PRESIGN_TTL_S_MAX,
            "SigV4 presigned URLs last at most 7 days"
        );
        Duration::from_secs(ttl_s)
    }

    /// A presigned `PUT` that only accepts a body of `size` bytes hashing to `sha256`, sent with
    /// exactly the returned headers.
    pub fn presign_put(
        &self,
        media_id: &str,
        size: u64,
        sha256: [u8; 32],
        content_type: &str,
        now_unix_s: u64,
        ttl_s: u64,
    ) -> Target {
        let key = object_key(media_id);
        let headers = vec![
            ("content-length".to_owned(), size.to_string()),
            ("content-type".to_owned(), content_type.to_owned()),
            ("x-amz-checksum-sha256".to_owned(), STANDARD.encode(sha256)),
        ];
        let mut action = self.bucket.put_object(Some(&self.credentials), &key);
        for (k, v) in &headers {
            action.headers_mut().insert(k.clone(), v.clone());
        }
        let url = action.sign_with_time(Self::ttl(ttl_s), &timestamp(now_unix_s));
        Target {
            url: url.to_string(),
            headers,
            expires_unix_s: now_unix_s + ttl_s,
        }
    }

    /// A presigned `GET` of the object (any `Range` the client adds is not signed, so it may
    /// ask for any part).
    pub fn presign_get(&self, media_id: &str, now_unix_s: u64, ttl_s: u64) -> Target {
        let key = object_key(media_id);
        let action = self.bucket.get_object(Some(&self.credentials), &key);
        Target {
            url: action
                .sign_with_time(Self::ttl(ttl_s), &timestamp(now_unix_s))
                .to_string(),
            headers: Vec::new(),
            expires_unix_s: now_unix_s + ttl_s,
        }
    }

    /// A presigned `HEAD` of the object: lets the server (or an operator) see whether an upload
    /// arrived.
    pub fn presign_head(&self, media_id: &str, now_unix_s: u64, ttl_s: u64) -> Target {
        let key = object_key(media_id);
        let action = self.bucket.head_object(Some(&self.credentials), &key);
        Target {
            url: action
                .sign_with_time(Self::ttl(ttl_s), &timestamp(now_unix_s))
                .to_string(),
            headers: Vec::new(),
            expires_unix_s: now_unix_s + ttl_s,
        }
    }

    /// A presigned `PUT` that creates the bucket (set-up and tests).
    pub fn presign_create_bucket(&self, now_unix_s: u64, ttl_s: u64) -> Target {
        let action = self.bucket.create_bucket(&self.credentials);
        Target {
            url: action
                .sign_with_time(Self::ttl(ttl_s), &timestamp(now_unix_s))
                .to_string(),
            headers: Vec::new(),
            expires_unix_s: now_unix_s + ttl_s,
        }
    }
}

impl MediaStore for S3Store {
    fn upload_target(&self, meta: &MediaMeta, now_unix_s: u64, ttl_s: u64) -> Target {
        let sha = meta
            .sha256_bytes()
            .unwrap_or_else(|| unreachable!("metadata holds a validated digest"));
        self.presign_put(
            &meta.media_id,
            meta.size,
            sha,
            &meta.content_type,
            now_unix_s,
            ttl_s,
        )
    }

    fn download_target(&self, meta: &MediaMeta, now_unix_s: u64, ttl_s: u64) -> Target {
        self.presign_get(&meta.media_id, now_unix_s, ttl_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> S3Config {
        S3Config {
            endpoint: "http://127.0.0.1:9000".to_owned(),
            bucket: "media-bucket".to_owned(),
            region: "us-east-1".to_owned(),
            access_key: "AKIAIOSFODNN7EXAMPLE".to_owned(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_owned(),
            path_style: true,
        }
    }

    #[test]
    fn presigned_urls_bind_method_object_headers_and_time() {
        let s = S3Store::new(&cfg()).expect("valid");
        let put = s.presign_put("abc", 5, [1; 32], "image/png", 1_700_000_000, 900);
        assert!(
            put.url.starts_with("http://127.0.0.1:9000/media-bucket/media/abc?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20231114%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20231114T221320Z&X-Amz-Expires=900"),
            "{}",
            put.url
        );
        assert!(
            put.url.contains(
                "X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost%3Bx-amz-checksum-sha256"
            ),
            "{}",
            put.url
        );
        assert_eq!(put.expires_unix_s, 1_700_000_900);
        assert_eq!(
            put.headers[0],
            ("content-length".to_owned(), "5".to_owned())
        );
        // Deterministic given the time; another size, hash or time changes the signature.
        let again = s.presign_put("abc", 5, [1; 32], "image/png", 1_700_000_000, 900);
        assert_eq!(put, again);
        for other in [
            s.presign_put("abc", 6, [1; 32], "image/png", 1_700_000_000, 900),
            s.presign_put("abc", 5, [2; 32], "image/png", 1_700_000_000, 900),
            s.presign_put("abc", 5, [1; 32], "image/png", 1_700_000_001, 900),
        ] {
            let sig = |u: &str| u.rsplit_once("X-Amz-Signature=").map(|p| p.1.to_owned());
            assert_ne!(sig(&put.url), sig(&other.url));
        }
        let get = s.presign_get("abc", 1_700_000_000, 60);
        assert!(get.url.contains("X-Amz-SignedHeaders=host&"), "{}", get.url);
    }

    #[test]
    fn bad_config() {
        let mut c = cfg();
        c.endpoint = "ftp://x".to_owned();
        assert!(S3Store::new(&c).is_err());
        let mut c = cfg();
        c.endpoint = "not a url".to_owned();
        assert!(S3Store::new(&c).is_err());
        let mut c = cfg();
        c.secret_key.clear();
        assert!(S3Store::new(&c).is_err());
    }
}
