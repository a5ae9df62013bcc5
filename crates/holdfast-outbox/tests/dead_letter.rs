//! The outbox with a dead-letter store over a real fjall store: what
//! expires, what drop-oldest removes and what the upstream refuses moves
//! to the store with its reason, lane and properties, and stays there
//! across a reopen; the outbox's counters stay exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is its failure

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use holdfast_metrics::Registry;
use holdfast_model::Message;
use holdfast_outbox::clock::Now;
use holdfast_outbox::config::OutboxConfig;
use holdfast_outbox::dead_letter::{DeadLetterConfig, DeadLetterMetrics, DeadLetters, Reason};
use holdfast_outbox::{DEAD_LETTER_LANE, Outbox, OutboxMetrics, TimeSource};
use holdfast_store::Store;

#[derive(Debug)]
struct FakeTime {
    boottime_ms: AtomicU64,
    wall_ms: AtomicU64,
}

impl FakeTime {
    fn new() -> Arc<FakeTime> {
        Arc::new(FakeTime {
            boottime_ms: AtomicU64::new(1_000_000),
            wall_ms: AtomicU64::new(1_700_000_000_000),
        })
    }
    fn advance(&self, ms: u64) {
        self.boottime_ms.fetch_add(ms, Ordering::SeqCst);
        self.wall_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl TimeSource for FakeTime {
    fn now(&self) -> Now {
        Now {
            boot_id: 1,
            boottime_ms: self.boottime_ms.load(Ordering::SeqCst),
            wall_ms: self.wall_ms.load(Ordering::SeqCst),
        }
    }
}

struct Opened {
    outbox: Outbox,
    dead: Arc<DeadLetters>,
    _store: Store,
}

fn open(dir: &Path, extra: &str, time: Arc<FakeTime>) -> Opened {
    let cfg: OutboxConfig = toml::from_str(&format!("expire_interval_ms = 3600000\n{extra}")).unwrap();
    cfg.validate().unwrap();
    let store = Store::open(&dir.join("store")).unwrap();
    let dead = Arc::new(DeadLetters::open(&store, &DeadLetterConfig::default(), DeadLetterMetrics::default()).unwrap());
    let outbox = Outbox::open_with(
        &store,
        dir,
        cfg,
        Arc::new(OutboxMetrics::new(&Registry::new())),
        time,
        Some(dead.clone()),
    )
    .unwrap();
    Opened {
        outbox,
        dead,
        _store: store,
    }
}

fn msg(topic: &str) -> Arc<Message> {
    let mut m = Message::new(topic, topic.as_bytes().to_vec(), "dev1");
    m.content_type = Some("application/json".into());
    m.properties = vec![("site".into(), "north".into())];
    Arc::new(m)
}

fn listed(dead: &DeadLetters) -> Vec<(String, Reason, Option<u8>)> {
    dead.list(None, 100)
        .unwrap()
        .into_iter()
        .map(|s| (s.topic, s.reason, s.lane))
        .collect()
}

#[test]
fn expired_messages_move_to_the_dead_letter_store_with_lane_and_properties() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    {
        let o = open(dir.path(), "", time.clone());
        o.outbox
            .append_blocking(3, msg("short/ttl"), Some(Duration::from_secs(1)))
            .unwrap();
        o.outbox.append_blocking(3, msg("long/ttl"), None).unwrap();
        time.advance(2_000);
        assert_eq!(o.outbox.sweep_expired(), 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while o.dead.stats().messages == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(listed(&o.dead), [("short/ttl".to_string(), Reason::Expired, Some(3))]);
        assert_eq!(o.outbox.stats()[3].messages, 1);
    }
    let o = open(dir.path(), "", time.clone());
    assert_eq!(listed(&o.dead), [("short/ttl".to_string(), Reason::Expired, Some(3))]);
    let e = o.dead.get(0).unwrap().unwrap();
    let m = &e.letter.record.message;
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.properties, [("site".to_string(), "north".to_string())]);
    assert_eq!(&m.payload[..], b"short/ttl");
    assert_eq!(e.letter.at_ms, 1_700_000_002_000);
    // What remains in the lane is the message that did not expire.
    let b = o.outbox.lease(10).unwrap().unwrap();
    assert_eq!(b.items.len(), 1);
    assert_eq!(b.items[0].record.message.topic, "long/ttl");
}

#[test]
fn an_expired_message_met_by_a_lease_is_dead_lettered_too() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    let o = open(dir.path(), "", time.clone());
    o.outbox
        .append_blocking(0, msg("a"), Some(Duration::from_secs(1)))
        .unwrap();
    time.advance(5_000);
    assert!(o.outbox.lease(10).unwrap().is_none());
    drop(o.outbox);
    assert_eq!(listed(&o.dead), [("a".to_string(), Reason::Expired, Some(0))]);
}

#[test]
fn drop_oldest_moves_what_it_removes_to_the_dead_letter_store() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    let o = open(dir.path(), "max_messages = 2\nwhen_full = \"drop-oldest\"\n", time);
    for t in ["m0", "m1", "m2", "m3"] {
        o.outbox.append_blocking(5, msg(t), None).unwrap();
    }
    assert_eq!(
        listed(&o.dead),
        [
            ("m0".to_string(), Reason::Quota, Some(5)),
            ("m1".to_string(), Reason::Quota, Some(5))
        ]
    );
    let s = &o.outbox.stats()[5];
    assert_eq!(s.messages, 2);
}

#[test]
fn set_aside_moves_a_refused_leased_message_and_dead_letter_keeps_an_unrouted_one() {
    let dir = tempfile::tempdir().unwrap();
    let time = FakeTime::new();
    let o = open(dir.path(), "", time);
    o.outbox.append_blocking(1, msg("refused"), None).unwrap();
    let b = o.outbox.lease(10).unwrap().unwrap();
    o.outbox.set_aside(vec![(
        b.items[0].id,
        Reason::UpstreamRefused,
        "broker-refused:0x87".into(),
    )]);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let id = rt
        .block_on(async {
            o.outbox
                .dead_letter(msg("unrouted"), Reason::RouterFailure, "router-failure:trap".into())
                .unwrap()
                .await
        })
        .unwrap()
        .unwrap();
    assert_eq!((id.lane, id.seq), (DEAD_LETTER_LANE, 1));
    let all = o.dead.list(None, 10).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[0].reason, all[0].detail.as_str(), all[0].lane),
        (Reason::UpstreamRefused, "broker-refused:0x87", Some(1))
    );
    assert_eq!((all[1].reason, all[1].lane), (Reason::RouterFailure, None));
    assert_eq!(o.outbox.stats()[1].messages, 0);
    o.outbox.release_all();
    assert!(o.outbox.lease(10).unwrap().is_none(), "set aside, not redelivered");
}
