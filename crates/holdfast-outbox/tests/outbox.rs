//! The outbox over a real fjall store in a temp directory: ordering,
//! recovery across reopen, group commit, TTL under clock jumps, quotas,
//! damaged records, scheduling, and a model-based test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use holdfast_metrics::Registry;
use holdfast_model::Message;
use holdfast_outbox::clock::Now;
use holdfast_outbox::config::{OutboxConfig, Scheduling, WhenFull};
use holdfast_outbox::{AppendError, MessageId, Outbox, OutboxMetrics, TimeSource};
use holdfast_store::Store;

/// A settable clock: boot time and wall time move independently.
#[derive(Debug)]
struct FakeTime {
    boot_id: AtomicU64,
    boottime_ms: AtomicU64,
    wall_ms: AtomicU64,
}

impl FakeTime {
    fn new() -> Arc<FakeTime> {
        Arc::new(FakeTime {
            boot_id: AtomicU64::new(1),
            boottime_ms: AtomicU64::new(1_000_000),
            wall_ms: AtomicU64::new(1_700_000_000_000),
        })
    }
    fn advance(&self, ms: u64) {
        self.boottime_ms.fetch_add(ms, Ordering::SeqCst);
        self.wall_ms.fetch_add(ms, Ordering::SeqCst);
    }
    fn jump_wall(&self, ms: i64) {
        let w = self.wall_ms.load(Ordering::SeqCst) as i64 + ms;
        self.wall_ms.store(w as u64, Ordering::SeqCst);
    }
    fn reboot(&self, downtime_ms: u64) {
        self.boot_id.fetch_add(1, Ordering::SeqCst);
        self.boottime_ms.store(5_000, Ordering::SeqCst);
        self.wall_ms.fetch_add(downtime_ms, Ordering::SeqCst);
    }
}

impl TimeSource for FakeTime {
    fn now(&self) -> Now {
        Now {
            boot_id: u128::from(self.boot_id.load(Ordering::SeqCst)),
            boottime_ms: self.boottime_ms.load(Ordering::SeqCst),
            wall_ms: self.wall_ms.load(Ordering::SeqCst),
        }
    }
}

struct Opened {
    outbox: Outbox,
    metrics: Arc<Registry>,
    _store: Store,
}

fn config(extra: &str) -> OutboxConfig {
    let c: OutboxConfig = toml::from_str(&format!("expire_interval_ms = 3600000\n{extra}")).unwrap();
    c.validate().unwrap();
    c
}

fn open(dir: &Path, cfg: OutboxConfig, time: Arc<FakeTime>) -> Opened {
    let store = Store::open(&dir.join("store")).unwrap();
    let metrics = Arc::new(Registry::new());
    let outbox = Outbox::open(&store, dir, cfg, Arc::new(OutboxMetrics::new(&metrics)), time).unwrap();
    Opened {
        outbox,
        metrics,
        _store: store,
    }
}

fn msg(topic: &str, n: u64) -> Arc<Message> {
    Arc::new(Message::new(topic, n.to_be_bytes().to_vec(), "c1"))
}

fn payload_n(m: &Message) -> u64 {
    u64::from_be_bytes(m.payload[..8].try_into().unwrap())
}

/// Leases and acks everything, returning payload numbers per lane in delivery order.
fn drain(o: &Outbox) -> Vec<(u8, u64)> {
    let mut out = Vec::new();
    while let Some(batch) = o.lease(64).unwrap() {
        let ids: Vec<MessageId> = batch.items.iter().map(|l| l.id).collect();
        out.extend(batch.items.iter().map(|l| (batch.lane, payload_n(&l.record.message))));
        o.ack_blocking(&ids).unwrap();
    }
    out
}

