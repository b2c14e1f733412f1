//! The end-to-end key directory: per (user, device) an identity key, a signed prekey and a
//! queue of one-time prekeys. The server stores only public keys and never interprets them
//! (payloads stay opaque); it checks sizes, counts and ids.
//!
//! ```text
//!  PUT /v1/keys (owner's token)   ─► KeyDirectory::put(user, device, KeyUpload)
//!  GET /v1/keys/{user}/{device}   ─► KeyDirectory::fetch ─► KeyBundle (one one-time prekey
//!                                     consumed) + Option<LowPrekeys> ─► engine tells the owner
//! ```
//!
//! Memory per device: at most [`ONE_TIME_PREKEYS_MAX`] × ([`PUBLIC_KEY_BYTES_MAX`] + 4) plus
//! the identity and signed prekey, about 7 KiB; the number of devices is bounded by the
//! account store ([`crate::accounts::DEVICES_PER_USER_MAX`] per user).

use std::collections::{HashMap, VecDeque};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use switchboard_wire::{DeviceId, UserId};

/// Largest public key (Curve25519 keys are 32 bytes, 33 with Signal's type byte); room for
/// other curves without letting a device store arbitrary blobs.
pub const PUBLIC_KEY_BYTES_MAX: usize = 64;
/// Largest signature over the signed prekey (XEdDSA/Ed25519 signatures are 64 bytes).
pub const SIGNATURE_BYTES_MAX: usize = 128;
/// Most one-time prekeys stored per device; an upload past it is refused (400).
pub const ONE_TIME_PREKEYS_MAX: usize = 100;
/// Most one-time prekeys in one upload (also bounds the request body: ~100 × 100 bytes).
pub const PREKEYS_PER_UPLOAD_MAX: usize = 100;
/// Below this many one-time prekeys, the owner is told to upload more ("running low").
pub const PREKEYS_LOW_THRESHOLD: usize = 10;

const _: () = assert!(PREKEYS_LOW_THRESHOLD < ONE_TIME_PREKEYS_MAX);
const _: () = assert!(PREKEYS_PER_UPLOAD_MAX <= ONE_TIME_PREKEYS_MAX);

/// A one-time prekey: the client's id for it and the public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreKey {
    pub key_id: u32,
    pub public_key: Vec<u8>,
}

/// The medium-term prekey with the identity key's signature over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedPreKey {
    pub key_id: u32,
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A validated `PUT /v1/keys`. The identity key and signed prekey are required on a device's
/// first upload and optional later (a signed prekey rotation, or a top-up of one-time keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyUpload {
    pub identity_key: Option<Vec<u8>>,
    pub signed_prekey: Option<SignedPreKey>,
    pub one_time_prekeys: Vec<PreKey>,
}

/// What `GET /v1/keys/{user}/{device}` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyBundle {
    pub identity_key: Vec<u8>,
    pub signed_prekey: SignedPreKey,
    /// `None` when the device has run out (X3DH then proceeds without one).
    pub one_time_prekey: Option<PreKey>,
}

/// "Upload more one-time prekeys": for the engine to deliver to the owner's device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LowPrekeys {
    pub user: UserId,
    pub device: DeviceId,
    pub remaining: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// Not valid JSON of the expected shape, or bad base64. 400.
    Malformed(String),
    /// A key or signature is empty or larger than its limit. 400.
    KeyTooLarge,
    /// More than [`PREKEYS_PER_UPLOAD_MAX`] in one upload, or more than
    /// [`ONE_TIME_PREKEYS_MAX`] stored. 400.
    TooManyPrekeys,
    /// A one-time prekey id repeated within the upload or already stored. 400.
    DuplicateKeyId,
    /// The first upload lacks the identity key or signed prekey. 400.
    MissingKeys,
    /// A different identity key than the one stored: a new identity is a new device. 409.
    IdentityKeyChanged,
    /// No keys for that device (or user 0 / device 0). 404.
    NotFound,
}

