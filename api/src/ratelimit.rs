//! Token-bucket rate limits, keyed by anything (user, phone number, source address), with
//! bounded memory and time passed in.
//!
//! ```text
//!  (key, now_ms) ─► KeyedLimiter::check ─► Allowed { remaining } ─► serve
//!                                       └► Limited { retry_after_ms } ─► 429 + Retry-After /
//!                                                                       Error frame RATE_LIMITED
//! ```
//!
//! Each bucket is stored as one number, its *theoretical arrival time* (GCRA): the instant at
//! which the bucket would be full again. A request costs one `refill_interval_ms` of it; it is
//! allowed while the bucket's debt stays within `burst` intervals. A key whose time has passed
//! is exactly a full bucket, so it can be forgotten: the limiter's memory holds only keys that
//! are currently below full, up to `keys_max`. When full, the key closest to full (smallest
//! arrival time) is dropped, which loses the least; if that key was not yet full, it gets a
//! fresh burst. Size `keys_max` above the number of keys active within one refill window to make
//! that rare.
//!
//! `now_ms` is a monotonic clock in milliseconds (any epoch); a clock that steps back grants
//! nothing extra.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};

/// A bucket's shape: `burst` requests at once, then one more every `refill_interval_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub refill_interval_ms: u64,
}

impl Rate {
    /// `burst` at once, refilled at `per_second` tokens a second.
    pub const fn per_second(burst: u32, per_second: u64) -> Rate {
        assert!(per_second > 0 && per_second <= 1000);
        Rate {
            burst,
            refill_interval_ms: 1000 / per_second,
        }
    }

    /// `burst` at once, one more every `every_s` seconds.
    pub const fn one_every_s(burst: u32, every_s: u64) -> Rate {
        Rate {
            burst,
            refill_interval_ms: every_s * 1000,
        }
    }

    pub const fn is_valid(&self) -> bool {
        self.burst >= 1
            && self.refill_interval_ms >= 1
            && self.refill_interval_ms <= RATE_INTERVAL_MS_MAX
    }

    /// How far ahead of `now` a bucket's arrival time may run: the whole burst.
    fn tolerance_ms(&self) -> u64 {
        self.refill_interval_ms
            .saturating_mul(u64::from(self.burst))
    }
}

/// Longest refill interval a `Rate` may have (one day), so arrival-time arithmetic cannot come
/// near overflow even with a burst of `u32::MAX`.
pub const RATE_INTERVAL_MS_MAX: u64 = 24 * 3600 * 1000;

/// Messages per user (issue 5: "burst 60, refill 1/s"). Over it: an `Error` frame
/// `RATE_LIMITED`, nothing stored; the client retries with the same `client_msg_id`.
pub const MESSAGES_PER_USER: Rate = Rate::per_second(60, 1);
/// WebSocket/HTTP connection attempts per source address: a reconnect storm from one NAT is
/// allowed a burst, a connect flood is not.
pub const CONNECTS_PER_ADDR: Rate = Rate::per_second(30, 1);
/// Frames per connection: bursts of a sync's receipts pass, a flood does not.
pub const FRAMES_PER_CONN: Rate = Rate::per_second(200, 50);
/// `POST /v1/auth/register` per phone number: each one sends an SMS, which costs money and
/// annoys the number's owner. 3 codes at once, then one every 10 minutes.
pub const REGISTRATIONS_PER_PHONE: Rate = Rate::one_every_s(3, 600);
/// `POST /v1/auth/register` per source address, across phone numbers (SMS pumping fraud).
pub const REGISTRATIONS_PER_ADDR: Rate = Rate::one_every_s(10, 60);
/// `POST /v1/auth/verify` per source address, against guessing across many phones (each code
/// also has its own check limit).
pub const VERIFICATIONS_PER_ADDR: Rate = Rate::one_every_s(20, 30);
/// `POST /v1/contacts/lookup` per user, against enumerating the phone directory.
pub const CONTACT_LOOKUPS_PER_USER: Rate = Rate::one_every_s(10, 60);
/// `GET /v1/keys/{user}/{device}` per requesting user: each fetch consumes someone's one-time
/// prekey, so draining them must be slow; a burst covers starting a session with every device of
/// a large group.
pub const PREKEY_FETCHES_PER_USER: Rate = Rate::per_second(500, 1);

