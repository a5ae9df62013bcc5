//! The upstream byte-rate cap (`upstream.max_bytes_per_second`): a token
//! bucket shared by every lane of the link, changed live by a reload.
//!
//! Lanes keep their priority under the cap: a sender waits while a lane of
//! higher priority (a lower number) is waiting for tokens, so lane 0 is
//! served first and the backlog of a live-first lane (`outbox.live_first_lanes`)
//! drains with what its new traffic leaves. A batch larger than the bucket
//! is let through and paid for afterwards (the bucket goes into debt), so
//! the long-run rate is the cap whatever the batch size.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_model::lock;
use holdfast_outbox::LANES;

/// The shared bucket.
#[derive(Debug)]
pub struct RateLimit {
    rate: AtomicU64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may be sent now (negative: debt).
    tokens: f64,
    last: Instant,
    /// Senders waiting, per lane.
    waiting: [u32; LANES],
}

/// The most a bucket holds: one second of the rate, at least 16 KiB.
fn burst(rate: u64) -> f64 {
    (rate as f64).max(16.0 * 1024.0)
}

/// What a sender should do now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Grant {
    /// Send.
    Go,
    /// Wait this long and ask again.
    Wait(Duration),
}

impl RateLimit {
    /// A bucket for `rate` bytes per second (0: no cap), full.
    pub fn new(rate: u64) -> RateLimit {
        RateLimit {
            rate: AtomicU64::new(rate),
            state: Mutex::new(Bucket {
                tokens: burst(rate),
                last: tokio::time::Instant::now().into_std(),
                waiting: [0; LANES],
            }),
        }
    }

    /// The cap, bytes per second (0: none).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the cap; returns whether it changed.
    pub fn set(&self, rate: u64) -> bool {
        self.rate.swap(rate, Ordering::Relaxed) != rate
    }

    /// Asks, at `now`, to send `n` bytes for `lane`; `waiting` says whether
    /// this sender already counts as waiting (it is counted from its first
    /// refusal until it is granted). Pure bookkeeping: the caller sleeps.
    pub fn ask(&self, lane: usize, n: u64, now: Instant, waiting: &mut bool) -> Grant {
        let rate = self.rate();
        let mut b = lock(&self.state);
        let lane = lane.min(LANES - 1);
        if rate == 0 {
            if *waiting {
                b.waiting[lane] -= 1;
                *waiting = false;
            }
            return Grant::Go;
        }
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = b.last.max(now);
        b.tokens = (b.tokens + elapsed * rate as f64).min(burst(rate));
        let higher_waiting = b.waiting[..lane].iter().any(|&w| w > 0);
        if b.tokens >= 0.0 && !higher_waiting {
            b.tokens -= n as f64;
            if *waiting {
                b.waiting[lane] -= 1;
                *waiting = false;
            }
            return Grant::Go;
        }
        if !*waiting {
            b.waiting[lane] += 1;
            *waiting = true;
        }
        let secs = if b.tokens < 0.0 { -b.tokens / rate as f64 } else { 0.002 };
        Grant::Wait(Duration::from_secs_f64(secs.clamp(0.001, 0.05)))
    }

    /// Waits until `n` bytes may be sent for `lane`; returns how long it
    /// waited.
    pub async fn take(&self, lane: usize, n: u64) -> Duration {
        // No cap: no lock, no bookkeeping.
        if self.rate() == 0 {
            return Duration::ZERO;
        }
        let start = tokio::time::Instant::now();
        let mut guard = Waiting {
            limit: self,
            lane,
            waiting: false,
        };
        loop {
            // The tokio clock, so paused-time tests need no real time.
            match self.ask(lane, n, tokio::time::Instant::now().into_std(), &mut guard.waiting) {
                Grant::Go => return start.elapsed(),
                Grant::Wait(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

/// Takes a cancelled sender off the waiting count.
struct Waiting<'a> {
    limit: &'a RateLimit,
    lane: usize,
    waiting: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.waiting {
            lock(&self.limit.state).waiting[self.lane.min(LANES - 1)] -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cap_always_goes() {
        let r = RateLimit::new(0);
        let mut w = false;
        assert_eq!(r.ask(3, u64::MAX / 2, Instant::now(), &mut w), Grant::Go);
    }

    #[test]
    fn the_long_run_rate_is_the_cap_and_time_is_an_input() {
        let r = RateLimit::new(100_000);
        let t0 = Instant::now();
        let mut t = t0;
        let mut sent = 0u64;
        // Batches of 30 KB for ten simulated seconds.
        while t < t0 + Duration::from_secs(10) {
            let mut w = false;
            match r.ask(0, 30_000, t, &mut w) {
                Grant::Go => sent += 30_000,
                Grant::Wait(d) => t += d,
            }
        }
        // The first second's burst plus ten seconds at the rate, within a batch.
        let expected = 100_000.0 * 11.0;
        assert!((sent as f64 - expected).abs() <= 60_000.0, "{sent}");
    }

    #[test]
    fn a_waiting_higher_priority_lane_goes_first() {
        let r = RateLimit::new(10_000);
        let t = Instant::now();
        let (mut w0, mut w5) = (false, false);
        // Spend the bucket and go into debt.
        assert_eq!(r.ask(5, 40_000, t, &mut w5), Grant::Go);
        assert!(matches!(r.ask(0, 1_000, t, &mut w0), Grant::Wait(_)));
        assert!(w0);
        // Out of debt: lane 5 must still wait while lane 0 waits.
        let later = t + Duration::from_secs(4);
        assert!(matches!(r.ask(5, 1_000, later, &mut w5), Grant::Wait(_)));
        assert_eq!(r.ask(0, 1_000, later, &mut w0), Grant::Go);
        assert!(!w0);
        assert_eq!(r.ask(5, 1_000, later, &mut w5), Grant::Go);
    }

    #[test]
    fn a_live_change_applies_at_once() {
        let r = RateLimit::new(1_000);
        let t = Instant::now();
        let mut w = false;
        assert_eq!(r.ask(0, 20_000, t, &mut w), Grant::Go);
        assert!(matches!(r.ask(0, 1, t, &mut w), Grant::Wait(_)));
        assert!(r.set(0));
        assert_eq!(r.ask(0, 1, t, &mut w), Grant::Go);
        assert!(!w);
    }

    #[tokio::test(start_paused = true)]
    async fn take_sleeps_on_the_tokio_clock() {
        let r = RateLimit::new(50_000);
        // The full bucket, then one batch into debt, then a wait for it.
        assert_eq!(r.take(1, 50_000).await, Duration::ZERO);
        assert_eq!(r.take(1, 50_000).await, Duration::ZERO);
        let waited = r.take(1, 1).await;
        assert!(waited >= Duration::from_millis(990), "{waited:?}");
    }
}
