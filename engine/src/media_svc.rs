//! The media endpoints (issue 5): media never goes through the chat WebSocket.
//!
//! ```text
//!  POST /v1/media {size, sha256, content_type}   auth ─► meta (data/media) ─► upload URL
//!  PUT  /v1/media/{id}/blob?exp&size&sha256&sig  signed URL (local backend) ─► streamed to
//!                                                 a temp file, checked, fdatasync, rename
//!  POST /v1/media/{id}/url [{chat_id}]           auth ─► uploader? else ask the chat's owner
//!                                                 core (ApiReq::MediaAccess) ─► download URL
//!  GET|HEAD /v1/media/{id}/blob?exp&sig          signed URL (local backend) ─► Range, streamed
//! ```
//!
//! Access: the uploader, or a member of a chat where a message named the id in its
//! `media_ids` (a `MediaGrant` record in that chat's shard, durable with the message). The
//! client says which chat (`chat_id`), so the check is one question to one owner core, never a
//! search. With the S3 backend the URLs are presigned S3 URLs and the bytes never pass through
//! this server; the metadata (uploader, size, hash, type) stays under `data/media/meta`.

use crate::api_http::{Body, BodyStream, Ctx, Handled, Reply};
use crate::calls::{call, CallRef};
use crate::core::{unix_ms, Core};
use crate::msg::ApiReq;
use std::rc::Rc;
use switchboard_api::http1::Method;
use switchboard_api::sign::{self, UrlSigner};
use switchboard_media::range::{self, RangeOutcome};
use switchboard_media::{
    CreateRequest, LocalStore, MediaError, MediaMeta, MediaStore, S3Config, S3Store,
};
use switchboard_wire::{ChatId, UserId};

/// Hard cap on a streamed upload body, whatever the configured media limit (the limit itself
/// is enforced against the declared size, and no byte beyond the declared size is accepted).
pub const MEDIA_BODY_BYTES_CAP: u64 = 5 * 1024 * 1024 * 1024;

/// Label the media URL key is derived under from the server secret.
const MEDIA_KEY_LABEL: &str = "switchboard media url key v1";

/// The directory under `data_dir` holding media metadata and (local backend) the bytes.
pub fn media_dir(cfg: &crate::config::Config) -> std::path::PathBuf {
    cfg.data_dir.join("media")
}

/// Per-core media state: the local store (metadata for every backend, bytes for the local one)
/// and, when configured, the S3 presigner.
pub struct MediaService {
    pub local: LocalStore,
    pub s3: Option<S3Store>,
}

impl MediaService {
    pub fn new(cfg: &crate::config::Config, key: &crate::token::TokenKey) -> MediaService {
        let signer = UrlSigner::new(&key.derive_key(MEDIA_KEY_LABEL));
        let local =
            LocalStore::new(media_dir(cfg), signer).with_media_bytes_max(cfg.media_bytes_max);
        let s3 = (cfg.media_backend == "s3").then(|| {
            // Validated with the config.
            S3Store::new(&s3_config(cfg)).expect("media S3 config validated")
        });
        MediaService { local, s3 }
    }

    fn backend(&self) -> &dyn MediaStore {
        match &self.s3 {
            Some(s3) => s3,
            None => &self.local,
        }
    }
}

/// The S3 settings of a config (checked by `Config::validate`).
pub fn s3_config(cfg: &crate::config::Config) -> S3Config {
    S3Config {
        endpoint: cfg.media_s3_endpoint.clone(),
        bucket: cfg.media_s3_bucket.clone(),
        region: cfg.media_s3_region.clone(),
        access_key: cfg.media_s3_access_key.clone(),
        secret_key: cfg.media_s3_secret_key.clone(),
        path_style: cfg.media_s3_path_style,
    }
}