impl KeyError {
    pub fn status(&self) -> u16 {
        match self {
            KeyError::NotFound => 404,
            KeyError::IdentityKeyChanged => 409,
            _ => 400,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            KeyError::Malformed(_) => "malformed_keys",
            KeyError::KeyTooLarge => "key_too_large",
            KeyError::TooManyPrekeys => "too_many_prekeys",
            KeyError::DuplicateKeyId => "duplicate_key_id",
            KeyError::MissingKeys => "missing_keys",
            KeyError::IdentityKeyChanged => "identity_key_changed",
            KeyError::NotFound => "not_found",
        }
    }
}

/// JSON shapes (keys and signatures in standard base64).
pub mod json {
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PreKey {
        pub key_id: u32,
        pub public_key: String,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct SignedPreKey {
        pub key_id: u32,
        pub public_key: String,
        pub signature: String,
    }

    /// `PUT /v1/keys` body.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PutKeys {
        #[serde(default)]
        pub identity_key: Option<String>,
        #[serde(default)]
        pub signed_prekey: Option<SignedPreKey>,
        #[serde(default)]
        pub one_time_prekeys: Vec<PreKey>,
    }

    /// `PUT /v1/keys` answer.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PutKeysResponse {
        pub one_time_prekeys: usize,
    }

    /// `GET /v1/keys/{user}/{device}` answer.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct KeyBundle {
        pub user_id: u64,
        pub device_id: u32,
        pub identity_key: String,
        pub signed_prekey: SignedPreKey,
        pub one_time_prekey: Option<PreKey>,
    }
}

fn decode_key(b64: &str, max: usize) -> Result<Vec<u8>, KeyError> {
    // Base64 of `max` bytes is at most 4 * ceil(max / 3) characters; check before decoding.
    if b64.len() > max.div_ceil(3) * 4 {
        return Err(KeyError::KeyTooLarge);
    }
    let bytes = STANDARD
        .decode(b64)
        .map_err(|e| KeyError::Malformed(format!("base64: {e}")))?;
    if bytes.is_empty() || bytes.len() > max {
        return Err(KeyError::KeyTooLarge);
    }
    Ok(bytes)
}

impl KeyUpload {
    /// Parses and validates a `PUT /v1/keys` body (sizes, counts, duplicate ids within it).
    pub fn from_json(body: &[u8]) -> Result<KeyUpload, KeyError> {
        let put: json::PutKeys =
            serde_json::from_slice(body).map_err(|e| KeyError::Malformed(e.to_string()))?;
        if put.one_time_prekeys.len() > PREKEYS_PER_UPLOAD_MAX {
            return Err(KeyError::TooManyPrekeys);
        }
        let identity_key = put
            .identity_key
            .as_deref()
            .map(|k| decode_key(k, PUBLIC_KEY_BYTES_MAX))
            .transpose()?;
        let signed_prekey = put
            .signed_prekey
            .map(|s| {
                Ok::<_, KeyError>(SignedPreKey {
                    key_id: s.key_id,
                    public_key: decode_key(&s.public_key, PUBLIC_KEY_BYTES_MAX)?,
                    signature: decode_key(&s.signature, SIGNATURE_BYTES_MAX)?,
                })
            })
            .transpose()?;
        let one_time_prekeys = put
            .one_time_prekeys
            .iter()
            .map(|p| {
                Ok(PreKey {
                    key_id: p.key_id,
                    public_key: decode_key(&p.public_key, PUBLIC_KEY_BYTES_MAX)?,
                })
            })
            .collect::<Result<Vec<_>, KeyError>>()?;
        let mut ids: Vec<u32> = one_time_prekeys.iter().map(|p| p.key_id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(KeyError::DuplicateKeyId);
        }
        Ok(KeyUpload {
            identity_key,
            signed_prekey,
            one_time_prekeys,
        })
    }
}

impl KeyBundle {
    pub fn to_json(&self, user: UserId, device: DeviceId) -> json::KeyBundle {
        json::KeyBundle {
            user_id: user.0,
            device_id: device.0,
            identity_key: STANDARD.encode(&self.identity_key),
            signed_prekey: json::SignedPreKey {
                key_id: self.signed_prekey.key_id,
                public_key: STANDARD.encode(&self.signed_prekey.public_key),
                signature: STANDARD.encode(&self.signed_prekey.signature),
            },
            one_time_prekey: self.one_time_prekey.as_ref().map(|p| json::PreKey {
                key_id: p.key_id,
                public_key: STANDARD.encode(&p.public_key),
            }),
        }
    }
}

