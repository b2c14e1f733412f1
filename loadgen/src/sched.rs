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

/// When a worker stops sending and stops waiting. The drain is measured from the worker's last
/// send, not from the end of the measured window: a worker running behind schedule still sends
/// the window's late arrivals after `send_until`, and their messages get the whole drain too
/// (else they would be counted lost or unacked for the generator's own lateness). Sending late
/// is bounded: arrivals still unsent `drain` after `send_until` are abandoned (the worker counts
/// them as `loadgen_behind` errors), so a run's message phase ends by `send_until + 2 × drain`.
///
/// ```text
///  on time:  … sends ─┤send_until├─ drain (until nothing is outstanding, at most `drain`) ─┤
///  behind:   … sends ─┤send_until├─ late sends ─┤last send├─ drain ─┤
///  far behind: late sends until send_until + drain, the rest abandoned ─┤─ drain ─┤
/// ```
#[derive(Clone, Debug)]
pub struct RunEnd {
    send_until: u64,
    drain: u64,
    /// Set once sending is over: when the drain ends at the latest.
    drain_until: Option<u64>,
}

impl RunEnd {
    pub fn new(send_until: u64, drain: u64) -> RunEnd {
        RunEnd {
            send_until,
            drain,
            drain_until: None,
        }
    }

    fn late_sends_until(&self) -> u64 {
        self.send_until.saturating_add(self.drain)
    }

    /// Whether the arrival scheduled at `sched` may be sent at `now`.
    pub fn may_send(&self, sched: u64, now: u64) -> bool {
        self.drain_until.is_none() && sched < self.send_until && now < self.late_sends_until()
    }

    /// Called after each round of sends with the next unsent arrival's time. Returns how sending
    /// ended the first time it does: `Some(true)` if arrivals of the window were left unsent
    /// (the worker abandons them), `Some(false)` if all were sent; `None` otherwise.
    pub fn after_sends(&mut self, now: u64, next_arrival: u64) -> Option<bool> {
        if self.drain_until.is_some() || now < self.send_until {
            return None;
        }
        let all_sent = next_arrival >= self.send_until;
        if !all_sent && now < self.late_sends_until() {
            return None;
        }
        self.drain_until = Some(now.saturating_add(self.drain));
        Some(!all_sent)
    }

    /// When sending ended, once it has.
    pub fn sending_ended_at(&self) -> Option<u64> {
        self.drain_until.map(|d| d - self.drain)
    }

    /// Whether the run is over: sending has ended and nothing is outstanding, or the drain ran
    /// out.
    pub fn finished(&self, now: u64, nothing_outstanding: bool) -> bool {
        self.drain_until
            .is_some_and(|d| nothing_outstanding || now >= d)
    }

    /// The latest time the worker may sleep until.
    pub fn deadline(&self) -> u64 {
        self.drain_until.unwrap_or(self.late_sends_until())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn run_end_on_time_drains_from_the_window_end() {
        let mut e = RunEnd::new(10 * S, 5 * S);
        assert!(e.may_send(9 * S, 9 * S));
        assert!(
            !e.may_send(10 * S, 10 * S),
            "arrivals after the window are not sent"
        );
        assert_eq!(
            e.after_sends(9 * S, 10 * S),
            None,
            "still inside the window"
        );
        assert!(
            !e.finished(9 * S, true),
            "nothing outstanding mid-window is not the end"
        );
        assert_eq!(e.after_sends(10 * S, 10 * S + 7), Some(false));
        assert_eq!(e.after_sends(10 * S + 1, 10 * S + 7), None, "reported once");
        assert_eq!(e.sending_ended_at(), Some(10 * S));
        assert_eq!(e.deadline(), 15 * S);
        assert!(!e.finished(12 * S, false));
        assert!(e.finished(12 * S, true));
        assert!(e.finished(15 * S, false));
    }

    #[test]
    fn run_end_behind_schedule_gets_the_whole_drain_after_the_last_send() {
        let mut e = RunEnd::new(10 * S, 5 * S);
        // At 12 s the worker is still sending arrivals scheduled before 10 s.
        assert!(e.may_send(9 * S, 12 * S));
        assert_eq!(e.after_sends(12 * S, 9 * S + 5), None);
        assert!(!e.finished(12 * S, true), "late sends are still due");
        // At 13 s the last one is out: the drain runs to 18 s, not 15 s.
        assert_eq!(e.after_sends(13 * S, 10 * S), Some(false));
        assert_eq!(e.sending_ended_at(), Some(13 * S));
        assert!(!e.finished(16 * S, false));
        assert!(e.finished(18 * S, false));
        assert!(
            !e.may_send(9 * S, 13 * S),
            "no sends once the drain started"
        );
    }

    #[test]
    fn run_end_far_behind_abandons_late_sends_and_stays_bounded() {
        let mut e = RunEnd::new(10 * S, 5 * S);
        assert!(e.may_send(9 * S, 15 * S - 1));
        assert!(
            !e.may_send(9 * S, 15 * S),
            "late sending ends drain after the window"
        );
        assert_eq!(
            e.deadline(),
            15 * S,
            "a sleeping worker wakes to stop sending"
        );
        assert_eq!(
            e.after_sends(15 * S, 9 * S),
            Some(true),
            "arrivals abandoned"
        );
        assert_eq!(e.deadline(), 20 * S);
        assert!(e.finished(20 * S, false));
    }

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
