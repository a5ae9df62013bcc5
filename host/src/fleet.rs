//! The node's side of the fleet view (`holdfast_deploy::fleet`): its own
//! row, made every [`SAMPLE`] from the subsystems, and the view served at
//! `GET /api/v1/fleet`: every node of the subtree in tree order, with its
//! state, filtered by state, label, subtree or a search.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::state::NodeState;
use holdfast_broker::Broker;
use holdfast_deploy::Deployer;
use holdfast_deploy::fleet::{FleetEntry, FleetLane, FleetPlugin, FleetRow, FleetState};
use holdfast_iothub::Hub;
use holdfast_link::Status;
use holdfast_outbox::Outbox;
use holdfast_plugins::PluginHost;
use holdfast_registry::Registry;

/// How often the node's own row is made.
pub const SAMPLE: Duration = Duration::from_secs(2);

/// What the fleet view reads of the node.
#[derive(Clone)]
pub struct FleetSources {
    node: String,
    parent: String,
    link: Arc<Status>,
    outbox: Arc<Outbox>,
    plugins: Arc<PluginHost>,
    deploy: Arc<Deployer>,
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    broker: Option<Arc<Broker>>,
    store: holdfast_store::Store,
    metrics: Arc<crate::metrics::HostMetrics>,
}

impl axum::extract::FromRef<Arc<NodeState>> for FleetSources {
    fn from_ref(n: &Arc<NodeState>) -> Self {
        FleetSources {
            node: n.config.node.id.clone(),
            parent: n.config.upstream.quic.parent_id.clone(),
            link: n.link.clone(),
            outbox: n.outbox.clone(),
            plugins: n.plugins.clone(),
            deploy: n.deploy.clone(),
            registry: n.registry.clone(),
            hub: n.hub.clone(),
            broker: n.broker.clone(),
            store: n.store.clone(),
            metrics: n.metrics.clone(),
        }
    }
}

impl FleetSources {
    /// The fleet table.
    pub fn fleet(&self) -> &Arc<holdfast_deploy::fleet::Fleet> {
        self.deploy.fleet()
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }
}

/// This node's row as it stands.
pub fn own_entry(n: &FleetSources) -> FleetEntry {
    let link = n.link.snapshot();
    let now = holdfast_model::unix_ms();
    let health = n.outbox.lane_health();
    let lanes = n
        .outbox
        .stats()
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let h = health.get(i).copied().unwrap_or_default();
            (s.messages > 0 || h.stuck).then(|| FleetLane {
                lane: u8::try_from(i).unwrap_or(u8::MAX),
                messages: s.messages,
                bytes: s.bytes,
                // A time, rounded to 10 s, so that the row does not change
                // while nothing moves.
                oldest_ms: s.oldest_age_ms.map(|age| now.saturating_sub(age) / 10_000 * 10_000),
                drain_per_s: h.drain_per_s.round() as u64,
                time_to_drain_s: h.time_to_drain_s.map(|t| t.ceil() as u64),
                stuck: h.stuck,
            })
        })
        .collect();
    let plugins = n
        .plugins
        .list()
        .into_iter()
        .map(|s| FleetPlugin {
            slot: s.slot.as_str().to_string(),
            version: s.version.chars().take(12).collect(),
            failures: s.traps,
        })
        .collect();
    let deployment = n
        .deploy
        .local_status()
        .applied
        .map(|a| format!("{}@{}", a.deployment, a.revision));
    let state = serde_json::to_value(link.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    FleetEntry {
        node: n.node.clone(),
        parent: (link.kind == "quic").then(|| n.parent.clone()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        labels: n.registry.entry(&n.node).map(|e| e.labels).unwrap_or_default(),
        link: state,
        link_since_ms: link.since_ms,
        lanes,
        c2d_queued: n.hub.c2d().queues().iter().map(|(_, q)| *q as u64).sum(),
        clients: n.broker.as_ref().map_or(0, |b| b.connections() as u64),
        plugins,
        deployment,
        disk_bytes: n.store.disk_space().unwrap_or(0),
        outbox_bytes: n.outbox.stats().iter().map(|s| s.bytes).sum(),
        quota_bytes: n.outbox.max_bytes(),
    }
}

/// Makes the node's own row every [`SAMPLE`] until it stops.
pub async fn sample_task(node: FleetSources, stopped: watch::Receiver<bool>) {
    crate::node::every(SAMPLE, stopped, move || {
        let fleet = node.deploy.fleet();
        fleet.set_own(own_entry(&node));
        let mut by_state = [0u64; 5];
        for (row, _) in fleet.rows() {
            by_state[row.state().0 as usize] += 1;
        }
        for (state, n) in FleetState::ALL.iter().zip(by_state) {
            node.metrics.set_fleet_nodes(state.as_str(), n);
        }
    })
    .await;
}

/// What `GET /api/v1/fleet` filters on.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// States (`ok`, `warning`, `stuck`, `offline`, `not-reporting`,
    /// `unknown`); empty: all.
    pub states: BTreeSet<String>,
    /// Labels every node shown carries.
    pub labels: BTreeMap<String, String>,
    /// Only this node and the nodes under it.
    pub subtree: Option<String>,
    /// Nodes whose id contains this (case-insensitive).
    pub search: Option<String>,
}

/// One node of the view.
struct Node {
    row: FleetRow,
    via: Option<String>,
    state: String,
    reasons: Vec<String>,
}