fn metric(m: &Registry, prefix: &str) -> f64 {
    m.render()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn appends_come_out_in_order_per_lane_with_strict_priority() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), config(""), FakeTime::new());
    for n in 0..20 {
        o.outbox.append_blocking((n % 3) as u8 * 4, msg("t", n), None).unwrap();
    }
    let out = drain(&o.outbox);
    let lanes: Vec<u8> = out.iter().map(|(l, _)| *l).collect();
    assert!(lanes.windows(2).all(|w| w[0] <= w[1]), "strict priority: {lanes:?}");
    for lane in [0u8, 4, 8] {
        let ns: Vec<u64> = out.iter().filter(|(l, _)| *l == lane).map(|(_, n)| *n).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "lane {lane} order: {ns:?}");
    }
    assert_eq!(out.len(), 20);
    assert!(o.outbox.stats().iter().all(|s| s.messages == 0 && s.bytes == 0));
    assert_eq!(metric(&o.metrics, "holdfast_outbox_delivered_total{lane=\"0\"}"), 7.0);
}

#[test]
fn reopening_in_a_loop_resumes_at_the_first_unacknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    let mut next = 0u64;
    let mut expected_next_delivery = 0u64;
    let mut ids = std::collections::HashSet::new();
    for round in 0..8 {
        let o = open(dir.path(), config(""), time.clone());
        for _ in 0..50 {
            let id = o.outbox.append_blocking(2, msg("t", next), None).unwrap();
            assert!(ids.insert(id.to_string()), "message id {id} repeated after reopen");
            next += 1;
        }
        // Lease 30, ack only the first 20: 10 are in flight when we "crash".
        let batch = o.outbox.lease_lane(2, 30).unwrap();
        let got: Vec<u64> = batch.items.iter().map(|l| payload_n(&l.record.message)).collect();
        assert_eq!(got[0], expected_next_delivery, "round {round}");
        assert!(got.windows(2).all(|w| w[1] == w[0] + 1));
        let ack: Vec<MessageId> = batch.items[..20].iter().map(|l| l.id).collect();
        o.outbox.ack_blocking(&ack).unwrap();
        expected_next_delivery += 20;
        assert_eq!(o.outbox.stats()[2].messages, next - expected_next_delivery);
        drop(o);
    }
    let o = open(dir.path(), config(""), time);
    let rest: Vec<u64> = drain(&o.outbox).into_iter().map(|(_, n)| n).collect();
    assert_eq!(rest, (expected_next_delivery..next).collect::<Vec<_>>());
}

#[test]
fn concurrent_appends_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let o = Arc::new(open(dir.path(), config(""), FakeTime::new()));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let o = o.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    o.outbox.append_blocking(1, msg("t", t * 1000 + i), None).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let commits = metric(&o.metrics, "holdfast_outbox_commits_total");
    assert_eq!(o.outbox.stats()[1].messages, 3200);
    assert!(
        commits < 3200.0 / 2.0,
        "{commits} commits for 3200 appends: no group commit"
    );
    // Per-thread order is preserved within the lane.
    let out = drain(&o.outbox);
    for t in 0..16u64 {
        let mine: Vec<u64> = out.iter().map(|(_, n)| *n).filter(|n| n / 1000 == t).collect();
        assert_eq!(mine, (t * 1000..t * 1000 + 200).collect::<Vec<_>>());
    }
}

#[test]
fn ttl_ages_on_the_outbox_clock_through_restarts_and_wall_jumps() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    let hour = 3_600_000;
    {
        let o = open(dir.path(), config(""), time.clone());
        o.outbox
            .append_blocking(0, msg("a", 1), Some(Duration::from_secs(2 * 3600)))
            .unwrap();
        o.outbox
            .append_blocking(0, msg("b", 2), Some(Duration::from_secs(5 * 3600)))
            .unwrap();
        time.advance(hour);
    }
    // Same boot, wall clock jumps forward 10 h: nothing expires.
    time.jump_wall(10 * hour as i64);
    {
        let o = open(dir.path(), config(""), time.clone());
        assert_eq!(o.outbox.sweep_expired(), 0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(o.outbox.stats()[0].messages, 2);
        // And backwards 20 h: the messages do not get younger either.
        time.jump_wall(-20 * (hour as i64));
        time.advance(hour + 1);
        // 2 h + 1 ms of outbox time have passed: the 2 h message has expired.
        let batch = o.outbox.lease(10).unwrap().unwrap();
        assert_eq!(
            batch
                .items
                .iter()
                .map(|l| payload_n(&l.record.message))
                .collect::<Vec<_>>(),
            vec![2]
        );
        o.outbox.release_all();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(metric(&o.metrics, "holdfast_outbox_expired_total{lane=\"0\"}"), 1.0);
    }
    // Reboot with the wall clock set back: no downtime counted, the 5 h one survives.
    time.reboot(0);
    time.jump_wall(-(48 * hour as i64));
    {
        let o = open(dir.path(), config(""), time.clone());
        assert!(o.outbox.clock_ms() >= 2 * hour && o.outbox.clock_ms() < 3 * hour);
        assert_eq!(o.outbox.sweep_expired(), 0);
    }
    // Reboot after 4 h of real downtime: counted, and the 5 h message is gone.
    time.reboot(4 * hour);
    let o = open(dir.path(), config(""), time.clone());
    assert_eq!(o.outbox.sweep_expired(), 1);
    std::thread::sleep(Duration::from_millis(50));
    assert!(o.outbox.lease(10).unwrap().is_none());
    assert_eq!(o.outbox.stats()[0].messages, 0);
}

