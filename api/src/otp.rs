//! Phone + one-time-code login, as a state machine with time and randomness passed in.
//!
//! ```text
//!  POST /v1/auth/register {phone} ─► Otp::register(phone, addr, now, rng) ─► SmsMessage
//!        └─ SmsSender::deliver(msg, now_unix) ─► SmsDelivery::Log | ::Post(webhook)  (engine sends)
//!  POST /v1/auth/verify {phone, code, device_name}
//!        ─► Otp::verify(.., store) ─► Login { user_id, device_id }  (engine mints the token)
//! ```
//!
//! A code is 6 random digits, valid for [`CODE_TTL_MS`] and at most [`CODE_CHECKS_MAX`]
//! checks; registering again replaces it. Registrations are rate-limited per phone and per
//! source address, verifications per source address. Codes are compared in constant time.
//! Pending codes are bounded ([`PENDING_CODES_MAX`]); when full (after dropping expired ones),
//! new registrations get 503 rather than evicting someone's code.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use rand::Rng as _;
use subtle::ConstantTimeEq as _;

use crate::accounts::{is_valid_device_name, AccountStore, Login, Phone, StoreError};
use crate::ratelimit::{self, Decision, KeyedLimiter, Rate};
use crate::sign::{webhook_signature, WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER};

/// Digits in a code: 10⁶ possibilities, so [`CODE_CHECKS_MAX`] guesses per code succeed with
/// probability 4·10⁻⁶.
pub const CODE_DIGITS: usize = 6;
/// How long a code stays valid (issue 5: 5 minutes).
pub const CODE_TTL_MS: u64 = 5 * 60 * 1000;
/// Checks allowed per code (issue 5: 4); the code is discarded on the last wrong one.
pub const CODE_CHECKS_MAX: u32 = 4;
/// Most codes pending at once (per core). Each costs ~150 bytes (phone twice, code, expiry):
/// ~15 MiB at the default.
pub const PENDING_CODES_MAX: usize = 100_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtpConfig {
    pub code_ttl_ms: u64,
    pub code_checks_max: u32,
    pub pending_codes_max: usize,
    pub registrations_per_phone: Rate,
    pub registrations_per_addr: Rate,
    pub verifications_per_addr: Rate,
    /// Keys each of the three limiters remembers.
    pub limiter_keys_max: usize,
    /// Product name in the SMS text.
    pub app_name: String,
}

impl Default for OtpConfig {
    fn default() -> Self {
        OtpConfig {
            code_ttl_ms: CODE_TTL_MS,
            code_checks_max: CODE_CHECKS_MAX,
            pending_codes_max: PENDING_CODES_MAX,
            registrations_per_phone: ratelimit::REGISTRATIONS_PER_PHONE,
            registrations_per_addr: ratelimit::REGISTRATIONS_PER_ADDR,
            verifications_per_addr: ratelimit::VERIFICATIONS_PER_ADDR,
            limiter_keys_max: ratelimit::LIMITER_KEYS_MAX,
            app_name: "Switchboard".to_owned(),
        }
    }
}

/// An SMS to send: the code and the text around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmsMessage {
    pub to: Phone,
    pub code: String,
    pub text: String,
}

/// Why a registration or verification was refused; each maps to a status and a JSON `code`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OtpError {
    /// Not an E.164 number. 400.
    InvalidPhone,
    /// Not 6 ASCII digits (does not use up a check). 400.
    InvalidCode,
    /// Empty, too long or with control characters. 400.
    InvalidDeviceName,
    /// Too many registrations or verifications; retry after this long. 429.
    RateLimited { retry_after_ms: u64 },
    /// Too many codes pending on this server. 503.
    Busy,
    /// No code pending for this phone (never requested, expired, used up or already used). 401.
    CodeExpired,
    /// Wrong code; `checks_left` more tries for this code. 401.
    CodeIncorrect { checks_left: u32 },
    /// That was the code's last check; request a new one. 429.
    TooManyAttempts,
    /// The account store refused (too many devices, unavailable).
    Store(StoreError),
}

