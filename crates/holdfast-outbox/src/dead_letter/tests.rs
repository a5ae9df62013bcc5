use std::sync::Arc;

use holdfast_model::Message;

use super::*;

fn letter(n: u32, payload: usize) -> DeadLetter {
    let mut m = Message::new(format!("t/{n}"), vec![b'x'; payload], "c");
    m.content_type = Some("application/json".into());
    m.properties = vec![("k".into(), n.to_string())];
    DeadLetter::of_message(
        Arc::new(m),
        Reason::RouterFailure,
        "router-failure:trap".into(),
        1000 + u64::from(n),
    )
}

fn open(dir: &std::path::Path, config: &DeadLetterConfig) -> (Store, DeadLetters) {
    let store = Store::open(dir).unwrap();
    let dl = DeadLetters::open(&store, config, DeadLetterMetrics::default()).unwrap();
    (store, dl)
}

fn topics(dl: &DeadLetters) -> Vec<String> {
    dl.list(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| s.topic)
        .collect()
}

#[test]
fn keeps_everything_a_letter_carries_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeadLetterConfig::default();
    let ids = {
        let (_s, dl) = open(dir.path(), &config);
        dl.put(vec![letter(1, 10), letter(2, 20)]).unwrap()
    };
    assert_eq!(ids, [Some(0), Some(1)]);
    for _ in 0..3 {
        let (_s, dl) = open(dir.path(), &config);
        assert_eq!(dl.stats().messages, 2);
        assert_eq!(topics(&dl), ["t/1", "t/2"]);
        let e = dl.get(1).unwrap().unwrap();
        assert_eq!(e.letter, letter(2, 20));
        assert_eq!(
            e.letter.record.message.content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(e.letter.record.message.properties, [("k".to_string(), "2".to_string())]);
        assert_eq!(e.summary().payload_bytes, 20);
    }
    // Ids are never reused after a reopen.
    let (_s, dl) = open(dir.path(), &config);
    assert_eq!(dl.put(vec![letter(3, 1)]).unwrap(), [Some(2)]);
}

#[test]
fn the_count_quota_evicts_the_oldest_first_and_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = DeadLetterConfig {
        max_messages: 3,
        ..DeadLetterConfig::default()
    };
    let metrics = DeadLetterMetrics::default();
    let store = Store::open(dir.path()).unwrap();
    let dl = DeadLetters::open(&store, &config, metrics.clone()).unwrap();
    for n in 0..5 {
        dl.put(vec![letter(n, 10)]).unwrap();
    }
    assert_eq!(topics(&dl), ["t/2", "t/3", "t/4"]);
    assert_eq!(dl.stats().messages, 3);
    assert_eq!(metrics.evicted_total(), 2);
    // Several at once, more than fit: only the newest are kept.
    dl.put((10..15).map(|n| letter(n, 10)).collect()).unwrap();
    assert_eq!(topics(&dl), ["t/12", "t/13", "t/14"]);
    assert_eq!(metrics.evicted_total(), 7);
    drop(dl);
    let dl = DeadLetters::open(&store, &config, DeadLetterMetrics::default()).unwrap();
    assert_eq!(topics(&dl), ["t/12", "t/13", "t/14"]);
    assert_eq!(dl.stats().messages, 3);
}

#[test]
fn the_byte_quota_evicts_by_stored_size_and_refuses_a_letter_larger_than_it() {
    let dir = tempfile::tempdir().unwrap();
    let size = letter(0, 1000).encode().unwrap().len() as u64;
    let config = DeadLetterConfig {
        max_messages: 100,
        max_bytes: size * 2 + size / 2,
    };
    let (_s, dl) = open(dir.path(), &config);
    for n in 0..4 {
        dl.put(vec![letter(n, 1000)]).unwrap();
    }
    assert_eq!(topics(&dl), ["t/2", "t/3"]);
    assert_eq!(dl.stats().bytes, size * 2);
    assert_eq!(dl.put(vec![letter(9, 10_000)]).unwrap(), [None]);
    assert_eq!(topics(&dl), ["t/2", "t/3"], "kept what it had");
}

#[test]
fn a_lowered_quota_evicts_at_once_and_purge_empties() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, dl) = open(dir.path(), &DeadLetterConfig::default());
    dl.put((0..6).map(|n| letter(n, 5)).collect()).unwrap();
    let changed = dl
        .apply_limits(&DeadLetterConfig {
            max_messages: 2,
            ..DeadLetterConfig::default()
        })
        .unwrap();
    assert_eq!(changed, ["dead_letter.max_messages"]);
    assert_eq!(topics(&dl), ["t/4", "t/5"]);
    assert_eq!(dl.purge(&[4, 99]).unwrap(), 1);
    assert!(dl.replayed(5).unwrap());
    assert!(!dl.replayed(5).unwrap());
    assert_eq!(dl.stats().messages, 0);
    dl.put(vec![letter(7, 5), letter(8, 5)]).unwrap();
    assert_eq!(dl.purge_all().unwrap(), 2);
    assert_eq!(
        dl.stats(),
        DeadLetterStats {
            messages: 0,
            bytes: 0,
            max_messages: 2,
            max_bytes: 256 << 20
        }
    );
    assert!(topics(&dl).is_empty());
}

#[test]
fn a_failed_commit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, dl) = open(dir.path(), &DeadLetterConfig::default());
    let mut batch = store.batch();
    let staged = dl.stage(&mut batch, vec![letter(1, 5)]);
    drop(batch);
    staged.done(false);
    assert_eq!(dl.stats().messages, 0);
    assert!(dl.get(0).unwrap().is_none());
}
