//! HTTP endpoints of push notifications (registered in `api_http.rs`), and the push side of
//! logout / device removal (`forget_device`):
//!
//! ```text
//!  POST   /v1/push/tokens {platform, token} ─► PushHandle::set_token ─► 204 once durable
//!  DELETE /v1/push/tokens                   ─► PushHandle::remove_token ─► 204
//!  PUT    /v1/chats/{chat}/mute {until_unix_s} ─► PushHandle::mute ─► 204
//! ```
//!
//! The push thread owns the registry; a handler sends it one command (`try_send`, so a full
//! channel answers `503 busy` at once) and awaits its oneshot reply, which resolves on this
//! glommio executor when the push thread has made the change durable.

use crate::accounts_svc::auth as bearer;
use crate::api_http::{Body, Ctx, Handled, Reply};
use serde::Deserialize;
use switchboard_push::model::valid_token;
use switchboard_push::{Platform, PushError, PushHandle};
use switchboard_wire::{DeviceId, UserId};

fn push<'a>(cx: &'a Ctx<'_>) -> Result<&'a PushHandle, Reply> {
    cx.core
        .push
        .get()
        .ok_or_else(|| Reply::error(503, "busy", "push notifications are not running"))
}

fn push_error(e: PushError) -> Reply {
    match e {
        PushError::Busy => Reply::error(503, "busy", "push service busy: retry later")
            .with_header("retry-after", "1".into()),
        PushError::InvalidToken => Reply::error(400, "invalid_push_token", "invalid push token"),
        PushError::Full => Reply::error(
            409,
            "too_many_push_tokens",
            "too many devices with push tokens",
        ),
        PushError::Storage(m) => Reply::error(500, "internal", &format!("push storage: {m}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    platform: String,
    token: String,
}

/// `POST /v1/push/tokens`.
pub async fn register(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let claims = bearer(cx)?;
    let req: TokenRequest = cx.json(body)?;
    let bad = |m: &str| Reply::error(400, "invalid_push_token", m);
    let platform = Platform::parse(&req.platform)
        .ok_or_else(|| bad("platform must be fcm, apns or webhook"))?;
    if !valid_token(platform, &req.token) {
        return Err(bad(
            "token must be 1-4096 printable ASCII bytes (hex for apns)",
        ));
    }
    push(cx)?
        .set_token(claims.user.0, claims.device.0, platform, req.token)
        .await
        .map_err(push_error)?;
    Ok(Reply::no_content())
}

/// `DELETE /v1/push/tokens`.
pub async fn unregister(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let claims = bearer(cx)?;
    push(cx)?
        .remove_token(claims.user.0, claims.device.0)
        .await
        .map_err(push_error)?;
    Ok(Reply::no_content())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteRequest {
    until_unix_s: u64,
}

/// `PUT /v1/chats/{chat}/mute`. Muting only affects the caller's own pushes, so no membership
/// check is needed (a chat the caller is not in never pushes to them anyway).
pub async fn mute(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let claims = bearer(cx)?;
    let chat = cx.param_u64("chat")?;
    let req: MuteRequest = cx.json(body)?;
    push(cx)?
        .mute(claims.user.0, chat, req.until_unix_s)
        .await
        .map_err(push_error)?;
    Ok(Reply::no_content())
}

/// A device was logged out or removed: its push token goes too. Best effort: if the push
/// thread is busy the token stays until a sink reports it invalid (the device's pushes carry no
/// content, and its session tokens are already revoked).
pub async fn forget_device(cx: &Ctx<'_>, user: UserId, device: DeviceId) {
    if let Some(push) = cx.core.push.get() {
        let _ = push.remove_token(user.0, device.0).await;
    }
}