/// The view of the subtree, in tree order (each node after its parent,
/// siblings by id), with a count per state over the nodes shown.
pub fn view(n: &FleetSources, filter: &Filter) -> Value {
    let now = holdfast_model::unix_ms();
    let me = n.node.clone();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for (mut row, via) in n.deploy.fleet().rows() {
        // The registry here (the root's is the fleet's) has the last word on labels.
        if let Some(e) = n.registry.entry(&row.entry.node) {
            row.entry.labels.extend(e.labels);
        }
        let (state, reasons) = row.state();
        nodes.insert(
            row.entry.node.clone(),
            Node {
                state: state.as_str().to_string(),
                reasons,
                row,
                via,
            },
        );
    }
    // Before its first sample, and for children that send no rows (an
    // older version), the node still shows what it knows.
    if !nodes.contains_key(&me) {
        let row = FleetRow {
            entry: own_entry(n),
            reporting: true,
            since_ms: now,
        };
        let (state, reasons) = row.state();
        nodes.insert(
            me.clone(),
            Node {
                state: state.as_str().to_string(),
                reasons,
                row,
                via: None,
            },
        );
    }
    for (child, info) in n.link.snapshot().children {
        nodes.entry(child.clone()).or_insert_with(|| Node {
            row: FleetRow {
                entry: FleetEntry {
                    node: child.clone(),
                    parent: Some(me.clone()),
                    link: "up".into(),
                    link_since_ms: info.since_ms,
                    ..FleetEntry::default()
                },
                reporting: true,
                since_ms: info.since_ms,
            },
            via: Some(child.clone()),
            state: "unknown".into(),
            reasons: vec!["connected, sends no fleet rows (a version before them)".into()],
        });
    }
    // Tree order: from this node down; nodes whose parent is not listed
    // come after, as roots of their own.
    let mut children: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (id, node) in &nodes {
        if let Some(p) = &node.row.entry.parent
            && nodes.contains_key(p)
            && *id != me
        {
            children.entry(p.clone()).or_default().push(id.clone());
        }
    }
    let mut order: Vec<(String, usize)> = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let tops: Vec<String> = std::iter::once(me.clone())
        .chain(nodes.iter().filter_map(|(id, node)| {
            let orphan = node.row.entry.parent.as_ref().is_none_or(|p| !nodes.contains_key(p));
            (orphan && *id != me).then(|| id.clone())
        }))
        .collect();
    for top in tops {
        let mut stack = vec![(top, 0usize)];
        while let Some((id, depth)) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(kids) = children.get(&id) {
                stack.extend(kids.iter().rev().map(|k| (k.clone(), depth + 1)));
            }
            order.push((id, depth));
        }
    }
    // Nodes in a parent cycle (never by design) are listed too.
    for id in nodes.keys() {
        if !seen.contains(id) {
            order.push((id.clone(), 0));
        }
    }
    let in_subtree: Option<BTreeSet<String>> = filter.subtree.as_ref().map(|top| {
        let mut set = BTreeSet::new();
        let mut todo = vec![top.clone()];
        while let Some(id) = todo.pop() {
            if set.insert(id.clone())
                && let Some(kids) = children.get(&id)
            {
                todo.extend(kids.iter().cloned());
            }
        }
        set.retain(|id| nodes.contains_key(id));
        set
    });
    let search = filter.search.as_ref().map(|s| s.to_lowercase());
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    let mut out = Vec::new();
    for (id, depth) in order {
        let Some(node) = nodes.get(&id) else { continue };
        let e = &node.row.entry;
        if !filter.states.is_empty() && !filter.states.contains(&node.state)
            || !filter.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v))
            || in_subtree.as_ref().is_some_and(|s| !s.contains(&id))
            || search.as_ref().is_some_and(|s| !id.to_lowercase().contains(s))
        {
            continue;
        }
        *by_state.entry(node.state.clone()).or_default() += 1;
        let messages: u64 = e.lanes.iter().map(|l| l.messages).sum();
        let oldest = e.lanes.iter().filter_map(|l| l.oldest_ms).min();
        out.push(json!({
            "node": id,
            "depth": depth,
            "parent": e.parent,
            "via": node.via,
            "state": node.state,
            "reasons": node.reasons,
            "reporting": node.row.reporting,
            "since_ms": node.row.since_ms,
            "last_contact_ms": if node.row.reporting { now } else { node.row.since_ms },
            "version": e.version,
            "labels": e.labels,
            "link": e.link,
            "link_since_ms": e.link_since_ms,
            "backlog_messages": messages,
            "backlog_bytes": e.lanes.iter().map(|l| l.bytes).sum::<u64>(),
            "oldest_age_s": oldest.map(|t| now.saturating_sub(t) / 1000),
            "drain_per_s": e.lanes.iter().map(|l| l.drain_per_s).sum::<u64>(),
            "time_to_drain_s": e.lanes.iter().filter_map(|l| l.time_to_drain_s).max(),
            "lanes": e.lanes,
            "c2d_queued": e.c2d_queued,
            "clients": e.clients,
            "plugins": e.plugins,
            "deployment": e.deployment,
            "disk_bytes": e.disk_bytes,
            "outbox_bytes": e.outbox_bytes,
            "quota_bytes": e.quota_bytes,
        }));
    }
    json!({
        "node": me,
        "now_ms": now,
        "report_seconds": n.deploy.fleet().report_every.as_secs(),
        "summary": { "nodes": out.len(), "by_state": by_state },
        "nodes": out,
    })
}