#[test]
fn reject_new_refuses_with_quota_exceeded_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), config("max_messages = 5\n"), FakeTime::new());
    for n in 0..5 {
        o.outbox.append_blocking(3, msg("t", n), None).unwrap();
    }
    let err = o.outbox.append_blocking(3, msg("t", 5), None).unwrap_err();
    assert!(matches!(err, AppendError::QuotaExceeded("message count")), "{err}");
    assert_eq!(err.mqtt_reason_code(), 0x97);
    assert_eq!(
        metric(
            &o.metrics,
            "holdfast_outbox_rejected_total{lane=\"3\",reason=\"quota\"}"
        ),
        1.0
    );
    // Delivering makes room again.
    let b = o.outbox.lease(1).unwrap().unwrap();
    o.outbox.ack_blocking(&[b.items[0].id]).unwrap();
    o.outbox.append_blocking(3, msg("t", 6), None).unwrap();
}

#[test]
fn the_free_disk_guard_and_the_byte_limit_refuse_appends() {
    let dir = tempfile::tempdir().unwrap();
    // A guard larger than any disk: every append is refused, nothing is stored.
    {
        let o = open(
            dir.path(),
            config("min_free_disk_bytes = 1152921504606846976\n"),
            FakeTime::new(),
        );
        let err = o.outbox.append_blocking(0, msg("t", 1), None).unwrap_err();
        assert!(matches!(err, AppendError::DiskFull), "{err}");
        assert_eq!(err.mqtt_reason_code(), 0x97);
        assert_eq!(
            metric(&o.metrics, "holdfast_outbox_rejected_total{lane=\"0\",reason=\"disk\"}"),
            1.0
        );
        assert_eq!(o.outbox.stats()[0].messages, 0);
    }
    // A byte limit of about three records.
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), config("max_bytes = 300\n"), FakeTime::new());
    let mut stored = 0;
    let err = loop {
        match o.outbox.append_blocking(0, msg("t", stored), None) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 100, "the byte limit never applied");
    };
    assert!(matches!(err, AppendError::QuotaExceeded("bytes")), "{err}");
    assert!(o.outbox.stats()[0].bytes <= 300);
    assert!(stored >= 1);
}

#[test]
fn drop_oldest_removes_from_the_lowest_priority_lane_first() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("max_messages = 6\nwhen_full = \"drop-oldest\"\n");
    assert_eq!(cfg.when_full, WhenFull::DropOldest);
    let o = open(dir.path(), cfg, FakeTime::new());
    for n in 0..3 {
        o.outbox.append_blocking(1, msg("t", n), None).unwrap();
        o.outbox.append_blocking(7, msg("t", 100 + n), None).unwrap();
    }
    for n in 0..4 {
        o.outbox.append_blocking(1, msg("t", 10 + n), None).unwrap();
    }
    // Full at 6: the four new lane-1 messages push out lane 7's three (lowest
    // priority first), then lane 1's oldest.
    let out = drain(&o.outbox);
    assert_eq!(out, vec![(1, 1), (1, 2), (1, 10), (1, 11), (1, 12), (1, 13)]);
    assert_eq!(
        metric(&o.metrics, "holdfast_outbox_dropped_total{lane=\"7\",reason=\"quota\"}"),
        3.0
    );
    assert_eq!(
        metric(&o.metrics, "holdfast_outbox_dropped_total{lane=\"1\",reason=\"quota\"}"),
        1.0
    );
}

