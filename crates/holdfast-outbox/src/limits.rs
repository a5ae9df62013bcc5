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
    /// `outbox.max_bytes`, capped by `disk_cap`.
    max_bytes: AtomicU64,
    min_free_disk_bytes: AtomicU64,
    drop_oldest: AtomicBool,
    /// 80 % of the free space when the outbox opened.
    disk_cap: u64,
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
    /// The limits of `config`, the byte limit capped at 80 % of the space
    /// free under `dir` now.
    pub(crate) fn new(config: &OutboxConfig, dir: &Path) -> Limits {
        let disk_cap = free_disk(dir).unwrap_or(u64::MAX) / 10 * 8;
        Limits {
            default_ttl_ms: AtomicU64::new(config.default_ttl_seconds.saturating_mul(1000)),
            max_messages: AtomicU64::new(config.max_messages),
            max_bytes: AtomicU64::new(config.max_bytes.min(disk_cap)),
            min_free_disk_bytes: AtomicU64::new(config.min_free_disk_bytes),
            drop_oldest: AtomicBool::new(config.when_full == WhenFull::DropOldest),
            disk_cap,
        }
    }

    /// The time-to-live of a message appended now without one.
    pub(crate) fn default_ttl_ms(&self) -> u64 {
        self.default_ttl_ms.load(Ordering::Relaxed)
    }

    /// The effective byte limit.
    pub(crate) fn max_bytes(&self) -> u64 {
        self.max_bytes.load(Ordering::Relaxed)
    }

    /// The quotas now.
    pub(crate) fn quota(&self) -> Quota {
        Quota {
            max_messages: self.max_messages.load(Ordering::Relaxed),
            max_bytes: self.max_bytes.load(Ordering::Relaxed),
            min_free_disk_bytes: self.min_free_disk_bytes.load(Ordering::Relaxed),
            drop_oldest: self.drop_oldest.load(Ordering::Relaxed),
        }
    }

    /// Takes the changeable limits of `new`; returns the keys that changed
    /// (see [`crate::Outbox::apply_limits`]).
    pub(crate) fn apply(&self, new: &OutboxConfig) -> Vec<String> {
        let max_bytes = new.max_bytes.min(self.disk_cap);
        let mut changed = holdfast_model::store_limits(&[
            (
                "outbox.default_ttl_seconds",
                &self.default_ttl_ms,
                new.default_ttl_seconds.saturating_mul(1000),
            ),
            ("outbox.max_messages", &self.max_messages, new.max_messages),
            ("outbox.max_bytes", &self.max_bytes, max_bytes),
            (
                "outbox.min_free_disk_bytes",
                &self.min_free_disk_bytes,
                new.min_free_disk_bytes,
            ),
        ]);
        for key in &mut changed {
            if key == "outbox.max_bytes" && max_bytes < new.max_bytes {
                *key = format!("{key} (capped at {max_bytes}: 80 % of the free space at start)");
            }
        }
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
