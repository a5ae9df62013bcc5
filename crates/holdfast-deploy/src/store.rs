//! Where deployments are kept: the fjall space `deploy`, and component
//! files named by their hash.
//!
//! Keys of the space:
//!
//! | key | value |
//! |---|---|
//! | `own/<id>` | a deployment this node owns ([`Signed`]) |
//! | `up/<id>` | a deployment received from the parent ([`Signed`]) |
//! | `rep/<deployment>\0<node>` | the latest [`Report`] of a node |
//! | `applied` | what this node applied ([`Applied`]) |
//! | `bad/<id>\0<digest>` | content this node failed or rolled back (the reason) |
//! | `ancestors` | this node's ancestors, nearest first (JSON list) |
//! | `seen/<id>` | the highest revision of a deployment this node has held (decimal) |
//! | `watch` | the health watch of the applied deployment ([`StoredWatch`]) |
//! | `fleet/<node>` | a row of the fleet view (`crate::fleet`) |
//!
//! Components are files `<dir>/<sha256>`, written to a temporary name,
//! synced and renamed, and checked against their hash whenever they are
//! read.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DeployError;
use crate::model::{Report, Signed, sha256_hex, valid_sha256};
use holdfast_store::{Durability, Space, Store};

/// What a node applied, kept so that it starts with it without its parent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The deployment.
    pub deployment: String,
    /// Its content digest.
    pub digest: String,
    /// Its revision when applied.
    pub revision: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// What it sets (the overlay on the node's own config).
    pub overlay: crate::Overlay,
    /// Plugin versions in force afterwards, by slot.
    pub versions: BTreeMap<String, String>,
}

/// The health watch of the applied deployment as stored, so that a
/// restarted node goes on watching with what it had counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredWatch {
    /// The deployment.
    pub deployment: String,
    /// Its content digest.
    pub digest: String,
    /// The slots watched.
    pub slots: Vec<String>,
    /// When the watch ends, ms since the Unix epoch (it goes on while
    /// fewer than `rollout.min_calls` calls were seen).
    pub until_ms: u64,
    /// The thresholds.
    pub rollout: crate::model::Rollout,
    /// Calls to the watched slots counted so far.
    pub calls: u64,
    /// Of which failed.
    pub failures: u64,
}

/// The `deploy` space.
#[derive(Debug, Clone)]
pub struct DeployStore {
    store: Store,
    space: Space,
    blobs: PathBuf,
}

fn rep_key(deployment: &str, node: &str) -> Vec<u8> {
    format!("rep/{deployment}\0{node}").into_bytes()
}

impl DeployStore {
    /// Opens the space and the component directory.
    ///
    /// # Errors
    /// Storage or I/O errors.
    pub fn open(store: &Store, blobs: &Path) -> Result<DeployStore, DeployError> {
        std::fs::create_dir_all(blobs).map_err(|e| DeployError::Io(format!("{}: {e}", blobs.display())))?;
        Ok(DeployStore {
            store: store.clone(),
            space: store.space("deploy")?,
            blobs: blobs.to_path_buf(),
        })
    }

    fn prefixed(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, DeployError> {
        let start = prefix.as_bytes().to_vec();
        let mut end = start.clone();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut out = Vec::new();
        for kv in self.space.range(start..end) {
            let (k, v) = kv?;
            let k = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            out.push((k, v));
        }
        Ok(out)
    }

    /// Signed documents under `own/` or `up/`.
    pub fn docs(&self, owned: bool) -> Result<Vec<Signed>, DeployError> {
        let prefix = if owned { "own/" } else { "up/" };
        let mut out = Vec::new();
        for (id, v) in self.prefixed(prefix)? {
            match serde_json::from_slice(&v) {
                Ok(s) => out.push(s),
                Err(e) => tracing::error!(id, error = %e, "deploy: a stored deployment does not load; skipped"),
            }
        }
        Ok(out)
    }

    /// Stores an owned document of revision `revision` (and records the
    /// revision as seen, in the same batch). With `drop_reports`, every
    /// report of it goes too (a deletion).
    pub fn put_owned(&self, id: &str, signed: &Signed, revision: u64, drop_reports: bool) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        b.insert(&self.space, format!("own/{id}"), serde_json::to_vec(signed)?);
        b.insert(&self.space, format!("seen/{id}"), revision.to_string().into_bytes());
        if drop_reports {
            for (k, _) in self.prefixed(&format!("rep/{id}\0"))? {
                b.remove(&self.space, rep_key(id, &k));
            }
        }
        b.commit(Durability::SyncAll)?;
        Ok(())
    }

