//! The node's last hour, for the status page's charts: a sample every
//! [`INTERVAL`] kept in a ring of [`CAPACITY`], in memory only (nothing is
//! written, no external service). `GET /api/v1/history` serves it.
//!
//! A sample holds the messages in and out per second since the sample
//! before, the backlog, whether the link was up, and the range cache's hit
//! ratio over the interval.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::state::NodeState;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Samples kept: one hour.
pub const CAPACITY: usize = 360;

/// One sample of the node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// When, ms since the Unix epoch.
    pub t_ms: u64,
    /// MQTT PUBLISH packets received from clients per second since the last
    /// sample (`None` for the first).
    pub in_per_s: Option<f64>,
    /// Messages that left: PUBLISH packets sent to MQTT subscribers plus
    /// messages the upstream acknowledged, per second since the last sample.
    pub out_per_s: Option<f64>,
    /// Messages in the outbox.
    pub backlog: u64,
    /// The upstream link was up (always, at a root).
    pub link_up: bool,
    /// Requests the range cache answered from what it had, of all it got
    /// since the last sample (`None` without requests).
    pub cache_hit_ratio: Option<f64>,
}

/// Cumulative counters read at a sample, to turn into rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Monotonic ms.
    pub at_ms: u64,
    pub received: u64,
    pub sent: u64,
    pub acked: u64,
    pub cache_requests: u64,
    pub cache_hits: u64,
}

/// The ring of samples.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    samples: VecDeque<Sample>,
    last: Option<Counters>,
}

impl History {
    /// Adds a sample taken at `t_ms` (wall clock) from `now` (cumulative
    /// counters) and the gauges; the oldest goes once there are
    /// [`CAPACITY`].
    pub fn record(&self, t_ms: u64, now: Counters, backlog: u64, link_up: bool) {
        let mut inner = holdfast_model::lock(&self.inner);
        let (in_per_s, out_per_s, cache_hit_ratio) = match inner.last {
            Some(prev) if now.at_ms > prev.at_ms => {
                let secs = (now.at_ms - prev.at_ms) as f64 / 1000.0;
                let rate = |a: u64, b: u64| Some(a.saturating_sub(b) as f64 / secs);
                let requests = now.cache_requests.saturating_sub(prev.cache_requests);
                let hits = now.cache_hits.saturating_sub(prev.cache_hits);
                (
                    rate(now.received, prev.received),
                    rate(now.sent + now.acked, prev.sent + prev.acked),
                    (requests > 0).then(|| hits.min(requests) as f64 / requests as f64),
                )
            }
            _ => (None, None, None),
        };
        inner.last = Some(now);
        if inner.samples.len() == CAPACITY {
            inner.samples.pop_front();
        }
        inner.samples.push_back(Sample {
            t_ms,
            in_per_s,
            out_per_s,
            backlog,
            link_up,
            cache_hit_ratio,
        });
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        holdfast_model::lock(&self.inner).samples.iter().copied().collect()
    }
}

/// Samples `node` every [`INTERVAL`] until it stops.
pub async fn sample_task(node: Arc<NodeState>, stopped: watch::Receiver<bool>) {
    crate::node::every(INTERVAL, stopped, move || {
        let n = &node;
        let (received, sent) = n.broker.as_ref().map_or((0, 0), |b| b.message_counts());
        let link = n.link.snapshot();
        let (cache_requests, cache_hits) = n.cache.as_ref().map_or((0, 0), |c| {
            let s = c.stats();
            (s.requests, s.hit_requests)
        });
        let backlog = n.outbox.stats().iter().map(|l| l.messages).sum();
        let counters = Counters {
            at_ms: u64::try_from(n.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            received,
            sent,
            acked: link.acked,
            cache_requests,
            cache_hits,
        };
        n.history
            .record(holdfast_model::unix_ms(), counters, backlog, link.is_up());
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(at_ms: u64, received: u64, sent: u64, acked: u64, cache: (u64, u64)) -> Counters {
        Counters {
            at_ms,
            received,
            sent,
            acked,
            cache_requests: cache.0,
            cache_hits: cache.1,
        }
    }

    #[test]
    fn rates_come_from_the_difference_with_the_sample_before() {
        let h = History::default();
        h.record(1_000, at(0, 100, 50, 10, (4, 1)), 7, true);
        h.record(11_000, at(10_000, 600, 250, 60, (14, 9)), 3, false);
        let s = h.samples();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].in_per_s, s[0].out_per_s, s[0].cache_hit_ratio),
            (None, None, None)
        );
        assert_eq!(s[1].in_per_s, Some(50.0));
        assert_eq!(s[1].out_per_s, Some(25.0), "sent 200 and acknowledged 50 in 10 s");
        assert_eq!(s[1].cache_hit_ratio, Some(0.8));
        assert_eq!((s[1].backlog, s[1].link_up, s[1].t_ms), (3, false, 11_000));
        // No cache requests in an interval: no ratio, not zero.
        h.record(21_000, at(20_000, 600, 250, 60, (14, 9)), 3, true);
        assert_eq!(h.samples()[2].cache_hit_ratio, None);
        assert_eq!(h.samples()[2].in_per_s, Some(0.0));
    }

    #[test]
    fn the_ring_keeps_the_last_hour() {
        let h = History::default();
        for i in 0..(CAPACITY as u64 + 25) {
            h.record(i * 10_000, at(i * 10_000, i, 0, 0, (0, 0)), i, true);
        }
        let s = h.samples();
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].backlog, 25);
        assert_eq!(s[CAPACITY - 1].backlog, CAPACITY as u64 + 24);
        assert!(s.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
    }
}
