//! What the server remembers about a media object, and the validation of `POST /v1/media`.
//!
//! The metadata is written once, when the upload URL is minted, and never changed: the uploader
//! (for the download check), the declared size and SHA-256 (what the upload must match) and the
//! content type (served back on `GET`). Whether the bytes have arrived is the object's own
//! existence in the backend.

use serde::{Deserialize, Serialize};

use crate::{hex, unhex32, MediaError, CONTENT_TYPE_BYTES_MAX};

/// Body of `POST /v1/media`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub size: u64,
    /// 64 hex digits.
    pub sha256: String,
    pub content_type: String,
}

/// A media object's metadata, stored as JSON next to (local) or instead of (S3) the bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MediaMeta {
    pub media_id: String,
    /// The user who created it (may always get a download URL).
    pub uploader: u64,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    pub content_type: String,
    pub created_unix_s: u64,
}

impl MediaMeta {
    /// The declared digest. Metadata is only ever built from a validated request, so the hex is
    /// well formed; a file that says otherwise is corrupt, which is an internal error.
    pub fn sha256_bytes(&self) -> Option<[u8; 32]> {
        unhex32(&self.sha256)
    }
}

/// Whether `ct` looks like `type/subtype[; params]` made of visible ASCII: it is echoed back as
/// a response header, so it must not carry CR/LF or other control characters.
pub fn is_valid_content_type(ct: &str) -> bool {
    if ct.is_empty() || ct.len() > CONTENT_TYPE_BYTES_MAX {
        return false;
    }
    if !ct.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return false;
    }
    let essence = ct.split(';').next().unwrap_or("").trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return false;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    token(ty) && token(sub)
}

impl CreateRequest {
    /// Checks the request against `media_bytes_max` and builds the metadata of a new object.
    /// Empty objects are refused (`invalid_size`): there is nothing to share.
    pub fn validate(
        &self,
        media_id: &str,
        uploader: u64,
        now_unix_s: u64,
        media_bytes_max: u64,
    ) -> Result<MediaMeta, MediaError> {
        if self.size == 0 {
            return Err(MediaError::Invalid("invalid_size"));
        }
        if self.size > media_bytes_max {
            return Err(MediaError::TooLarge {
                limit: media_bytes_max,
            });
        }
        let sha = unhex32(&self.sha256).ok_or(MediaError::Invalid("invalid_sha256"))?;
        if !is_valid_content_type(&self.content_type) {
            return Err(MediaError::Invalid("invalid_content_type"));
        }
        if !switchboard_api::sign::is_valid_media_id(media_id) {
            return Err(MediaError::Invalid("invalid_media_id"));
        }
        Ok(MediaMeta {
            media_id: media_id.to_owned(),
            uploader,
            size: self.size,
            sha256: hex(&sha),
            content_type: self.content_type.clone(),
            created_unix_s: now_unix_s,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size: u64, sha: &str, ct: &str) -> CreateRequest {
        CreateRequest {
            size,
            sha256: sha.to_owned(),
            content_type: ct.to_owned(),
        }
    }

    #[test]
    fn validation() {
        let sha = "AB".repeat(32);
        let m = req(10, &sha, "image/jpeg")
            .validate("id1", 7, 100, 1000)
            .expect("valid");
        assert_eq!(m.sha256, "ab".repeat(32), "normalised to lower case");
        assert_eq!(m.sha256_bytes(), Some([0xab; 32]));
        assert_eq!((m.uploader, m.size, m.created_unix_s), (7, 10, 100));
        let code = |r: Result<MediaMeta, MediaError>| r.map(|_| ()).map_err(|e| e.code());
        assert_eq!(
            code(req(1000, &sha, "a/b").validate("i", 1, 0, 1000)),
            Ok(())
        );
        assert_eq!(
            code(req(1001, &sha, "a/b").validate("i", 1, 0, 1000)),
            Err("body_too_large")
        );
        assert_eq!(
            code(req(0, &sha, "a/b").validate("i", 1, 0, 1000)),
            Err("invalid_size")
        );
        assert_eq!(
            code(req(1, "ab", "a/b").validate("i", 1, 0, 1000)),
            Err("invalid_sha256")
        );
        for bad in [
            "",
            "jpeg",
            "image/",
            "/x",
            "a/b\r\nX: y",
            "a b/c",
            &"a/".repeat(200),
        ] {
            assert_eq!(
                code(req(1, &sha, bad).validate("i", 1, 0, 1000)),
                Err("invalid_content_type"),
                "{bad:?}"
            );
        }
        assert_eq!(
            code(req(1, &sha, "text/plain; charset=utf-8").validate("i", 1, 0, 1000)),
            Ok(())
        );
        assert_eq!(
            code(req(1, &sha, "a/b").validate("../x", 1, 0, 1000)),
            Err("invalid_media_id")
        );
    }

    #[test]
    fn json_shape() {
        let r: CreateRequest =
            serde_json::from_str(r#"{"size": 5, "sha256": "00", "content_type": "image/png"}"#)
                .expect("parses");
        assert_eq!(r.size, 5);
        assert!(serde_json::from_str::<CreateRequest>(r#"{"size": 5}"#).is_err());
        assert!(serde_json::from_str::<CreateRequest>(
            r#"{"size": -1, "sha256": "00", "content_type": "a/b"}"#
        )
        .is_err());
    }
}