fn media_error(e: &MediaError) -> Reply {
    if let MediaError::Io(io) = e {
        eprintln!("switchboard: media storage error: {io}");
        return Reply::error(500, "storage_error", "media storage failed");
    }
    Reply::error(e.status(), e.code(), &e.to_string())
}

fn now_s() -> u64 {
    unix_ms() / 1000
}

#[derive(serde::Serialize)]
struct Created<'a> {
    media_id: &'a str,
    upload_url: &'a str,
    /// Headers the upload must carry as given (S3: the signed ones; empty for the local backend).
    upload_headers: std::collections::BTreeMap<&'a str, &'a str>,
    expires_unix_s: u64,
}

/// `POST /v1/media`.
pub async fn create(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let claims = crate::accounts_svc::auth(cx)?;
    let req: CreateRequest = cx.json(body)?;
    let svc = &cx.core.media;
    let id = sign::new_media_id(&mut rand::thread_rng());
    let now = now_s();
    let meta = req
        .validate(&id, claims.user.0, now, svc.local.media_bytes_max())
        .map_err(|e| media_error(&e))?;
    svc.local
        .create_meta(&meta)
        .await
        .map_err(|e| media_error(&e))?;
    let target = svc
        .backend()
        .upload_target(&meta, now, sign::UPLOAD_URL_TTL_S);
    Ok(Reply::json(
        201,
        &Created {
            media_id: &id,
            upload_url: &target.url,
            upload_headers: target
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            expires_unix_s: target.expires_unix_s,
        },
    ))
}

fn signed(cx: &Ctx<'_>, method: Method) -> Result<sign::SignedMedia, Reply> {
    if cx.core.media.s3.is_some() {
        return Err(Reply::error(
            404,
            "not_found",
            "media bytes are served by the S3 backend, not this server",
        ));
    }
    cx.core
        .media
        .local
        .signer()
        .verify(method, &cx.head.path, cx.head.query.as_deref(), now_s())
        .map_err(|e| Reply::error(e.status(), e.code(), "signed URL refused"))
}

/// `PUT /v1/media/{id}/blob?…` (local backend): the body streams to a temp file, is checked
/// against the declared size and SHA-256, made durable and published.
pub async fn upload(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let Body::Stream(mut stream) = body else {
        return Err(Reply::error(500, "internal", "upload body not streamed"));
    };
    let granted = signed(cx, Method::Put)?;
    let claims = granted
        .upload
        .ok_or_else(|| Reply::error(400, "malformed_signed_url", "not an upload URL"))?;
    if claims.size > cx.core.media.local.media_bytes_max() {
        return Err(Reply::error(413, "body_too_large", "over the media limit"));
    }
    // A declared length that cannot match is refused before any body byte is read.
    if let Some(len) = content_length(cx) {
        if len != claims.size {
            return Err(Reply::error(
                400,
                "size_mismatch",
                &format!("Content-Length {len}, declared size {}", claims.size),
            ));
        }
    }
    let mut up = cx
        .core
        .media
        .local
        .begin_upload(&granted.media_id, claims.size, claims.sha256)
        .await
        .map_err(|e| media_error(&e))?;
    pump(&mut stream, &mut up).await?;
    up.finish().await.map_err(|e| media_error(&e))?;
    Ok(Reply::json(
        201,
        &serde_json::json!({"media_id": granted.media_id, "size": claims.size}),
    ))
}

async fn pump(
    stream: &mut BodyStream<'_>,
    up: &mut switchboard_media::Upload,
) -> Result<(), Reply> {
    while let Some(chunk) = stream.next_chunk().await? {
        up.write(&chunk).await.map_err(|e| media_error(&e))?;
    }
    Ok(())
}

