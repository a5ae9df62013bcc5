//! The outbox's side of the link's per-hop idempotence, over a real fjall
//! store: epochs that name what is queued across restarts, and child
//! batches stored once whatever is sent again, all or nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is its failure

use std::path::Path;
use std::sync::Arc;

use holdfast_metrics::Registry;
use holdfast_model::{HopId, Message};
use holdfast_outbox::config::OutboxConfig;
use holdfast_outbox::record::Record;
use holdfast_outbox::{AppendError, FromChild, Outbox, OutboxMetrics, Stored, SystemTimeSource};
use holdfast_store::Store;

struct Opened {
    outbox: Outbox,
    metrics: Arc<Registry>,
    _store: Store,
}

fn open(dir: &Path, extra: &str) -> Opened {
    let cfg: OutboxConfig = toml::from_str(&format!("expire_interval_ms = 3600000\n{extra}")).unwrap();
    let store = Store::open(&dir.join("store")).unwrap();
    let metrics = Arc::new(Registry::new());
    let outbox = Outbox::open(
        &store,
        dir,
        cfg,
        Arc::new(OutboxMetrics::new(&metrics)),
        Arc::new(SystemTimeSource),
    )
    .unwrap();
    Opened {
        outbox,
        metrics,
        _store: store,
    }
}

fn record(n: u64) -> Vec<u8> {
    Record {
        enqueued_clock_ms: 0,
        enqueued_wall_ms: 0,
        ttl_ms: 3_600_000,
        message: Arc::new(Message::new("t", n.to_be_bytes().to_vec(), "dev")),
    }
    .encode()
    .unwrap()
}

fn batch(child: &str, epoch: u64, seqs: std::ops::Range<u64>) -> FromChild {
    FromChild {
        child: Arc::from(child),
        lane: 2,
        records: seqs.map(|s| (Some(HopId { epoch, seq: s }), record(s))).collect(),
    }
}

fn store(o: &Outbox, b: FromChild) -> Result<Stored, AppendError> {
    o.submit_from(b).unwrap().blocking_recv().unwrap()
}

fn queued(o: &Outbox) -> Vec<u64> {
    let b = o.lease_lane(2, 10_000).unwrap();
    let out = b
        .items
        .iter()
        .map(|l| u64::from_be_bytes(l.record.message.payload[..8].try_into().unwrap()))
        .collect();
    o.release_all();
    out
}

#[test]
fn a_batch_sent_again_is_stored_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let o = open(dir.path(), "");
        assert_eq!(
            store(&o.outbox, batch("gw1", 7, 0..5)).unwrap(),
            Stored {
                stored: 5,
                duplicates: 0
            }
        );
        // The ack was lost: the child sends 3..8 again with more.
        assert_eq!(
            store(&o.outbox, batch("gw1", 7, 3..8)).unwrap(),
            Stored {
                stored: 3,
                duplicates: 2
            }
        );
        // Another child's sequences are its own.
        assert_eq!(store(&o.outbox, batch("gw2", 7, 0..2)).unwrap().stored, 2);
    }
    // The marks are durable with the records.
    let o = open(dir.path(), "");
    assert_eq!(
        store(&o.outbox, batch("gw1", 7, 0..8)).unwrap(),
        Stored {
            stored: 0,
            duplicates: 8
        }
    );
    // The child restarted: a new epoch is new messages.
    assert_eq!(store(&o.outbox, batch("gw1", 8, 0..2)).unwrap().stored, 2);
    assert_eq!(queued(&o.outbox), [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 1]);
    let line = o
        .metrics
        .render()
        .lines()
        .find(|l| l.starts_with("holdfast_outbox_duplicates_total{lane=\"2\"}"))
        .map(str::to_string)
        .unwrap();
    assert!(line.ends_with(" 8"), "{line}");
}

#[test]
fn a_batch_that_does_not_fit_is_refused_whole_and_its_marks_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let o = open(dir.path(), "max_messages = 4\n");
    assert_eq!(store(&o.outbox, batch("gw1", 1, 0..3)).unwrap().stored, 3);
    let err = store(&o.outbox, batch("gw1", 1, 3..5)).unwrap_err();
    assert!(matches!(err, AppendError::QuotaExceeded(_)), "{err}");
    assert_eq!(queued(&o.outbox), [0, 1, 2], "nothing of the refused batch");
    // Room again: the same batch is stored (its ids were not marked).
    let b = o.outbox.lease_lane(2, 2).unwrap();
    o.outbox
        .ack_blocking(&b.items.iter().map(|l| l.id).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(store(&o.outbox, batch("gw1", 1, 3..5)).unwrap().stored, 2);
    assert_eq!(queued(&o.outbox), [2, 3, 4]);
}

#[test]
fn queued_messages_keep_their_epoch_and_new_ones_get_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let o = open(dir.path(), "");
        for n in 0..3 {
            o.outbox
                .append_blocking(2, Arc::new(Message::new("t", vec![n], "c")), None)
                .unwrap();
        }
        let b = o.outbox.lease_lane(2, 10).unwrap();
        assert!(b.items.iter().all(|l| l.epoch == o.outbox.epoch()));
        o.outbox.epoch()
    };
    let o = open(dir.path(), "");
    assert_ne!(o.outbox.epoch(), first, "every start draws a new epoch");
    o.outbox
        .append_blocking(2, Arc::new(Message::new("t", vec![9], "c")), None)
        .unwrap();
    let b = o.outbox.lease_lane(2, 10).unwrap();
    let epochs: Vec<u64> = b.items.iter().map(|l| l.epoch).collect();
    assert_eq!(epochs, [first, first, first, o.outbox.epoch()]);
    // Once the old messages are delivered, the old epoch is forgotten at
    // the next start; what is queued keeps the epoch it was stored in.
    o.outbox
        .ack_blocking(&b.items[..3].iter().map(|l| l.id).collect::<Vec<_>>())
        .unwrap();
    let second = o.outbox.epoch();
    drop(o);
    let o = open(dir.path(), "");
    let b = o.outbox.lease_lane(2, 10).unwrap();
    assert_eq!(b.items.iter().map(|l| l.epoch).collect::<Vec<_>>(), [second]);
}
