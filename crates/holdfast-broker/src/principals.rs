//! Connections by principal, and revoking them when the registry says so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use holdfast_model::identity::IdentityDirectory as _;
use holdfast_registry::Registry;
use tokio::sync::{Notify, watch};

/// The connections authenticated as each principal.
pub(crate) struct Principals {
    /// Connection id → its revocation signal, by principal id.
    map: Mutex<HashMap<String, HashMap<u64, Arc<Notify>>>>,
    /// Where identities are looked up and revocations come from.
    registry: Arc<Registry>,
}

impl Principals {
    /// No connections yet; identities from `registry`.
    pub(crate) fn new(registry: Arc<Registry>) -> Principals {
        Principals {
            map: Mutex::new(HashMap::new()),
            registry,
        }
    }

    /// Registers connection `conn_id` as authenticated as `principal`; the
    /// returned signal fires when its credentials are revoked.
    pub(crate) fn register(&self, principal: &str, conn_id: u64) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut map = holdfast_model::lock(&self.map);
        map.entry(principal.to_string())
            .or_default()
            .insert(conn_id, notify.clone());
        notify
    }

    /// Forgets connection `conn_id`.
    pub(crate) fn unregister(&self, principal: &str, conn_id: u64) {
        let mut map = holdfast_model::lock(&self.map);
        if let Some(conns) = map.get_mut(principal) {
            conns.remove(&conn_id);
            if conns.is_empty() {
                map.remove(principal);
            }
        }
    }

    /// Disconnects every connection authenticated as one of `ids`; returns
    /// how many were told to leave.
    pub(crate) fn revoke(&self, ids: &[String]) -> usize {
        let map = holdfast_model::lock(&self.map);
        let mut n = 0;
        for id in ids {
            for notify in map.get(id).into_iter().flat_map(HashMap::values) {
                notify.notify_one();
                n += 1;
            }
        }
        n
    }

    /// Disconnects connections whose identity is gone or disabled (after
    /// revocations were missed).
    pub(crate) fn revoke_stale(&self) -> usize {
        let ids: Vec<String> = holdfast_model::lock(&self.map).keys().cloned().collect();
        let stale: Vec<String> = ids
            .into_iter()
            .filter(|id| id != "anonymous" && !self.registry.lookup(id).is_some_and(|i| i.enabled))
            .collect();
        self.revoke(&stale)
    }

    /// Runs until `stop`: disconnects clients whose credentials the
    /// registry revokes.
    pub(crate) async fn watch_revocations(&self, mut stop: watch::Receiver<bool>) {
        let mut revocations = self.registry.revocations();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = revocations.recv() => match r {
                    Ok(ids) => {
                        let n = self.revoke(&ids);
                        if n > 0 {
                            tracing::info!(ids = ?ids, connections = n, "disconnecting clients whose credentials changed");
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        let n = self.revoke_stale();
                        tracing::warn!(missed, disconnected = n, "missed registry revocations; rechecked every connection");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}
