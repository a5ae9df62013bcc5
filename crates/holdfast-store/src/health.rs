//! Whether the store can write, and who is told when that changes.
//!
//! A failed write or sync (ENOSPC, EIO) leaves fjall's database refusing
//! every later write ("poisoned"). The store then counts as *failed*: it
//! says so once (an error log, [`HealthEvent::Failed`] to each observer),
//! refuses writes at once without touching the disk, and reopens the
//! database in the background once the disk has room again
//! ([`crate::Store`]); on success it says so once more
//! ([`HealthEvent::Recovered`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A change of the store's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// A write or sync failed: writes are refused until the store reopens.
    Failed {
        /// What failed.
        reason: String,
    },
    /// The store reopened and writes again.
    Recovered {
        /// How long it was failed.
        after: Duration,
    },
}

/// Something told of every [`HealthEvent`].
pub type Observer = Arc<dyn Fn(&HealthEvent) + Send + Sync>;

/// The failure, if any, and the observers.
#[derive(Default)]
pub(crate) struct Health {
    failed: Mutex<Option<(String, Instant)>>,
    observers: Mutex<Vec<Observer>>,
}

impl Health {
    /// The failure's reason, while failed.
    pub(crate) fn failure(&self) -> Option<String> {
        lock(&self.failed).as_ref().map(|(r, _)| r.clone())
    }

    /// Records a failure; true when the store was healthy until now (the
    /// caller logs it and starts the recovery).
    pub(crate) fn fail(&self, reason: &str) -> bool {
        {
            let mut failed = lock(&self.failed);
            if failed.is_some() {
                return false;
            }
            *failed = Some((reason.to_string(), Instant::now()));
        }
        self.tell(&HealthEvent::Failed {
            reason: reason.to_string(),
        });
        true
    }

    /// Records the recovery; how long the store was failed.
    pub(crate) fn recovered(&self) -> Duration {
        let after = lock(&self.failed)
            .take()
            .map(|(_, since)| since.elapsed())
            .unwrap_or_default();
        self.tell(&HealthEvent::Recovered { after });
        after
    }

    pub(crate) fn observe(&self, observer: Observer) {
        lock(&self.observers).push(observer);
    }

    fn tell(&self, event: &HealthEvent) {
        let observers = lock(&self.observers).clone();
        for o in observers {
            o(event);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