#[test]
fn a_damaged_record_is_quarantined_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    {
        let o = open(dir.path(), config(""), time.clone());
        for n in 0..5 {
            o.outbox.append_blocking(4, msg("t", n), None).unwrap();
        }
    }
    {
        // Corrupt the third record in place, as a bad sector would.
        let store = Store::open(&dir.path().join("store")).unwrap();
        let space = store.space("outbox").unwrap();
        let mut key = vec![4u8];
        key.extend_from_slice(&2u64.to_be_bytes());
        let mut v = space.get(&key).unwrap().unwrap();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        let mut b = store.batch();
        b.insert(&space, key, v);
        b.commit(holdfast_store::Durability::SyncAll).unwrap();
    }
    let o = open(dir.path(), config(""), time);
    let out: Vec<u64> = drain(&o.outbox).into_iter().map(|(_, n)| n).collect();
    assert_eq!(out, vec![0, 1, 3, 4]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        metric(
            &o.metrics,
            "holdfast_outbox_dropped_total{lane=\"4\",reason=\"damaged\"}"
        ),
        1.0
    );
    assert_eq!(o.outbox.stats()[4].messages, 0);
}

#[test]
fn bounded_scheduling_serves_a_starved_lane() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("scheduling = \"bounded\"\nstarvation_limit = 3\n");
    assert_eq!(cfg.scheduling, Scheduling::Bounded);
    let o = open(dir.path(), cfg, FakeTime::new());
    for n in 0..40 {
        o.outbox.append_blocking(0, msg("hi", n), None).unwrap();
    }
    o.outbox.append_blocking(9, msg("lo", 999), None).unwrap();
    let mut served = Vec::new();
    for _ in 0..8 {
        let b = o.outbox.lease(1).unwrap().unwrap();
        served.push(b.lane);
        let ids: Vec<MessageId> = b.items.iter().map(|l| l.id).collect();
        o.outbox.ack_blocking(&ids).unwrap();
    }
    let pos = served.iter().position(|l| *l == 9).expect("lane 9 starved");
    assert!(pos <= 4, "lane 9 served at batch {pos}: {served:?}");
}

#[test]
fn live_first_delivers_new_traffic_before_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), config("live_first_lanes = [2]\n"), FakeTime::new());
    for n in 0..5 {
        o.outbox.append_blocking(2, msg("t", n), None).unwrap();
    }
    o.outbox.mark_live(); // the link comes up: 0..5 are backlog
    for n in 100..103 {
        o.outbox.append_blocking(2, msg("t", n), None).unwrap();
    }
    let out: Vec<u64> = drain(&o.outbox).into_iter().map(|(_, n)| n).collect();
    assert_eq!(out, vec![100, 101, 102, 0, 1, 2, 3, 4]);
}

#[test]
fn release_all_redelivers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), config(""), FakeTime::new());
    for n in 0..10 {
        o.outbox.append_blocking(0, msg("t", n), None).unwrap();
    }
    let first = o.outbox.lease(4).unwrap().unwrap();
    o.outbox.ack_blocking(&[first.items[1].id]).unwrap();
    o.outbox.release_all();
    let out: Vec<u64> = drain(&o.outbox).into_iter().map(|(_, n)| n).collect();
    assert_eq!(out, vec![0, 2, 3, 4, 5, 6, 7, 8, 9]);
}

#[test]
fn stats_report_depth_bytes_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    let o = open(dir.path(), config(""), time.clone());
    o.outbox.append_blocking(5, msg("t", 1), None).unwrap();
    time.advance(90_000);
    o.outbox.append_blocking(5, msg("t", 2), None).unwrap();
    let s = o.outbox.stats()[5];
    assert_eq!(s.messages, 2);
    assert!(s.bytes > 16);
    assert_eq!(s.oldest_age_ms, Some(90_000));
    let text = o.metrics.render();
    assert!(text.contains("holdfast_outbox_depth_messages{lane=\"5\"} 2"), "{text}");
    assert!(text.contains("holdfast_outbox_oldest_age_seconds{lane=\"5\"} 90"));
}

