//! Switchboard's media service: the backend-independent part of `POST /v1/media`,
//! `PUT`/`GET` of the bytes and `POST /v1/media/{id}/url`. Media never goes through the chat
//! WebSocket.
//!
//! ```text
//!  POST /v1/media {size, sha256, content_type}
//!      └─► meta::CreateRequest::validate ─► MediaMeta ─► MetaDir::create (temp, fsync, rename)
//!          └─► MediaStore::upload_target ─► Local: signed /v1/media/{id}/blob URL (api::sign)
//!                                          S3:    presigned SigV4 PUT (size + sha256 signed)
//!  PUT /v1/media/{id}/blob?…   (local backend only; S3 uploads go straight to S3)
//!      └─► LocalStore::begin_upload ─► Upload::write(chunk)… ─► Upload::finish
//!            temp file, upload::Verifier         size + sha256 checked, fdatasync, rename
//!  POST /v1/media/{id}/url  (after the engine's access check: uploader or chat grant)
//!      └─► MediaStore::download_target ─► Local: signed GET URL │ S3: presigned GET
//!  GET|HEAD /v1/media/{id}/blob?…  (local)
//!      └─► range::parse ─► LocalStore::open ─► Blob::read_at (bounded chunks)
//! ```
//!
//! Sans-IO parts (no runtime, no clock): [`meta`], [`range`], [`upload::Verifier`], [`s3`]
//! presigning. File IO ([`local`]) runs on the calling glommio executor through io_uring
//! (`BufferedFile`), in chunks of at most [`IO_CHUNK_BYTES_MAX`], so no call blocks the
//! reactor for long.

pub mod local;
pub mod meta;
pub mod range;
pub mod s3;
pub mod upload;

pub use local::{Blob, LocalStore, Upload};
pub use meta::{CreateRequest, MediaMeta};
pub use s3::{S3Config, S3Store};

/// Default largest media object: 100 MiB, as the issue asks (configurable per store).
pub const MEDIA_BYTES_MAX_DEFAULT: u64 = switchboard_api::http1::MEDIA_BODY_BYTES_MAX;
/// Largest single read or write the local store issues: bounds the memory an upload or download
/// holds per request and the time one io_uring operation takes.
pub const IO_CHUNK_BYTES_MAX: usize = 256 * 1024;
/// Longest `content_type` accepted (RFC 6838 allows 127 + 1 + 127 for type/subtype).
pub const CONTENT_TYPE_BYTES_MAX: usize = 255;

/// Where the client sends the bytes (upload) or fetches them (download).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    /// Absolute (S3) or server-relative (local: `/v1/media/{id}/blob?…`) URL.
    pub url: String,
    /// Headers the client must send exactly as given (they are covered by the signature).
    pub headers: Vec<(String, String)>,
    pub expires_unix_s: u64,
}

/// A media storage backend: hands out the URLs clients move bytes with. Access control (who
/// may get a download URL) is the caller's job; a backend only signs.
pub trait MediaStore {
    /// The URL the uploader `PUT`s the bytes to, binding the declared size and SHA-256.
    fn upload_target(&self, meta: &MediaMeta, now_unix_s: u64, ttl_s: u64) -> Target;
    /// A URL anyone holding it may `GET` (and `HEAD`) the bytes with until it expires.
    fn download_target(&self, meta: &MediaMeta, now_unix_s: u64, ttl_s: u64) -> Target;
}

/// Why a media request failed, grouped so each maps to one HTTP status and a stable `code`
/// (see `api/README.md`, "Media").
#[derive(Debug)]
#[non_exhaustive]
pub enum MediaError {
    /// The client's request is invalid (`400`), with the stable code.
    Invalid(&'static str),
    /// Declared or sent size over the store's limit (`413 body_too_large`).
    TooLarge { limit: u64 },
    /// The body is not the declared size (`400 size_mismatch`); nothing was kept.
    SizeMismatch { declared: u64, received: u64 },
    /// The body does not hash to the declared SHA-256 (`400 sha256_mismatch`); nothing was kept.
    Sha256Mismatch,
    /// No such media object (or not uploaded yet, for downloads) (`404 not_found`).
    NotFound,
    /// The id already exists (`409 already_uploaded`).
    AlreadyExists,
    /// The server's storage failed (`500 storage_error`).
    Io(std::io::Error),
}

impl MediaError {
    pub fn status(&self) -> u16 {
        match self {
            MediaError::Invalid(_)
            | MediaError::SizeMismatch { .. }
            | MediaError::Sha256Mismatch => 400,
            MediaError::TooLarge { .. } => 413,
            MediaError::NotFound => 404,
            MediaError::AlreadyExists => 409,
            MediaError::Io(_) => 500,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            MediaError::Invalid(code) => code,
            MediaError::TooLarge { .. } => "body_too_large",
            MediaError::SizeMismatch { .. } => "size_mismatch",
            MediaError::Sha256Mismatch => "sha256_mismatch",
            MediaError::NotFound => "not_found",
            MediaError::AlreadyExists => "already_uploaded",
            MediaError::Io(_) => "storage_error",
        }
    }
}

impl std::fmt::Display for MediaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MediaError::Invalid(code) => write!(f, "invalid request: {code}"),
            MediaError::TooLarge { limit } => write!(f, "media larger than {limit} bytes"),
            MediaError::SizeMismatch { declared, received } => {
                write!(f, "declared {declared} bytes, received {received}")
            }
            MediaError::Sha256Mismatch => f.write_str("body does not match the declared sha256"),
            MediaError::NotFound => f.write_str("no such media"),
            MediaError::AlreadyExists => f.write_str("media already uploaded"),
            MediaError::Io(e) => write!(f, "storage error: {e}"),
        }
    }
}

impl std::error::Error for MediaError {}

impl From<glommio::GlommioError<()>> for MediaError {
    fn from(e: glommio::GlommioError<()>) -> Self {
        MediaError::Io(e.into())
    }
}

impl From<std::io::Error> for MediaError {
    fn from(e: std::io::Error) -> Self {
        MediaError::Io(e)
    }
}

/// Lower-case hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses 64 hex digits (either case) into a SHA-256 digest.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = [0xa5u8; 32];
        assert_eq!(unhex32(&hex(&d)), Some(d));
        assert_eq!(unhex32(&hex(&d).to_uppercase()), Some(d));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(unhex32(&"g".repeat(64)), None);
    }

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(MediaError::TooLarge { limit: 1 }.status(), 413);
        assert_eq!(MediaError::Sha256Mismatch.code(), "sha256_mismatch");
        assert_eq!(MediaError::AlreadyExists.status(), 409);
        assert_eq!(
            MediaError::Invalid("invalid_sha256").code(),
            "invalid_sha256"
        );
    }
}
