//! Retained messages: the last retained message per topic, kept in memory
//! and in the store, up to `mqtt.max_retained` topics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use holdfast_mqtt::topic;

use crate::metrics::BrokerMetrics;
use crate::now_ms;
use crate::persist::Persist;
use crate::session::Msg;

/// The retained messages by topic.
pub(crate) struct Retained {
    map: RwLock<HashMap<String, Arc<Msg>>>,
    /// Most topics with a retained message (a reload changes it).
    pub(crate) max: AtomicU64,
    persist: Arc<Persist>,
    metrics: Arc<BrokerMetrics>,
}

impl Retained {
    /// The retained messages restored from the store, at most `max` topics
    /// for new ones.
    pub(crate) fn new(restored: Vec<Msg>, max: usize, persist: Arc<Persist>, metrics: Arc<BrokerMetrics>) -> Retained {
        let map: HashMap<String, Arc<Msg>> = restored.into_iter().map(|m| (m.topic.clone(), Arc::new(m))).collect();
        metrics.set_retained(map.len());
        Retained {
            map: RwLock::new(map),
            max: AtomicU64::new(max as u64),
            persist,
            metrics,
        }
    }

    /// Topics with a retained message.
    pub(crate) fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Keeps `msg` as its topic's retained message; an empty payload clears it.
    pub(crate) fn set(&self, msg: &Arc<Msg>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if msg.payload.is_empty() {
            map.remove(&msg.topic);
        } else {
            if map.len() as u64 >= self.max.load(Ordering::Relaxed) && !map.contains_key(&msg.topic) {
                drop(map);
                self.metrics.denied("retained-limit");
                return;
            }
            // A copy, so the retained message does not pin a connection's read buffer.
            let mut own = (**msg).clone();
            own.payload = Bytes::copy_from_slice(&msg.payload);
            map.insert(msg.topic.clone(), Arc::new(own));
        }
        self.metrics.set_retained(map.len());
        if let Err(e) = self.persist.put_retained(msg) {
            tracing::error!(error = %e, topic = %msg.topic, "cannot store a retained message");
        }
    }

    /// Retained messages matching `filter`, leaving out expired ones.
    pub(crate) fn matching(&self, filter: &str) -> Vec<Arc<Msg>> {
        let now = now_ms();
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|m| topic::matches(filter, &m.topic) && m.expires_at_ms.is_none_or(|e| e > now))
            .cloned()
            .collect()
    }
}
