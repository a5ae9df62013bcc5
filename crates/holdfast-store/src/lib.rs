//! # holdfast-store
//!
//! The one fjall database of a node, under `<data_dir>/store`.
//!
//! Only this crate touches fjall, and no fjall type appears in its public
//! API. Subsystems get a [`Space`] (a fjall
//! keyspace) per concern and write through [`Batch`]es whose durability
//! they state explicitly.
//!
//! The journal, memtables and tables are sized to the file system holding
//! the database ([`Sizing`]), so a small partition is not filled by the
//! store's own overhead. A write or sync that fails (a full disk, an I/O
//! error) does not leave the node broken until someone restarts it: the
//! store reports itself failed ([`Store::failure`], [`HealthEvent`]), refuses
//! writes, and reopens the database in the background once the disk has
//! room again. Spaces and batches resolve the database when they are used,
//! so every holder of a [`Space`] keeps working after the reopen; nothing a
//! commit reported durable is lost (the reopen replays the journal).

mod health;
mod sizing;

use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use self::health::Health;
pub use self::health::{HealthEvent, Observer};
pub use self::sizing::{Sizing, disk_free, disk_total};

/// How often a failed store looks for room to reopen in.
const RECOVER_EVERY: Duration = Duration::from_millis(250);

/// Storage errors. They carry the storage engine's message as text, so they
/// can be cloned and handed to every waiter of a failed group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A write or fsync failed (a full disk, a hardware-level fault): the
    /// store refuses writes until it has reopened, which it does by itself
    /// once the disk has room again.
    #[error("storage failed; writes are refused until the store reopens by itself: {0}")]
    Poisoned(String),
    /// Another process has the database open.
    #[error("the store at {0} is in use by another process")]
    Locked(String),
    /// Any other storage error.
    #[error("storage error: {0}")]
    Other(String),
}

fn err(e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Poisoned => StoreError::Poisoned(e.to_string()),
        other => StoreError::Other(other.to_string()),
    }
}

/// How durable a commit must be before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Handed to the OS: survives a process crash, not power loss.
    Buffered,
    /// `fdatasync`: survives power loss.
    SyncData,
    /// `fsync`: survives power loss, metadata included.
    SyncAll,
}

impl Durability {
    fn mode(self) -> fjall::PersistMode {
        match self {
            Durability::Buffered => fjall::PersistMode::Buffer,
            Durability::SyncData => fjall::PersistMode::SyncData,
            Durability::SyncAll => fjall::PersistMode::SyncAll,
        }
    }
}

/// One opening of the database and its spaces (index = [`Space`]'s).
struct Open {
    db: fjall::Database,
    spaces: Vec<fjall::Keyspace>,
}

struct Inner {
    dir: PathBuf,
    sizing: Sizing,
    /// The open database; `None` while it is being reopened.
    open: ArcSwapOption<Open>,
    /// The spaces' names, in the order they were opened (serialises
    /// opening spaces and reopening the database).
    names: Mutex<Vec<String>>,
    health: Health,
    /// A compaction is running.
    compacting: AtomicBool,
}

/// The node's database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// One keyspace of the database.
#[derive(Clone)]
pub struct Space {
    inner: Arc<Inner>,
    idx: usize,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space").field("idx", &self.idx).finish_non_exhaustive()
    }
}

/// An atomic write across spaces.
pub struct Batch {
    inner: Arc<Inner>,
    /// Space, key, value (`None`: a removal).
    ops: Vec<(usize, Vec<u8>, Option<Vec<u8>>)>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("len", &self.ops.len()).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn open_db(dir: &Path, sizing: &Sizing) -> Result<fjall::Database, StoreError> {
    // A bounded journal: what is not yet flushed to tables is replayed on
    // open, so this bounds the time from open to the first delivery, and
    // the disk it takes (sized to the disk: [`Sizing`]).
    //
    // The journal is not compressed: fjall rotates it by its size on
    // disk and decodes every entry of it on open, so LZ4 (fjall's
    // default for values over 4 KiB) let a journal of compressible
    // payloads hold gigabytes that a restart had to decompress (seconds
    // with 1 GB queued; docs/benchmarks.md, "Restart after a kill").
    // Uncompressed, what is replayed is bounded by the journal's size.
    fjall::Database::builder(dir)
        .max_journaling_size(sizing.journal_bytes)
        .journal_rotation_size(sizing.journal_rotation_bytes)
        .journal_compression(fjall::CompressionType::None)
        .open()
        .map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked(dir.display().to_string()),
            other => err(other),
        })
}

