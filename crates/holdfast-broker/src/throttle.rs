//! Per-source back-off for failed authentication.
//!
//! After `after` consecutive failures from one IP address, every further
//! CONNECT from it waits before it is answered: `initial` for the first,
//! doubling with each failure up to `max`. A success from the address
//! clears it; so does `FORGET` without a failure. The table is bounded:
//! when full, the entry idle the longest is dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most.
const MAX_SOURCES: usize = 8192;
/// A source with no failure for this long starts afresh.
const FORGET: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy)]
struct Source {
    failures: u32,
    last: Instant,
}

/// What a failure did to its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Consecutive failures so far.
    pub failures: u32,
    /// The delay now imposed on the source, if any.
    pub delay: Option<Duration>,
}

/// The back-off table.
#[derive(Debug)]
pub struct Throttle {
    after: u32,
    initial: Duration,
    max: Duration,
    sources: Mutex<HashMap<IpAddr, Source>>,
}

impl Throttle {
    /// A table that starts delaying after `after` failures (0 disables it).
    pub fn new(after: u32, initial: Duration, max: Duration) -> Self {
        Throttle {
            after,
            initial,
            max,
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn delay_for(&self, failures: u32) -> Option<Duration> {
        if self.after == 0 || failures < self.after {
            return None;
        }
        let doublings = (failures - self.after).min(20);
        Some(self.initial.saturating_mul(1 << doublings).min(self.max))
    }

    /// How long a CONNECT from `ip` must wait before it is answered.
    pub fn delay(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let map = holdfast_model::lock(&self.sources);
        let s = map.get(&ip)?;
        if now.duration_since(s.last) > FORGET {
            return None;
        }
        self.delay_for(s.failures)
    }

    /// Records a failed authentication from `ip`.
    pub fn failure(&self, ip: IpAddr, now: Instant) -> Failure {
        let mut map = holdfast_model::lock(&self.sources);
        if map.len() >= MAX_SOURCES && !map.contains_key(&ip) {
            let oldest = map.iter().min_by_key(|(_, s)| s.last).map(|(ip, _)| *ip);
            if let Some(old) = oldest {
                map.remove(&old);
            }
        }
        let s = map.entry(ip).or_insert(Source { failures: 0, last: now });
        if now.duration_since(s.last) > FORGET {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        s.last = now;
        Failure {
            failures: s.failures,
            delay: self.delay_for(s.failures),
        }
    }

    /// Records a successful authentication from `ip`.
    pub fn success(&self, ip: IpAddr) {
        let mut map = holdfast_model::lock(&self.sources);
        map.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_after_repeated_failures_and_forgives_success() {
        let t = Throttle::new(3, Duration::from_millis(100), Duration::from_secs(1));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let now = Instant::now();
        assert_eq!(t.failure(ip, now).delay, None);
        assert_eq!(t.failure(ip, now).delay, None);
        assert_eq!(t.failure(ip, now).delay, Some(Duration::from_millis(100)));
        assert_eq!(t.failure(ip, now).delay, Some(Duration::from_millis(200)));
        for _ in 0..10 {
            t.failure(ip, now);
        }
        assert_eq!(t.delay(ip, now), Some(Duration::from_secs(1)));
        assert_eq!(t.delay(other, now), None);
        assert_eq!(t.delay(ip, now + FORGET + Duration::from_secs(1)), None);
        t.success(ip);
        assert_eq!(t.delay(ip, now), None);
        let off = Throttle::new(0, Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..10 {
            assert_eq!(off.failure(ip, now).delay, None);
        }
    }
}
