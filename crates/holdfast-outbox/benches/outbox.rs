//! Outbox benchmark: durable append throughput with group commit beside a
//! one-fsync-per-message baseline and the disk's own fsync rate, drain rate,
//! open-to-first-delivery with a large backlog, bytes on disk per message.
//! Prints figures; asserts nothing.
//!
//! Run: `cargo bench -p holdfast --bench outbox` (1,000,000-message backlog),
//! or `-- --quick` (100,000). Set `HOLDFAST_BENCH_DIR` to measure another disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_model::Message;
use holdfast_outbox::config::OutboxConfig;
use holdfast_outbox::{Outbox, OutboxMetrics, SystemTimeSource};
use holdfast_store::Store;

fn open(dir: &Path) -> (Store, Outbox) {
    let store = Store::open(&dir.join("store")).expect("store");
    let config = OutboxConfig {
        max_messages: u64::MAX,
        max_bytes: u64::MAX,
        ..OutboxConfig::default()
    };
    let outbox = Outbox::open(
        &store,
        dir,
        config,
        Arc::new(OutboxMetrics::default()),
        Arc::new(SystemTimeSource),
    )
    .expect("outbox");
    (store, outbox)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The disk's own rate of small write + fdatasync, the physical limit for
/// one-message-per-sync durability.
fn fsync_rate(dir: &Path, seconds: f64) -> f64 {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let block = [7u8; 256];
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < seconds {
        f.write_all(&block).expect("write");
        f.sync_data().expect("fdatasync");
        n += 1;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    rate
}

/// `tasks` concurrent appenders for `seconds`: (messages/s, latency ms p50, p99, messages).
fn appends(outbox: &Arc<Outbox>, tasks: usize, size: usize, seconds: f64) -> (f64, f64, f64, u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let payload = vec![0x5au8; size];
    let (rate, mut lat, n) = rt.block_on(async {
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(seconds);
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (outbox, payload) = (outbox.clone(), payload.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let msg = Arc::new(Message::new(format!("bench/{t}"), payload, "bench"));
                    while Instant::now() < until {
                        let s = Instant::now();
                        outbox.append((t % 3) as u8, msg.clone(), None).await.expect("append");
                        lat.push(s.elapsed().as_secs_f64() * 1e3);
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.expect("task"));
        }
        let n = all.len() as u64;
        (n as f64 / start.elapsed().as_secs_f64(), all, n)
    });
    lat.sort_by(|a, b| a.total_cmp(b));
    (rate, pct(&lat, 0.5), pct(&lat, 0.99), n)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let backlog: u64 = if quick { 100_000 } else { 1_000_000 };
    let base = std::env::var_os("HOLDFAST_BENCH_DIR").map(std::path::PathBuf::from);
    let tmp = match &base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir_in(std::env::current_dir().expect("cwd")),
    }
    .expect("temp dir");
    let dir = tmp.path();
    println!("holdfast outbox benchmark (dir {}, backlog {backlog})", dir.display());
    println!();

    let disk = fsync_rate(dir, 3.0);
    println!(
        "disk: 256 B write + fdatasync, one at a time: {disk:.0} /s  (the physical limit of one sync per message)"
    );
    println!();
    println!(
        "{:<52} {:>12} {:>9} {:>9} {:>10}",
        "appends (durable before ack)", "msgs/s", "p50 ms", "p99 ms", "vs disk"
    );
    for size in [256usize, 1024] {
        let d = tempfile::tempdir_in(dir).expect("dir");
        let (_store, outbox) = open(d.path());
        let outbox = Arc::new(outbox);
        let (naive, n50, n99, _) = appends(&outbox, 1, size, 3.0);
        println!(
            "{:<52} {:>12.0} {:>9.2} {:>9.2} {:>9.2}x",
            format!("{size} B, 1 appender (one message per fsync)"),
            naive,
            n50,
            n99,
            naive / disk
        );
        let (group, g50, g99, _) = appends(&outbox, 512, size, 5.0);
        println!(
            "{:<52} {:>12.0} {:>9.2} {:>9.2} {:>9.2}x",
            format!("{size} B, 512 concurrent appenders (group commit)"),
            group,
            g50,
            g99,
            group / disk
        );
    }
    println!();

    // Backlog: fill, measure size on disk, reopen, time to first delivery, drain.
    let d = tempfile::tempdir_in(dir).expect("dir");
    {
        let (store, outbox) = open(d.path());
        let outbox = Arc::new(outbox);
        let fill = Instant::now();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let per = backlog / 256;
            let handles: Vec<_> = (0..256u64)
                .map(|t| {
                    let outbox = outbox.clone();
                    tokio::spawn(async move {
                        let msg = Arc::new(Message::new(format!("bench/{t}"), vec![0x5au8; 256], "bench"));
                        for _ in 0..per {
                            outbox.append(0, msg.clone(), None).await.expect("append");
                        }
                    })
                })
                .collect();
            for h in handles {
                h.await.expect("task");
            }
        });
        let filled = outbox.stats()[0].messages;
        println!(
            "filled {filled} messages of 256 B in {:.1} s ({:.0} msgs/s)",
            fill.elapsed().as_secs_f64(),
            filled as f64 / fill.elapsed().as_secs_f64()
        );
        outbox.close();
        store.persist(holdfast_store::Durability::SyncAll).expect("persist");
        let disk_bytes = store.disk_space().expect("disk space");
        println!(
            "on disk: {:.1} MiB, {:.0} bytes per message (256 B payload + topic, metadata, index)",
            disk_bytes as f64 / (1 << 20) as f64,
            disk_bytes as f64 / filled as f64
        );
    }
    let t = Instant::now();
    let (_store, outbox) = open(d.path());
    let opened = t.elapsed();
    let first = outbox.lease(1).expect("lease").expect("a message");
    let first_delivery = t.elapsed();
    println!(
        "open to first delivery with {backlog} queued: {:.1} ms (open {:.1} ms)",
        first_delivery.as_secs_f64() * 1e3,
        opened.as_secs_f64() * 1e3
    );
    outbox.release_all();
    drop(first);
    let t = Instant::now();
    let mut drained = 0u64;
    while let Some(batch) = outbox.lease(1000).expect("lease") {
        let ids: Vec<_> = batch.items.iter().map(|l| l.id).collect();
        drained += ids.len() as u64;
        outbox.ack_blocking(&ids).expect("ack");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "drain (lease 1000 + ack, one thread): {drained} messages in {secs:.1} s = {:.0} msgs/s",
        drained as f64 / secs
    );
}
