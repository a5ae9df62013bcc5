//! Kill -9 a process that is appending to the outbox at full speed, restart
//! it, and check that every acknowledged message is present exactly once and
//! in order. Repeated, so recovery is exercised on recovered data too.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use holdfast::config::OutboxConfig;
use holdfast_outbox::{Outbox, OutboxMetrics, SystemTimeSource};
use holdfast_store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// Runs the filler until it has acknowledged `at_least` appends, then SIGKILLs
/// it. Returns what it acknowledged: (lane, seq) -> payload.
fn fill_and_kill(dir: &Path, tag: &str, at_least: usize) -> BTreeMap<(u8, u64), String> {
    let mut child = Command::new(BIN)
        .args(["debug", "outbox-fill", "--data-dir"])
        .arg(dir)
        .args(["--tag", tag])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut acked = BTreeMap::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.splitn(3, ' ');
                let (Some(lane), Some(seq), Some(payload)) = (parts.next(), parts.next(), parts.next()) else {
                    continue; // a line cut by the kill
                };
                let (Ok(lane), Ok(seq)) = (lane.parse(), seq.parse()) else {
                    continue;
                };
                acked.insert((lane, seq), payload.to_string());
                seen.store(acked.len(), Ordering::Relaxed);
            }
            acked
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.load(Ordering::Relaxed) < at_least {
        assert!(!reader.is_finished(), "the filler exited early");
        assert!(
            Instant::now() < deadline,
            "the filler acknowledged too little in 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no destructors, no final sync.
    child.kill().unwrap();
    child.wait().unwrap();
    let acked = reader.join().unwrap();
    assert!(
        acked.len() >= at_least,
        "only {} appends acknowledged before the kill",
        acked.len()
    );
    acked
}

fn recovered(dir: &Path) -> Vec<(u8, u64, String)> {
    let store = Store::open(&dir.join("store")).unwrap();
    let outbox = Outbox::open(
        &store,
        dir,
        OutboxConfig::default(),
        Arc::new(OutboxMetrics::default()),
        Arc::new(SystemTimeSource),
    )
    .unwrap();
    let mut out = Vec::new();
    for lane in 0..10u8 {
        loop {
            let batch = outbox.lease_lane(lane, 1000).unwrap();
            if batch.items.is_empty() {
                break;
            }
            for l in batch.items {
                out.push((
                    lane,
                    l.id.seq,
                    String::from_utf8(l.record.message.payload.to_vec()).unwrap(),
                ));
            }
        }
    }
    out
}

#[test]
fn acknowledged_appends_survive_sigkill_exactly_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut all_acked: BTreeMap<(u8, u64), String> = BTreeMap::new();
    for round in 0..3 {
        let acked = fill_and_kill(dir.path(), &format!("r{round}"), 2000);
        for (k, v) in &acked {
            assert!(
                all_acked.insert(*k, v.clone()).is_none(),
                "sequence {k:?} reused after a crash"
            );
        }
        let stored = recovered(dir.path());
        // Order: strictly increasing sequence per lane, and payload order per writer.
        let mut last: HashMap<u8, u64> = HashMap::new();
        let mut per_writer: HashMap<String, u64> = HashMap::new();
        for (lane, seq, payload) in &stored {
            if let Some(prev) = last.insert(*lane, *seq) {
                assert!(*seq > prev, "lane {lane}: {seq} after {prev}");
            }
            let (writer, i) = payload.rsplit_once(':').unwrap();
            let i: u64 = i.parse().unwrap();
            // Within one writer and lane, payload counters only grow.
            if let Some(prev) = per_writer.insert(format!("{lane}/{writer}"), i) {
                assert!(i > prev, "{payload} after {writer}:{prev}");
            }
        }
        // Exactly once: every acknowledged append is there, with its payload, once.
        let index: HashMap<(u8, u64), &String> = stored.iter().map(|(l, s, p)| ((*l, *s), p)).collect();
        assert_eq!(index.len(), stored.len(), "duplicate keys");
        for (k, payload) in &all_acked {
            assert_eq!(
                index.get(k).copied(),
                Some(payload),
                "acknowledged {k:?} missing or changed after SIGKILL"
            );
        }
        eprintln!(
            "round {round}: {} acknowledged before SIGKILL, {} stored after restart (the rest were in flight)",
            acked.len(),
            stored.len()
        );
    }
}
