//! The health watch of the applied deployment: counts the calls and
//! failures of the plugins it deployed and says when they fail past its
//! threshold. The counts are stored, so a restarted node goes on from them.

use std::collections::BTreeMap;

use crate::DeployError;
use crate::store::{Applied, DeployStore, StoredWatch};

/// What is watched.
#[derive(Debug, Clone)]
struct Watch {
    /// As stored (its counts: those before this process).
    stored: StoredWatch,
    /// The slots' counters when this process began watching.
    baseline: BTreeMap<String, (u64, u64)>,
    last_sent: (u64, u64),
    last_sent_ms: u64,
}

/// What the watch saw.
#[derive(Debug, PartialEq)]
pub(crate) enum Observation {
    /// Nothing is watched.
    Idle,
    /// The deployed plugins fail past the threshold: roll back.
    Failing {
        /// Calls since the deployment was applied.
        calls: u64,
        /// Of which failed.
        failures: u64,
        /// Why, for the report.
        reason: String,
    },
    /// Within the threshold.
    Healthy {
        /// Calls since the deployment was applied.
        calls: u64,
        /// Of which failed.
        failures: u64,
        /// The counts changed and are due to go up (at most every 2 s).
        due: bool,
    },
}

/// The watch of the applied deployment, if any.
pub(crate) struct HealthWatch {
    store: DeployStore,
    current: Option<Watch>,
}

impl HealthWatch {
    /// The stored watch, when it is of `applied` (a restarted node goes on
    /// watching with what it had counted; this process's counters start at
    /// zero). A stale one is dropped.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn open(store: DeployStore, applied: Option<&Applied>) -> Result<HealthWatch, DeployError> {
        let mut current = None;
        if let Some(w) = store.watch()? {
            if applied.is_some_and(|a| a.deployment == w.deployment && a.digest == w.digest) {
                tracing::info!(deployment = %w.deployment, calls = w.calls, failures = w.failures,
                    "deploy: watching the applied deployment again");
                current = Some(Watch {
                    stored: w,
                    baseline: BTreeMap::new(),
                    last_sent: (0, 0),
                    last_sent_ms: 0,
                });
            } else {
                store.set_watch(None, false)?;
            }
        }
        Ok(HealthWatch { store, current })
    }

    /// Starts watching what was just applied (nothing, when it deploys no
    /// plugin), counting from the slots' counters `baseline`.
    pub(crate) fn start(
        &mut self,
        applied: &Applied,
        rollout: &crate::model::Rollout,
        baseline: BTreeMap<String, (u64, u64)>,
    ) {
        let slots: Vec<String> = applied.overlay.plugins.keys().cloned().collect();
        let stored = (!slots.is_empty()).then(|| StoredWatch {
            deployment: applied.deployment.clone(),
            digest: applied.digest.clone(),
            slots,
            until_ms: holdfast_model::unix_ms() + rollout.watch_seconds * 1000,
            rollout: rollout.clone(),
            calls: 0,
            failures: 0,
        });
        if let Err(e) = self.store.set_watch(stored.as_ref(), true) {
            tracing::error!(error = %e, "deploy: cannot record the health watch");
        }
        self.current = stored.map(|stored| Watch {
            stored,
            baseline,
            last_sent: (0, 0),
            last_sent_ms: 0,
        });
    }

    /// Stops watching; `sync`: durably at once.
    pub(crate) fn stop(&mut self, sync: bool) {
        self.current = None;
        if let Err(e) = self.store.set_watch(None, sync) {
            tracing::error!(error = %e, "deploy: cannot record the health watch");
        }
    }

    /// Looks at the watched slots' counters (`counters`, asked only when
    /// something is watched). The watch ends after `watch_seconds`, and
    /// goes on while fewer than `min_calls` calls were seen (a plugin that
    /// fails on its first calls an hour later is still rolled back).
    pub(crate) fn observe(
        &mut self,
        applied: Option<&Applied>,
        counters: impl FnOnce() -> BTreeMap<String, (u64, u64)>,
        now: u64,
    ) -> Observation {
        let Some(w) = self.current.clone() else {
            return Observation::Idle;
        };
        let Some(applied) = applied else {
            return Observation::Idle;
        };
        if applied.deployment != w.stored.deployment || applied.digest != w.stored.digest {
            self.current = None;
            let _ = self.store.set_watch(None, false);
            return Observation::Idle;
        }
        let counters = counters();
        let (mut calls, mut failures) = (w.stored.calls, w.stored.failures);
        for slot in &w.stored.slots {
            let (c, f) = counters.get(slot).copied().unwrap_or_default();
            let (c0, f0) = w.baseline.get(slot).copied().unwrap_or_default();
            calls += c.saturating_sub(c0);
            failures += f.saturating_sub(f0);
        }
        let r = &w.stored.rollout;
        if calls >= r.min_calls && failures as f64 > r.max_failure_rate * calls as f64 {
            let reason = format!(
                "{} of {calls} calls to {} failed (trap, timeout or memory) since it was applied",
                failures,
                w.stored.slots.join(", ")
            );
            return Observation::Failing {
                calls,
                failures,
                reason,
            };
        }
        // The counts are stored when they go up.
        let due = (calls, failures) != w.last_sent && now.saturating_sub(w.last_sent_ms) >= 2000;
        if due {
            let snapshot = StoredWatch {
                calls,
                failures,
                ..w.stored.clone()
            };
            if let Err(e) = self.store.set_watch(Some(&snapshot), false) {
                tracing::error!(error = %e, "deploy: cannot record the health watch");
            }
            if let Some(w) = self.current.as_mut() {
                w.last_sent = (calls, failures);
                w.last_sent_ms = now;
            }
        }
        if now >= w.stored.until_ms && (calls >= r.min_calls || r.release_without_traffic) {
            self.current = None;
            let _ = self.store.set_watch(None, false);
        }
        Observation::Healthy { calls, failures, due }
    }
}
