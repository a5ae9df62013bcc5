//! The link's service streams as the hub sees them: one per connected
//! child gateway (method calls and cloud-to-device messages go down it)
//! and, on a node with a parent, the parent's (feedback goes up it).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use holdfast_model::lock;
use tokio::sync::mpsc;

use crate::service::Svc;

/// A connected child gateway's service stream.
#[derive(Clone)]
pub(crate) struct Downlink {
    /// Where its messages are queued.
    pub(crate) tx: mpsc::UnboundedSender<Svc>,
    /// It speaks link/2: durable cloud-to-device with acks and feedback.
    pub(crate) v2: bool,
    /// Messages sent down on this connection and not yet acknowledged.
    pub(crate) sent: Arc<Mutex<HashSet<String>>>,
}

/// The service streams of the connected child gateways and of the parent.
#[derive(Default)]
pub(crate) struct Links {
    /// By child gateway id.
    down: Mutex<HashMap<String, Downlink>>,
    /// The parent's, on a link/2 link.
    up: Mutex<Option<mpsc::UnboundedSender<Svc>>>,
}

impl Links {
    /// Child gateway `child` is connected, with service stream `tx`.
    pub(crate) fn add_downlink(&self, child: &str, tx: mpsc::UnboundedSender<Svc>, v2: bool) {
        let down = Downlink {
            tx,
            v2,
            sent: Arc::default(),
        };
        lock(&self.down).insert(child.to_string(), down);
    }

    /// Forgets `child`'s service stream, if it is still `tx`.
    pub(crate) fn remove_downlink(&self, child: &str, tx: &mpsc::UnboundedSender<Svc>) {
        let mut map = lock(&self.down);
        if map.get(child).is_some_and(|d| d.tx.same_channel(tx)) {
            map.remove(child);
        }
    }

    /// `child`'s service stream, if it is connected.
    pub(crate) fn downlink(&self, child: &str) -> Option<Downlink> {
        lock(&self.down).get(child).cloned()
    }

    /// Queues `m` for child `child`: false if it is not connected.
    pub(crate) fn send_down(&self, child: &str, m: Svc) -> bool {
        lock(&self.down).get(child).is_some_and(|d| d.tx.send(m).is_ok())
    }

    /// The parent's service stream is `tx` from now on.
    pub(crate) fn set_uplink(&self, tx: mpsc::UnboundedSender<Svc>) {
        *lock(&self.up) = Some(tx);
    }

    /// The parent's service stream `tx` ended (a newer one stays).
    pub(crate) fn clear_uplink(&self, tx: &mpsc::UnboundedSender<Svc>) {
        let mut up = lock(&self.up);
        if up.as_ref().is_some_and(|u| u.same_channel(tx)) {
            *up = None;
        }
    }

    /// Queues `m` for the parent, if its stream is up.
    pub(crate) fn send_up(&self, m: Svc) {
        if let Some(tx) = lock(&self.up).as_ref() {
            let _ = tx.send(m);
        }
    }
}