#[test]
fn a_lane_whose_oldest_message_does_not_move_is_stuck_and_its_drain_is_measured() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), config(""), FakeTime::new());
    let after = Duration::from_secs(60);
    for n in 0..100 {
        o.outbox.append_blocking(3, msg("t", n), None).unwrap();
    }
    // The oldest message is leased again and again and never acknowledged (a parent
    // that refuses it): nothing moves for a minute with the link up.
    let mut t = 0;
    for _ in 0..12 {
        let b = o.outbox.lease(1).unwrap().unwrap();
        assert_eq!(b.items[0].id.seq, 0);
        o.outbox.release_all();
        let h = o.outbox.watch_lanes(t, true, after)[3];
        assert!(!h.stuck, "{t}: {h:?}");
        t += 5_000;
    }
    let h = o.outbox.watch_lanes(t, true, after)[3];
    assert!(h.stuck, "{h:?}");
    assert_eq!(h.still_ms, 60_000);
    assert_eq!(h.time_to_drain_s, None, "nothing drains");
    assert_eq!(o.outbox.lane_health()[3], h);
    let text = o.metrics.render();
    assert!(text.contains("holdfast_outbox_stuck{lane=\"3\"} 1"), "{text}");
    assert!(
        text.contains("holdfast_outbox_stuck_episodes_total{lane=\"3\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("holdfast_outbox_time_to_drain_seconds{lane=\"3\"}"),
        "{text}"
    );
    assert!(
        text.contains("holdfast_outbox_time_to_drain_seconds{lane=\"0\"} 0.0"),
        "{text}"
    );
    assert!(text.contains("holdfast_outbox_stuck{lane=\"0\"} 0"), "{text}");

    // It drains: 10 messages acknowledged every 5 s.
    for _ in 0..6 {
        t += 5_000;
        let b = o.outbox.lease(10).unwrap().unwrap();
        let ids: Vec<MessageId> = b.items.iter().map(|i| i.id).collect();
        o.outbox.ack_blocking(&ids).unwrap();
        let h = o.outbox.watch_lanes(t, true, after)[3];
        assert!(!h.stuck, "{h:?}");
    }
    let h = o.outbox.lane_health()[3];
    assert!(h.drain_per_s > 0.5 && h.drain_per_s < 2.0, "{h:?}");
    let ttd = h.time_to_drain_s.unwrap();
    assert!((ttd - 40.0 / h.drain_per_s).abs() < 0.01, "{h:?}");
    let text = o.metrics.render();
    assert!(text.contains("holdfast_outbox_stuck{lane=\"3\"} 0"), "{text}");
    assert!(
        text.contains("holdfast_outbox_stuck_episodes_total{lane=\"3\"} 1"),
        "{text}"
    );

    // With the link down, a lane that does not move is not stuck.
    for _ in 0..30 {
        t += 5_000;
        assert!(!o.outbox.watch_lanes(t, false, after)[3].stuck);
    }
}

