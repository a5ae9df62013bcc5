//! Stuck and slow lanes.
//!
//! Per lane, from samples taken every few seconds:
//! - the drain rate: messages acknowledged upstream per second, smoothed over about a
//!   minute;
//! - the time to drain: the backlog divided by that rate (unknown while nothing drains);
//! - whether the lane is *stuck*: it holds messages and its oldest message has not moved
//!   for `stuck_after` of link time, that is time in which the link was up. Time with the
//!   link down does not count (a node offline is expected to queue) but does not reset
//!   the clock either, so a link that keeps coming up and being closed (a full parent)
//!   is caught. The clock restarts when the oldest message moves or the lane empties.
//!
//! The logic here takes its time from the caller (monotonic milliseconds), so it can be
//! driven by a real clock in the node and by a simulated one in tests.

use std::time::Duration;

use serde::Serialize;

use crate::{LANES, Outbox};

/// How long the drain rate's smoothing remembers, ms (an exponential moving average
/// with this time constant).
const RATE_TIME_CONSTANT_MS: f64 = 60_000.0;

/// Below this many messages per second a lane counts as not draining.
const MIN_RATE: f64 = 0.001;

/// What the watch says about one lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LaneHealth {
    /// Messages acknowledged upstream per second, smoothed over about a minute.
    pub drain_per_s: f64,
    /// Seconds to drain the backlog at that rate: 0 when the lane is empty, `None`
    /// while it holds messages and nothing drains.
    pub time_to_drain_s: Option<f64>,
    /// The oldest message has not moved for `stuck_after` of link time.
    pub stuck: bool,
    /// Link time since the oldest message last moved, ms (0 when the lane is empty).
    pub still_ms: u64,
}

/// A lane that became stuck, or moved again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// `lane` has held its oldest message for `still_ms` with the link up.
    Stuck { lane: u8, still_ms: u64, messages: u64 },
    /// `lane` moved again (or emptied) after `stuck_ms` stuck.
    Moved { lane: u8, stuck_ms: u64 },
}

/// One lane's sample: the sequence of its oldest queued message, how many it holds,
/// and how many it has delivered since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    pub head: u64,
    pub messages: u64,
    pub delivered: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Watched {
    /// The last sample, and when it was taken.
    last: Option<(u64, Sample)>,
    rate: f64,
    /// Link time since the head last moved, ms.
    still_ms: u64,
    /// Since when the lane is stuck.
    stuck_since_ms: Option<u64>,
}

/// The watch over every lane.
#[derive(Debug, Default)]
pub(crate) struct LaneWatch {
    lanes: [Watched; LANES],
    health: [LaneHealth; LANES],
}

impl LaneWatch {
    /// Takes one sample of every lane at `now_ms` (monotonic) and returns the lanes
    /// that became stuck or moved again. `link_up`: the link was up during the time
    /// since the last sample (the caller says so when it is up now, or connected in
    /// between). `stuck_after_ms` 0 never calls a lane stuck.
    pub(crate) fn observe(
        &mut self,
        now_ms: u64,
        link_up: bool,
        stuck_after_ms: u64,
        samples: &[Sample; LANES],
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        for (i, (w, s)) in self.lanes.iter_mut().zip(samples).enumerate() {
            let lane = i as u8;
            match w.last {
                Some((at, prev)) if now_ms > at => {
                    let dt = (now_ms - at) as f64;
                    let per_s = s.delivered.saturating_sub(prev.delivered) as f64 * 1000.0 / dt;
                    let alpha = 1.0 - (-dt / RATE_TIME_CONSTANT_MS).exp();
                    w.rate += alpha * (per_s - w.rate);
                    if s.messages == 0 || s.head != prev.head {
                        w.still_ms = 0;
                    } else if link_up {
                        w.still_ms = w.still_ms.saturating_add(now_ms - at);
                    }
                }
                Some(_) => {}
                None => w.still_ms = 0,
            }
            if s.messages == 0 && w.rate < MIN_RATE {
                w.rate = 0.0;
            }
            w.last = Some((now_ms, *s));
            let still_ms = if s.messages == 0 { 0 } else { w.still_ms };
            let stuck = stuck_after_ms > 0 && s.messages > 0 && still_ms >= stuck_after_ms;
            match (stuck, w.stuck_since_ms) {
                (true, None) => {
                    w.stuck_since_ms = Some(now_ms);
                    changes.push(Change::Stuck {
                        lane,
                        still_ms,
                        messages: s.messages,
                    });
                }
                (false, Some(since)) => {
                    w.stuck_since_ms = None;
                    changes.push(Change::Moved {
                        lane,
                        stuck_ms: now_ms - since,
                    });
                }
                _ => {}
            }
            self.health[i] = LaneHealth {
                drain_per_s: w.rate,
                time_to_drain_s: if s.messages == 0 {
                    Some(0.0)
                } else if w.rate >= MIN_RATE {
                    Some(s.messages as f64 / w.rate)
                } else {
                    None
                },
                stuck,
                still_ms,
            };
        }
        changes
    }

