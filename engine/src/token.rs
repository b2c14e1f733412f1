//! Session tokens: `base64url(user u64 BE | device u32 BE | expires_unix_s u64 BE | HMAC-SHA256[32])`.
//! The MAC covers the first 20 bytes under the server's secret. Stateless: any core verifies
//! any token; revocation (logout) arrives with the login issue.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use switchboard_wire::{DeviceId, UserId};

type HmacSha256 = Hmac<Sha256>;

const BODY_BYTES: usize = 8 + 4 + 8;
const TOKEN_BYTES: usize = BODY_BYTES + 32;
/// Longest token string we even try to decode (base64 of TOKEN_BYTES is 76 chars).
pub const TOKEN_CHARS_MAX: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    pub user: UserId,
    pub device: DeviceId,
    pub expires_unix_s: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
    Expired,
    /// User 0 or device 0 are never valid.
    BadIds,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed token",
            TokenError::BadSignature => "bad token signature",
            TokenError::Expired => "token expired",
            TokenError::BadIds => "token names user 0 or device 0",
        })
    }
}
impl std::error::Error for TokenError {}

#[derive(Clone)]
pub struct TokenKey {
    mac: HmacSha256,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> TokenKey {
        assert!(secret.len() >= 32, "token secret must be at least 32 bytes");
        TokenKey {
            mac: HmacSha256::new_from_slice(secret).expect("HMAC takes any key length"),
        }
    }

    /// A 256-bit key for another purpose (`label`), derived from the token secret with HMAC,
    /// so one secret file serves every signer while keys for different uses stay unrelated.
    pub fn derive_key(&self, label: &str) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(b"derive\0");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn mint(&self, claims: Claims) -> String {
        let mut buf = [0u8; TOKEN_BYTES];
        buf[..8].copy_from_slice(&claims.user.0.to_be_bytes());
        buf[8..12].copy_from_slice(&claims.device.0.to_be_bytes());
        buf[12..20].copy_from_slice(&claims.expires_unix_s.to_be_bytes());
        let mut mac = self.mac.clone();
        mac.update(&buf[..BODY_BYTES]);
        buf[BODY_BYTES..].copy_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(buf)
    }

    pub fn verify(&self, token: &str, now_unix_s: u64) -> Result<Claims, TokenError> {
        if token.len() > TOKEN_CHARS_MAX {
            return Err(TokenError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token.as_bytes())
            .map_err(|_| TokenError::Malformed)?;
        if raw.len() != TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let mut mac = self.mac.clone();
        mac.update(&raw[..BODY_BYTES]);
        // Constant-time comparison.
        mac.verify_slice(&raw[BODY_BYTES..])
            .map_err(|_| TokenError::BadSignature)?;
        let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
        let claims = Claims {
            user: UserId(be64(&raw[..8])),
            device: DeviceId(u32::from_be_bytes(raw[8..12].try_into().expect("4 bytes"))),
            expires_unix_s: be64(&raw[12..20]),
        };
        if claims.user.0 == 0 || claims.device.0 == 0 {
            return Err(TokenError::BadIds);
        }
        if claims.expires_unix_s <= now_unix_s {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// Parses a TTL like `3600`, `90s`, `15m`, `12h`, `30d`.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 3600, 15m, 12h, 30d)"))?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("duration {s:?} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(&[7u8; 32])
    }

    #[test]
    fn mint_verify_roundtrip() {
        let c = Claims {
            user: UserId(42),
            device: DeviceId(3),
            expires_unix_s: 2_000,
        };
        let t = key().mint(c);
        assert_eq!(key().verify(&t, 1_999), Ok(c));
        assert_eq!(key().verify(&t, 2_000), Err(TokenError::Expired));
    }

    #[test]
    fn rejects_forgeries_and_garbage() {
        let c = Claims {
            user: UserId(42),
            device: DeviceId(3),
            expires_unix_s: 2_000,
        };
        let t = key().mint(c);
        assert_eq!(
            TokenKey::new(&[8u8; 32]).verify(&t, 0),
            Err(TokenError::BadSignature)
        );
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[7] ^= 1; // another user id, same MAC
        assert_eq!(
            key().verify(&URL_SAFE_NO_PAD.encode(&raw), 0),
            Err(TokenError::BadSignature)
        );
        for bad in ["", "x", "!!!!", &"A".repeat(500), &t[..t.len() - 2]] {
            assert_eq!(key().verify(bad, 0), Err(TokenError::Malformed), "{bad}");
        }
        let zero = key().mint(Claims {
            user: UserId(0),
            ..c
        });
        assert_eq!(key().verify(&zero, 0), Err(TokenError::BadIds));
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("15m"), Ok(900));
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("abc").is_err());
    }
}
