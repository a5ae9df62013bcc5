//! The fleet view: every node of this node's subtree with what an operator
//! watches (link, backlog per lane, drain, cloud-to-device queue, clients,
//! plugins, deployment, disk, version), carried up the link on the deploy
//! stream ([`crate::proto::Msg::Fleet`], for parents that announce the
//! `fleet` feature).
//!
//! Each node keeps a table of rows: its own, made by the host every few
//! seconds ([`Fleet::set_own`]), and those its children sent
//! ([`Fleet::receive`]). A row carries a sequence number of the last
//! change; the child's end of the deploy stream sends the rows changed
//! since its last message, at most once per `deploy.fleet_report_seconds`,
//! all of them again on each new connection. So a parent gets one message
//! per child and interval whatever the size of the child's subtree, with
//! only what changed; an idle fleet sends nothing.
//!
//! A node is never dropped from the table silently: when the stream to a
//! child ends, every row that came through it is marked *not reporting*
//! since that moment (and the change goes up like any other), until the
//! child reports again. Only an operator removes a row ([`Fleet::forget`]),
//! and the removal goes up too. Rows are kept in the `deploy` space, so a
//! restarted node still lists the nodes it cannot hear.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::store::DeployStore;
use holdfast_registry::Registry;

/// Rows per [`crate::proto::Msg::Fleet`] message, so that a frame stays
/// far below the stream's limit (a row is a few hundred bytes).
pub const MAX_ROWS_PER_MESSAGE: usize = 1000;

/// What a node says about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetEntry {
    /// The node.
    pub node: String,
    /// Its parent, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Holdfast's version.
    pub version: String,
    /// Its labels (its own registry entry's, where it has one).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The upstream link: `root`, `connecting`, `up`, `down`.
    pub link: String,
    /// In that state since, ms since the Unix epoch.
    pub link_since_ms: u64,
    /// The lanes holding messages (or stuck), in lane order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lanes: Vec<FleetLane>,
    /// Cloud-to-device messages queued for devices here.
    pub c2d_queued: u64,
    /// Connected MQTT clients.
    pub clients: u64,
    /// The plugins in force.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<FleetPlugin>,
    /// The deployment applied, as `id@revision`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// Bytes the node's store takes on disk.
    pub disk_bytes: u64,
    /// Bytes the outbox holds.
    pub outbox_bytes: u64,
    /// The outbox's quota, bytes.
    pub quota_bytes: u64,
}

/// One lane of a node's outbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetLane {
    /// The lane.
    pub lane: u8,
    /// Messages held.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When the oldest was stored, ms since the Unix epoch (a time, not an
    /// age, so that a row does not change while nothing moves).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_ms: Option<u64>,
    /// Messages drained per second (rounded).
    pub drain_per_s: u64,
    /// Seconds to drain at that rate; absent while nothing drains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_drain_s: Option<u64>,
    /// Its oldest message has not moved for `outbox.stuck_after_seconds`
    /// of link time.
    pub stuck: bool,
}

/// One plugin slot of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetPlugin {
    /// The slot.
    pub slot: String,
    /// The version in force (the start of its hash).
    pub version: String,
    /// Failed calls (traps, timeouts) of that version.
    pub failures: u64,
}

/// A row of the table, as it crosses the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRow {
    /// What the node said last.
    pub entry: FleetEntry,
    /// The path from the node up to here is whole.
    pub reporting: bool,
    /// Since when it reports, or since when it does not (the last
    /// contact), ms since the Unix epoch.
    pub since_ms: u64,
}

/// How a node fares, for colours and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FleetState {
    /// Reporting, linked, nothing stuck.
    Ok,
    /// Reporting, with something to look at (see the reasons).
    Warning,
    /// A lane does not move while its link is up.
    Stuck,
    /// Its own upstream link is down (seen on the node itself).
    Offline,
    /// The path to it is cut: shown with the time of the last contact.
    NotReporting,
}

impl FleetState {
    /// Every state, in the order of their discriminants.
    pub const ALL: [FleetState; 5] = [
        FleetState::Ok,
        FleetState::Warning,
        FleetState::Stuck,
        FleetState::Offline,
        FleetState::NotReporting,
    ];

    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FleetState::Ok => "ok",
            FleetState::Warning => "warning",
            FleetState::Stuck => "stuck",
            FleetState::Offline => "offline",
            FleetState::NotReporting => "not-reporting",
        }
    }
}