    /// What the last sample said about each lane.
    pub(crate) fn health(&self) -> [LaneHealth; LANES] {
        self.health
    }
}

impl Outbox {
    /// Samples every lane for the stuck-and-slow watch at `now_ms` on a monotonic
    /// clock (the node calls it every few seconds). It updates the drain-rate,
    /// time-to-drain and stuck gauges, logs a lane that becomes stuck (at warn, and
    /// counts it) or moves again, and returns what it found.
    ///
    /// `link_up`: the lanes can drain now (the link is up, or this node is a root).
    /// A lane is stuck when it holds messages and its oldest message has not moved
    /// for `stuck_after` while the link was up; zero turns that check off.
    pub fn watch_lanes(&self, now_ms: u64, link_up: bool, stuck_after: Duration) -> [LaneHealth; LANES] {
        let stats = self.stats();
        let heads = self.lanes.heads();
        let samples: [Sample; LANES] = std::array::from_fn(|i| Sample {
            head: heads[i].0,
            messages: stats.get(i).map_or(0, |s| s.messages),
            delivered: self.metrics.delivered(i as u8),
        });
        let stuck_after_ms = u64::try_from(stuck_after.as_millis()).unwrap_or(u64::MAX);
        let (changes, health) = {
            let mut w = holdfast_model::lock(&self.watch);
            let changes = w.observe(now_ms, link_up, stuck_after_ms, &samples);
            (changes, w.health())
        };
        for (i, h) in health.iter().enumerate() {
            self.metrics.set_health(i as u8, h);
        }
        for change in changes {
            match change {
                Change::Stuck {
                    lane,
                    still_ms,
                    messages,
                } => {
                    self.metrics.stuck_episode(lane);
                    let oldest_age_s = stats.get(lane as usize).and_then(|s| s.oldest_age_ms).map(|a| a / 1000);
                    tracing::warn!(
                        lane,
                        messages,
                        still_s = still_ms / 1000,
                        oldest_age_s,
                        "outbox lane stuck: its oldest message has not moved while the link was up"
                    );
                }
                Change::Moved { lane, stuck_ms } => {
                    tracing::info!(lane, stuck_s = stuck_ms / 1000, "outbox lane moves again");
                }
            }
        }
        health
    }