const _: () = assert!(MESSAGES_PER_USER.is_valid());
const _: () = assert!(PREKEY_FETCHES_PER_USER.is_valid());
const _: () = assert!(CONNECTS_PER_ADDR.is_valid());
const _: () = assert!(FRAMES_PER_CONN.is_valid());
const _: () = assert!(REGISTRATIONS_PER_PHONE.is_valid());
const _: () = assert!(REGISTRATIONS_PER_ADDR.is_valid());
const _: () = assert!(VERIFICATIONS_PER_ADDR.is_valid());
const _: () = assert!(CONTACT_LOOKUPS_PER_USER.is_valid());

/// Default most keys one limiter remembers (per core). Each costs about 3 keys' size plus
/// ~64 bytes (a hash-map slot and a B-tree entry): ~10 MiB for 100k `u64` or `IpAddr` keys.
pub const LIMITER_KEYS_MAX: usize = 100_000;

/// The key a source address is limited under: IPv4 as is, IPv6 by its /64 (one subscriber
/// usually holds a whole /64, so per-address limits on full IPv6 addresses would be free to
/// dodge), an IPv4-mapped IPv6 address as its IPv4 address.
pub fn source_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// The outcome of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead; `remaining` more requests would pass right now.
    Allowed { remaining: u32 },
    /// Refused; nothing was taken. Retrying after `retry_after_ms` will pass.
    Limited { retry_after_ms: u64 },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }

    /// The `Retry-After` header value in whole seconds (rounded up, at least 1) when limited.
    pub fn retry_after_s(&self) -> Option<u64> {
        match *self {
            Decision::Allowed { .. } => None,
            Decision::Limited { retry_after_ms } => Some(retry_after_ms.div_ceil(1000).max(1)),
        }
    }
}

/// GCRA step: the decision for `cost` tokens and the new arrival time if allowed.
fn decide(rate: Rate, tat_ms: u64, now_ms: u64, cost: u32) -> (Decision, u64) {
    debug_assert!(rate.is_valid());
    if cost == 0 {
        let remaining = remaining(rate, tat_ms, now_ms);
        return (Decision::Allowed { remaining }, tat_ms);
    }
    if cost > rate.burst {
        // Never passes; say when a full bucket would be there, which is the best we know.
        let retry_after_ms = tat_ms.saturating_sub(now_ms).max(rate.refill_interval_ms);
        return (Decision::Limited { retry_after_ms }, tat_ms);
    }
    let start = tat_ms.max(now_ms);
    let new_tat = start + rate.refill_interval_ms * u64::from(cost);
    let allowed_until = now_ms + rate.tolerance_ms();
    if new_tat > allowed_until {
        (
            Decision::Limited {
                retry_after_ms: new_tat - allowed_until,
            },
            tat_ms,
        )
    } else {
        let remaining = remaining(rate, new_tat, now_ms);
        (Decision::Allowed { remaining }, new_tat)
    }
}

fn remaining(rate: Rate, tat_ms: u64, now_ms: u64) -> u32 {
    let debt = tat_ms.saturating_sub(now_ms);
    let free = rate.tolerance_ms().saturating_sub(debt) / rate.refill_interval_ms;
    u32::try_from(free).unwrap_or(u32::MAX)
}

/// One bucket, for limits that belong to one object (frames per connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    rate: Rate,
    tat_ms: u64,
}

impl Bucket {
    pub fn new(rate: Rate) -> Self {
        assert!(rate.is_valid(), "invalid rate {rate:?}");
        Bucket { rate, tat_ms: 0 }
    }

    /// A bucket in the state `tat_ms()` reported, for owners that keep only the arrival time
    /// (the rate being the same for all of them) to save memory per object.
    pub fn with_tat(rate: Rate, tat_ms: u64) -> Self {
        assert!(rate.is_valid(), "invalid rate {rate:?}");
        Bucket { rate, tat_ms }
    }

    /// The bucket's theoretical arrival time, its only state besides the rate.
    pub fn tat_ms(&self) -> u64 {
        self.tat_ms
    }

    /// Takes one token if there is one.
    pub fn check(&mut self, now_ms: u64) -> Decision {
        self.check_n(1, now_ms)
    }