impl FleetRow {
    /// The row's state and why.
    pub fn state(&self) -> (FleetState, Vec<String>) {
        if !self.reporting {
            return (FleetState::NotReporting, vec!["the path to the node is cut".into()]);
        }
        let e = &self.entry;
        if e.link == "down" || e.link == "connecting" {
            return (FleetState::Offline, vec![format!("its upstream link is {}", e.link)]);
        }
        let stuck: Vec<String> = e
            .lanes
            .iter()
            .filter(|l| l.stuck)
            .map(|l| format!("lane {} is stuck", l.lane))
            .collect();
        if !stuck.is_empty() {
            return (FleetState::Stuck, stuck);
        }
        let mut why = Vec::new();
        if e.quota_bytes > 0 && e.outbox_bytes.saturating_mul(10) >= e.quota_bytes.saturating_mul(9) {
            why.push(format!("the outbox is {}% full", e.outbox_bytes * 100 / e.quota_bytes));
        }
        for p in e.plugins.iter().filter(|p| p.failures > 0) {
            why.push(format!("{} plugin: {} failed calls", p.slot, p.failures));
        }
        if why.is_empty() {
            (FleetState::Ok, why)
        } else {
            (FleetState::Warning, why)
        }
    }
}

/// A row as kept here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Kept {
    pub(crate) row: FleetRow,
    /// The child it came through; `None` for this node's own.
    pub(crate) via: Option<String>,
    /// Sequence number of its last change.
    #[serde(skip)]
    pub(crate) seq: u64,
}

#[derive(Default)]
struct Table {
    rows: BTreeMap<String, Kept>,
    /// Rows forgotten, with the sequence number of the removal (so that
    /// the removal goes up).
    forgotten: BTreeMap<String, u64>,
    seq: u64,
    /// The current stream of each child.
    streams: BTreeMap<String, u64>,
    next_stream: u64,
}

