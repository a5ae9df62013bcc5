//! # holdfast-store
//!
//! The one fjall database of a node, under `<data_dir>/store`.
//!
//! Only this crate touches fjall, and no fjall type appears in its public
//! API. Subsystems get a [`Space`] (a fjall
//! keyspace) per concern and write through [`Batch`]es whose durability
//! they state explicitly.

use std::ops::RangeBounds;
use std::path::Path;

/// Journal size at which fjall flushes memtables and starts a new journal.
const JOURNAL_BYTES: u64 = 64 << 20;
/// Memtable size per space; the most that is replayed per space on open.
const MEMTABLE_BYTES: u64 = 16 << 20;

/// Storage errors. They carry the storage engine's message as text, so they
/// can be cloned and handed to every waiter of a failed group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A previous write or fsync failed (a hardware-level fault). The
    /// database accepts no more writes; the process should restart.
    #[error("storage is poisoned by an earlier write failure; restart the node: {0}")]
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

/// The node's database.
#[derive(Clone)]
pub struct Store {
    db: fjall::Database,
    dir: std::path::PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// One keyspace of the database.
#[derive(Clone)]
pub struct Space {
    ks: fjall::Keyspace,
}

impl std::fmt::Debug for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Space").finish_non_exhaustive()
    }
}

/// An atomic write across spaces.
pub struct Batch {
    batch: fjall::OwnedWriteBatch,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("len", &self.batch.len()).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    ///
    /// # Errors
    /// I/O errors, another process holding it, or a damaged journal.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        // A bounded journal: what is not yet flushed to tables is replayed on
        // open, so this bounds the time from open to the first delivery.
        //
        // The journal is not compressed: fjall rotates it by its size on
        // disk and decodes every entry of it on open, so LZ4 (fjall's
        // default for values over 4 KiB) let a journal of compressible
        // payloads hold gigabytes that a restart had to decompress (seconds
        // with 1 GB queued; docs/benchmarks.md, "Restart after a kill").
        // Uncompressed, what is replayed is bounded by the journal's size.
        let db = fjall::Database::builder(dir)
            .max_journaling_size(JOURNAL_BYTES)
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => StoreError::Locked(dir.display().to_string()),
                other => err(other),
            })?;
        let store = Store {
            db,
            dir: dir.to_path_buf(),
        };
        store.sync_dirs()?;
        Ok(store)
    }

    /// Makes the store's directory entries durable: the store's directory
    /// and the directories in it (fjall creates a keyspace's directory
    /// without syncing the directory that holds it, so a power cut soon
    /// after a space is created could lose the whole space).
    fn sync_dirs(&self) -> Result<(), StoreError> {
        let sync = |p: &Path| std::fs::File::open(p).and_then(|f| f.sync_all());
        let io = |e: std::io::Error| StoreError::Other(format!("syncing the store's directories: {e}"));
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync(parent).map_err(io)?;
        }
        sync(&self.dir).map_err(io)?;
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.file_type().map_err(io)?.is_dir() {
                sync(&entry.path()).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Opens (creating if needed) the space `name`.
    ///
    /// # Errors
    /// Storage errors.
    pub fn space(&self, name: &str) -> Result<Space, StoreError> {
        let existed = self.db.keyspace_exists(name);
        let ks = self
            .db
            .keyspace(name, || {
                fjall::KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
            })
            .map_err(err)?;
        if !existed {
            self.sync_dirs()?;
        }
        Ok(Space { ks })
    }

    /// Starts an atomic batch.
    pub fn batch(&self) -> Batch {
        Batch { batch: self.db.batch() }
    }

    /// Makes everything written so far durable.
    ///
    /// # Errors
    /// Storage errors (a failure poisons the store).
    pub fn persist(&self, durability: Durability) -> Result<(), StoreError> {
        self.db.persist(durability.mode()).map_err(err)
    }

    /// Bytes the whole database occupies on disk.
    ///
    /// # Errors
    /// I/O errors.
    pub fn disk_space(&self) -> Result<u64, StoreError> {
        self.db.disk_space().map_err(err)
    }
}

impl Batch {
    /// Adds an insert.
    pub fn insert(&mut self, space: &Space, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.batch.insert(&space.ks, key.into(), value.into());
    }

    /// Adds a removal.
    pub fn remove(&mut self, space: &Space, key: impl Into<Vec<u8>>) {
        self.batch.remove(&space.ks, key.into());
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Applies the batch atomically; returns once it is as durable as asked.
    ///
    /// # Errors
    /// Storage errors (a failed sync poisons the store).
    pub fn commit(self, durability: Durability) -> Result<(), StoreError> {
        self.batch.durability(Some(durability.mode())).commit().map_err(err)
    }
}

impl Space {
    /// The value under `key`.
    ///
    /// # Errors
    /// Storage errors.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.ks.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    /// Key/value pairs in `range`, in key order.
    pub fn range<R: RangeBounds<Vec<u8>>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
        self.ks.range(range).map(|guard| {
            let (k, v) = guard.into_inner().map_err(err)?;
            Ok((k.to_vec(), v.to_vec()))
        })
    }

    /// Key/value pairs in `range`, in reverse key order.
    pub fn range_rev<R: RangeBounds<Vec<u8>>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
        self.ks.range(range).rev().map(|guard| {
            let (k, v) = guard.into_inner().map_err(err)?;
            Ok((k.to_vec(), v.to_vec()))
        })
    }

    /// Bytes this space occupies on disk (approximate).
    pub fn disk_space(&self) -> u64 {
        self.ks.disk_space()
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