    /// Takes `cost` tokens if there are that many (all or nothing).
    pub fn check_n(&mut self, cost: u32, now_ms: u64) -> Decision {
        let (decision, tat) = decide(self.rate, self.tat_ms, now_ms, cost);
        self.tat_ms = tat;
        decision
    }
}

/// Buckets keyed by `K`, remembering at most `keys_max` keys (see the module docs).
#[derive(Clone, Debug)]
pub struct KeyedLimiter<K> {
    rate: Rate,
    keys_max: usize,
    /// key → arrival time.
    tats: HashMap<K, u64>,
    /// (arrival time, key), to find the key closest to full.
    by_tat: BTreeSet<(u64, K)>,
}

impl<K: Hash + Eq + Ord + Clone> KeyedLimiter<K> {
    pub fn new(rate: Rate, keys_max: usize) -> Self {
        assert!(rate.is_valid(), "invalid rate {rate:?}");
        assert!(keys_max >= 1);
        KeyedLimiter {
            rate,
            keys_max,
            tats: HashMap::new(),
            by_tat: BTreeSet::new(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Keys currently remembered (below full).
    pub fn len(&self) -> usize {
        self.tats.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tats.is_empty()
    }

    /// Takes one token from `key`'s bucket if there is one.
    pub fn check(&mut self, key: &K, now_ms: u64) -> Decision {
        self.check_n(key, 1, now_ms)
    }

    /// Takes `cost` tokens from `key`'s bucket if there are that many (all or nothing).
    pub fn check_n(&mut self, key: &K, cost: u32, now_ms: u64) -> Decision {
        let old = self.tats.get(key).copied();
        let (decision, new_tat) = decide(self.rate, old.unwrap_or(0), now_ms, cost);
        if old == Some(new_tat) || (old.is_none() && new_tat <= now_ms) {
            return decision;
        }
        if let Some(old) = old {
            self.by_tat.remove(&(old, key.clone()));
        } else {
            self.make_room(now_ms);
        }
        self.tats.insert(key.clone(), new_tat);
        self.by_tat.insert((new_tat, key.clone()));
        decision
    }

    /// What `check` would answer, without taking anything.
    pub fn peek(&self, key: &K, now_ms: u64) -> Decision {
        let tat = self.tats.get(key).copied().unwrap_or(0);
        decide(self.rate, tat, now_ms, 1).0
    }

    /// Forgets every key whose bucket is full again; returns how many. Optional (eviction
    /// happens anyway when the limiter is full); a timer may call it to return memory.
    pub fn purge(&mut self, now_ms: u64) -> usize {
        let mut purged = 0;
        while let Some((tat, _)) = self.by_tat.first() {
            if *tat > now_ms {
                break;
            }
            if let Some((_, key)) = self.by_tat.pop_first() {
                self.tats.remove(&key);
                purged += 1;
            }
        }
        purged
    }

    fn make_room(&mut self, now_ms: u64) {
        if self.tats.len() < self.keys_max {
            return;
        }
        // Dropping full buckets loses nothing; otherwise drop the one closest to full.
        if self.purge(now_ms) == 0 {
            if let Some((_, key)) = self.by_tat.pop_first() {
                self.tats.remove(&key);
            }
        }
        debug_assert!(self.tats.len() < self.keys_max);
        debug_assert_eq!(self.tats.len(), self.by_tat.len());
    }
}

/// The server's configurable limits, with the documented defaults above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub messages_per_user: Rate,
    pub connects_per_addr: Rate,
    pub frames_per_conn: Rate,
    pub registrations_per_phone: Rate,
    pub registrations_per_addr: Rate,
    pub verifications_per_addr: Rate,
    pub contact_lookups_per_user: Rate,
    pub prekey_fetches_per_user: Rate,
    /// Most keys each keyed limiter remembers, per core.
    pub limiter_keys_max: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            messages_per_user: MESSAGES_PER_USER,
            connects_per_addr: CONNECTS_PER_ADDR,
            frames_per_conn: FRAMES_PER_CONN,
            registrations_per_phone: REGISTRATIONS_PER_PHONE,
            registrations_per_addr: REGISTRATIONS_PER_ADDR,
            verifications_per_addr: VERIFICATIONS_PER_ADDR,
            contact_lookups_per_user: CONTACT_LOOKUPS_PER_USER,
            prekey_fetches_per_user: PREKEY_FETCHES_PER_USER,
            limiter_keys_max: LIMITER_KEYS_MAX,
        }
    }
}

