//! Open-loop send times: when each message *should* be sent, decided before the run and never
//! moved by how the server responds. Latencies are measured from these times, so a server
//! that stalls is charged for every message that should have gone out during the stall
//! (no coordinated omission).
//!
//! ```text
//!  seed ─► Rng ─► Arrivals(rate, constant | poisson) ─► t0, t1, t2, … (ns since the start)
//! ```

use crate::scenario::Arrival;

/// A small, fast, seedable generator (SplitMix64 sequence). Not cryptographic; reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        switchboard_wire::splitmix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is below 2^-40 for the sizes used here).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        self.next_u64() % n
    }

    /// Uniform in the open interval (0, 1).
    pub fn unit_open(&mut self) -> f64 {
        // 53 random bits, shifted off zero.
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

/// The schedule of one worker: send times in nanoseconds since the message phase started.
#[derive(Clone, Debug)]
pub struct Arrivals {
    gap_mean_ns: f64,
    kind: Arrival,
    next_ns: f64,
    rng: Rng,
}

impl Arrivals {
    /// `rate` messages per second (> 0), the first at `start_ns` (constant) or one random gap
    /// after it (Poisson).
    pub fn new(rate: f64, kind: Arrival, start_ns: u64, seed: u64) -> Arrivals {
        assert!(rate > 0.0, "a schedule needs a positive rate");
        let mut a = Arrivals {
            gap_mean_ns: 1e9 / rate,
            kind,
            next_ns: start_ns as f64,
            rng: Rng::new(seed),
        };
        if kind == Arrival::Poisson {
            a.next_ns += a.gap();
        }
        a
    }

    fn gap(&mut self) -> f64 {
        match self.kind {
            Arrival::Constant => self.gap_mean_ns,
            // Inverse transform sampling of the exponential distribution.
            Arrival::Poisson => -self.rng.unit_open().ln() * self.gap_mean_ns,
        }
    }

    /// The next scheduled time, without consuming it.
    pub fn peek(&self) -> u64 {
        self.next_ns as u64
    }

    /// Consumes and returns the next scheduled time.
    pub fn pop(&mut self) -> u64 {
        let t = self.next_ns as u64;
        self.next_ns += self.gap();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_is_exact() {
        let mut a = Arrivals::new(1000.0, Arrival::Constant, 5, 1);
        assert_eq!(a.peek(), 5);
        assert_eq!(a.pop(), 5);
        assert_eq!(a.pop(), 1_000_005);
        assert_eq!(a.pop(), 2_000_005);
    }

    #[test]
    fn poisson_has_the_rate_and_the_spread() {
        let rate = 50_000.0;
        let mut a = Arrivals::new(rate, Arrival::Poisson, 0, 42);
        let n = 200_000;
        let mut prev = 0u64;
        let mut gaps = Vec::with_capacity(n);
        for _ in 0..n {
            let t = a.pop();
            assert!(t >= prev);
            gaps.push((t - prev) as f64);
            prev = t;
        }
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 20_000.0).abs() < 200.0, "mean gap {mean}");
        // Exponential: standard deviation equals the mean; constant would be 0.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        let sd = var.sqrt();
        assert!((sd / mean - 1.0).abs() < 0.03, "sd/mean {}", sd / mean);
        // Same seed, same schedule.
        let mut b = Arrivals::new(rate, Arrival::Poisson, 0, 42);
        let mut c = Arrivals::new(rate, Arrival::Poisson, 0, 42);
        assert!((0..100).all(|_| b.pop() == c.pop()));
    }

    #[test]
    fn rng_below_and_unit() {
        let mut r = Rng::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[r.below(10) as usize] += 1;
            let u = r.unit_open();
            assert!(u > 0.0 && u < 1.0);
        }
        assert!(seen.iter().all(|&c| c > 800), "{seen:?}");
    }
}
