//! Twins as devices connected here see them: `$iothub/twin/GET`, reported
//! patches (`$iothub/twin/PATCH/properties/reported`), and desired changes
//! sent to them as they come. The twins themselves are [`Twins`].

use std::sync::Arc;

use holdfast_registry::Registry;
use serde_json::Value;

use crate::clients::Port;
use crate::metrics::IothubMetrics;
use crate::twin::{DesiredChange, Twins};

/// The device side of this node's twins.
pub(crate) struct DeviceTwins {
    twins: Arc<Twins>,
    registry: Arc<Registry>,
    clients: Port,
    events: IothubMetrics,
}

impl DeviceTwins {
    /// Twins answered to devices through `clients`; `registry` says which
    /// identities still exist.
    pub(crate) fn new(twins: Arc<Twins>, registry: Arc<Registry>, clients: Port, events: IothubMetrics) -> DeviceTwins {
        DeviceTwins {
            twins,
            registry,
            clients,
            events,
        }
    }

    /// `$iothub/twin/GET` from `client_id`, authenticated as `own`: its twin.
    pub(crate) fn get(&self, client_id: &str, own: Option<&str>, rid: &str) {
        self.events.count("twin-get");
        let (status, body) = match own {
            Some(id) => (200, self.twins.get(id).device_view().to_string()),
            None => (401, r#"{"error":"anonymous clients have no twin"}"#.to_string()),
        };
        self.clients.send_to(
            client_id,
            format!("$iothub/twin/res/{status}/?$rid={rid}"),
            body.into_bytes(),
        );
    }

    /// A reported patch from `client_id`, authenticated as `own`: stored
    /// (fsynced) before it is answered.
    pub(crate) fn patch_reported(self: &Arc<Self>, client_id: &str, own: Option<&str>, rid: String, payload: &[u8]) {
        self.events.count("twin-patch-reported");
        let parsed = serde_json::from_slice::<Value>(payload);
        let (me, client, own) = (self.clone(), client_id.to_string(), own.map(str::to_string));
        // The patch is fsynced before it is answered. On the multi-thread
        // runtime the connection waits for it (its other work moves to
        // another thread), so its next request sees the patch; otherwise
        // it goes to a blocking thread.
        let work = move || {
            let result = match (own, parsed) {
                (None, _) => Err((401, "anonymous clients have no twin".to_string())),
                (_, Err(e)) => Err((400, format!("the patch is not JSON: {e}"))),
                (Some(id), Ok(patch)) => me
                    .twins
                    .patch_reported(&id, &patch)
                    .map_err(|e| (e.status(), e.to_string())),
            };
            let (topic, body) = match result {
                Ok(version) => (
                    format!("$iothub/twin/res/204/?$rid={rid}&$version={version}"),
                    Vec::new(),
                ),
                Err((status, why)) => {
                    me.events.count("twin-refused");
                    tracing::debug!(client = %client, %why, "twin: reported patch refused");
                    let body = serde_json::json!({ "error": why }).to_string();
                    (format!("$iothub/twin/res/{status}/?$rid={rid}"), body.into_bytes())
                }
            };
            me.clients.send_to(&client, topic, body);
        };
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi {
            tokio::task::block_in_place(work);
        } else {
            tokio::task::spawn_blocking(work);
        }
    }

    /// Tells a device connected here about a desired change.
    fn notify_desired(&self, change: &DesiredChange) {
        let mut body = change.patch.clone();
        body.insert("$version".into(), Value::from(change.version));
        if self.clients.send_to(
            &change.id,
            format!("$iothub/twin/PATCH/properties/desired/?$version={}", change.version),
            Value::Object(body).to_string().into_bytes(),
        ) {
            self.events.count("twin-desired-notified");
        }
    }

    /// Runs until `stop`: sends desired changes to the devices connected
    /// here, and drops the twins of identities removed from the registry.
    pub(crate) async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.twins.desired_changes();
        let mut registry = self.registry.changes();
        registry.mark_changed();
        loop {
            let mut removals = false;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                r = registry.changed() => match r {
                    Ok(()) => removals = true,
                    Err(_) => return,
                },
                c = changes.recv() => match c {
                    Ok(change) => self.notify_desired(&change),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "twins: desired changes were missed; devices get them at their next GET");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
            if removals {
                let (twins, registry) = (self.twins.clone(), self.registry.clone());
                let removed = tokio::task::spawn_blocking(move || {
                    use holdfast_model::identity::IdentityDirectory as _;
                    twins.retain(|id| registry.lookup(id).is_some())
                })
                .await;
                match removed {
                    Ok(Ok(n)) if n > 0 => tracing::info!(twins = n, "twins of removed identities deleted"),
                    Ok(Err(e)) => tracing::error!(error = %e, "twins: cannot delete the twins of removed identities"),
                    _ => {}
                }
            }
        }
    }
}