impl RateLimits {
    /// Checks every rate; the message names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("messages_per_user", self.messages_per_user),
            ("connects_per_addr", self.connects_per_addr),
            ("frames_per_conn", self.frames_per_conn),
            ("registrations_per_phone", self.registrations_per_phone),
            ("registrations_per_addr", self.registrations_per_addr),
            ("verifications_per_addr", self.verifications_per_addr),
            ("contact_lookups_per_user", self.contact_lookups_per_user),
            ("prekey_fetches_per_user", self.prekey_fetches_per_user),
        ] {
            if !rate.is_valid() {
                return Err(format!(
                    "{name}: burst must be >= 1 and refill_interval_ms in 1..={RATE_INTERVAL_MS_MAX}, got {rate:?}"
                ));
            }
        }
        if self.limiter_keys_max == 0 {
            return Err("limiter_keys_max must be >= 1".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a script of `(now_ms, cost)` checks against one bucket and renders the decisions
    /// (`ok N` = allowed with N remaining, `wait N` = limited, retry after N ms).
    /// Every other step goes through `tat_ms` / `with_tat`, as an owner that keeps only the
    /// arrival time does, so the table also checks that round trip.
    fn script(rate: Rate, steps: &[(u64, u32)]) -> String {
        let mut b = Bucket::new(rate);
        steps
            .iter()
            .enumerate()
            .map(|(i, &(now, cost))| {
                if i % 2 == 1 {
                    b = Bucket::with_tat(rate, b.tat_ms());
                }
                match b.check_n(cost, now) {
                    Decision::Allowed { remaining } => format!("ok {remaining}"),
                    Decision::Limited { retry_after_ms } => format!("wait {retry_after_ms}"),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[test]
    fn buckets() {
        let r3 = Rate::per_second(3, 1);
        /// `(now_ms, cost)` steps.
        type Steps<'a> = &'a [(u64, u32)];
        let cases: &[(Rate, Steps, &str)] = &[
            // Burst of 3, then limited until one token refills.
            (
                r3,
                &[(1000, 1), (1000, 1), (1000, 1), (1000, 1)],
                "ok 2, ok 1, ok 0, wait 1000",
            ),
            (
                r3,
                &[
                    (1000, 1),
                    (1000, 1),
                    (1000, 1),
                    (1500, 1),
                    (2000, 1),
                    (2000, 1),
                ],
                "ok 2, ok 1, ok 0, wait 500, ok 0, wait 1000",
            ),
            // Idle refills up to the burst, not beyond.
            (
                r3,
                &[(1000, 3), (10_000, 1), (10_000, 3)],
                "ok 0, ok 2, wait 1000",
            ),
            // All or nothing: a cost that does not fit takes nothing.
            (
                r3,
                &[(1000, 2), (1000, 2), (1000, 1)],
                "ok 1, wait 1000, ok 0",
            ),
            // A cost above the burst never passes; cost 0 only reports.
            (
                r3,
                &[(1000, 4), (1000, 0), (1000, 3)],
                "wait 1000, ok 3, ok 0",
            ),
            // A clock that steps back grants nothing extra.
            (
                r3,
                &[(5000, 3), (4000, 1), (6000, 1)],
                "ok 0, wait 2000, ok 0",
            ),
            // Time zero works (no special meaning of 0).
            (r3, &[(0, 1), (0, 2), (0, 1)], "ok 2, ok 0, wait 1000"),
            (
                MESSAGES_PER_USER,
                &[(0, 60), (0, 1), (999, 1), (1000, 1), (1000, 1)],
                "ok 0, wait 1000, wait 1, ok 0, wait 1000",
            ),
            (
                REGISTRATIONS_PER_PHONE,
                &[(0, 1), (1, 1), (2, 1), (3, 1), (600_002, 1)],
                "ok 2, ok 1, ok 0, wait 599997, ok 0",
            ),
        ];
        for (rate, steps, expect) in cases {
            assert_eq!(script(*rate, steps), *expect, "{rate:?} {steps:?}");
        }
    }

    #[test]
    fn sustained_rate_is_the_refill_rate() {
        // Over 100 s at one attempt every 100 ms, FRAMES_PER_CONN-like rate 2/s with burst 5
        // lets through the burst plus 2 per second.
        let mut b = Bucket::new(Rate::per_second(5, 2));
        let allowed = (0..1000u64)
            .filter(|i| b.check(i * 100).is_allowed())
            .count();
        assert_eq!(allowed, 5 + 2 * 100 - 1);
    }

    #[test]
    fn keyed_limits_are_independent() {
        let mut l = KeyedLimiter::new(Rate::per_second(2, 1), 100);
        assert!(l.check(&"a", 0).is_allowed());
        assert!(l.check(&"a", 0).is_allowed());
        assert_eq!(
            l.check(&"a", 0),
            Decision::Limited {
                retry_after_ms: 1000
            }
        );
        assert_eq!(
            l.peek(&"a", 0),
            Decision::Limited {
                retry_after_ms: 1000
            }
        );
        assert!(l.check(&"b", 0).is_allowed());
        assert_eq!(l.peek(&"c", 0), Decision::Allowed { remaining: 1 });
        assert_eq!(l.len(), 2);
        // A limited request took nothing.
        assert!(l.check(&"a", 1000).is_allowed());
        assert_eq!(l.purge(999), 0);
        assert_eq!(l.purge(1000), 1, "b is full again");
        assert_eq!(l.purge(2999), 0);
        assert_eq!(l.purge(3000), 1, "a is full again");
        assert!(l.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_full_buckets_go_first() {
        let rate = Rate::per_second(2, 1);
        let mut l = KeyedLimiter::new(rate, 3);
        for k in 0..3u32 {
            assert!(l.check(&k, u64::from(k) * 100).is_allowed());
        }
        assert_eq!(l.len(), 3);
        // Key 0 (closest to full) is evicted for key 3.
        assert!(l.check(&3, 300).is_allowed());
        assert_eq!(l.len(), 3);
        assert_eq!(l.peek(&0, 300), Decision::Allowed { remaining: 1 });
        // Later, when keys 1..3 have refilled, they are dropped rather than an active key.
        assert!(l.check(&1, 310).is_allowed());
        assert!(l.check(&9, 1400).is_allowed());
        assert_eq!(l.len(), 2, "full buckets were purged: {:?}", l.tats);
        assert_eq!(l.peek(&1, 1400), Decision::Allowed { remaining: 0 });
        // Many keys never grow it past the bound.
        for k in 0..10_000u32 {
            l.check(&k, 2000);
            assert!(l.len() <= 3);
            assert_eq!(l.tats.len(), l.by_tat.len());
        }
    }

    #[test]
    fn a_request_that_leaves_the_bucket_full_stores_nothing() {
        let mut l = KeyedLimiter::new(Rate::per_second(2, 1), 10);
        assert_eq!(l.check_n(&1u8, 0, 0), Decision::Allowed { remaining: 2 });
        assert!(l.is_empty());
    }

    #[test]
    fn source_keys() {
        let key = |s: &str| source_key(s.parse().expect("ip")).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::ffff"), "2001:db8:1:2::");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::1"), "::");
    }

    #[test]
    fn retry_after_header() {
        assert_eq!(Decision::Allowed { remaining: 1 }.retry_after_s(), None);
        assert_eq!(
            Decision::Limited { retry_after_ms: 1 }.retry_after_s(),
            Some(1)
        );
        assert_eq!(
            Decision::Limited {
                retry_after_ms: 1000
            }
            .retry_after_s(),
            Some(1)
        );
        assert_eq!(
            Decision::Limited {
                retry_after_ms: 1001
            }
            .retry_after_s(),
            Some(2)
        );
        assert_eq!(
            Decision::Limited { retry_after_ms: 0 }.retry_after_s(),
            Some(1)
        );
    }

    #[test]
    fn defaults_validate() {
        assert_eq!(RateLimits::default().validate(), Ok(()));
        let bad = RateLimits {
            frames_per_conn: Rate {
                burst: 0,
                refill_interval_ms: 10,
            },
            ..RateLimits::default()
        };
        assert!(bad
            .validate()
            .is_err_and(|e| e.starts_with("frames_per_conn")));
        assert_eq!(
            MESSAGES_PER_USER,
            Rate {
                burst: 60,
                refill_interval_ms: 1000
            }
        );
    }
}
