//! Scope sync, the registry's service on the link: a parent sends each
//! connected child gateway every identity whose parent chain includes that
//! child, so the child can authenticate them with no upstream. [`ScopeSync`] implements the link's
//! [`LinkService`] port: the link opens the stream and frames the parts.
//!
//! On every connection the parent opens one unidirectional stream and
//! sends a full sync (in parts of [`PART_ENTRIES`] identities), then an
//! incremental change each time its registry changes in a way that touches
//! the child's scope. A child that applied a full sync replaces what it held
//! from before; identities it seeded from its own config stay. If the
//! child itself stops being a registered child of this node (disabled,
//! removed, moved), the parent closes the link.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use holdfast_metrics::ResultLabels;

use crate::RegistryMetrics;
use holdfast_model::IdentityDirectory;
use holdfast_model::ports::{BoxFuture, LinkService, ServiceStream, StreamMsg, StreamSend, scope_part as part};

use crate::{Delta, Registry, RegistryError, Scope};

/// Identities per part of a full sync.
pub const PART_ENTRIES: usize = 1000;
/// Changes arriving this close together go out as one.
const COALESCE: Duration = Duration::from_millis(20);
/// Largest SCOPE frame a child accepts.
const MAX_SCOPE_FRAME: usize = 16 << 20;

/// Scope sync on the link, for this node's registry.
#[derive(Debug)]
pub struct ScopeSync {
    registry: Arc<Registry>,
    metrics: RegistryMetrics,
    /// This node's id: the children it serves have it as their parent.
    node_id: String,
}

impl ScopeSync {
    /// Scope sync for `registry` at node `node_id`.
    pub fn new(registry: Arc<Registry>, metrics: RegistryMetrics, node_id: String) -> ScopeSync {
        ScopeSync {
            registry,
            metrics,
            node_id,
        }
    }

    fn count(&self, result: &'static str) {
        holdfast_metrics::handle(&self.metrics.registry_syncs, &ResultLabels { result }).inc();
    }
}

impl LinkService for ScopeSync {
    fn is_hello(&self, _first: &StreamMsg) -> bool {
        // The parent opens this stream.
        false
    }

    fn max_frame(&self) -> usize {
        MAX_SCOPE_FRAME
    }

    fn parent_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()> {
        Box::pin(serve(self, stream))
    }

    fn child_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()> {
        Box::pin(receive(self, stream))
    }
}

async fn send_part(send: &mut dyn StreamSend, p: u8, body: Vec<u8>) -> Result<(), String> {
    send.send(StreamMsg::Part(p, Bytes::from(body)))
        .await
        .map_err(|e| e.to_string())
}

async fn send_full(send: &mut dyn StreamSend, scope: &Scope) -> Result<(), String> {
    let entries: Vec<_> = scope.entries.values().collect();
    let mut chunks = entries.chunks(PART_ENTRIES).peekable();
    if chunks.peek().is_none() {
        let body = serde_json::to_vec(scope).map_err(|e| e.to_string())?;
        return send_part(send, part::FULL_END, body).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let piece = Scope {
            entries: chunk.iter().map(|e| (e.id.clone(), (*e).clone())).collect(),
            cas: if last { scope.cas.clone() } else { Default::default() },
        };
        let body = serde_json::to_vec(&piece).map_err(|e| e.to_string())?;
        send_part(send, if last { part::FULL_END } else { part::FULL_PART }, body).await?;
    }
    Ok(())
}

/// Parent side: sends the child its scope until the connection ends.
/// Closes the connection when the child is no longer a child here.
async fn serve(sync: Arc<ScopeSync>, stream: ServiceStream) {
    let ServiceStream {
        peer,
        mut send,
        mut recv,
    } = stream;
    let child = peer.peer_id().to_string();
    let registry = &sync.registry;
    let mut changes = registry.changes();
    changes.borrow_and_update();
    let mut sent = registry.scope(&child);
    if let Err(e) = send_full(&mut *send, &sent).await {
        tracing::debug!(child = %child, error = %e, "scope sync: the stream failed");
        return;
    }
    sync.count("sent-full");
    tracing::info!(child = %child, identities = sent.entries.len(), "scope sync: full sync sent");
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            // Nothing comes this way: it ends with the connection.
            _ = recv.recv() => return,
        }
        tokio::time::sleep(COALESCE).await;
        changes.borrow_and_update();
        if !registry.is_child_gateway(&child, &sync.node_id) {
            peer.revoke("no longer a registered child of this node");
            return;
        }
        let now = registry.scope(&child);
        let Some(delta) = now.delta_from(&sent) else {
            continue;
        };
        let body = match serde_json::to_vec(&delta) {
            Ok(b) => b,
            Err(_) => return,
        };
        if send_part(&mut *send, part::DELTA, body).await.is_err() {
            return;
        }
        sync.count("sent-delta");
        tracing::debug!(child = %child, upserts = delta.upserts.len(), removed = delta.removed.len(), "scope sync: change sent");
        sent = now;
    }
}