fn open_space(db: &fjall::Database, name: &str, sizing: &Sizing) -> Result<fjall::Keyspace, StoreError> {
    let (memtable, table) = (sizing.memtable_bytes, sizing.table_bytes);
    db.keyspace(name, move || {
        fjall::KeyspaceCreateOptions::default()
            .max_memtable_size(memtable)
            .compaction_strategy(Arc::new(
                fjall::compaction::Leveled::default().with_table_target_size(table),
            ))
    })
    .map_err(err)
}

fn no_space() -> StoreError {
    StoreError::Other("no such space".to_string())
}

impl Inner {
    /// The open database, or the failure while it is being reopened.
    fn open(&self) -> Result<Arc<Open>, StoreError> {
        self.open.load_full().ok_or_else(|| {
            StoreError::Poisoned(
                self.health
                    .failure()
                    .unwrap_or_else(|| "the store is being reopened".to_string()),
            )
        })
    }

    /// Refuses a write at once while the store is failed.
    fn writable(&self) -> Result<Arc<Open>, StoreError> {
        if let Some(reason) = self.health.failure() {
            return Err(StoreError::Poisoned(reason));
        }
        self.open()
    }

    /// A write or sync failed: fjall refuses writes from now on. The first
    /// failure is logged and starts the recovery.
    fn failed(self: &Arc<Self>, e: fjall::Error) -> StoreError {
        let reason = match err(e) {
            StoreError::Poisoned(r) | StoreError::Locked(r) | StoreError::Other(r) => r,
        };
        if self.health.fail(&reason) {
            tracing::error!(
                dir = %self.dir.display(),
                "storage failed: {reason}; writes are refused (the node reports itself unhealthy) \
                 until the store reopens, which it does by itself once the disk has room"
            );
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("holdfast-store-recover".into())
                .spawn(move || recover(&weak));
            if let Err(e) = spawned {
                tracing::error!("storage: cannot start the recovery thread: {e}");
            }
        }
        StoreError::Poisoned(reason)
    }

    /// Drops the failed database and opens it again, with every space.
    fn reopen(&self) -> Result<(), StoreError> {
        let names = lock(&self.names);
        if let Some(old) = self.open.swap(None) {
            // Readers and batches hold it for a moment; fjall's lock is
            // released when the last handle goes.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(old);
        }
        let db = open_db(&self.dir, &self.sizing)?;
        let spaces = names
            .iter()
            .map(|n| open_space(&db, n, &self.sizing))
            .collect::<Result<Vec<_>, _>>()?;
        // Synced before writes resume.
        db.persist(fjall::PersistMode::SyncAll).map_err(err)?;
        self.open.store(Some(Arc::new(Open { db, spaces })));
        Ok(())
    }
}

