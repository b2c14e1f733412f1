//! Any string presented as a session token: `TokenKey::verify` must not panic, and accepted
//! claims never name user 0 or device 0 and are not expired.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard::token::TokenKey;

static KEY: OnceLock<TokenKey> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let key = KEY.get_or_init(|| TokenKey::new(&[7u8; 32]));
    if let Ok(claims) = key.verify(s, 0) {
        assert!(claims.user.0 != 0 && claims.device.0 != 0, "{claims:?}");
        assert!(claims.expires_unix_s > 0, "{claims:?}");
    }
});
