//! The outbox's quotas: the limits a config reload changes. The rest of
//! [`OutboxConfig`] is fixed for the outbox's life.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::config::{OutboxConfig, WhenFull};

/// The live limits, read by the writer once per commit and by appends.
#[derive(Debug)]
pub(crate) struct Limits {
    default_ttl_ms: AtomicU64,
    max_messages: AtomicU64,
    /// `outbox.max_bytes` as configured; the byte quota is this or the
    /// disk's share ([`disk_cap`]), whichever is smaller, at each commit.
    max_bytes: AtomicU64,
    min_free_disk_bytes: AtomicU64,
    drop_oldest: AtomicBool,
    /// What the store may occupy beyond its live data (journals,
    /// compaction), left free by the byte quota.
    headroom: u64,
}

/// The outbox's share of the disk: 80 % of what it could occupy (the free
/// space and what it holds now) less the store's `headroom`. Follows the
/// free space live: a node started on a full disk gets its quota once
/// space is freed, without a restart or a reload.
pub(crate) fn disk_cap(free: Option<u64>, stored: u64, headroom: u64) -> u64 {
    match free {
        Some(free) => (free.saturating_add(stored) / 10 * 8).saturating_sub(headroom),
        None => u64::MAX,
    }
}

/// The free space the byte quota needs for `stored + size` bytes to fit
/// (the inverse of [`disk_cap`]).
pub(crate) fn free_needed(stored: u64, size: u64, headroom: u64) -> u64 {
    (stored + size + headroom)
        .div_ceil(8)
        .saturating_mul(10)
        .saturating_sub(stored)
}

/// One reading of the quotas, for a whole commit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quota {
    pub(crate) max_messages: u64,
    pub(crate) max_bytes: u64,
    pub(crate) min_free_disk_bytes: u64,
    pub(crate) drop_oldest: bool,
}

impl Limits {
    /// The limits of `config`, leaving the store's `headroom` free.
    pub(crate) fn new(config: &OutboxConfig, headroom: u64) -> Limits {
        Limits {
            default_ttl_ms: AtomicU64::new(config.default_ttl_seconds.saturating_mul(1000)),
            max_messages: AtomicU64::new(config.max_messages),
            max_bytes: AtomicU64::new(config.max_bytes),
            min_free_disk_bytes: AtomicU64::new(config.min_free_disk_bytes),
            drop_oldest: AtomicBool::new(config.when_full == WhenFull::DropOldest),
            headroom,
        }
    }

    /// What the store may occupy beyond its live data.
    pub(crate) fn headroom(&self) -> u64 {
        self.headroom
    }

    /// `outbox.max_bytes` as configured.
    pub(crate) fn configured_max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// The time-to-live of a message appended now without one.
    pub(crate) fn default_ttl_ms(&self) -> u64 {
        self.default_ttl_ms.load(Ordering::Relaxed)
    }

    /// The effective byte limit with `free` bytes free and `stored` held.
    pub(crate) fn max_bytes(&self, free: Option<u64>, stored: u64) -> u64 {
        self.configured_max_bytes().min(disk_cap(free, stored, self.headroom))
    }

    /// The quotas with `free` bytes free and `stored` held.
    pub(crate) fn quota(&self, free: Option<u64>, stored: u64) -> Quota {
        Quota {
            max_messages: self.max_messages.load(Ordering::Relaxed),
            max_bytes: self.max_bytes(free, stored),
            min_free_disk_bytes: self.min_free_disk_bytes.load(Ordering::Relaxed),
            drop_oldest: self.drop_oldest.load(Ordering::Relaxed),
        }
    }

    /// Takes the changeable limits of `new`; returns the keys that changed
    /// (see [`crate::Outbox::apply_limits`]).
    pub(crate) fn apply(&self, new: &OutboxConfig) -> Vec<String> {
        let mut changed = holdfast_model::store_limits(&[
            (
                "outbox.default_ttl_seconds",
                &self.default_ttl_ms,
                new.default_ttl_seconds.saturating_mul(1000),
            ),
            ("outbox.max_messages", &self.max_messages, new.max_messages),
            ("outbox.max_bytes", &self.max_bytes, new.max_bytes),
            (
                "outbox.min_free_disk_bytes",
                &self.min_free_disk_bytes,
                new.min_free_disk_bytes,
            ),
        ]);
        let drop_oldest = new.when_full == WhenFull::DropOldest;
        if self.drop_oldest.swap(drop_oldest, Ordering::Relaxed) != drop_oldest {
            changed.push("outbox.when_full".to_string());
        }
        changed
    }
}

/// Free bytes on the file system holding `dir`.
pub(crate) fn free_disk(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A start on a full disk gives no byte quota; it grows as space is
    /// freed, and what is stored counts as the outbox's own.
    #[test]
    fn the_disk_share_follows_the_free_space() {
        let headroom = 8 * MIB;
        assert_eq!(disk_cap(Some(MIB), 0, headroom), 0);
        assert_eq!(disk_cap(Some(64 * MIB), 0, headroom), 64 * MIB / 10 * 8 - headroom);
        assert_eq!(
            disk_cap(Some(32 * MIB), 32 * MIB, headroom),
            disk_cap(Some(64 * MIB), 0, headroom)
        );
        assert_eq!(disk_cap(None, 0, headroom), u64::MAX);
        let limits = Limits::new(&OutboxConfig::default(), headroom);
        assert_eq!(limits.quota(Some(MIB), 0).max_bytes, 0);
        assert!(limits.quota(Some(64 * MIB), 0).max_bytes > 40 * MIB);
        // free_needed is the least free space under which the data fits.
        for (stored, size) in [(0, 1), (10 * MIB, 64 << 10), (40 * MIB, 1)] {
            let need = free_needed(stored, size, headroom);
            assert!(disk_cap(Some(need), stored, headroom) >= stored + size);
            assert!(disk_cap(Some(need - 16), stored, headroom) < stored + size);
        }
    }
}