fn content_length(cx: &Ctx<'_>) -> Option<u64> {
    cx.head
        .header_str("content-length")
        .and_then(|v| v.trim().parse().ok())
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UrlRequest {
    /// The chat where the media was sent (not needed by the uploader).
    #[serde(default)]
    chat_id: u64,
}

/// `POST /v1/media/{id}/url`: a download URL for the uploader or a member of a chat where the
/// id was sent.
pub async fn download_url(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let claims = crate::accounts_svc::auth(cx)?;
    let req: UrlRequest = match &body {
        Body::Buffered(b) if b.is_empty() => UrlRequest::default(),
        _ => cx.json(body)?,
    };
    let id = cx.param("id").unwrap_or_default().to_owned();
    let meta: MediaMeta = cx
        .core
        .media
        .local
        .load_meta(&id)
        .await
        .map_err(|e| media_error(&e))?;
    if meta.uploader != claims.user.0 {
        let forbidden = || {
            Reply::error(
                403,
                "forbidden",
                "only the uploader and members of a chat where it was sent may fetch this media",
            )
        };
        if req.chat_id == 0 {
            return Err(forbidden());
        }
        let chat = ChatId(req.chat_id);
        let dest = cx.core.core_of_chat(chat);
        let answer = call(
            cx.core,
            dest,
            ApiReq::MediaAccess {
                user: claims.user,
                chat,
                media_id: id.clone(),
            },
        )
        .await;
        match answer.status {
            204 => {}
            403 => return Err(forbidden()),
            _ => return Err(answer),
        }
    }
    let target = cx
        .core
        .media
        .backend()
        .download_target(&meta, now_s(), sign::DOWNLOAD_URL_TTL_S);
    Ok(Reply::json(
        200,
        &serde_json::json!({"url": target.url, "expires_unix_s": target.expires_unix_s}),
    ))
}

/// At the chat's owner core: may `user` fetch `media_id` through `chat`? `204` yes, `403` no.
pub fn handle_access(core: &Rc<Core>, from: CallRef, user: UserId, chat: ChatId, media_id: &str) {
    let shard = core.owned_shard_id(core.shard_of(chat));
    let granted = shard
        .owner
        .borrow()
        .state
        .chat(&chat)
        .is_some_and(|m| m.media_visible_to(user, media_id));
    let reply = if granted {
        Reply::no_content()
    } else {
        Reply::error(403, "forbidden", "no such media in this chat for this user")
    };
    crate::accounts_svc::reply_now(core, from, reply);
}

/// `GET`/`HEAD /v1/media/{id}/blob?…` (local backend): the bytes, with a single `Range`.
pub async fn download(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let granted = signed(cx, Method::Get)?;
    let (meta, blob) = cx
        .core
        .media
        .local
        .open(&granted.media_id)
        .await
        .map_err(|e| media_error(&e))?;
    let total = blob.len();
    // Reopened when the body is written (a reply may cross cores; a file handle may not).
    blob.close().await.map_err(|e| media_error(&e))?;
    let (status, start, len) = match range::parse(cx.head.header_str("range"), total) {
        RangeOutcome::Full => (200, 0, total),
        RangeOutcome::Partial { start, len } => (206, start, len),
        RangeOutcome::Unsatisfiable => {
            return Err(
                Reply::error(416, "range_not_satisfiable", "range outside the object")
                    .with_header("content-range", range::unsatisfied_range(total)),
            );
        }
    };
    let mut reply = Reply {
        status,
        content_type: None,
        headers: vec![
            ("content-type", meta.content_type.clone()),
            ("accept-ranges", "bytes".to_owned()),
            ("cache-control", "private, max-age=3600".to_owned()),
            // The type is the uploader's claim: never let a browser sniff or run it in the API's
            // origin (an uploaded text/html must not become a page of this site).
            ("x-content-type-options", "nosniff".to_owned()),
            ("content-security-policy", "sandbox".to_owned()),
        ],
        body: Vec::new(),
        close: false,
        blob: Some(crate::api_http::BlobBody {
            media_id: granted.media_id,
            start,
            len,
        }),
    };
    if status == 206 {
        reply = reply.with_header("content-range", range::content_range(start, len, total));
    }
    Ok(reply)
}