impl Table {
    fn bump(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// What changed since a sequence number: rows to send and nodes
/// forgotten.
#[derive(Debug, Default)]
pub struct Changes {
    /// The sequence number these go up to.
    pub seq: u64,
    /// Rows changed.
    pub rows: Vec<FleetRow>,
    /// Nodes forgotten.
    pub forgotten: Vec<String>,
}

/// This node's fleet table. See the module docs.
pub struct Fleet {
    node: String,
    store: DeployStore,
    /// Labels of the nodes it knows (its registry): added to the rows
    /// that come up, so that they go further with them.
    registry: Option<Arc<Registry>>,
    table: Mutex<Table>,
    changed: watch::Sender<u64>,
    /// How often at most a node sends changes up.
    pub report_every: std::time::Duration,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Opens the rows kept in `store`: every other node's is not reporting
    /// until its child says otherwise. `registry` adds labels to the rows
    /// that come up. (The deployer opens the node's own; benchmarks and
    /// tests open their own.)
    pub fn open(
        node: &str,
        store: DeployStore,
        registry: Option<Arc<Registry>>,
        report_every: std::time::Duration,
    ) -> Fleet {
        let now = holdfast_model::unix_ms();
        let mut table = Table::default();
        for mut k in store.fleet_rows() {
            if k.row.entry.node == node {
                continue;
            }
            if k.row.reporting {
                k.row.reporting = false;
                k.row.since_ms = now;
            }
            k.seq = table.bump();
            table.rows.insert(k.row.entry.node.clone(), k);
        }
        Fleet {
            node: node.to_string(),
            store,
            registry,
            table: Mutex::new(table),
            changed: watch::channel(0).0,
            report_every,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        holdfast_model::lock(&self.table)
    }

    /// Changes to the table (the sequence number).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stores rows and says they changed.
    fn changed(&self, t: &Table, nodes: &[String], removed: &[String]) {
        let kept: Vec<&Kept> = nodes.iter().filter_map(|n| t.rows.get(n)).collect();
        if let Err(e) = self.store.put_fleet_rows(&kept, removed) {
            tracing::warn!(error = %e, "fleet: rows not stored");
        }
        let seq = t.seq;
        self.changed.send_replace(seq);
    }

    /// This node's own entry, made by the host.
    pub fn set_own(&self, mut entry: FleetEntry) {
        entry.node = self.node.clone();
        let mut t = self.lock();
        if t.rows.get(&self.node).is_some_and(|k| k.row.entry == entry) {
            return;
        }
        let since_ms = t
            .rows
            .get(&self.node)
            .map_or_else(holdfast_model::unix_ms, |k| k.row.since_ms);
        let seq = t.bump();
        t.rows.insert(
            self.node.clone(),
            Kept {
                row: FleetRow {
                    entry,
                    reporting: true,
                    since_ms,
                },
                via: None,
                seq,
            },
        );
        t.forgotten.remove(&self.node);
        let node = self.node.clone();
        self.changed(&t, &[node], &[]);
    }

    /// A stream from `child` begins; answers its number for
    /// [`Fleet::receive`] and [`Fleet::detach`].
    pub fn attach(&self, child: &str) -> u64 {
        let mut t = self.lock();
        t.next_stream += 1;
        let n = t.next_stream;
        t.streams.insert(child.to_string(), n);
        n
    }

    /// The stream `stream` from `child` ended: what came through it is not
    /// reporting from now on (unless a newer stream from the child took
    /// over already).
    pub fn detach(&self, child: &str, stream: u64) {
        let mut t = self.lock();
        if t.streams.get(child) != Some(&stream) {
            return;
        }
        t.streams.remove(child);
        let now = holdfast_model::unix_ms();
        let lost: Vec<String> = t
            .rows
            .iter()
            .filter(|(_, k)| k.via.as_deref() == Some(child) && k.row.reporting)
            .map(|(n, _)| n.clone())
            .collect();
        if lost.is_empty() {
            return;
        }
        for n in &lost {
            let seq = t.bump();
            if let Some(k) = t.rows.get_mut(n) {
                k.row.reporting = false;
                k.row.since_ms = now;
                k.seq = seq;
            }
        }
        tracing::info!(child, nodes = lost.len(), "fleet: a child's subtree stopped reporting");
        self.changed(&t, &lost, &[]);
    }

    /// Rows and removals from `child` on stream `stream`. Rows naming this
    /// node are ignored; a removal applies to a row that came through the
    /// child.
    pub fn receive(&self, child: &str, stream: u64, rows: Vec<FleetRow>, forgotten: Vec<String>) {
        let mut t = self.lock();
        if t.streams.get(child) != Some(&stream) {
            return;
        }
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        for mut row in rows {
            let node = row.entry.node.clone();
            if node == self.node || node.is_empty() {
                continue;
            }
            if let Some(e) = self.registry.as_ref().and_then(|r| r.entry(&node)) {
                row.entry.labels.extend(e.labels);
            }
            if t.rows
                .get(&node)
                .is_some_and(|k| k.row == row && k.via.as_deref() == Some(child))
            {
                continue;
            }
            let seq = t.bump();
            t.forgotten.remove(&node);
            t.rows.insert(
                node.clone(),
                Kept {
                    row,
                    via: Some(child.to_string()),
                    seq,
                },
            );
            changed.push(node);
        }
        for node in forgotten {
            if t.rows.get(&node).is_some_and(|k| k.via.as_deref() == Some(child)) {
                t.rows.remove(&node);
                let seq = t.bump();
                t.forgotten.insert(node.clone(), seq);
                removed.push(node);
            }
        }
        if !changed.is_empty() || !removed.is_empty() {
            self.changed(&t, &changed, &removed);
        }
    }

    /// Removes a node that does not report (an operator's decision: it was
    /// decommissioned or moved). The removal goes up.
    ///
    /// # Errors
    /// The node is unknown, is this node, or reports.
    pub fn forget(&self, node: &str) -> Result<(), crate::DeployError> {
        let mut t = self.lock();
        match t.rows.get(node) {
            None => return Err(crate::DeployError::NotFound(node.to_string())),
            Some(k) if k.row.reporting => {
                return Err(crate::DeployError::Conflict(format!(
                    "{node} reports; only a node that stopped reporting is forgotten"
                )));
            }
            Some(_) => {}
        }
        t.rows.remove(node);
        let seq = t.bump();
        t.forgotten.insert(node.to_string(), seq);
        self.changed(&t, &[], &[node.to_string()]);
        Ok(())
    }

    /// What changed after `seq`, at most `max` rows (the oldest changes
    /// first; the sequence number answered covers only what is returned).
    pub fn since(&self, seq: u64, max: usize) -> Changes {
        let t = self.lock();
        let mut rows: Vec<(u64, &Kept)> = t.rows.values().filter(|k| k.seq > seq).map(|k| (k.seq, k)).collect();
        rows.sort_by_key(|(s, _)| *s);
        let mut out = Changes {
            seq: t.seq,
            ..Changes::default()
        };
        if rows.len() > max {
            rows.truncate(max);
            out.seq = rows.last().map_or(seq, |(s, _)| *s);
        }
        out.rows = rows.into_iter().map(|(_, k)| k.row.clone()).collect();
        out.forgotten = t
            .forgotten
            .iter()
            .filter(|(_, s)| **s > seq && **s <= out.seq)
            .map(|(n, _)| n.clone())
            .collect();
        out
    }

    /// The last sequence number.
    pub fn seq(&self) -> u64 {
        self.lock().seq
    }

    /// Every row with the child it came through (`None`: this node).
    pub fn rows(&self) -> Vec<(FleetRow, Option<String>)> {
        self.lock()
            .rows
            .values()
            .map(|k| (k.row.clone(), k.via.clone()))
            .collect()
    }
}

#[cfg(test)]
#[path = "fleet_tests.rs"]
mod tests;
