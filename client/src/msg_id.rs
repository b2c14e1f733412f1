//! Client message ids: 16 bytes that are unique within a process and, with overwhelming
//! probability, across processes and machines.
//!
//! The high half is a per-process seed (process id, wall-clock nanoseconds, a monotonic reading
//! and an address, mixed with SplitMix64); the low half is SplitMix64 of a process-wide counter.
//! SplitMix64 is a bijection on `u64`, so two ids from one process never collide; two processes
//! collide only if their seeds do (about 2^-64 per pair).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use switchboard_wire::{splitmix64, ClientMsgId};

static COUNTER: AtomicU64 = AtomicU64::new(0);
static SEED: OnceLock<u64> = OnceLock::new();

fn seed() -> u64 {
    *SEED.get_or_init(|| {
        let wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mono = Instant::now();
        // The address of a local differs between runs under ASLR: a little more entropy for free.
        let local = 0u8;
        let addr = &local as *const u8 as u64;
        let mut h = splitmix64(u64::from(std::process::id()));
        h = splitmix64(h ^ wall_ns);
        h = splitmix64(h ^ addr);
        h = splitmix64(h ^ mono.elapsed().as_nanos() as u64);
        h
    })
}

/// A fresh client message id, never nil.
pub fn new_client_msg_id() -> ClientMsgId {
    let hi = seed();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = ClientMsgId::from_halves(hi, splitmix64(n ^ hi));
        // Nil means "no id" on the wire; skipping it costs one counter value in 2^128.
        if !id.is_nil() {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_and_not_nil() {
        let mut seen = HashSet::new();
        for _ in 0..100_000 {
            let id = new_client_msg_id();
            assert!(!id.is_nil());
            assert!(seen.insert(id), "duplicate id {id}");
        }
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..20_000).map(|_| new_client_msg_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = HashSet::new();
        for t in threads {
            for id in t.join().expect("thread") {
                assert!(seen.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(seen.len(), 80_000);
    }

    #[test]
    fn low_halves_look_random() {
        // Consecutive ids must not share a low-half prefix pattern a server could mistake for
        // a sequence; check that bits are spread, not that they are cryptographically random.
        let a = new_client_msg_id().halves().1;
        let b = new_client_msg_id().halves().1;
        assert!((a ^ b).count_ones() > 8, "{a:016x} {b:016x}");
    }
}