mod model {
    //! Random sequences of append / lease / ack / release / time / sweep /
    //! restart, checked against a plain in-memory model of the outbox.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append { lane: u8, short_ttl: bool },
        Lease { max: usize },
        Ack { pick: Vec<bool> },
        Release,
        Advance { ms: u64 },
        Sweep,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..3, any::<bool>()).prop_map(|(lane, short_ttl)| Op::Append { lane, short_ttl }),
            4 => (1usize..5).prop_map(|max| Op::Lease { max }),
            3 => proptest::collection::vec(any::<bool>(), 0..8).prop_map(|pick| Op::Ack { pick }),
            1 => Just(Op::Release),
            2 => (0u64..1500).prop_map(|ms| Op::Advance { ms }),
            1 => Just(Op::Sweep),
            1 => Just(Op::Restart),
        ]
    }

    #[derive(Debug, Clone)]
    struct M {
        n: u64,
        enqueued: u64,
        ttl: u64,
        leased: bool,
    }

    const SHORT_TTL_MS: u64 = 1000;

    /// The model's lease: lowest lane with an unleased message; expired
    /// ones met on the way are removed; up to `max` in order.
    fn model_lease(lanes: &mut [Vec<M>; 3], now: u64, max: usize) -> Option<(u8, Vec<u64>)> {
        for (l, lane) in lanes.iter_mut().enumerate() {
            let mut out = Vec::new();
            let mut i = 0;
            while i < lane.len() && out.len() < max {
                if lane[i].leased {
                    i += 1;
                    continue;
                }
                if now - lane[i].enqueued >= lane[i].ttl {
                    lane.remove(i);
                    continue;
                }
                lane[i].leased = true;
                out.push(lane[i].n);
                i += 1;
            }
            if !out.is_empty() {
                return Some((l as u8, out));
            }
        }
        None
    }

    fn run(ops: Vec<Op>) {
        let dir = tempfile::tempdir().unwrap();
        let time = FakeTime::new();
        let mut o = Some(open(dir.path(), config(""), time.clone()));
        let mut lanes: [Vec<M>; 3] = Default::default();
        let mut in_flight: Vec<(MessageId, u8, u64)> = Vec::new();
        let mut next = 0u64;
        for op in ops {
            let ob = &o.as_ref().unwrap().outbox;
            let now = time.boottime_ms.load(Ordering::SeqCst);
            match op {
                Op::Append { lane, short_ttl } => {
                    let ttl = short_ttl.then(|| Duration::from_millis(SHORT_TTL_MS));
                    ob.append_blocking(lane, msg("t", next), ttl).unwrap();
                    lanes[lane as usize].push(M {
                        n: next,
                        enqueued: now,
                        ttl: if short_ttl { SHORT_TTL_MS } else { 7_200_000 },
                        leased: false,
                    });
                    next += 1;
                }
                Op::Lease { max } => {
                    let got = ob.lease(max).unwrap().map(|b| {
                        (
                            b.lane,
                            b.items
                                .iter()
                                .map(|l| (l.id, payload_n(&l.record.message)))
                                .collect::<Vec<_>>(),
                        )
                    });
                    let want = model_lease(&mut lanes, now, max);
                    assert_eq!(
                        got.as_ref()
                            .map(|(l, items)| (*l, items.iter().map(|(_, n)| *n).collect::<Vec<_>>())),
                        want
                    );
                    if let Some((lane, items)) = got {
                        in_flight.extend(items.into_iter().map(|(id, n)| (id, lane, n)));
                    }
                }
                Op::Ack { pick } => {
                    let mut acked = Vec::new();
                    let mut keep = Vec::new();
                    for (i, f) in in_flight.drain(..).enumerate() {
                        if pick.get(i).copied().unwrap_or(false) {
                            acked.push(f);
                        } else {
                            keep.push(f);
                        }
                    }
                    in_flight = keep;
                    ob.ack_blocking(&acked.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
                        .unwrap();
                    for (_, lane, n) in acked {
                        lanes[lane as usize].retain(|m| m.n != n);
                    }
                }
                Op::Release => {
                    ob.release_all();
                    in_flight.clear();
                    lanes.iter_mut().flatten().for_each(|m| m.leased = false);
                }
                Op::Advance { ms } => time.advance(ms),
                Op::Sweep => {
                    ob.sweep_expired();
                    for lane in lanes.iter_mut() {
                        lane.retain(|m| m.leased || now - m.enqueued < m.ttl);
                    }
                }
                Op::Restart => {
                    drop(o.take());
                    o = Some(open(dir.path(), config(""), time.clone()));
                    in_flight.clear();
                    lanes.iter_mut().flatten().for_each(|m| m.leased = false);
                }
            }
        }
        // Finally everything still queued and unexpired comes out, in order.
        let ob = &o.as_ref().unwrap().outbox;
        ob.release_all();
        lanes.iter_mut().flatten().for_each(|m| m.leased = false);
        let now = time.boottime_ms.load(Ordering::SeqCst);
        let mut want = Vec::new();
        while let Some((lane, ns)) = model_lease(&mut lanes, now, 64) {
            want.extend(ns.into_iter().map(|n| (lane, n)));
        }
        assert_eq!(drain(ob), want);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]
        #[test]
        fn outbox_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
            run(ops);
        }
    }
}