#[derive(Clone, Debug)]
struct DeviceKeys {
    identity_key: Vec<u8>,
    signed_prekey: SignedPreKey,
    one_time: VecDeque<PreKey>,
    /// The owner was told it runs low since its last upload (tell once, not on every fetch).
    low_signalled: bool,
}

/// The directory for the users whose keys this core holds.
#[derive(Clone, Debug, Default)]
pub struct KeyDirectory {
    devices: HashMap<(UserId, DeviceId), DeviceKeys>,
}

impl KeyDirectory {
    pub fn new() -> Self {
        KeyDirectory::default()
    }

    /// Stores a device's upload; returns how many one-time prekeys it now holds. All or
    /// nothing: a refused upload changes nothing.
    pub fn put(
        &mut self,
        user: UserId,
        device: DeviceId,
        upload: KeyUpload,
    ) -> Result<usize, KeyError> {
        if user.0 == 0 || device.0 == 0 {
            return Err(KeyError::NotFound);
        }
        debug_assert!(upload.one_time_prekeys.len() <= PREKEYS_PER_UPLOAD_MAX);
        match self.devices.get_mut(&(user, device)) {
            None => {
                let (Some(identity_key), Some(signed_prekey)) =
                    (upload.identity_key, upload.signed_prekey)
                else {
                    return Err(KeyError::MissingKeys);
                };
                if upload.one_time_prekeys.len() > ONE_TIME_PREKEYS_MAX {
                    return Err(KeyError::TooManyPrekeys);
                }
                let count = upload.one_time_prekeys.len();
                self.devices.insert(
                    (user, device),
                    DeviceKeys {
                        identity_key,
                        signed_prekey,
                        one_time: upload.one_time_prekeys.into(),
                        low_signalled: false,
                    },
                );
                Ok(count)
            }
            Some(keys) => {
                if upload
                    .identity_key
                    .as_ref()
                    .is_some_and(|k| *k != keys.identity_key)
                {
                    return Err(KeyError::IdentityKeyChanged);
                }
                if keys.one_time.len() + upload.one_time_prekeys.len() > ONE_TIME_PREKEYS_MAX {
                    return Err(KeyError::TooManyPrekeys);
                }
                if upload
                    .one_time_prekeys
                    .iter()
                    .any(|p| keys.one_time.iter().any(|q| q.key_id == p.key_id))
                {
                    return Err(KeyError::DuplicateKeyId);
                }
                if let Some(spk) = upload.signed_prekey {
                    keys.signed_prekey = spk;
                }
                keys.one_time.extend(upload.one_time_prekeys);
                if keys.one_time.len() >= PREKEYS_LOW_THRESHOLD {
                    keys.low_signalled = false;
                }
                Ok(keys.one_time.len())
            }
        }
    }

    /// A bundle for starting a session with (user, device), consuming its oldest one-time
    /// prekey. The second value, when present, asks the engine to tell the owner to upload more
    /// (once per time it drops below [`PREKEYS_LOW_THRESHOLD`]).
    pub fn fetch(
        &mut self,
        user: UserId,
        device: DeviceId,
    ) -> Result<(KeyBundle, Option<LowPrekeys>), KeyError> {
        let keys = self
            .devices
            .get_mut(&(user, device))
            .ok_or(KeyError::NotFound)?;
        let one_time_prekey = keys.one_time.pop_front();
        let remaining = keys.one_time.len();
        let low = (remaining < PREKEYS_LOW_THRESHOLD && !keys.low_signalled).then(|| {
            keys.low_signalled = true;
            LowPrekeys {
                user,
                device,
                remaining,
            }
        });
        Ok((
            KeyBundle {
                identity_key: keys.identity_key.clone(),
                signed_prekey: keys.signed_prekey.clone(),
                one_time_prekey,
            },
            low,
        ))
    }

