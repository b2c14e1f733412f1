//! Session tokens minted from the server's secret, so the load generator can authenticate
//! thousands of users without a login round trip.
//!
//! Same format as `switchboard::token`:
//! `base64url_nopad(user u64 BE | device u32 BE | expires_unix_s u64 BE | HMAC-SHA256(secret, those 20 bytes))`.
//! The secret is the trimmed text of `<data_dir>/token.secret` used as ASCII bytes (not
//! hex-decoded). It is re-implemented here rather than imported so that loadgen depends only on
//! `wire` and `client`; a test checks that the engine verifies what this mints.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest secret the server accepts from `token.secret` (64 hex characters).
pub const SECRET_CHARS_MIN: usize = 64;

const BODY_BYTES: usize = 8 + 4 + 8;

/// Mints tokens with one secret.
#[derive(Clone)]
pub struct Minter {
    mac: HmacSha256,
}

impl Minter {
    /// A minter for the secret in `path` (the server's `token.secret`).
    pub fn from_secret_file(path: &Path) -> Result<Minter, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("read secret file {}: {e}", path.display()))?;
        let secret = text.trim();
        if secret.len() < SECRET_CHARS_MIN {
            return Err(format!(
                "{}: secret shorter than {SECRET_CHARS_MIN} characters",
                path.display()
            ));
        }
        Ok(Minter::new(secret.as_bytes()))
    }

    pub fn new(secret: &[u8]) -> Minter {
        Minter {
            mac: HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length"),
        }
    }

    pub fn mint(&self, user: u64, device: u32, expires_unix_s: u64) -> String {
        let mut buf = [0u8; BODY_BYTES + 32];
        buf[..8].copy_from_slice(&user.to_be_bytes());
        buf[8..12].copy_from_slice(&device.to_be_bytes());
        buf[12..20].copy_from_slice(&expires_unix_s.to_be_bytes());
        let mut mac = self.mac.clone();
        mac.update(&buf[..BODY_BYTES]);
        buf[BODY_BYTES..].copy_from_slice(&mac.finalize().into_bytes());
        URL_SAFE_NO_PAD.encode(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard::token::{Claims, TokenKey};
    use switchboard_wire::{DeviceId, UserId};

    #[test]
    fn engine_verifies_minted_tokens() {
        let secret = "ab".repeat(32);
        let t = Minter::new(secret.as_bytes()).mint(42, 1, 2_000);
        let claims = TokenKey::new(secret.as_bytes()).verify(&t, 1_000);
        assert_eq!(
            claims,
            Ok(Claims {
                user: UserId(42),
                device: DeviceId(1),
                expires_unix_s: 2_000
            })
        );
        let other = "cd".repeat(32);
        assert!(TokenKey::new(other.as_bytes()).verify(&t, 1_000).is_err());
    }

    #[test]
    fn secret_file_is_trimmed_and_checked() {
        let dir = std::env::temp_dir().join(format!("sb-loadgen-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("token.secret");
        let secret = "0f".repeat(32);
        std::fs::write(&path, format!("{secret}\n")).expect("write");
        let minted = Minter::from_secret_file(&path)
            .expect("minter")
            .mint(7, 1, 99);
        assert_eq!(minted, Minter::new(secret.as_bytes()).mint(7, 1, 99));
        std::fs::write(&path, "short").expect("write");
        assert!(Minter::from_secret_file(&path).is_err());
        std::fs::remove_dir_all(&dir).expect("rmdir");
    }
}