    /// What the last [`Outbox::watch_lanes`] found, per lane (all zero before the
    /// first sample).
    pub fn lane_health(&self) -> [LaneHealth; LANES] {
        holdfast_model::lock(&self.watch).health()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(lane: usize, s: Sample) -> [Sample; LANES] {
        let mut all = [Sample::default(); LANES];
        all[lane] = s;
        all
    }

    fn at(head: u64, messages: u64, delivered: u64) -> Sample {
        Sample {
            head,
            messages,
            delivered,
        }
    }

    #[test]
    fn a_lane_whose_head_does_not_move_with_the_link_up_is_stuck_and_moves_again() {
        let mut w = LaneWatch::default();
        assert!(w.observe(0, true, 60_000, &samples(5, at(10, 3, 0))).is_empty());
        assert!(w.observe(55_000, true, 60_000, &samples(5, at(10, 3, 0))).is_empty());
        assert!(!w.health()[5].stuck);
        assert_eq!(w.health()[5].still_ms, 55_000);
        let c = w.observe(60_000, true, 60_000, &samples(5, at(10, 3, 0)));
        assert_eq!(
            c,
            vec![Change::Stuck {
                lane: 5,
                still_ms: 60_000,
                messages: 3
            }]
        );
        assert!(w.health()[5].stuck);
        assert_eq!(w.health()[5].time_to_drain_s, None);
        // Reported once, not at every sample.
        assert!(w.observe(65_000, true, 60_000, &samples(5, at(10, 3, 0))).is_empty());
        let c = w.observe(70_000, true, 60_000, &samples(5, at(11, 2, 1)));
        assert_eq!(
            c,
            vec![Change::Moved {
                lane: 5,
                stuck_ms: 10_000
            }]
        );
        assert!(!w.health()[5].stuck);
        assert_eq!(w.health()[5].still_ms, 0);
        // Other lanes were empty all along.
        assert_eq!(
            w.health()[0],
            LaneHealth {
                time_to_drain_s: Some(0.0),
                ..LaneHealth::default()
            }
        );
    }

    #[test]
    fn time_with_the_link_down_does_not_count_but_does_not_reset_the_clock() {
        let mut w = LaneWatch::default();
        w.observe(0, false, 60_000, &samples(1, at(4, 9, 0)));
        w.observe(600_000, false, 60_000, &samples(1, at(4, 9, 0)));
        assert!(!w.health()[1].stuck, "down for ten minutes is not stuck");
        assert_eq!(w.health()[1].still_ms, 0);
        w.observe(630_000, true, 60_000, &samples(1, at(4, 9, 0)));
        assert!(!w.health()[1].stuck);
        assert_eq!(w.health()[1].still_ms, 30_000);
        // A link that comes and goes (a parent that closes it when full): the time
        // it was up adds up.
        w.observe(700_000, false, 60_000, &samples(1, at(4, 9, 0)));
        assert!(!w.health()[1].stuck);
        let c = w.observe(730_000, true, 60_000, &samples(1, at(4, 9, 0)));
        assert_eq!(
            c,
            vec![Change::Stuck {
                lane: 1,
                still_ms: 60_000,
                messages: 9
            }]
        );
        // The link going down again does not make it move.
        assert!(w.observe(900_000, false, 60_000, &samples(1, at(4, 9, 0))).is_empty());
        assert!(w.health()[1].stuck);
        let c = w.observe(905_000, true, 60_000, &samples(1, at(5, 8, 1)));
        assert_eq!(
            c,
            vec![Change::Moved {
                lane: 1,
                stuck_ms: 175_000
            }]
        );
    }

    #[test]
    fn an_empty_lane_or_a_zero_limit_is_never_stuck() {
        let mut w = LaneWatch::default();
        for t in 0..20 {
            assert!(w.observe(t * 60_000, true, 60_000, &samples(2, at(7, 0, 0))).is_empty());
            assert!(w.observe(t * 60_000 + 1, true, 0, &samples(3, at(7, 5, 0))).is_empty());
        }
    }

    #[test]
    fn the_drain_rate_follows_deliveries_and_gives_the_time_to_drain() {
        let mut w = LaneWatch::default();
        // 100 messages a second for six minutes, with 6,000 left.
        let mut delivered = 0;
        for t in 0..=72u64 {
            w.observe(t * 5_000, true, 300_000, &samples(0, at(delivered, 6_000, delivered)));
            delivered += 500;
        }
        let h = w.health()[0];
        assert!((h.drain_per_s - 100.0).abs() < 2.0, "{h:?}");
        let ttd = h.time_to_drain_s.unwrap();
        assert!((ttd - 60.0).abs() < 2.0, "{h:?}");
        // Deliveries stop: the rate decays and the estimate grows, then is unknown.
        for t in 73..=250u64 {
            w.observe(t * 5_000, true, 0, &samples(0, at(delivered, 6_000, delivered)));
        }
        let h = w.health()[0];
        assert!(h.drain_per_s < MIN_RATE, "{h:?}");
        assert_eq!(h.time_to_drain_s, None);
    }

    #[test]
    fn a_sample_at_the_same_instant_changes_nothing() {
        let mut w = LaneWatch::default();
        w.observe(1_000, true, 10, &samples(4, at(1, 1, 0)));
        let before = w.health();
        assert!(w.observe(1_000, true, 10, &samples(4, at(1, 1, 0))).is_empty());
        assert_eq!(w.health(), before);
    }
}