    /// One-time prekeys stored for a device (for the owner's `GET /v1/keys` count).
    pub fn prekey_count(&self, user: UserId, device: DeviceId) -> Option<usize> {
        self.devices.get(&(user, device)).map(|k| k.one_time.len())
    }

    /// Forgets a removed device's keys; returns whether there were any.
    pub fn remove_device(&mut self, user: UserId, device: DeviceId) -> bool {
        self.devices.remove(&(user, device)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: UserId = UserId(7);
    const D: DeviceId = DeviceId(1);

    fn b64(bytes: &[u8]) -> String {
        STANDARD.encode(bytes)
    }

    fn upload_json(
        identity: Option<&[u8]>,
        spk: Option<u32>,
        otk_ids: std::ops::Range<u32>,
    ) -> Vec<u8> {
        let mut v = serde_json::json!({
            "one_time_prekeys": otk_ids.map(|id| serde_json::json!({"key_id": id, "public_key": b64(&[id as u8; 33])})).collect::<Vec<_>>(),
        });
        if let Some(k) = identity {
            v["identity_key"] = b64(k).into();
        }
        if let Some(id) = spk {
            v["signed_prekey"] = serde_json::json!({"key_id": id, "public_key": b64(&[9; 33]), "signature": b64(&[5; 64])});
        }
        serde_json::to_vec(&v).expect("json")
    }

    fn put(dir: &mut KeyDirectory, body: &[u8]) -> Result<usize, KeyError> {
        dir.put(U, D, KeyUpload::from_json(body)?)
    }

    #[test]
    fn upload_validation() {
        let cases: Vec<(Vec<u8>, Result<usize, KeyError>)> = vec![
            (upload_json(Some(&[1; 33]), Some(1), 0..3), Ok(3)),
            (upload_json(Some(&[1; 33]), Some(1), 0..0), Ok(0)),
            (upload_json(Some(&[1; PUBLIC_KEY_BYTES_MAX]), Some(1), 0..1), Ok(1)),
            (upload_json(Some(&[1; PUBLIC_KEY_BYTES_MAX + 1]), Some(1), 0..1), Err(KeyError::KeyTooLarge)),
            (upload_json(Some(&[]), Some(1), 0..1), Err(KeyError::KeyTooLarge)),
            (upload_json(None, Some(1), 0..1), Err(KeyError::MissingKeys)),
            (upload_json(Some(&[1; 33]), None, 0..1), Err(KeyError::MissingKeys)),
            (
                upload_json(Some(&[1; 33]), Some(1), 0..(PREKEYS_PER_UPLOAD_MAX as u32 + 1)),
                Err(KeyError::TooManyPrekeys),
            ),
            (
                br#"{"identity_key":"AQ==","signed_prekey":{"key_id":1,"public_key":"AQ==","signature":"AQ=="},"one_time_prekeys":[{"key_id":1,"public_key":"AQ=="},{"key_id":1,"public_key":"Ag=="}]}"#.to_vec(),
                Err(KeyError::DuplicateKeyId),
            ),
            (
                format!(r#"{{"identity_key":"{}"}}"#, "A".repeat(100_000)).into_bytes(),
                Err(KeyError::KeyTooLarge),
            ),
        ];
        for (body, expect) in cases {
            let mut dir = KeyDirectory::new();
            assert_eq!(
                put(&mut dir, &body),
                expect,
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
        for bad in [
            &b"null"[..],
            b"{",
            br#"{"identity_key":"not base64!"}"#,
            b"{\"one_time_prekeys\": 5}",
            b"{\"one_time_prekeys\": [{\"key_id\": -1, \"public_key\": \"AQ==\"}]}",
        ] {
            assert!(
                matches!(KeyUpload::from_json(bad), Err(KeyError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut dir = KeyDirectory::new();
        let upload =
            KeyUpload::from_json(&upload_json(Some(&[1; 33]), Some(1), 0..1)).expect("upload");
        assert_eq!(
            dir.put(UserId(0), D, upload.clone()),
            Err(KeyError::NotFound)
        );
        assert_eq!(dir.put(U, DeviceId(0), upload), Err(KeyError::NotFound));
    }

    #[test]
    fn later_uploads() {
        let mut dir = KeyDirectory::new();
        assert_eq!(
            put(&mut dir, &upload_json(Some(&[1; 33]), Some(1), 0..50)),
            Ok(50)
        );
        // Top-up without identity or signed prekey.
        assert_eq!(put(&mut dir, &upload_json(None, None, 50..90)), Ok(90));
        // Same identity is fine, a new one is not.
        assert_eq!(
            put(&mut dir, &upload_json(Some(&[1; 33]), Some(2), 90..95)),
            Ok(95)
        );
        assert_eq!(
            put(&mut dir, &upload_json(Some(&[2; 33]), None, 95..96)),
            Err(KeyError::IdentityKeyChanged)
        );
        // Ids already stored, and the per-device cap, refuse the whole upload.
        assert_eq!(
            put(&mut dir, &upload_json(None, None, 94..96)),
            Err(KeyError::DuplicateKeyId)
        );
        assert_eq!(
            put(&mut dir, &upload_json(None, None, 200..206)),
            Err(KeyError::TooManyPrekeys)
        );
        assert_eq!(dir.prekey_count(U, D), Some(95));
        assert_eq!(
            put(&mut dir, &upload_json(None, None, 200..205)),
            Ok(ONE_TIME_PREKEYS_MAX)
        );
        // The signed prekey was rotated to id 2.
        let (bundle, _) = dir.fetch(U, D).expect("fetch");
        assert_eq!(bundle.signed_prekey.key_id, 2);
    }

    #[test]
    fn fetch_consumes_and_signals_low_once() {
        let mut dir = KeyDirectory::new();
        let n = PREKEYS_LOW_THRESHOLD as u32 + 2;
        assert_eq!(
            put(&mut dir, &upload_json(Some(&[1; 33]), Some(1), 0..n)),
            Ok(n as usize)
        );
        let mut signals = Vec::new();
        for expect_id in 0..n {
            let (bundle, low) = dir.fetch(U, D).expect("fetch");
            assert_eq!(bundle.identity_key, vec![1; 33]);
            assert_eq!(
                bundle.one_time_prekey.map(|p| p.key_id),
                Some(expect_id),
                "oldest first"
            );
            signals.extend(low);
        }
        assert_eq!(
            signals,
            vec![LowPrekeys {
                user: U,
                device: D,
                remaining: PREKEYS_LOW_THRESHOLD - 1
            }]
        );
        // Exhausted: bundles without a one-time prekey, no repeated signal.
        let (bundle, low) = dir.fetch(U, D).expect("fetch");
        assert_eq!((bundle.one_time_prekey, low), (None, None));
        // A top-up above the threshold re-arms the signal.
        assert_eq!(put(&mut dir, &upload_json(None, None, 100..111)), Ok(11));
        let (_, low) = dir.fetch(U, D).expect("fetch");
        assert_eq!(low, None);
        let (_, low) = dir.fetch(U, D).expect("fetch");
        assert_eq!(low.map(|l| l.remaining), Some(9));

        assert_eq!(dir.fetch(U, DeviceId(2)), Err(KeyError::NotFound));
        assert!(dir.remove_device(U, D));
        assert_eq!(dir.fetch(U, D), Err(KeyError::NotFound));
        assert_eq!(dir.prekey_count(U, D), None);
    }

    #[test]
    fn bundle_json() {
        let mut dir = KeyDirectory::new();
        put(&mut dir, &upload_json(Some(&[1; 33]), Some(3), 4..5)).expect("put");
        let (bundle, _) = dir.fetch(U, D).expect("fetch");
        let v = serde_json::to_value(bundle.to_json(U, D)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "user_id": 7, "device_id": 1,
                "identity_key": b64(&[1; 33]),
                "signed_prekey": {"key_id": 3, "public_key": b64(&[9; 33]), "signature": b64(&[5; 64])},
                "one_time_prekey": {"key_id": 4, "public_key": b64(&[4; 33])},
            })
        );
        assert_eq!(KeyError::IdentityKeyChanged.status(), 409);
        assert_eq!(KeyError::NotFound.status(), 404);
        assert_eq!(KeyError::TooManyPrekeys.status(), 400);
    }
}
