//! Stored blocks: the disk budget, committing, reading and deleting block files.

#[allow(unused_imports)]
use super::*;

impl Cache {
    /// Reserves room for `len` bytes, evicting least recently used objects
    /// if needed. False when there is no room (the block is not stored).
    pub(crate) fn admit(&self, key: &str, len: u64) -> bool {
        let free = rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        let mut victims = Vec::new();
        let ok = {
            let mut inner = lock(&self.inner);
            let mut need_free = free.map_or(0, |f| {
                self.min_free
                    .load(Ordering::Relaxed)
                    .saturating_add(len)
                    .saturating_sub(f)
            });
            loop {
                let over = (inner.stored_bytes + inner.reserved_bytes + len)
                    .saturating_sub(self.max_size.load(Ordering::Relaxed));
                if over == 0 && need_free == 0 {
                    inner.reserved_bytes += len;
                    break true;
                }
                let victim = inner
                    .lru
                    .iter()
                    .find(|(_, k)| {
                        k != key
                            && inner
                                .objects
                                .get(k)
                                .is_some_and(|o| o.readers == 0 && o.inflight.is_empty() && !o.stored.is_empty())
                    })
                    .cloned();
                let Some((tick, vkey)) = victim else {
                    break false;
                };
                inner.lru.remove(&(tick, vkey.clone()));
                if let Some(o) = inner.objects.remove(&vkey) {
                    let bytes = o.stored_bytes();
                    inner.stored_bytes -= bytes;
                    need_free = need_free.saturating_sub(bytes);
                    self.metrics.cache_evictions.inc();
                    self.metrics.cache_evicted_bytes.inc_by(bytes);
                    victims.push((vkey, o.id));
                }
            }
        };
        self.update_gauges();
        for (vkey, id) in victims {
            tracing::debug!(key = %vkey, "cache: evicted");
            // Deleting now (not later) so the free space is back for this block.
            if let Err(e) = disk::remove_object(&self.index, &self.dir, Some(&vkey), id) {
                tracing::warn!(error = %e, "cache: cannot remove an evicted object's index records");
            }
        }
        if !ok {
            self.event("admission-refused");
        }
        ok
    }

    pub(crate) fn update_gauges(&self) {
        let inner = lock(&self.inner);
        self.metrics.cache_stored_bytes.set(inner.stored_bytes as i64);
        self.metrics.cache_objects.set(inner.objects.len() as i64);
    }

    /// Syncs a complete block, renames it into place and indexes it.
    pub(crate) fn commit_block(self: &Arc<Self>, key: String, obj_id: u64, k: u32, block: Arc<Block>, data: BlockData) {
        let cache = self.clone();
        tokio::spawn(async move {
            let Buf::File(file, part) = data.buf else {
                return;
            };
            let (dir, len) = (cache.dir.clone(), data.len);
            let part_path = part.clone();
            let synced = tokio::task::spawn_blocking(move || {
                file.sync_data()?;
                std::fs::rename(&*part_path, disk::block_path(&dir, obj_id, k))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
            let stored = {
                let mut inner = lock(&cache.inner);
                inner.reserved_bytes = inner.reserved_bytes.saturating_sub(len);
                let mut stored = false;
                let mut replaced = 0;
                if let Some(o) = inner.objects.get_mut(&key)
                    && o.id == obj_id
                    && o.inflight.get(&k).is_some_and(|b| Arc::ptr_eq(b, &block))
                {
                    o.inflight.remove(&k);
                    if synced.is_ok() {
                        replaced = o.stored.insert(k, len).unwrap_or(0);
                        stored = true;
                    }
                }
                if stored {
                    inner.stored_bytes = inner.stored_bytes + len - replaced;
                }
                stored
            };
            match (&synced, stored) {
                (Ok(()), true) => {
                    if let Err(e) = disk::put_block(&cache.index, obj_id, k, len) {
                        tracing::warn!(error = %e, "cache: cannot index a block");
                    }
                }
                (Ok(()), false) => {
                    let _ = std::fs::remove_file(disk::block_path(&cache.dir, obj_id, k));
                }
                (Err(e), _) => {
                    tracing::warn!(error = %e, "cache: cannot sync a block; not stored");
                    cache.event("write-failed");
                    let _ = std::fs::remove_file(&*part);
                }
            }
            cache.update_gauges();
        });
    }

    /// Deletes an old version's blocks in the background.
    pub(crate) fn delete_later(self: &Arc<Self>, key: Option<String>, id: u64) {
        let (index, dir) = (self.index.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = disk::remove_object(&index, &dir, key.as_deref(), id) {
                tracing::warn!(error = %e, "cache: cannot remove an old object version");
            }
        });
        self.update_gauges();
    }

    /// Reads bytes `from..to` of a stored block.
    pub(crate) async fn read_stored(&self, id: u64, k: u32, from: u64, to: u64) -> std::io::Result<Bytes> {
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

    /// Forgets a stored block whose file could not be read.
    pub(crate) fn drop_stored(&self, key: &str, id: u64, k: u32) {
        let mut inner = lock(&self.inner);
        let mut freed = 0;
        if let Some(o) = inner.objects.get_mut(key)
            && o.id == id
            && let Some(len) = o.stored.remove(&k)
        {
            freed = len;
        }
        inner.stored_bytes -= freed;
        self.event("block-unreadable");
    }
}

/// Reads bytes `from..to` of a file into a buffer that is not zero-filled first.
pub(crate) fn read_file_range(path: &std::path::Path, from: u64, to: u64) -> std::io::Result<Bytes> {
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

pub(crate) fn failed(b: &Block) -> bool {
    matches!(&*b.state.borrow(), BlockState::Failed(_))
}
