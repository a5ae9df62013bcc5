//! The outbox on a small disk: a tmpfs of a few MiB mounted for the test
//! (root only: CI runs as root; without the right to mount each test says
//! so and returns). What it shows: the byte quota follows the free space
//! (a start on a full disk is not stuck with a quota of 0), a space donor
//! (the range cache) gives room before an append is refused, and a failed
//! write makes the outbox's store failed until it reopens by itself, with
//! nothing acknowledged lost.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is its failure

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_metrics::Registry;
use holdfast_model::Message;
use holdfast_outbox::config::OutboxConfig;
use holdfast_outbox::{AppendError, Outbox, OutboxMetrics, SpaceDonor, SystemTimeSource};
use holdfast_store::{Store, disk_free};

/// A tmpfs of `mib` MiB, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): the outbox small-disk tests did not run");
            return None;
        }
        Some(Tmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn free(dir: &Path) -> u64 {
    disk_free(dir).unwrap()
}

/// Fills the file system of `dir` with 256 KiB files under `dir/ballast`
/// until at most `leave` bytes are free; the files.
fn ballast(dir: &Path, leave: u64) -> Vec<PathBuf> {
    let b = dir.join("ballast");
    std::fs::create_dir_all(&b).unwrap();
    let chunk = vec![1u8; 256 << 10];
    let mut files = Vec::new();
    while free(dir) > leave {
        let p = b.join(files.len().to_string());
        let n = (free(dir) - leave).min(chunk.len() as u64) as usize;
        if std::fs::write(&p, &chunk[..n]).is_err() {
            files.push(p);
            break;
        }
        files.push(p);
    }
    files
}

fn open(dir: &Path, extra: &str) -> (Outbox, Store) {
    let cfg: OutboxConfig = toml::from_str(&format!("commit_window_us = 0\n{extra}")).unwrap();
    cfg.validate().unwrap();
    let store = Store::open(&dir.join("store")).unwrap();
    let metrics = OutboxMetrics::new(&Registry::new());
    let outbox = Outbox::open(&store, dir, cfg, Arc::new(metrics), Arc::new(SystemTimeSource)).unwrap();
    (outbox, store)
}

fn msg(i: u32) -> Arc<Message> {
    let mut payload = i.to_be_bytes().to_vec();
    payload.resize(32 << 10, 0x42);
    Arc::new(Message::new("t", payload, "c"))
}

/// (d) Started with 1 MiB free, the outbox's share of the disk is 0, and
/// appends are refused as over quota; freeing space gives it a quota at
/// once, without a restart or a reload. (It was computed once, at start.)
#[test]
fn a_start_on_a_full_disk_gets_a_quota_once_space_is_freed() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let files = ballast(fs.path(), 1 << 20);
    let (outbox, _store) = open(fs.path(), "min_free_disk_bytes = 0");
    let refused = outbox.append_blocking(0, msg(0), None).unwrap_err();
    assert!(matches!(refused, AppendError::QuotaExceeded("bytes")), "{refused}");
    assert_eq!(outbox.max_bytes(), 0);
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    assert!(outbox.max_bytes() > 10 << 20, "{}", outbox.max_bytes());
    outbox.append_blocking(0, msg(1), None).unwrap();
}

/// A donor that deletes its files when asked, as the range cache evicts.
struct Files {
    files: std::sync::Mutex<Vec<PathBuf>>,
    asked: AtomicU64,
}

impl SpaceDonor for Files {
    fn give_space(&self, bytes: u64) -> u64 {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let mut files = self.files.lock().unwrap();
        let mut given = 0;
        while given < bytes {
            let Some(f) = files.pop() else { break };
            given += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(f).unwrap();
        }
        given
    }
}

/// (b) With the disk filled to the outbox's floor by content that can be
/// fetched again, an append is not refused: the donor is asked first and
/// frees what the append needs, no more than that.
#[test]
fn a_donor_gives_room_before_an_append_is_refused() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let (outbox, _store) = open(fs.path(), "min_free_disk_bytes = 4194304");
    let files = ballast(fs.path(), 2 << 20);
    let n = files.len();
    let refused = outbox.append_blocking(0, msg(0), None).unwrap_err();
    assert!(matches!(refused, AppendError::DiskFull), "{refused}");
    let donor = Arc::new(Files {
        files: std::sync::Mutex::new(files),
        asked: AtomicU64::new(0),
    });
    outbox.add_space_donor(donor.clone());
    for i in 0..20 {
        outbox.append_blocking(0, msg(i), None).unwrap();
    }
    assert!(donor.asked.load(Ordering::SeqCst) > 0);
    let left = donor.files.lock().unwrap().len();
    assert!(
        left > n / 2,
        "the donor gave more than needed: {left} of {n} files left"
    );
}

/// (c) A write that finds the disk full (here: filled by another
/// process after the messages were taken, and the write is the removal
/// of acknowledged ones) fails; the store is failed (the outbox says why)
/// and refuses appends, and once space is freed it reopens by itself:
/// appends are taken again and every message stored before is still
/// there, in order.
#[test]
fn a_full_disk_fails_the_store_until_space_returns_and_loses_nothing() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let (outbox, _store) = open(fs.path(), "min_free_disk_bytes = 0");
    let mut stored = Vec::new();
    for i in 0..200 {
        stored.push(outbox.append_blocking(0, msg(i), None).unwrap());
    }
    let files = ballast(fs.path(), 0);
    // Deliveries acknowledged one by one: each removal is a journal write.
    let mut acked = 0;
    while outbox.storage_failure().is_none() && acked < stored.len() {
        let b = outbox.lease(1).unwrap().unwrap();
        let ids: Vec<_> = b.items.iter().map(|l| l.id).collect();
        if outbox.ack_blocking(&ids).is_ok() {
            acked += 1;
        }
    }
    assert!(outbox.storage_failure().is_some(), "no write failed");
    outbox.release_all();
    assert!(outbox.append_blocking(0, msg(999), None).is_err());
    for f in &files {
        std::fs::remove_file(f).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox.storage_failure().is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(outbox.storage_failure(), None, "the store did not recover");
    let last = outbox.append_blocking(0, msg(1000), None).unwrap();
    let mut leased = Vec::new();
    while let Some(b) = outbox.lease(1000).unwrap() {
        leased.extend(b.items.into_iter().map(|l| l.id));
    }
    // What was not acknowledged is all there, in order, then the new one.
    // The removal that failed may have reached the journal after all (its
    // message was delivered: either way is right).
    let want = |from: usize| {
        let mut w: Vec<_> = stored[from..].to_vec();
        w.push(last);
        w
    };
    assert!(leased == want(acked) || leased == want(acked + 1), "{leased:?}");
}