/// Child side: applies what the parent sends until the connection ends.
async fn receive(sync: Arc<ScopeSync>, stream: ServiceStream) {
    let ServiceStream { peer, mut recv, .. } = stream;
    let parent = peer.peer_id().to_string();
    let registry = &sync.registry;
    let mut pending = Scope::default();
    loop {
        let (p, body) = match recv.recv().await {
            Ok(Some(StreamMsg::Part(p, body))) => (p, body),
            Ok(Some(_)) => {
                sync.count("failed");
                peer.protocol_error("expected a scope frame");
                return;
            }
            Ok(None) => return,
            Err(e) => {
                sync.count("failed");
                tracing::warn!(error = %e, "scope sync: malformed frame from the parent");
                peer.protocol_error("malformed scope frame");
                return;
            }
        };
        let result = match p {
            part::FULL_PART | part::FULL_END => match serde_json::from_slice::<Scope>(&body) {
                Ok(piece) => {
                    pending.entries.extend(piece.entries);
                    pending.cas.extend(piece.cas);
                    if p == part::FULL_PART {
                        continue;
                    }
                    let full = std::mem::take(&mut pending);
                    let n = full.entries.len();
                    let (r, parent) = (registry.clone(), parent.clone());
                    let applied = tokio::task::spawn_blocking(move || r.apply_full(&parent, full)).await;
                    if let Ok(Ok(changed)) = &applied {
                        tracing::info!(identities = n, changed, "scope sync: full sync applied");
                    }
                    applied.map(|r| r.map(|_| "full"))
                }
                Err(e) => Ok(Err(RegistryError::Invalid(e.to_string()))),
            },
            _ => match serde_json::from_slice::<Delta>(&body) {
                Ok(delta) => {
                    let (r, parent) = (registry.clone(), parent.clone());
                    tokio::task::spawn_blocking(move || r.apply_delta(&parent, delta))
                        .await
                        .map(|r| r.map(|_| "delta"))
                }
                Err(e) => Ok(Err(RegistryError::Invalid(e.to_string()))),
            },
        };
        match result {
            Ok(Ok(kind)) => {
                sync.count(kind);
                sync.metrics.registry_identities.set(registry.len() as i64);
            }
            Ok(Err(e)) => {
                sync.count("failed");
                tracing::error!(error = %e, "scope sync: cannot apply what the parent sent");
                // Reconnecting brings a fresh full sync.
                peer.protocol_error("cannot apply scope");
                return;
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    //! Scope sync between two registries over an in-memory stream: the
    //! port lets the service run with no link and no sockets.

    use std::sync::Mutex;

    use holdfast_model::ports::{LinkPeer, StreamClosed, StreamRecv};
    use tokio::sync::mpsc;

    use super::*;
    use crate::{NewIdentity, Role};
    use holdfast_store::Store;

    /// One end of the connection: records how it was closed.
    struct Peer {
        id: &'static str,
        closed: Mutex<Option<String>>,
    }

    impl LinkPeer for Peer {
        fn peer_id(&self) -> &str {
            self.id
        }
        fn version(&self) -> u16 {
            3
        }
        fn protocol_error(&self, reason: &str) {
            *self.closed.lock().unwrap() = Some(format!("protocol: {reason}"));
        }
        fn revoke(&self, reason: &str) {
            *self.closed.lock().unwrap() = Some(format!("revoked: {reason}"));
        }
    }

    struct Tx(mpsc::UnboundedSender<StreamMsg>);
    impl StreamSend for Tx {
        fn send(&mut self, msg: StreamMsg) -> BoxFuture<'_, Result<(), StreamClosed>> {
            let r = self.0.send(msg).map_err(|_| StreamClosed);
            Box::pin(async move { r })
        }
    }

    struct Rx(mpsc::UnboundedReceiver<StreamMsg>);
    impl StreamRecv for Rx {
        fn recv(&mut self) -> BoxFuture<'_, Result<Option<StreamMsg>, String>> {
            Box::pin(async move { Ok(self.0.recv().await) })
        }
    }

    fn registry(dir: &std::path::Path, role: Role) -> Arc<Registry> {
        let store = Store::open(dir).unwrap();
        Arc::new(Registry::open(&store, "root", role).unwrap())
    }

    fn add(r: &Registry, id: &str, kind: &str, parent: Option<&str>) {
        r.add(NewIdentity {
            id: id.into(),
            kind: Some(kind.into()),
            parent: parent.map(str::to_string),
            ..NewIdentity::default()
        })
        .unwrap();
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_follows_its_scope_and_a_revoked_child_is_closed() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let owner = registry(d1.path(), Role::Owner);
        add(&owner, "gw1", "gateway", Some("root"));
        add(&owner, "dev1", "device", Some("gw1"));
        add(&owner, "other", "device", None);
        let replica = registry(d2.path(), Role::Replica { parent: "root".into() });
        let metrics = RegistryMetrics::default();
        let parent_sync = Arc::new(ScopeSync::new(owner.clone(), metrics.clone(), "root".into()));
        let child_sync = Arc::new(ScopeSync::new(replica.clone(), metrics.clone(), "gw1".into()));

        let (tx, rx) = mpsc::unbounded_channel();
        // The parent's receiving side ends with the connection: never here.
        let (_keep, idle) = mpsc::unbounded_channel();
        let to_child = Arc::new(Peer {
            id: "gw1",
            closed: Mutex::new(None),
        });
        let to_parent = Arc::new(Peer {
            id: "root",
            closed: Mutex::new(None),
        });
        let (unused_tx, _) = mpsc::unbounded_channel();
        let parent = tokio::spawn(parent_sync.parent_end(ServiceStream {
            peer: to_child.clone(),
            send: Box::new(Tx(tx)),
            recv: Box::new(Rx(idle)),
        }));
        let child = tokio::spawn(child_sync.child_end(ServiceStream {
            peer: to_parent.clone(),
            send: Box::new(Tx(unused_tx)),
            recv: Box::new(Rx(rx)),
        }));

        until("the full sync", || replica.lookup("dev1").is_some()).await;
        assert!(replica.lookup("other").is_none(), "outside gw1's scope");
        add(&owner, "dev2", "device", Some("gw1"));
        until("the delta", || replica.lookup("dev2").is_some()).await;
        assert_eq!(replica.sync_state().full_syncs, 1);

        // gw1 moves away from this node: the parent closes its link.
        owner.set_enabled("gw1", false).unwrap();
        tokio::time::timeout(Duration::from_secs(5), parent)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            to_child.closed.lock().unwrap().as_deref(),
            Some("revoked: no longer a registered child of this node")
        );
        // Its stream ends, and so does the child's end.
        tokio::time::timeout(Duration::from_secs(5), child)
            .await
            .unwrap()
            .unwrap();
        assert!(to_parent.closed.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn a_malformed_part_closes_the_link_as_a_protocol_error() {
        let d = tempfile::tempdir().unwrap();
        let replica = registry(d.path(), Role::Replica { parent: "root".into() });
        let sync = Arc::new(ScopeSync::new(replica, RegistryMetrics::default(), "gw1".into()));
        let (tx, rx) = mpsc::unbounded_channel();
        let (unused, _) = mpsc::unbounded_channel();
        let peer = Arc::new(Peer {
            id: "root",
            closed: Mutex::new(None),
        });
        tx.send(StreamMsg::Part(part::FULL_END, Bytes::from_static(b"not json")))
            .unwrap();
        sync.child_end(ServiceStream {
            peer: peer.clone(),
            send: Box::new(Tx(unused)),
            recv: Box::new(Rx(rx)),
        })
        .await;
        assert_eq!(
            peer.closed.lock().unwrap().as_deref(),
            Some("protocol: cannot apply scope")
        );
    }
}