/// The recovery: once the disk has room for a journal, reopen; again until
/// it succeeds (or the store is gone).
fn recover(weak: &Weak<Inner>) {
    let mut attempts = 0u64;
    loop {
        std::thread::sleep(RECOVER_EVERY);
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let room = disk_free(&inner.dir).is_none_or(|f| f >= inner.sizing.journal_rotation_bytes);
        if !room {
            continue;
        }
        attempts += 1;
        match inner.reopen() {
            Ok(()) => {
                let after = inner.health.recovered();
                tracing::info!(
                    dir = %inner.dir.display(),
                    after_ms = after.as_millis() as u64,
                    attempts,
                    "storage recovered: the store reopened and takes writes again"
                );
                return;
            }
            Err(e) => tracing::debug!(attempts, "storage: reopen failed, retrying: {e}"),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database in `dir`, sized to the file
    /// system holding it ([`Sizing::for_dir`]).
    ///
    /// # Errors
    /// I/O errors, another process holding it, or a damaged journal.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Other(format!("{}: {e}", dir.display())))?;
        Store::open_sized(dir, Sizing::for_dir(dir))
    }

    /// Opens (creating if needed) the database in `dir` with `sizing`.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_sized(dir: &Path, sizing: Sizing) -> Result<Store, StoreError> {
        let db = open_db(dir, &sizing)?;
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                sizing,
                open: ArcSwapOption::new(Some(Arc::new(Open { db, spaces: Vec::new() }))),
                names: Mutex::new(Vec::new()),
                health: Health::default(),
                compacting: AtomicBool::new(false),
            }),
        })
    }

    /// Opens (creating if needed) the space `name`.
    ///
    /// # Errors
    /// Storage errors.
    pub fn space(&self, name: &str) -> Result<Space, StoreError> {
        let mut names = lock(&self.inner.names);
        if let Some(idx) = names.iter().position(|n| n == name) {
            return Ok(Space {
                inner: self.inner.clone(),
                idx,
            });
        }
        let open = self.inner.open()?;
        let ks = open_space(&open.db, name, &self.inner.sizing)?;
        let mut spaces = open.spaces.clone();
        spaces.push(ks);
        self.inner.open.store(Some(Arc::new(Open {
            db: open.db.clone(),
            spaces,
        })));
        names.push(name.to_string());
        Ok(Space {
            inner: self.inner.clone(),
            idx: names.len() - 1,
        })
    }

    /// Starts an atomic batch.
    pub fn batch(&self) -> Batch {
        Batch {
            inner: self.inner.clone(),
            ops: Vec::new(),
        }
    }

    /// Makes everything written so far durable.
    ///
    /// # Errors
    /// Storage errors (a failure makes the store failed until it reopens).
    pub fn persist(&self, durability: Durability) -> Result<(), StoreError> {
        let open = self.inner.writable()?;
        open.db.persist(durability.mode()).map_err(|e| self.inner.failed(e))
    }

    /// Bytes the whole database occupies on disk (journals counted at
    /// their length).
    ///
    /// # Errors
    /// I/O errors.
    pub fn disk_space(&self) -> Result<u64, StoreError> {
        self.inner.open()?.db.disk_space().map_err(err)
    }

    /// The sizes the store runs with.
    pub fn sizing(&self) -> Sizing {
        self.inner.sizing
    }

    /// The directory of the database.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Why the store refuses writes, while it does (a write or sync
    /// failed and it has not reopened yet).
    pub fn failure(&self) -> Option<String> {
        self.inner.health.failure()
    }

    /// Calls `observer` on every change of health, from the thread that
    /// saw it (keep it short).
    pub fn observe(&self, observer: Observer) {
        self.inner.health.observe(observer);
    }

    /// Flushes `space`'s memtable and compacts all its tables into one
    /// level in a background thread (at most one at a time; a no-op while
    /// one runs or the store is failed), so what deletions (a drained
    /// queue) left behind is given back to the file system.
    pub fn compact_later(&self, space: &Space) {
        if self.inner.health.failure().is_some() || self.inner.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        let (inner, idx) = (self.inner.clone(), space.idx);
        let spawned = std::thread::Builder::new()
            .name("holdfast-store-compact".into())
            .spawn(move || {
                let run = || -> Result<(), StoreError> {
                    let ks = inner.open()?.spaces.get(idx).cloned().ok_or_else(no_space)?;
                    ks.rotate_memtable_and_wait().map_err(err)?;
                    ks.major_compact().map_err(err)?;
                    // The tables merged away stay referenced by the old
                    // versions until the next flush collects them: flush
                    // again, with a removal of a key that does not exist
                    // (an invisible write) so there is something to flush.
                    ks.remove(&b"\xffholdfast-compacted"[..]).map_err(err)?;
                    ks.rotate_memtable_and_wait().map_err(err)
                };
                if let Err(e) = run() {
                    tracing::warn!("storage: compaction failed: {e}");
                }
                inner.compacting.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!("storage: cannot start a compaction: {e}");
            self.inner.compacting.store(false, Ordering::Release);
        }
    }
}

impl Batch {
    /// Adds an insert.
    pub fn insert(&mut self, space: &Space, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((space.idx, key.into(), Some(value.into())));
    }