    /// Removes an owned document (an expired tombstone) and every report of
    /// it. The revision seen stays.
    pub fn remove_owned(&self, id: &str) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        b.remove(&self.space, format!("own/{id}"));
        for (k, _) in self.prefixed(&format!("rep/{id}\0"))? {
            b.remove(&self.space, rep_key(id, &k));
        }
        b.commit(Durability::SyncAll)?;
        Ok(())
    }

    /// Replaces every document received from the parent: `(id, document,
    /// revision)`. The revisions are recorded as seen in the same batch, so
    /// that no older revision is taken again, across restarts too.
    pub fn replace_received(&self, docs: &[(String, Signed, u64)]) -> Result<(), DeployError> {
        let seen = self.seen()?;
        let mut b = self.store.batch();
        for (id, _) in self.prefixed("up/")? {
            b.remove(&self.space, format!("up/{id}"));
        }
        for (id, s, revision) in docs {
            b.insert(&self.space, format!("up/{id}"), serde_json::to_vec(s)?);
            if seen.get(id).is_none_or(|r| r < revision) {
                b.insert(&self.space, format!("seen/{id}"), revision.to_string().into_bytes());
            }
        }
        b.commit(Durability::SyncAll)?;
        Ok(())
    }

    /// The highest revision held of each deployment id, ever.
    pub fn seen(&self) -> Result<BTreeMap<String, u64>, DeployError> {
        Ok(self
            .prefixed("seen/")?
            .into_iter()
            .filter_map(|(id, v)| Some((id, std::str::from_utf8(&v).ok()?.parse().ok()?)))
            .collect())
    }

    /// The stored health watch.
    pub fn watch(&self) -> Result<Option<StoredWatch>, DeployError> {
        Ok(match self.space.get(b"watch")? {
            Some(v) => serde_json::from_slice(&v).ok(),
            None => None,
        })
    }

    /// Stores the health watch (`None`: no watch). `sync`: wait for the
    /// disk (when it starts); otherwise buffered (the counts, every few
    /// seconds: a power cut loses at most those seconds of counting).
    pub fn set_watch(&self, watch: Option<&StoredWatch>, sync: bool) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        match watch {
            Some(w) => b.insert(&self.space, "watch", serde_json::to_vec(w)?),
            None => b.remove(&self.space, "watch"),
        }
        b.commit(if sync {
            Durability::SyncAll
        } else {
            Durability::Buffered
        })?;
        Ok(())
    }

    /// Every stored report.
    pub fn reports(&self) -> Result<Vec<Report>, DeployError> {
        Ok(self
            .prefixed("rep/")?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Stores reports (buffered: a lost report is made again).
    pub fn put_reports(&self, reports: &[Report]) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        for r in reports {
            b.insert(&self.space, rep_key(&r.deployment, &r.node), serde_json::to_vec(r)?);
        }
        b.commit(Durability::Buffered)?;
        Ok(())
    }

    /// Removes reports.
    pub fn remove_reports(&self, keys: &[(String, String)]) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        for (d, n) in keys {
            b.remove(&self.space, rep_key(d, n));
        }
        b.commit(Durability::Buffered)?;
        Ok(())
    }

    /// The fleet rows kept (a row that does not load is skipped, logged).
    pub(crate) fn fleet_rows(&self) -> Vec<crate::fleet::Kept> {
        let rows = match self.prefixed("fleet/") {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "fleet: the rows kept do not load");
                return Vec::new();
            }
        };
        rows.into_iter()
            .filter_map(|(node, v)| match serde_json::from_slice(&v) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::warn!(node, error = %e, "fleet: a row kept does not load; skipped");
                    None
                }
            })
            .collect()
    }

    /// Stores fleet rows and removes others (buffered: a lost change is
    /// reported again).
    pub(crate) fn put_fleet_rows(&self, rows: &[&crate::fleet::Kept], removed: &[String]) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        for k in rows {
            b.insert(
                &self.space,
                format!("fleet/{}", k.row.entry.node),
                serde_json::to_vec(k)?,
            );
        }
        for n in removed {
            b.remove(&self.space, format!("fleet/{n}"));
        }
        b.commit(Durability::Buffered)?;
        Ok(())
    }

    /// What this node applied.
    pub fn applied(&self) -> Result<Option<Applied>, DeployError> {
        Ok(match self.space.get(b"applied")? {
            Some(v) => serde_json::from_slice(&v).ok(),
            None => None,
        })
    }

    /// Records what this node applied (`None`: its own config only).
    pub fn set_applied(&self, applied: Option<&Applied>) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        match applied {
            Some(a) => b.insert(&self.space, "applied", serde_json::to_vec(a)?),
            None => b.remove(&self.space, "applied"),
        }
        b.commit(Durability::SyncAll)?;
        Ok(())
    }

    /// The overlay this node applied last, if its components are intact:
    /// what a restarted node starts with, before it hears from its parent.
    /// A damaged component clears it (the deployment is fetched again).
    pub fn startup_overlay(&self) -> Option<crate::Overlay> {
        let applied = self.applied().ok().flatten()?;
        for (slot, s) in &applied.overlay.plugins {
            if let Some(sha) = &s.sha256
                && let Err(e) = self.read_blob(sha)
            {
                tracing::error!(deployment = %applied.deployment, slot, error = %e,
                    "deploy: the applied component is damaged; starting without the deployment");
                let _ = self.set_applied(None);
                return None;
            }
        }
        Some(applied.overlay)
    }

    /// Content this node will not apply again: `(id, digest) → reason`.
    pub fn bad(&self) -> Result<BTreeMap<(String, String), String>, DeployError> {
        Ok(self
            .prefixed("bad/")?
            .into_iter()
            .filter_map(|(k, v)| {
                let (id, digest) = k.split_once('\0')?;
                Some((
                    (id.to_string(), digest.to_string()),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect())
    }

    /// Records content this node will not apply again.
    pub fn put_bad(&self, id: &str, digest: &str, reason: &str) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        b.insert(&self.space, format!("bad/{id}\0{digest}"), reason.as_bytes().to_vec());
        b.commit(Durability::SyncAll)?;
        Ok(())
    }

    /// This node's ancestors, nearest first.
    pub fn ancestors(&self) -> Result<Vec<String>, DeployError> {
        Ok(match self.space.get(b"ancestors")? {
            Some(v) => serde_json::from_slice(&v).unwrap_or_default(),
            None => Vec::new(),
        })
    }

    /// Records this node's ancestors.
    pub fn set_ancestors(&self, ancestors: &[String]) -> Result<(), DeployError> {
        let mut b = self.store.batch();
        b.insert(&self.space, "ancestors", serde_json::to_vec(ancestors)?);
        b.commit(Durability::SyncAll)?;
        Ok(())
    }

    /// Where a component's file is.
    pub fn blob_path(&self, sha: &str) -> PathBuf {
        self.blobs.join(sha)
    }

    /// True when the component's file exists (its bytes are checked when read).
    pub fn has_blob(&self, sha: &str) -> bool {
        valid_sha256(sha) && self.blob_path(sha).is_file()
    }

    /// Reads a component and checks its hash.
    ///
    /// # Errors
    /// Missing, unreadable, or bytes that do not match the hash (the file is
    /// then removed so that it is fetched again).
    pub fn read_blob(&self, sha: &str) -> Result<Vec<u8>, DeployError> {
        if !valid_sha256(sha) {
            return Err(DeployError::Invalid(format!("{sha:?} is not a SHA-256")));
        }
        let path = self.blob_path(sha);
        let bytes = std::fs::read(&path).map_err(|e| DeployError::Io(format!("{}: {e}", path.display())))?;
        let got = sha256_hex(&bytes);
        if got != sha {
            let _ = std::fs::remove_file(&path);
            return Err(DeployError::HashMismatch {
                want: sha.to_string(),
                got,
            });
        }
        Ok(bytes)
    }

    /// Stores a component whose bytes must hash to `sha`.
    ///
    /// # Errors
    /// A hash mismatch, or I/O errors.
    pub fn put_blob(&self, sha: &str, bytes: &[u8]) -> Result<(), DeployError> {
        let got = sha256_hex(bytes);
        if got != sha {
            return Err(DeployError::HashMismatch {
                want: sha.to_string(),
                got,
            });
        }
        let path = self.blob_path(sha);
        let tmp = self.blobs.join(format!(".{sha}.tmp"));
        let io = |e: std::io::Error| DeployError::Io(format!("{}: {e}", tmp.display()));
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(&self.blobs) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes component files not in `keep`.
    pub fn retain_blobs(&self, keep: &std::collections::BTreeSet<String>) {
        let Ok(dir) = std::fs::read_dir(&self.blobs) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if valid_sha256(&name) && !keep.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
