//! The login, profile, contact and key-directory endpoints: the caller side (HTTP handlers, on
//! the core that accepted the connection) and the owner side (`handle_api`, on the core owning
//! the account's shard, synchronous like everything in `Core::handle`).
//!
//! ```text
//!  handler (core A) ─ validate ─► calls::call(owner core, ApiReq) ─► handle_api (core B)
//!      reads: answered at once ◄──────────────────────────────────────┤
//!      writes: stage Record::Account + Effect::ApiReply ─► committer (fsync) ─► reply ◄┘
//!      logout/removal/refresh: + Effect::Revoke ─► Revoked broadcast to every core (before the reply)
//! ```
//!
//! Login codes (`api::otp::Otp`) live on the phone's home core, so `register` and `verify`
//! reach the same state whichever cores accepted their connections.

use crate::accounts::{
    phone_shard, user_shard, Staging, ABOUT_BYTES_MAX, AVATAR_MEDIA_ID_BYTES_MAX,
    DISPLAY_NAME_BYTES_MAX, REVOCATIONS_PER_SHARD_MAX,
};
use crate::api_http::{Body, Ctx, Handled, Reply};
use crate::calls::{call, CallRef};
use crate::core::{unix_ms, Core};
use crate::msg::{ApiReq, CoreMsg};
use crate::owner::Effect;
use crate::token::Claims;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use switchboard_api::accounts::Phone;
use switchboard_api::keys::{self, KeyUpload};
use switchboard_api::otp::{self, OtpError, SmsDelivery, SmsSender};
use switchboard_api::ratelimit::Decision;
use switchboard_storage::{AccountRecord, Record};
use switchboard_wire::{DeviceId, UserId};

/// How far past `now + token_ttl_s` a refreshed token's expiry may be pushed: each refresh
/// expires strictly after the token it replaces, so refreshing faster than once a second moves
/// expiries ahead of the clock; past this slack a refresh gets 429.
pub const REFRESH_SLACK_S: u64 = 60;

/// Most phone numbers in one `POST /v1/contacts/lookup`.
pub const CONTACTS_PER_LOOKUP_MAX: usize = 500;

// ---------------------------------------------------------------- caller side (HTTP handlers)

/// The authenticated caller: a valid, unexpired, unrevoked bearer token.
pub fn auth(cx: &Ctx<'_>) -> Result<Claims, Reply> {
    let unauthorized = |m: &str| {
        cx.core.metrics().http_unauthorized.fetch_add(1, Relaxed);
        Reply::error(401, "unauthorized", m).with_header("www-authenticate", "Bearer".into())
    };
    let token = cx
        .head
        .header_str("authorization")
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
    let claims = cx
        .core
        .key
        .verify(token, unix_ms() / 1000)
        .map_err(|e| unauthorized(&e.to_string()))?;
    if cx.core.is_revoked(&claims) {
        return Err(unauthorized("token revoked"));
    }
    Ok(claims)
}

fn parse_phone(s: &str) -> Result<Phone, Reply> {
    Phone::parse(s).ok_or_else(|| {
        Reply::error(
            400,
            "invalid_phone",
            "phone must be E.164: +, 7 to 15 digits, the first not 0",
        )
    })
}

fn phone_core(core: &Core, phone: &Phone) -> usize {
    phone_shard(phone, core.shards_total) as usize % core.cores
}

fn user_core(core: &Core, user: UserId) -> usize {
    user_shard(user, core.shards_total) as usize % core.cores
}

pub async fn register(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let req: otp::json::RegisterRequest = cx.json(body)?;
    let phone = parse_phone(&req.phone)?;
    let dest = phone_core(cx.core, &phone);
    Ok(call(
        cx.core,
        dest,
        ApiReq::Register {
            phone,
            addr: cx.peer,
        },
    )
    .await)
}

pub async fn verify(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let req: otp::json::VerifyRequest = cx.json(body)?;
    let phone = parse_phone(&req.phone)?;
    let dest = phone_core(cx.core, &phone);
    Ok(call(
        cx.core,
        dest,
        ApiReq::Verify {
            phone: req.phone,
            code: req.code,
            device_name: req.device_name,
            addr: cx.peer,
        },
    )
    .await)
}