impl OtpError {
    pub fn status(&self) -> u16 {
        match self {
            OtpError::InvalidPhone | OtpError::InvalidCode | OtpError::InvalidDeviceName => 400,
            OtpError::CodeExpired | OtpError::CodeIncorrect { .. } => 401,
            OtpError::RateLimited { .. } | OtpError::TooManyAttempts => 429,
            OtpError::Busy => 503,
            OtpError::Store(e) => e.status(),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            OtpError::InvalidPhone => "invalid_phone",
            OtpError::InvalidCode => "invalid_code",
            OtpError::InvalidDeviceName => "invalid_device_name",
            OtpError::RateLimited { .. } => "rate_limited",
            OtpError::Busy => "busy",
            OtpError::CodeExpired => "code_expired",
            OtpError::CodeIncorrect { .. } => "code_incorrect",
            OtpError::TooManyAttempts => "too_many_attempts",
            OtpError::Store(e) => e.code(),
        }
    }

    /// `Retry-After` seconds for 429s that have one.
    pub fn retry_after_s(&self) -> Option<u64> {
        match *self {
            OtpError::RateLimited { retry_after_ms } => {
                Decision::Limited { retry_after_ms }.retry_after_s()
            }
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
struct Pending {
    code: [u8; CODE_DIGITS],
    expires_ms: u64,
    checks_left: u32,
}

/// The login state machine for one core (see the module docs).
#[derive(Debug)]
pub struct Otp {
    config: OtpConfig,
    pending: HashMap<Phone, Pending>,
    /// (expiry, phone) of every pending code, to drop expired ones in order.
    expiries: BTreeSet<(u64, Phone)>,
    per_phone: KeyedLimiter<Phone>,
    per_addr: KeyedLimiter<IpAddr>,
    verify_per_addr: KeyedLimiter<IpAddr>,
}

impl Otp {
    pub fn new(config: OtpConfig) -> Self {
        assert!(
            config.code_ttl_ms > 0 && config.code_checks_max > 0 && config.pending_codes_max > 0
        );
        Otp {
            per_phone: KeyedLimiter::new(config.registrations_per_phone, config.limiter_keys_max),
            per_addr: KeyedLimiter::new(config.registrations_per_addr, config.limiter_keys_max),
            verify_per_addr: KeyedLimiter::new(
                config.verifications_per_addr,
                config.limiter_keys_max,
            ),
            config,
            pending: HashMap::new(),
            expiries: BTreeSet::new(),
        }
    }

    /// Codes currently pending.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Starts (or restarts) a login for `phone`: a new code replaces any pending one. Returns
    /// the SMS to send. `now_ms` is monotonic milliseconds.
    pub fn register(
        &mut self,
        phone: &str,
        addr: IpAddr,
        now_ms: u64,
        rng: &mut dyn rand::RngCore,
    ) -> Result<SmsMessage, OtpError> {
        let phone = Phone::parse(phone).ok_or(OtpError::InvalidPhone)?;
        let addr = ratelimit::source_key(addr);
        // Check both limits before taking from either, so a refusal costs nothing.
        for d in [
            self.per_addr.peek(&addr, now_ms),
            self.per_phone.peek(&phone, now_ms),
        ] {
            if let Decision::Limited { retry_after_ms } = d {
                return Err(OtpError::RateLimited { retry_after_ms });
            }
        }
        self.purge_expired(now_ms);
        if !self.pending.contains_key(&phone) && self.pending.len() >= self.config.pending_codes_max
        {
            return Err(OtpError::Busy);
        }
        self.per_addr.check(&addr, now_ms);
        self.per_phone.check(&phone, now_ms);

        let mut code = [0u8; CODE_DIGITS];
        for d in &mut code {
            *d = b'0' + rng.gen_range(0..10u8);
        }
        let expires_ms = now_ms.saturating_add(self.config.code_ttl_ms);
        if let Some(old) = self.pending.insert(
            phone.clone(),
            Pending {
                code,
                expires_ms,
                checks_left: self.config.code_checks_max,
            },
        ) {
            self.expiries.remove(&(old.expires_ms, phone.clone()));
        }
        self.expiries.insert((expires_ms, phone.clone()));
        let code = String::from_utf8_lossy(&code).into_owned();
        let minutes = self.config.code_ttl_ms.div_ceil(60_000);
        let text = format!(
            "Your {} code is {code}. It expires in {minutes} minutes. Do not share it.",
            self.config.app_name
        );
        Ok(SmsMessage {
            to: phone,
            code,
            text,
        })
    }

    /// Checks `code` for `phone`; on success the code is used up and `store` logs the device in
    /// (creating the user for a new phone).
    pub fn verify(
        &mut self,
        phone: &str,
        code: &str,
        device_name: &str,
        addr: IpAddr,
        now_ms: u64,
        store: &mut dyn AccountStore,
    ) -> Result<Login, OtpError> {
        let phone = Phone::parse(phone).ok_or(OtpError::InvalidPhone)?;
        if code.len() != CODE_DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(OtpError::InvalidCode);
        }
        if !is_valid_device_name(device_name) {
            return Err(OtpError::InvalidDeviceName);
        }
        if let Decision::Limited { retry_after_ms } = self
            .verify_per_addr
            .check(&ratelimit::source_key(addr), now_ms)
        {
            return Err(OtpError::RateLimited { retry_after_ms });
        }
        self.purge_expired(now_ms);
        let Some(pending) = self.pending.get_mut(&phone) else {
            return Err(OtpError::CodeExpired);
        };
        debug_assert!(pending.checks_left > 0 && pending.expires_ms > now_ms);
        pending.checks_left -= 1;
        let matches: bool = pending.code.ct_eq(code.as_bytes()).into();
        if !matches {
            if pending.checks_left == 0 {
                self.remove(&phone);
                return Err(OtpError::TooManyAttempts);
            }
            return Err(OtpError::CodeIncorrect {
                checks_left: pending.checks_left,
            });
        }
        // The code is used up even if the store fails: the client registers again.
        self.remove(&phone);
        store.login(&phone, device_name).map_err(OtpError::Store)
    }

    fn remove(&mut self, phone: &Phone) {
        if let Some(p) = self.pending.remove(phone) {
            self.expiries.remove(&(p.expires_ms, phone.clone()));
        }
    }

    /// Drops every code expired at `now_ms`; returns how many. Called by `register` and
    /// `verify`; a timer may call it too.
    pub fn purge_expired(&mut self, now_ms: u64) -> usize {
        let mut purged = 0;
        while self.expiries.first().is_some_and(|(exp, _)| *exp <= now_ms) {
            if let Some((_, phone)) = self.expiries.pop_first() {
                self.pending.remove(&phone);
                purged += 1;
            }
        }
        debug_assert_eq!(self.pending.len(), self.expiries.len());
        purged
    }
}

/// JSON shapes of `POST /v1/auth/register` and `POST /v1/auth/verify` (see `api/README.md`).
pub mod json {
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RegisterRequest {
        pub phone: String,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RegisterResponse {
        pub expires_in_s: u64,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct VerifyRequest {
        pub phone: String,
        pub code: String,
        pub device_name: String,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct VerifyResponse {
        pub user_id: u64,
        pub device_id: u32,
        pub token: String,
        pub new_user: bool,
    }

    /// The error body of a wrong code: the usual two fields plus the checks left.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CodeIncorrect {
        pub error: String,
        pub code: String,
        pub checks_left: u32,
    }
}

/// What the engine does to deliver an SMS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SmsDelivery {
    /// Write this line to the log (development: the code is in it).
    Log { line: String },
    /// POST `body` to `url` with `headers` (a real SMS gateway behind a webhook).
    Post(WebhookPost),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookPost {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Turns an SMS into a delivery the engine performs (config `sms = "log" | "webhook"`).
pub trait SmsSender {
    /// `now_unix_s` is wall-clock time, for the webhook's signed timestamp.
    fn deliver(&self, msg: &SmsMessage, now_unix_s: u64) -> SmsDelivery;
}

/// Development sender: logs the message, code included. Never use it in production.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogSender;

impl SmsSender for LogSender {
    fn deliver(&self, msg: &SmsMessage, _now_unix_s: u64) -> SmsDelivery {
        SmsDelivery::Log {
            line: format!("sms to {}: {}", msg.to, msg.text),
        }
    }
}

/// Posts `{"to", "text", "code"}` as JSON to a gateway URL, signed with
/// `x-switchboard-signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` and
/// `x-switchboard-timestamp: <unix seconds>` (see [`crate::sign::webhook_signature`]).
#[derive(Clone)]
pub struct WebhookSender {
    pub url: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for WebhookSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSender")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl WebhookSender {
    pub fn new(url: &str, secret: &[u8]) -> Self {
        WebhookSender {
            url: url.to_owned(),
            secret: secret.to_vec(),
        }
    }
}

impl SmsSender for WebhookSender {
    fn deliver(&self, msg: &SmsMessage, now_unix_s: u64) -> SmsDelivery {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            to: &'a str,
            text: &'a str,
            code: &'a str,
        }
        // Serialising three strings cannot fail.
        let body = serde_json::to_vec(&Body {
            to: msg.to.as_str(),
            text: &msg.text,
            code: &msg.code,
        })
        .unwrap_or_default();
        let signature = webhook_signature(&self.secret, now_unix_s, &body);
        SmsDelivery::Post(WebhookPost {
            url: self.url.clone(),
            headers: vec![
                ("content-type".to_owned(), "application/json".to_owned()),
                (WEBHOOK_TIMESTAMP_HEADER.to_owned(), now_unix_s.to_string()),
                (WEBHOOK_SIGNATURE_HEADER.to_owned(), signature),
            ],
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounts::InMemoryAccounts;
    use rand::SeedableRng as _;
    use switchboard_wire::{DeviceId, UserId};

    const PHONE: &str = "+14155550123";

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    struct World {
        otp: Otp,
        store: InMemoryAccounts,
        rng: rand::rngs::StdRng,
        now_ms: u64,
    }

    impl World {
        fn new(config: OtpConfig) -> Self {
            World {
                otp: Otp::new(config),
                store: InMemoryAccounts::new(),
                rng: rand::rngs::StdRng::seed_from_u64(5),
                now_ms: 1_000_000,
            }
        }

        fn register(&mut self, phone: &str, addr: &str) -> Result<SmsMessage, OtpError> {
            self.otp
                .register(phone, ip(addr), self.now_ms, &mut self.rng)
        }

        fn verify(&mut self, phone: &str, code: &str) -> Result<Login, OtpError> {
            self.otp.verify(
                phone,
                code,
                "phone",
                ip("10.0.0.1"),
                self.now_ms,
                &mut self.store,
            )
        }
    }

    /// A different 6-digit code than `code`.
    fn wrong(code: &str) -> String {
        let n: u32 = code.parse().expect("digits");
        format!("{:06}", (n + 1) % 1_000_000)
    }

    #[test]
    fn register_then_verify() {
        let mut w = World::new(OtpConfig::default());
        let sms = w.register(PHONE, "10.0.0.1").expect("register");
        assert_eq!(sms.to.as_str(), PHONE);
        assert_eq!(sms.code.len(), CODE_DIGITS);
        assert!(sms.code.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(
            sms.text,
            format!(
                "Your Switchboard code is {}. It expires in 5 minutes. Do not share it.",
                sms.code
            )
        );
        let login = w.verify(PHONE, &sms.code).expect("verify");
        assert_eq!(
            login,
            Login {
                user_id: UserId(1),
                device_id: DeviceId(1),
                new_user: true
            }
        );
        // Used up.
        assert_eq!(w.verify(PHONE, &sms.code), Err(OtpError::CodeExpired));
        assert_eq!(w.otp.pending_len(), 0);
        // A second device on the same phone: same user.
        let sms = w.register(PHONE, "10.0.0.1").expect("register");
        let login = w.verify(PHONE, &sms.code).expect("verify");
        assert_eq!(
            (login.user_id, login.device_id, login.new_user),
            (UserId(1), DeviceId(2), false)
        );
    }

    #[test]
    fn checks_are_limited_per_code() {
        let mut w = World::new(OtpConfig::default());
        let sms = w.register(PHONE, "10.0.0.1").expect("register");
        let bad = wrong(&sms.code);
        assert_eq!(
            w.verify(PHONE, &bad),
            Err(OtpError::CodeIncorrect { checks_left: 3 })
        );
        assert_eq!(
            w.verify(PHONE, &bad),
            Err(OtpError::CodeIncorrect { checks_left: 2 })
        );
        assert_eq!(
            w.verify(PHONE, &bad),
            Err(OtpError::CodeIncorrect { checks_left: 1 })
        );
        // The fourth check may still be right.
        assert!(w.verify(PHONE, &sms.code).is_ok());

        let sms = w.register(PHONE, "10.0.0.1").expect("register");
        for left in (1..CODE_CHECKS_MAX).rev() {
            assert_eq!(
                w.verify(PHONE, &wrong(&sms.code)),
                Err(OtpError::CodeIncorrect { checks_left: left })
            );
        }
        assert_eq!(
            w.verify(PHONE, &wrong(&sms.code)),
            Err(OtpError::TooManyAttempts)
        );
        assert_eq!(
            w.verify(PHONE, &sms.code),
            Err(OtpError::CodeExpired),
            "the code is gone"
        );
        // Malformed codes are refused before they use up a check.
        let sms = w.register(PHONE, "10.0.0.1").expect("register");
        for bad in ["12345", "1234567", "12345a", "", "١٢٣٤٥٦"] {
            assert_eq!(w.verify(PHONE, bad), Err(OtpError::InvalidCode), "{bad:?}");
        }
        assert!(w.verify(PHONE, &sms.code).is_ok());
    }

    #[test]
    fn codes_expire_and_are_replaced() {
        let mut w = World::new(OtpConfig::default());
        let first = w.register(PHONE, "10.0.0.1").expect("register");
        w.now_ms += CODE_TTL_MS - 1;
        let second = w.register(PHONE, "10.0.0.1").expect("register");
        if first.code != second.code {
            assert_eq!(
                w.verify(PHONE, &first.code),
                Err(OtpError::CodeIncorrect { checks_left: 3 })
            );
        }
        assert_eq!(w.otp.pending_len(), 1);
        w.now_ms += CODE_TTL_MS;
        assert_eq!(w.verify(PHONE, &second.code), Err(OtpError::CodeExpired));
        assert_eq!(w.otp.pending_len(), 0);
        assert_eq!(
            w.verify("+4930123456", "123456"),
            Err(OtpError::CodeExpired)
        );
    }

    #[test]
    fn input_validation() {
        let mut w = World::new(OtpConfig::default());
        assert_eq!(
            w.register("4155550123", "10.0.0.1"),
            Err(OtpError::InvalidPhone)
        );
        assert_eq!(w.verify("+1 415", "123456"), Err(OtpError::InvalidPhone));
        let sms = w.register(PHONE, "10.0.0.1").expect("register");
        let store = &mut w.store;
        for name in ["", " ", "a\u{0}b", &"x".repeat(65)] {
            assert_eq!(
                w.otp
                    .verify(PHONE, &sms.code, name, ip("10.0.0.1"), w.now_ms, store),
                Err(OtpError::InvalidDeviceName)
            );
        }
        assert!(w
            .otp
            .verify(PHONE, &sms.code, "ok", ip("10.0.0.1"), w.now_ms, store)
            .is_ok());
    }

    #[test]
    fn registration_rate_limits() {
        let mut w = World::new(OtpConfig::default());
        // Per phone: a burst of 3, then one per refill interval.
        for _ in 0..3 {
            w.register(PHONE, "10.0.0.1").expect("register");
        }
        let err = w.register(PHONE, "10.0.0.2").expect_err("limited");
        assert_eq!(
            err,
            OtpError::RateLimited {
                retry_after_ms: 600_000
            }
        );
        assert_eq!(
            (err.status(), err.code(), err.retry_after_s()),
            (429, "rate_limited", Some(600))
        );
        w.now_ms += 600_000;
        w.register(PHONE, "10.0.0.3").expect("refilled");

        // Per source address, across phones; a refused attempt costs nothing.
        let mut w = World::new(OtpConfig::default());
        for i in 0..10 {
            w.register(&format!("+1415555{i:04}"), "192.0.2.1")
                .expect("register");
        }
        assert!(matches!(
            w.register("+14155559999", "192.0.2.1"),
            Err(OtpError::RateLimited { .. })
        ));
        w.register("+14155559999", "192.0.2.2")
            .expect("another address");
        // IPv6 addresses count per /64.
        for i in 0..10 {
            w.register(&format!("+4930555{i:04}"), &format!("2001:db8::{i:x}"))
                .expect("register");
        }
        assert!(matches!(
            w.register("+493055599", "2001:db8::ffff:1"),
            Err(OtpError::RateLimited { .. })
        ));
        w.register("+493055599", "2001:db8:0:1::1")
            .expect("another /64");
    }

    #[test]
    fn verification_rate_limit_per_address() {
        let mut w = World::new(OtpConfig {
            verifications_per_addr: Rate::one_every_s(2, 30),
            ..OtpConfig::default()
        });
        w.register(PHONE, "10.0.0.1").expect("register");
        assert!(matches!(
            w.verify(PHONE, "000000"),
            Err(OtpError::CodeIncorrect { .. }) | Ok(_)
        ));
        let _ = w.verify(PHONE, "000001");
        assert!(matches!(
            w.verify(PHONE, "000002"),
            Err(OtpError::RateLimited { .. })
        ));
    }

    #[test]
    fn pending_codes_are_bounded() {
        let mut w = World::new(OtpConfig {
            pending_codes_max: 2,
            ..OtpConfig::default()
        });
        w.register("+14155550001", "10.0.0.1").expect("register");
        w.now_ms += 1000;
        w.register("+14155550002", "10.0.0.1").expect("register");
        assert_eq!(w.register("+14155550003", "10.0.0.1"), Err(OtpError::Busy));
        // A phone that already has a code may replace it.
        w.register("+14155550002", "10.0.0.1").expect("replace");
        // Once the first expires there is room.
        w.now_ms += CODE_TTL_MS - 1000;
        w.register("+14155550003", "10.0.0.1")
            .expect("room after expiry");
        assert_eq!(w.otp.pending_len(), 2);
    }

    #[test]
    fn store_errors_pass_through() {
        let mut w = World::new(OtpConfig {
            registrations_per_phone: Rate::per_second(100, 1),
            ..OtpConfig::default()
        });
        for _ in 0..crate::accounts::DEVICES_PER_USER_MAX {
            let sms = w.register(PHONE, "10.0.0.1").expect("register");
            w.verify(PHONE, &sms.code).expect("login");
            w.now_ms += 60_000;
        }
        let sms = w.register(PHONE, "10.0.0.1").expect("register");
        let err = w.verify(PHONE, &sms.code).expect_err("full");
        assert_eq!(err, OtpError::Store(StoreError::DevicesFull));
        assert_eq!((err.status(), err.code()), (409, "too_many_devices"));
    }

    #[test]
    fn codes_are_uniform_digits() {
        let mut w = World::new(OtpConfig {
            registrations_per_phone: Rate::per_second(1000, 1000),
            registrations_per_addr: Rate::per_second(1000, 1000),
            ..OtpConfig::default()
        });
        let mut counts = [0u32; 10];
        for _ in 0..1000 {
            let sms = w.register(PHONE, "10.0.0.1").expect("register");
            for b in sms.code.bytes() {
                counts[(b - b'0') as usize] += 1;
            }
        }
        // 6000 digits: each value ~600; a broken generator (constant, or only a few values)
        // falls far outside.
        assert!(
            counts.iter().all(|&c| (450..750).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn senders() {
        let msg = SmsMessage {
            to: Phone::parse(PHONE).expect("phone"),
            code: "123456".to_owned(),
            text: "Your Switchboard code is 123456.".to_owned(),
        };
        assert_eq!(
            LogSender.deliver(&msg, 0),
            SmsDelivery::Log {
                line: "sms to +14155550123: Your Switchboard code is 123456.".to_owned()
            }
        );
        let sender = WebhookSender::new("https://sms.example/send", b"secret");
        assert!(!format!("{sender:?}").contains("secret"));
        let SmsDelivery::Post(post) = sender.deliver(&msg, 1_700_000_000) else {
            panic!("expected a POST");
        };
        assert_eq!(post.url, "https://sms.example/send");
        let body: serde_json::Value = serde_json::from_slice(&post.body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"to": PHONE, "text": "Your Switchboard code is 123456.", "code": "123456"})
        );
        let header = |name: &str| {
            post.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .expect("header")
        };
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(header(WEBHOOK_TIMESTAMP_HEADER), "1700000000");
        assert!(crate::sign::verify_webhook_signature(
            b"secret",
            1_700_000_000,
            &post.body,
            &header(WEBHOOK_SIGNATURE_HEADER),
            1_700_000_000
        ));
    }
}
