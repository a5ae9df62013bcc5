//! How big the store's journal, memtables and tables may grow, from the
//! size of the file system holding the data directory.
//!
//! fjall's defaults (a journal sealed at 64 MB, a journal budget of at least
//! 64 MiB, tables of 64 MiB) suit a large disk. On a small partition (a
//! 64 MiB data directory on an industrial box) the journal alone could
//! take the whole disk and was never reclaimed, so the store scales them
//! down: what it may hold beyond its live data ([`Sizing::headroom`]) is
//! a small fraction of the disk, and the outbox's quota leaves it free.

use std::path::Path;

const MIB: u64 = 1 << 20;

/// The store's sizes for one file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Total size of all journals; past it, the memtables holding the
    /// oldest journal are flushed so it can be deleted.
    pub journal_bytes: u64,
    /// Size at which the active journal is sealed and a new one started.
    pub journal_rotation_bytes: u64,
    /// Memtable size per space: past it, the memtable is flushed to a table.
    pub memtable_bytes: u64,
    /// Target size of a table written by compaction.
    pub table_bytes: u64,
}

impl Sizing {
    /// The sizes for a file system of `total` bytes: 1/32 of it for the
    /// journals (4-64 MiB), journals sealed at 1/64 (1 MiB-64 MB),
    /// memtables of 1/128 (1-16 MiB), tables of 1/32 (1-64 MiB). From 2 GiB
    /// up (4 GiB for the journal's seal) these are the sizes every node
    /// had before, so a large disk behaves as it did.
    pub fn for_disk(total: u64) -> Sizing {
        Sizing {
            journal_bytes: (total / 32).clamp(4 * MIB, 64 * MIB),
            journal_rotation_bytes: (total / 64).clamp(MIB, 64_000_000),
            memtable_bytes: (total / 128).clamp(MIB, 16 * MIB),
            table_bytes: (total / 32).clamp(MIB, 64 * MIB),
        }
    }

    /// The sizes for the file system holding `dir` (the large-disk sizes
    /// when it cannot be measured).
    pub fn for_dir(dir: &Path) -> Sizing {
        Sizing::for_disk(disk_total(dir).unwrap_or(u64::MAX))
    }

    /// What the store may occupy beyond its live data: every journal, and
    /// the tables a compaction writes before it deletes the ones it merged
    /// (two table targets). A quota on stored bytes leaves this free.
    pub fn headroom(&self) -> u64 {
        self.journal_bytes + 2 * self.table_bytes
    }
}

/// Size of the file system holding `dir`.
pub fn disk_total(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_blocks.saturating_mul(s.f_frsize))
}

/// Bytes an unprivileged process may still write on the file system
/// holding `dir`.
pub fn disk_free(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_disk_gets_small_journals_and_a_large_one_the_old_sizes() {
        let small = Sizing::for_disk(64 * MIB);
        assert_eq!(small.journal_bytes, 4 * MIB);
        assert_eq!(small.journal_rotation_bytes, MIB);
        assert_eq!(small.memtable_bytes, MIB);
        assert_eq!(small.table_bytes, 2 * MIB);
        // An eighth of the disk at most, so the outbox keeps the rest.
        assert!(small.headroom() <= 8 * MIB, "{small:?}");
        let large = Sizing::for_disk(100 << 30);
        assert_eq!(large.journal_bytes, 64 * MIB);
        assert_eq!(large.journal_rotation_bytes, 64_000_000);
        assert_eq!(large.memtable_bytes, 16 * MIB);
        assert_eq!(large.table_bytes, 64 * MIB);
    }
}