pub async fn refresh(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let req = ApiReq::Refresh {
        user: c.user,
        device: c.device,
        expires_s: c.expires_unix_s,
    };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

pub async fn logout(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let req = ApiReq::RemoveDevice {
        user: c.user,
        device: c.device,
    };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

pub async fn remove_device(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let device = cx.param_u64("device")?;
    let device = u32::try_from(device)
        .ok()
        .filter(|d| *d != 0)
        .ok_or_else(|| Reply::error(404, "not_found", "no such device"))?;
    let req = ApiReq::RemoveDevice {
        user: c.user,
        device: DeviceId(device),
    };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

pub async fn devices(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let req = ApiReq::Devices { user: c.user };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

pub async fn get_me(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let req = ApiReq::GetProfile {
        user: c.user,
        with_phone: true,
    };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

/// `PUT /v1/users/me` body: any subset of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    pub display_name: Option<String>,
    pub about: Option<String>,
    /// `null` clears the avatar.
    #[serde(default, deserialize_with = "double_option")]
    pub avatar_media_id: Option<Option<String>>,
}

fn double_option<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    use serde::Deserialize;
    Option::<String>::deserialize(d).map(Some)
}

fn check_text(value: &Option<String>, max: usize, what: &str) -> Result<(), Reply> {
    match value {
        Some(v) if v.len() > max || v.chars().any(char::is_control) => Err(Reply::error(
            400,
            "invalid_profile",
            &format!("{what}: at most {max} bytes, no control characters"),
        )),
        _ => Ok(()),
    }
}

pub async fn put_me(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let patch: ProfilePatch = cx.json(body)?;
    check_text(&patch.display_name, DISPLAY_NAME_BYTES_MAX, "display_name")?;
    check_text(&patch.about, ABOUT_BYTES_MAX, "about")?;
    let avatar = patch.avatar_media_id.clone().flatten();
    check_text(&avatar, AVATAR_MEDIA_ID_BYTES_MAX, "avatar_media_id")?;
    if avatar.as_deref().is_some_and(|a| {
        a.is_empty()
            || !a
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        return Err(Reply::error(
            400,
            "invalid_profile",
            "avatar_media_id must be a media id (letters, digits, - and _)",
        ));
    }
    let req = ApiReq::PutProfile {
        user: c.user,
        patch,
    };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

pub async fn get_user(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    auth(cx)?;
    let user = UserId(cx.param_u64("id")?);
    if user.0 == 0 {
        return Err(Reply::error(404, "not_found", "no such user"));
    }
    let req = ApiReq::GetProfile {
        user,
        with_phone: false,
    };
    Ok(call(cx.core, user_core(cx.core, user), req).await)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupRequest {
    phones: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LookupHit {
    pub phone: String,
    pub user_id: u64,
}

pub async fn contacts_lookup(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    if let Decision::Limited { retry_after_ms } = cx
        .core
        .api
        .contact_lookups
        .borrow_mut()
        .check(&c.user, unix_ms())
    {
        return Err(Reply::rate_limited(
            "rate_limited",
            retry_after_ms.div_ceil(1000),
        ));
    }
    let req: LookupRequest = cx.json(body)?;
    if req.phones.len() > CONTACTS_PER_LOOKUP_MAX {
        return Err(Reply::error(
            400,
            "too_many_phones",
            &format!("at most {CONTACTS_PER_LOOKUP_MAX} numbers per lookup"),
        ));
    }
    let mut by_core: HashMap<usize, Vec<Phone>> = HashMap::new();
    for p in &req.phones {
        let phone = parse_phone(p)?;
        by_core
            .entry(phone_core(cx.core, &phone))
            .or_default()
            .push(phone);
    }
    let mut users = Vec::new();
    for (dest, phones) in by_core {
        let reply = call(cx.core, dest, ApiReq::Lookup { phones }).await;
        if reply.status != 200 {
            return Err(reply);
        }
        let part: Vec<LookupHit> = serde_json::from_slice(&reply.body)
            .map_err(|_| Reply::error(500, "internal", "lookup part"))?;
        users.extend(part);
    }
    users.sort_by(|a, b| a.phone.cmp(&b.phone));
    users.dedup();
    Ok(Reply::json(200, &serde_json::json!({ "users": users })))
}

fn key_error(e: keys::KeyError) -> Reply {
    let message = match &e {
        keys::KeyError::Malformed(m) => format!("malformed keys: {m}"),
        other => format!("{other:?}"),
    };
    Reply::error(e.status(), e.code(), &message)
}

pub async fn put_keys(cx: &Ctx<'_>, body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let Body::Buffered(bytes) = body else {
        return Err(Reply::error(500, "internal", "keys body"));
    };
    let is_json = cx.head.header_str("content-type").is_some_and(|ct| {
        ct.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !is_json {
        return Err(Reply::error(
            415,
            "unsupported_media_type",
            "Content-Type must be application/json",
        ));
    }
    let upload = KeyUpload::from_json(&bytes).map_err(key_error)?;
    let req = ApiReq::PutKeys {
        user: c.user,
        device: c.device,
        upload,
    };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

pub async fn own_keys(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    let req = ApiReq::KeyCount {
        user: c.user,
        device: c.device,
    };
    Ok(call(cx.core, user_core(cx.core, c.user), req).await)
}

pub async fn get_keys(cx: &Ctx<'_>, _body: Body<'_>) -> Handled {
    let c = auth(cx)?;
    if let Decision::Limited { retry_after_ms } = cx
        .core
        .api
        .prekey_fetches
        .borrow_mut()
        .check(&c.user, unix_ms())
    {
        return Err(Reply::rate_limited(
            "rate_limited",
            retry_after_ms.div_ceil(1000),
        ));
    }
    let user = UserId(cx.param_u64("user")?);
    let device = u32::try_from(cx.param_u64("device")?)
        .map_err(|_| Reply::error(404, "not_found", "no such device"))?;
    if user.0 == 0 || device == 0 {
        return Err(Reply::error(404, "not_found", "no keys for this device"));
    }
    let req = ApiReq::FetchKeys {
        user,
        device: DeviceId(device),
    };
    Ok(call(cx.core, user_core(cx.core, user), req).await)
}

// ---------------------------------------------------------------- owner side (Core::handle)

/// Answers a call now (reads, refusals).
pub fn reply_now(core: &Rc<Core>, to: CallRef, reply: Reply) {
    if to.core == core.id {
        core.api.calls.complete(to.id, reply);
    } else {
        let c = core.clone();
        glommio::spawn_local(async move {
            c.route(to.core, CoreMsg::ApiReply { id: to.id, reply })
                .await
        })
        .detach();
    }
}

fn not_found(what: &str) -> Reply {
    Reply::error(404, "not_found", what)
}

fn otp_error(e: &OtpError) -> Reply {
    let r = match e {
        OtpError::CodeIncorrect { checks_left } => Reply::json(
            401,
            &otp::json::CodeIncorrect {
                error: "wrong code".into(),
                code: e.code().into(),
                checks_left: *checks_left,
            },
        ),
        OtpError::Store(s) => Reply::error(s.status(), s.code(), &format!("{s:?}")),
        _ => Reply::error(e.status(), e.code(), &format!("{e:?}")),
    };
    match e.retry_after_s() {
        Some(s) => r.with_header("retry-after", s.max(1).to_string()),
        None => r,
    }
}

#[derive(serde::Serialize)]
struct ProfileJson<'a> {
    user_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<&'a str>,
    display_name: &'a str,
    about: &'a str,
    avatar_media_id: Option<&'a str>,
}

fn profile_reply(accounts: &crate::accounts::Accounts, user: UserId, with_phone: bool) -> Reply {
    let (Some(p), Some(phone)) = (accounts.profile(user), accounts.phone_of(user)) else {
        return not_found("no such user");
    };
    Reply::json(
        200,
        &ProfileJson {
            user_id: user.0,
            phone: with_phone.then_some(phone.as_str()),
            display_name: &p.display_name,
            about: &p.about,
            avatar_media_id: (!p.avatar_media_id.is_empty()).then_some(p.avatar_media_id.as_str()),
        },
    )
}

/// The compact form of a validated upload, as stored in `AccountRecord::Keys` (replayed with
/// `KeyUpload::from_json`).
fn keys_record_bytes(u: &KeyUpload) -> Vec<u8> {
    let put = keys::json::PutKeys {
        identity_key: u.identity_key.as_deref().map(|k| STANDARD.encode(k)),
        signed_prekey: u.signed_prekey.as_ref().map(|s| keys::json::SignedPreKey {
            key_id: s.key_id,
            public_key: STANDARD.encode(&s.public_key),
            signature: STANDARD.encode(&s.signature),
        }),
        one_time_prekeys: u
            .one_time_prekeys
            .iter()
            .map(|p| keys::json::PreKey {
                key_id: p.key_id,
                public_key: STANDARD.encode(&p.public_key),
            })
            .collect(),
    };
    serde_json::to_vec(&put).unwrap_or_default()
}

/// Handles a call on the core owning the state. Never waits (see `Core::handle`).
pub fn handle_api(core: &Rc<Core>, from: CallRef, req: ApiReq) {
    let now_ms = unix_ms();
    let shard_of_user = |u: UserId| user_shard(u, core.shards_total);
    match req {
        ApiReq::Register { phone, addr } => {
            if core.api.sms_inflight.load(Relaxed) >= crate::api_http::SMS_POSTS_INFLIGHT_MAX {
                return reply_now(core, from, Reply::error(503, "busy", "SMS gateway busy"));
            }
            let sent = core.api.otp.borrow_mut().register(
                phone.as_str(),
                addr,
                now_ms,
                &mut rand::thread_rng(),
            );
            let reply = match sent {
                Ok(msg) => {
                    match core.api.sms.deliver(&msg, now_ms / 1000) {
                        SmsDelivery::Log { line } => eprintln!("switchboard: {line}"),
                        SmsDelivery::Post(post) => crate::api_http::post_webhook(core, post),
                    }
                    Reply::json(
                        202,
                        &otp::json::RegisterResponse {
                            expires_in_s: core.api.code_ttl_ms / 1000,
                        },
                    )
                }
                Err(e) => otp_error(&e),
            };
            reply_now(core, from, reply);
        }
        ApiReq::Verify {
            phone,
            code,
            device_name,
            addr,
        } => {
            let Some(p) = Phone::parse(&phone) else {
                return reply_now(core, from, otp_error(&OtpError::InvalidPhone));
            };
            let shard = core.owned_shard_id(phone_shard(&p, core.shards_total));
            let mut accounts = shard.accounts.borrow_mut();
            if shard.owner.borrow().overloaded() {
                drop(accounts);
                return reply_now(core, from, Reply::error(503, "busy", "storage busy"));
            }
            let mut staging = Staging {
                accounts: &mut accounts,
                now_ms,
                records: Vec::new(),
            };
            let result = core.api.otp.borrow_mut().verify(
                &phone,
                &code,
                &device_name,
                addr,
                now_ms,
                &mut staging,
            );
            let records = staging.records;
            drop(accounts);
            match result {
                Ok(login) => {
                    let expires = now_ms / 1000 + core.cfg.token_ttl_s;
                    let token = core.key.mint(Claims {
                        user: login.user_id,
                        device: login.device_id,
                        expires_unix_s: expires,
                    });
                    let reply = Reply::json(
                        200,
                        &otp::json::VerifyResponse {
                            user_id: login.user_id.0,
                            device_id: login.device_id.0,
                            token,
                            new_user: login.new_user,
                        },
                    );
                    shard
                        .owner
                        .borrow_mut()
                        .stage(records, vec![Effect::ApiReply { to: from, reply }]);
                    shard.staged();
                }
                Err(e) => reply_now(core, from, otp_error(&e)),
            }
        }
        ApiReq::Refresh {
            user,
            device,
            expires_s,
        } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            if !shard.accounts.borrow().has_device(user, device) {
                return reply_now(
                    core,
                    from,
                    Reply::error(401, "unauthorized", "no such device"),
                );
            }
            let now_s = now_ms / 1000;
            // Strictly later than the old token, so revoking "through the old expiry" cannot
            // hit the new one (tokens carry no other serial).
            let new_expiry = (now_s + core.cfg.token_ttl_s).max(expires_s + 1);
            if new_expiry > now_s + core.cfg.token_ttl_s + REFRESH_SLACK_S {
                return reply_now(core, from, Reply::rate_limited("rate_limited", 1));
            }
            let token = core.key.mint(Claims {
                user,
                device,
                expires_unix_s: new_expiry,
            });
            let reply = Reply::json(
                200,
                &serde_json::json!({"token": token, "expires_unix_s": new_expiry}),
            );
            // The refreshed token is revoked: one live token per device (older ones too).
            stage_revoke(core, &shard, from, user, device, expires_s, false, reply);
        }
        ApiReq::RemoveDevice { user, device } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            if !shard.accounts.borrow().has_device(user, device) {
                return reply_now(core, from, not_found("no such device"));
            }
            // Every token of the device expires within `token_ttl_s` (+ the refresh slack), so
            // this covers them all, and the entry can be pruned once they have all expired.
            let through = now_ms / 1000 + core.cfg.token_ttl_s + REFRESH_SLACK_S;
            stage_revoke(
                core,
                &shard,
                from,
                user,
                device,
                through,
                true,
                Reply::no_content(),
            );
        }
        ApiReq::Devices { user } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            let accounts = shard.accounts.borrow();
            let reply = match accounts.devices(user) {
                Some(ds) => Reply::json(
                    200,
                    &ds.iter()
                        .map(|d| serde_json::json!({"device_id": d.id.0, "name": d.name}))
                        .collect::<Vec<_>>(),
                ),
                None => not_found("no account for this user"),
            };
            drop(accounts);
            reply_now(core, from, reply);
        }
        ApiReq::GetProfile { user, with_phone } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            let reply = profile_reply(&shard.accounts.borrow(), user, with_phone);
            reply_now(core, from, reply);
        }
        ApiReq::PutProfile { user, patch } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            let mut accounts = shard.accounts.borrow_mut();
            let Some(current) = accounts.profile(user).cloned() else {
                drop(accounts);
                return reply_now(core, from, not_found("no account for this user"));
            };
            if shard.owner.borrow().overloaded() {
                drop(accounts);
                return reply_now(core, from, Reply::error(503, "busy", "storage busy"));
            }
            let record = Record::Account(AccountRecord::Profile {
                user,
                display_name: patch.display_name.unwrap_or(current.display_name),
                about: patch.about.unwrap_or(current.about),
                avatar_media_id: match patch.avatar_media_id {
                    Some(a) => a.unwrap_or_default(),
                    None => current.avatar_media_id,
                },
            });
            accounts.apply(&record);
            let reply = profile_reply(&accounts, user, true);
            drop(accounts);
            shard
                .owner
                .borrow_mut()
                .stage(vec![record], vec![Effect::ApiReply { to: from, reply }]);
            shard.staged();
        }
        ApiReq::Lookup { phones } => {
            let mut hits = Vec::new();
            for p in phones {
                let shard = core.owned_shard_id(phone_shard(&p, core.shards_total));
                let found = shard.accounts.borrow().user_by_phone(&p);
                if let Some(u) = found {
                    hits.push(crate::accounts_svc::LookupHit {
                        phone: p.as_str().to_owned(),
                        user_id: u.0,
                    });
                }
            }
            reply_now(core, from, Reply::json(200, &hits));
        }
        ApiReq::PutKeys {
            user,
            device,
            upload,
        } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            let mut accounts = shard.accounts.borrow_mut();
            if !accounts.has_device(user, device) {
                drop(accounts);
                return reply_now(core, from, not_found("no such device: log in first"));
            }
            if shard.owner.borrow().overloaded() {
                drop(accounts);
                return reply_now(core, from, Reply::error(503, "busy", "storage busy"));
            }
            let bytes = keys_record_bytes(&upload);
            match accounts.keys.put(user, device, upload) {
                Ok(n) => {
                    drop(accounts);
                    let reply = Reply::json(
                        200,
                        &keys::json::PutKeysResponse {
                            one_time_prekeys: n,
                        },
                    );
                    let record = Record::Account(AccountRecord::Keys {
                        user,
                        device,
                        keys: bytes,
                    });
                    shard
                        .owner
                        .borrow_mut()
                        .stage(vec![record], vec![Effect::ApiReply { to: from, reply }]);
                    shard.staged();
                }
                Err(e) => {
                    drop(accounts);
                    reply_now(core, from, key_error(e));
                }
            }
        }
        ApiReq::MediaAccess {
            user,
            chat,
            media_id,
        } => crate::media_svc::handle_access(core, from, user, chat, &media_id),
        ApiReq::KeyCount { user, device } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            let reply = match shard.accounts.borrow().keys.prekey_count(user, device) {
                Some(n) => Reply::json(
                    200,
                    &serde_json::json!({
                        "one_time_prekeys": n,
                        "low": n < keys::PREKEYS_LOW_THRESHOLD,
                    }),
                ),
                None => not_found("no keys uploaded for this device"),
            };
            reply_now(core, from, reply);
        }
        ApiReq::FetchKeys { user, device } => {
            let shard = core.owned_shard_id(shard_of_user(user));
            if shard.owner.borrow().overloaded() {
                return reply_now(core, from, Reply::error(503, "busy", "storage busy"));
            }
            let fetched = shard.accounts.borrow_mut().keys.fetch(user, device);
            match fetched {
                Ok((bundle, low)) => {
                    // The owner learns it is running low from a `PrekeysLow` frame on its live
                    // connections (once per drop below the mark) and from `GET /v1/keys`.
                    let reply = Reply::json(200, &bundle.to_json(user, device));
                    let mut effects = Vec::with_capacity(2);
                    if let Some(low) = low {
                        effects.push(Effect::PrekeysLow {
                            user: low.user,
                            device: low.device,
                            remaining: u32::try_from(low.remaining).unwrap_or(u32::MAX),
                        });
                    }
                    effects.push(Effect::ApiReply { to: from, reply });
                    // Only a handed-out one-time prekey changes durable state.
                    let records = if bundle.one_time_prekey.is_some() {
                        vec![Record::Account(AccountRecord::PrekeyTaken { user, device })]
                    } else {
                        Vec::new()
                    };
                    shard.owner.borrow_mut().stage(records, effects);
                    shard.staged();
                }
                Err(e) => reply_now(core, from, key_error(e)),
            }
        }
    }
}

/// Stages a revocation; after it is durable every core learns it (`Effect::Revoke`), then the
/// caller gets `reply`.
#[allow(clippy::too_many_arguments)]
fn stage_revoke(
    core: &Rc<Core>,
    shard: &crate::shard::Shard,
    from: CallRef,
    user: UserId,
    device: DeviceId,
    through_s: u64,
    removed: bool,
    reply: Reply,
) {
    let mut accounts = shard.accounts.borrow_mut();
    if accounts.revocations.len() >= REVOCATIONS_PER_SHARD_MAX {
        accounts.prune_revocations(unix_ms() / 1000);
    }
    if accounts.revocations.len() >= REVOCATIONS_PER_SHARD_MAX || shard.owner.borrow().overloaded()
    {
        drop(accounts);
        return reply_now(
            core,
            from,
            Reply::error(503, "busy", "revocation list full"),
        );
    }
    let record = Record::Account(AccountRecord::Revoke {
        user,
        device,
        through_s,
        removed,
    });
    accounts.apply(&record);
    drop(accounts);
    shard.owner.borrow_mut().stage(
        vec![record],
        vec![
            Effect::Revoke {
                user,
                device,
                through_s,
                removed,
            },
            Effect::ApiReply { to: from, reply },
        ],
    );
    shard.staged();
}
