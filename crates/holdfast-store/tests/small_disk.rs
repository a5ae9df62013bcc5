//! The store on a small file system: a tmpfs of a few MiB mounted for the
//! test (root only; CI runs as root). Without the right to mount, each
//! test says so and passes without running: the end-to-end tests in
//! `tests/e2e_small_disk.rs` need the same.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is its failure

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use holdfast_store::{Durability, Sizing, Store, disk_free};

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
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): the small-disk store tests did not run");
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

/// Fills the file system holding `dir` with a file until `leave` bytes are free.
fn ballast(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("ballast");
    let f = std::fs::File::create(&path).unwrap();
    let mut len = 0u64;
    let chunk = vec![1u8; 1 << 16];
    let mut w = std::io::BufWriter::new(f);
    use std::io::Write;
    while free(dir) > leave + chunk.len() as u64 {
        if w.write_all(&chunk).is_err() {
            break;
        }
        len += chunk.len() as u64;
        let _ = w.flush();
    }
    let _ = w.flush();
    assert!(len > 0);
    path
}

/// Writes `bytes` in 64 KiB values under keys from `first`, synced; the
/// keys written.
fn fill(store: &Store, space: &holdfast_store::Space, first: u32, bytes: u64) -> u32 {
    let value = vec![0x5au8; 64 << 10];
    let n = (bytes / value.len() as u64) as u32;
    for i in first..first + n {
        let mut b = store.batch();
        b.insert(space, i.to_be_bytes().to_vec(), value.clone());
        b.commit(Durability::SyncData).unwrap();
    }
    n
}

/// A queue filled to 40 MiB on a 64 MiB disk and drained gives its space
/// back: the journal is sealed and deleted at small sizes, and the
/// compaction after the drain drops the dead tables. (With fjall's
/// default sizes the 40 MiB stayed in the journal for good.)
#[test]
fn a_drained_queue_gives_its_space_back_on_a_small_disk() {
    let Some(fs) = Tmpfs::mount(64) else { return };
    let dir = fs.path().join("store");
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.sizing(), Sizing::for_disk(64 << 20));
    let space = store.space("outbox").unwrap();
    let empty = free(fs.path());
    let n = fill(&store, &space, 0, 40 << 20);
    for i in 0..n {
        let mut b = store.batch();
        b.remove(&space, i.to_be_bytes().to_vec());
        b.commit(Durability::Buffered).unwrap();
    }
    store.compact_later(&space);
    let deadline = Instant::now() + Duration::from_secs(30);
    let headroom = store.sizing().headroom();
    while empty.saturating_sub(free(fs.path())) > headroom && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        store.compact_later(&space);
    }
    let used = empty.saturating_sub(free(fs.path()));
    if used > headroom {
        let _ = std::process::Command::new("du").arg("-a").arg(&dir).status();
    }
    assert!(
        used <= headroom,
        "the drained store still uses {used} bytes (headroom {headroom})"
    );
    assert_eq!(space.range(..).count(), 0);
}

/// A commit that fails for want of space makes the store failed (it says
/// why and refuses writes); once space is freed it reopens by itself, with
/// every acknowledged write, and takes writes again.
#[test]
fn a_full_disk_fails_the_store_and_freeing_space_recovers_it() {
    let Some(fs) = Tmpfs::mount(32) else { return };
    let dir = fs.path().join("store");
    let store = Store::open(&dir).unwrap();
    let space = store.space("outbox").unwrap();
    let other = store.space("sessions").unwrap();
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = events.clone();
    store.observe(std::sync::Arc::new(move |e| seen.lock().unwrap().push(e.clone())));
    let acked = fill(&store, &space, 0, 2 << 20);
    let ballast = ballast(fs.path(), 256 << 10);
    // Writes until one fails: what succeeded is acknowledged.
    let value = vec![7u8; 64 << 10];
    let mut ok = acked;
    let failed = loop {
        let mut b = store.batch();
        b.insert(&space, ok.to_be_bytes().to_vec(), value.clone());
        match b.commit(Durability::SyncData) {
            Ok(()) => ok += 1,
            Err(e) => break e,
        }
        assert!(ok < acked + 1000, "the disk never filled");
    };
    assert!(store.failure().is_some(), "{failed}");
    // Refused at once while failed, in every space.
    let mut b = store.batch();
    b.insert(&other, b"k".to_vec(), b"v".to_vec());
    assert!(b.commit(Durability::SyncData).is_err());
    std::fs::remove_file(ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.failure().is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(store.failure(), None, "the store did not recover");
    // Everything acknowledged is there; new writes are taken, in any space.
    let keys: Vec<u32> = space
        .range(..)
        .map(|r| u32::from_be_bytes(r.unwrap().0.try_into().unwrap()))
        .collect();
    assert!(keys.len() as u32 >= ok, "{} < {ok}", keys.len());
    assert_eq!(keys[..ok as usize], (0..ok).collect::<Vec<_>>()[..]);
    let mut b = store.batch();
    b.insert(&other, b"k".to_vec(), b"v".to_vec());
    b.commit(Durability::SyncData).unwrap();
    assert_eq!(other.get(b"k").unwrap(), Some(b"v".to_vec()));
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(events[0], holdfast_store::HealthEvent::Failed { .. }));
    assert!(matches!(events[1], holdfast_store::HealthEvent::Recovered { .. }));
}