    /// Adds a removal.
    pub fn remove(&mut self, space: &Space, key: impl Into<Vec<u8>>) {
        self.ops.push((space.idx, key.into(), None));
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Applies the batch atomically; returns once it is as durable as asked.
    ///
    /// # Errors
    /// Storage errors; a failed write or sync makes the store failed
    /// until it reopens (nothing of the batch is applied then).
    pub fn commit(self, durability: Durability) -> Result<(), StoreError> {
        if self.ops.is_empty() {
            return Ok(());
        }
        let open = self.inner.writable()?;
        let mut batch = open.db.batch();
        for (idx, key, value) in self.ops {
            let ks = open.spaces.get(idx).ok_or_else(no_space)?;
            match value {
                Some(v) => batch.insert(ks, key, v),
                None => batch.remove(ks, key),
            }
        }
        batch
            .durability(Some(durability.mode()))
            .commit()
            .map_err(|e| self.inner.failed(e))
    }
}

impl Space {
    /// Runs `f` on the keyspace of the open database, without cloning a
    /// handle (reads are the drain's hot path).
    fn with<T>(&self, f: impl FnOnce(&fjall::Keyspace) -> T) -> Result<T, StoreError> {
        let open = self.inner.open.load();
        let Some(open) = open.as_ref() else {
            return Err(self.inner.open().err().unwrap_or_else(no_space));
        };
        open.spaces.get(self.idx).map(f).ok_or_else(no_space)
    }

    /// The value under `key`.
    ///
    /// # Errors
    /// Storage errors.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with(|ks| ks.get(key))?.map_err(err)?.map(|v| v.to_vec()))
    }

    /// Key/value pairs in `range`, in key order.
    pub fn range<R: RangeBounds<Vec<u8>>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
        let (failed, iter) = match self.with(|ks| ks.range(range)) {
            Ok(iter) => (None, Some(iter)),
            Err(e) => (Some(Err(e)), None),
        };
        failed.into_iter().chain(iter.into_iter().flatten().map(|guard| {
            let (k, v) = guard.into_inner().map_err(err)?;
            Ok((k.to_vec(), v.to_vec()))
        }))
    }

    /// Key/value pairs in `range`, in reverse key order.
    pub fn range_rev<R: RangeBounds<Vec<u8>>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
        let (failed, iter) = match self.with(|ks| ks.range(range).rev()) {
            Ok(iter) => (None, Some(iter)),
            Err(e) => (Some(Err(e)), None),
        };
        failed.into_iter().chain(iter.into_iter().flatten().map(|guard| {
            let (k, v) = guard.into_inner().map_err(err)?;
            Ok((k.to_vec(), v.to_vec()))
        }))
    }

    /// Bytes this space occupies on disk (approximate; 0 while the store
    /// is being reopened).
    pub fn disk_space(&self) -> u64 {
        self.with(fjall::Keyspace::disk_space).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Non-zero bytes in the journal files (`*.jnl`, preallocated with
    /// zeros) in `dir`.
    fn journal_bytes(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
            .map(|p| std::fs::read(p).unwrap().iter().filter(|b| **b != 0).count())
            .sum()
    }

    /// Large, compressible values are journaled as they are (not LZ4), so a
    /// journal's size on disk bounds what a restart replays; and they come
    /// back whole after a reopen.
    #[test]
    fn large_values_are_journaled_uncompressed_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let value = vec![0x5au8; 64 << 10];
        {
            let store = Store::open(dir.path()).unwrap();
            let space = store.space("outbox").unwrap();
            for i in 0u32..16 {
                let mut batch = store.batch();
                batch.insert(&space, i.to_be_bytes().to_vec(), value.clone());
                batch.commit(Durability::SyncData).unwrap();
            }
            // 1 MiB of one byte: LZ4 would journal a few KiB.
            assert!(
                journal_bytes(dir.path()) >= 16 * (64 << 10),
                "{}",
                journal_bytes(dir.path())
            );
        }
        let store = Store::open(dir.path()).unwrap();
        let space = store.space("outbox").unwrap();
        let all: Vec<_> = space.range(..).map(|r| r.unwrap()).collect();
        assert_eq!(all.len(), 16);
        assert!(all.iter().all(|(_, v)| *v == value));
    }
}
