//! The block store: block files under the cache directory and their index
//! records, the disk budget (`cache.max_size`, `cache.min_free`) a block is
//! admitted under, committing a finished block, reading stored ones and
//! deleting an old version's.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::block::{Block, BlockData, Buf};
use crate::counters::Counters;
use crate::disk::{self, Index, ObjRecord};
use crate::objects::Objects;
use crate::{Meta, SMALL_READ};

/// The block files and their index (see the module docs).
pub(crate) struct BlockStore {
    dir: PathBuf,
    index: Index,
    block_size: u64,
    /// `cache.max_size` and `cache.min_free`, which a config reload changes.
    max_size: AtomicU64,
    min_free: AtomicU64,
}

impl BlockStore {
    pub(crate) fn new(dir: PathBuf, index: Index, block_size: u64, max_size: u64, min_free: u64) -> BlockStore {
        BlockStore {
            dir,
            index,
            block_size,
            max_size: AtomicU64::new(max_size),
            min_free: AtomicU64::new(min_free),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The budget a reload changes.
    pub(crate) fn max_size(&self) -> &AtomicU64 {
        &self.max_size
    }

    /// The free space kept a reload changes.
    pub(crate) fn min_free(&self) -> &AtomicU64 {
        &self.min_free
    }

    /// Free bytes on the cache's file system.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Writes an object's record to the index (best effort: the blocks are
    /// still served from memory's view if it fails).
    pub(crate) fn put_object(&self, key: &str, rec: &ObjRecord) {
        let _ = disk::put_object(&self.index, key, rec);
    }

    /// Reserves room for `len` bytes of `key`, evicting least recently used
    /// objects if needed. False when there is no room (the block is not
    /// stored).
    pub(crate) fn admit(&self, objects: &Objects, counters: &Counters, key: &str, len: u64) -> bool {
        let need_free = self.free_bytes().map_or(0, |f| {
            self.min_free
                .load(Ordering::Relaxed)
                .saturating_add(len)
                .saturating_sub(f)
        });
        let (ok, victims) = objects.reserve(key, len, self.max_size.load(Ordering::Relaxed), need_free);
        objects.update_gauges();
        for (vkey, id) in victims {
            tracing::debug!(key = %vkey, "cache: evicted");
            // Deleting now (not later) so the free space is back for this block.
            if let Err(e) = disk::remove_object(&self.index, &self.dir, Some(&vkey), id) {
                tracing::warn!(error = %e, "cache: cannot remove an evicted object's index records");
            }
        }
        if !ok {
            counters.event("admission-refused");
        }
        ok
    }

    /// Evicts least recently used objects until about `need` bytes are
    /// freed on disk, for the outbox (whose messages cannot be fetched
    /// again, as this content can); the bytes freed.
    pub(crate) fn give_space(&self, objects: &Objects, counters: &Counters, need: u64) -> u64 {
        let (freed, victims) = objects.evict(need);
        objects.update_gauges();
        for (vkey, id) in victims {
            tracing::debug!(key = %vkey, "cache: evicted for the outbox");
            counters.event("yielded-to-outbox");
            if let Err(e) = disk::remove_object(&self.index, &self.dir, Some(&vkey), id) {
                tracing::warn!(error = %e, "cache: cannot remove an evicted object's index records");
            }
        }
        freed
    }

    /// A buffer for block `k` (of `len` bytes) of object `obj_id`: a
    /// `.part` file when `public` and admitted, memory otherwise.
    pub(crate) fn buffer(
        &self,
        objects: &Objects,
        counters: &Counters,
        key: &str,
        (obj_id, k, len): (u64, u32, u64),
        public: bool,
    ) -> Buf {
        if !(public && self.admit(objects, counters, key, len)) {
            return Buf::memory(len);
        }
        let path = disk::part_path(&self.dir, obj_id, k);
        let file = std::fs::create_dir_all(disk::obj_dir(&self.dir, obj_id)).and_then(|()| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
        });
        match file {
            Ok(f) => Buf::File(Arc::new(f), Arc::new(path)),
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "cache: cannot create block file; serving without storing");
                counters.event("write-failed");
                objects.unreserve(len);
                Buf::memory(len)
            }
        }
    }

    /// Syncs a complete block, renames it into place and indexes it.
    pub(crate) fn commit(
        self: &Arc<Self>,
        objects: &Arc<Objects>,
        counters: &Arc<Counters>,
        key: String,
        (obj_id, k): (u64, u32),
        block: Arc<Block>,
        data: BlockData,
    ) {
        let (store, objects, counters) = (self.clone(), objects.clone(), counters.clone());
        tokio::spawn(async move {
            let Buf::File(file, part) = data.buf else {
                return;
            };
            let (dir, len) = (store.dir.clone(), data.len);
            let part_path = part.clone();
            let synced = tokio::task::spawn_blocking(move || {
                file.sync_data()?;
                std::fs::rename(&*part_path, disk::block_path(&dir, obj_id, k))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
            let stored = objects.stored(&key, obj_id, k, &block, len, synced.is_ok());
            match (&synced, stored) {
                (Ok(()), true) => {
                    if let Err(e) = disk::put_block(&store.index, obj_id, k, len) {
                        tracing::warn!(error = %e, "cache: cannot index a block");
                    }
                }
                (Ok(()), false) => {
                    let _ = std::fs::remove_file(disk::block_path(&store.dir, obj_id, k));
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, "cache: cannot sync a block; not stored");
                    counters.event("write-failed");
                    let _ = std::fs::remove_file(&*part);
                }
            }
            objects.update_gauges();
        });
    }

    /// Deletes an old version's blocks and records in the background.
    pub(crate) fn delete_later(&self, key: Option<String>, id: u64) {
        let (index, dir) = (self.index.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = disk::remove_object(&index, &dir, key.as_deref(), id) {
                tracing::warn!(error = %e, "cache: cannot remove an old object version");
            }
        });
    }

    /// Reads bytes `from..to` of a stored block.
    pub(crate) async fn read(&self, id: u64, k: u32, from: u64, to: u64) -> std::io::Result<Bytes> {
        let path = disk::block_path(&self.dir, id, k);
        if to - from <= SMALL_READ {
            // Small reads come from the page cache in microseconds: a
            // blocking-pool round trip would cost more than the read.
            return read_file_range(&path, from, to);
        }
        tokio::task::spawn_blocking(move || read_file_range(&path, from, to))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// Bytes `start..end` (at most [`SMALL_READ`]) when every block holding
    /// them is stored for `meta`'s version, read here and now; `None`
    /// otherwise (the caller streams instead).
    pub(crate) fn read_small(&self, objects: &Objects, key: &str, meta: &Meta, start: u64, end: u64) -> Option<Bytes> {
        if end <= start || end - start > SMALL_READ {
            return None;
        }
        let id = objects.coverage(key, meta, &[(start, end)]).ok()?;
        let bs = self.block_size;
        let mut parts = Vec::new();
        for k in start / bs..=(end - 1) / bs {
            let b0 = k * bs;
            let (from, to) = (start.max(b0) - b0, end.min(b0 + bs) - b0);
            parts.push(read_file_range(&disk::block_path(&self.dir, id, u32::try_from(k).ok()?), from, to).ok()?);
        }
        if parts.len() == 1 {
            return parts.pop();
        }
        Some(Bytes::from(parts.concat()))
    }
}

/// Reads bytes `from..to` of a file into a buffer that is not zero-filled first.
fn read_file_range(path: &Path, from: u64, to: u64) -> std::io::Result<Bytes> {
    use std::io::{Read, Seek};
    let mut f = File::open(path)?;
    f.seek(std::io::SeekFrom::Start(from))?;
    let want = (to - from) as usize;
    let mut v = Vec::with_capacity(want);
    f.take(want as u64).read_to_end(&mut v)?;
    if v.len() != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "block file is short",
        ));
    }
    Ok(Bytes::from(v))
}
