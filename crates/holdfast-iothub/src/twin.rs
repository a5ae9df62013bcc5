//! Device and module twins: desired and reported properties, versioned,
//! stored in the `twins` space.
//!
//! The node that owns the registry owns the desired properties; a node with
//! a parent keeps a replica of them for its scope, updated by the parent
//! (see [`crate::link::service`]). Reported properties are written where
//! the device is connected; a node with a parent also keeps the merged patch
//! it has not yet pushed up (`pending`), so a week of offline patches goes
//! up as one.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, watch};

use holdfast_store::{Durability, Space, Store, StoreError};

/// IoT Hub's limits on twin documents.
pub mod limits {
    /// Deepest nesting of objects (and arrays) below the root of desired or
    /// reported: `{"1": {"2": … {"10": {"p": 1}}}}` is the deepest allowed.
    pub const MAX_DEPTH: usize = 10;
    /// Longest key, UTF-8 bytes.
    pub const MAX_KEY_BYTES: usize = 1024;
    /// Longest string value, UTF-8 bytes.
    pub const MAX_STRING_BYTES: usize = 4096;
    /// Largest desired or reported document, serialized without whitespace.
    pub const MAX_DOC_BYTES: usize = 32 * 1024;
}

/// A twin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    /// Desired properties.
    pub desired: Map<String, Value>,
    /// Version of the desired properties.
    pub desired_version: u64,
    /// Reported properties.
    pub reported: Map<String, Value>,
    /// Version of the reported properties on this node.
    pub reported_version: u64,
    /// Reported changes the parent has not acknowledged, merged (nulls kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Map<String, Value>>,
    /// Bumped at every change of `pending`.
    #[serde(default)]
    pub pending_gen: u64,
    /// The last patch generation applied from each child gateway, so a
    /// patch resent after a lost acknowledgement is applied once.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied: BTreeMap<String, u64>,
}

impl Default for Twin {
    fn default() -> Twin {
        Twin {
            desired: Map::new(),
            desired_version: 1,
            reported: Map::new(),
            reported_version: 1,
            pending: None,
            pending_gen: 0,
            applied: BTreeMap::new(),
        }
    }
}

fn with_version(doc: &Map<String, Value>, version: u64) -> Value {
    let mut d = doc.clone();
    d.insert("$version".into(), Value::from(version));
    Value::Object(d)
}

impl Twin {
    /// The document a device gets for `$iothub/twin/GET`.
    pub fn device_view(&self) -> Value {
        serde_json::json!({
            "desired": with_version(&self.desired, self.desired_version),
            "reported": with_version(&self.reported, self.reported_version),
        })
    }
}

/// Why a twin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TwinError {
    /// The patch breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// The document would exceed the size limit.
    #[error("{0}")]
    TooLarge(String),
    /// No such identity.
    #[error("no identity {0}")]
    NotFound(String),
    /// Desired properties are set at the node that owns the registry.
    #[error("desired properties are owned by the parent; change them there")]
    Replica,
    /// Storage.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TwinError {
    /// The status code IoT Hub would answer with.
    pub fn status(&self) -> u16 {
        match self {
            TwinError::Invalid(_) => 400,
            TwinError::TooLarge(_) => 413,
            TwinError::NotFound(_) => 404,
            TwinError::Replica => 409,
            TwinError::Store(_) => 500,
        }
    }
}

/// Checks a patch (nulls allowed: they delete).
///
/// # Errors
/// [`TwinError::Invalid`] naming the offending key.
pub fn validate_patch(patch: &Value) -> Result<&Map<String, Value>, TwinError> {
    let Value::Object(map) = patch else {
        return Err(TwinError::Invalid("a twin patch must be a JSON object".into()));
    };
    check_object(map, 1, "")?;
    Ok(map)
}

fn check_object(map: &Map<String, Value>, depth: usize, path: &str) -> Result<(), TwinError> {
    for (k, v) in map {
        let here = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if k.is_empty() || k.len() > limits::MAX_KEY_BYTES {
            return Err(TwinError::Invalid(format!(
                "key {here:?}: keys are 1 to {} bytes",
                limits::MAX_KEY_BYTES
            )));
        }
        if k.chars().any(|c| c.is_control() || c == '.' || c == '$' || c == ' ') {
            return Err(TwinError::Invalid(format!(
                "key {here:?}: keys may not contain control characters, '.', '$' or spaces"
            )));
        }
        check_value(v, depth, &here)?;
    }
    Ok(())
}

fn check_value(v: &Value, depth: usize, here: &str) -> Result<(), TwinError> {
    match v {
        Value::String(s) if s.len() > limits::MAX_STRING_BYTES => Err(TwinError::Invalid(format!(
            "{here}: string values are at most {} bytes",
            limits::MAX_STRING_BYTES
        ))),
        Value::Object(_) | Value::Array(_) if depth > limits::MAX_DEPTH => Err(TwinError::Invalid(format!(
            "{here}: nesting deeper than {} levels",
            limits::MAX_DEPTH
        ))),
        Value::Object(m) => check_object(m, depth + 1, here),
        Value::Array(a) => a.iter().try_for_each(|x| check_value(x, depth + 1, here)),
        _ => Ok(()),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Applies a JSON merge patch (RFC 7386): null deletes, objects merge.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => match target.get_mut(k) {
                Some(Value::Object(t)) => merge(t, p),
                _ => {
                    target.insert(k.clone(), strip_nulls(v));
                }
            },
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Folds patch `later` into patch `earlier`, keeping nulls, so applying the
/// result equals applying both in order.
pub fn compose(earlier: &mut Map<String, Value>, later: &Map<String, Value>) {
    for (k, v) in later {
        match (earlier.get_mut(k), v) {
            (Some(Value::Object(e)), Value::Object(l)) => compose(e, l),
            _ => {
                earlier.insert(k.clone(), v.clone());
            }
        }
    }
}

/// The merge patch that turns `old` into `new`.
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        out.insert(k.clone(), Value::Null);
    }
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(Value::Object(o)), Value::Object(n)) => {
                let d = diff(o, n);
                if !d.is_empty() {
                    out.insert(k.clone(), Value::Object(d));
                }
            }
            (Some(o), n) if o == n => {}
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

fn check_size(doc: &Map<String, Value>, what: &str) -> Result<(), TwinError> {
    let len = serde_json::to_vec(doc).map_or(usize::MAX, |v| v.len());
    if len > limits::MAX_DOC_BYTES {
        return Err(TwinError::TooLarge(format!(
            "{what} properties would be {len} bytes; the limit is {}",
            limits::MAX_DOC_BYTES
        )));
    }
    Ok(())
}

/// A desired change to tell a device and the child gateways about.
#[derive(Debug, Clone)]
pub struct DesiredChange {
    /// Twin id.
    pub id: String,
    /// The new version.
    pub version: u64,
    /// The patch from the previous version.
    pub patch: Map<String, Value>,
}

/// The twins of this node.
pub struct Twins {
    store: Store,
    space: Space,
    map: RwLock<HashMap<String, Twin>>,
    replica: bool,
    desired: broadcast::Sender<DesiredChange>,
    pending: watch::Sender<u64>,
}

impl std::fmt::Debug for Twins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twins")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Twins {
    /// Opens the twins; `replica` when a parent owns the desired properties.
    ///
    /// # Errors
    /// Storage.
    pub fn open(store: &Store, replica: bool) -> Result<Twins, StoreError> {
        let space = store.space("twins")?;
        let mut map = HashMap::new();
        for kv in space.range::<std::ops::RangeFull>(..) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k).into_owned();
            match serde_json::from_slice::<Twin>(&v) {
                Ok(t) => {
                    map.insert(id, t);
                }
                Err(e) => tracing::error!(twin = %id, error = %e, "twins: skipping an undecodable twin"),
            }
        }
        Ok(Twins {
            store: store.clone(),
            space,
            map: RwLock::new(map),
            replica,
            desired: broadcast::channel(1024).0,
            pending: watch::channel(0).0,
        })
    }

    /// True when a parent owns the desired properties.
    pub fn is_replica(&self) -> bool {
        self.replica
    }

    /// How many twins have been written.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// True when none has.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Twin>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Twin>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The twin of `id` (a new, empty one if none was written).
    pub fn get(&self, id: &str) -> Twin {
        self.read().get(id).cloned().unwrap_or_default()
    }

    /// Desired changes, as they happen.
    pub fn desired_changes(&self) -> broadcast::Receiver<DesiredChange> {
        self.desired.subscribe()
    }

    /// Ticks whenever a pending reported patch changes.
    pub fn pending_changes(&self) -> watch::Receiver<u64> {
        self.pending.subscribe()
    }

    fn save(&self, id: &str, twin: &Twin) -> Result<(), TwinError> {
        let mut batch = self.store.batch();
        let json = serde_json::to_vec(twin).map_err(|e| TwinError::Invalid(e.to_string()))?;
        batch.insert(&self.space, id.as_bytes().to_vec(), json);
        batch.commit(Durability::SyncAll)?;
        Ok(())
    }

    /// Merges a reported patch from the device (or from a child gateway);
    /// returns the new reported version. On a replica the patch is also
    /// kept to push up.
    ///
    /// # Errors
    /// Invalid or too large, storage.
    pub fn patch_reported(&self, id: &str, patch: &Value) -> Result<u64, TwinError> {
        self.apply_reported(id, patch, None)
    }

    /// [`Twins::patch_reported`] for the merged patch of generation
    /// `generation` from child gateway `child`; one it already applied
    /// changes nothing.
    ///
    /// # Errors
    /// As [`Twins::patch_reported`].
    pub fn patch_reported_from(&self, child: &str, generation: u64, id: &str, patch: &Value) -> Result<u64, TwinError> {
        self.apply_reported(id, patch, Some((child, generation)))
    }

    fn apply_reported(&self, id: &str, patch: &Value, from: Option<(&str, u64)>) -> Result<u64, TwinError> {
        let patch = validate_patch(patch)?;
        let mut map = self.write();
        let mut twin = map.get(id).cloned().unwrap_or_default();
        if let Some((child, generation)) = from {
            if twin.applied.get(child).is_some_and(|g| *g >= generation) {
                return Ok(twin.reported_version);
            }
            twin.applied.insert(child.to_string(), generation);
        }
        merge(&mut twin.reported, patch);
        check_size(&twin.reported, "reported")?;
        twin.reported_version += 1;
        if self.replica {
            compose(twin.pending.get_or_insert_with(Map::new), patch);
            twin.pending_gen += 1;
        }
        self.save(id, &twin)?;
        let version = twin.reported_version;
        map.insert(id.to_string(), twin);
        drop(map);
        if self.replica {
            self.pending.send_modify(|n| *n += 1);
        }
        Ok(version)
    }

    /// Merges a desired patch (the owner's admin API); returns the new version.
    ///
    /// # Errors
    /// On a replica, invalid or too large, storage.
    pub fn patch_desired(&self, id: &str, patch: &Value) -> Result<u64, TwinError> {
        if self.replica {
            return Err(TwinError::Replica);
        }
        let patch = validate_patch(patch)?;
        let mut map = self.write();
        let mut twin = map.get(id).cloned().unwrap_or_default();
        let old = twin.desired.clone();
        merge(&mut twin.desired, patch);
        check_size(&twin.desired, "desired")?;
        twin.desired_version += 1;
        self.save(id, &twin)?;
        let version = twin.desired_version;
        let change = DesiredChange {
            id: id.to_string(),
            version,
            patch: diff(&old, &twin.desired),
        };
        map.insert(id.to_string(), twin);
        drop(map);
        let _ = self.desired.send(change);
        Ok(version)
    }

    /// Replaces the desired properties with the parent's; returns the change
    /// if the version differs.
    ///
    /// # Errors
    /// Storage.
    pub fn set_desired(
        &self,
        id: &str,
        version: u64,
        desired: Map<String, Value>,
    ) -> Result<Option<DesiredChange>, TwinError> {
        let mut map = self.write();
        let mut twin = map.get(id).cloned().unwrap_or_default();
        if twin.desired_version == version && twin.desired == desired {
            return Ok(None);
        }
        let patch = diff(&twin.desired, &desired);
        twin.desired = desired;
        twin.desired_version = version;
        self.save(id, &twin)?;
        map.insert(id.to_string(), twin);
        drop(map);
        let change = DesiredChange {
            id: id.to_string(),
            version,
            patch,
        };
        let _ = self.desired.send(change.clone());
        Ok(Some(change))
    }

    /// Every pending reported patch: `(id, generation, patch)`.
    pub fn pending(&self) -> Vec<(String, u64, Map<String, Value>)> {
        self.read()
            .iter()
            .filter_map(|(id, t)| t.pending.as_ref().map(|p| (id.clone(), t.pending_gen, p.clone())))
            .collect()
    }

    /// The parent stored the pending patch of generation `generation`; it is
    /// dropped unless it changed since.
    ///
    /// # Errors
    /// Storage.
    pub fn acknowledge(&self, id: &str, generation: u64) -> Result<(), TwinError> {
        let mut map = self.write();
        let Some(twin) = map.get(id) else {
            return Ok(());
        };
        if twin.pending_gen != generation || twin.pending.is_none() {
            return Ok(());
        }
        let mut twin = twin.clone();
        twin.pending = None;
        self.save(id, &twin)?;
        map.insert(id.to_string(), twin);
        Ok(())
    }

    /// The desired properties of every twin in `ids` that has any.
    pub fn desired_of<'a>(&self, ids: impl Iterator<Item = &'a String>) -> Vec<(String, u64, Map<String, Value>)> {
        let map = self.read();
        ids.filter_map(|id| map.get(id).map(|t| (id.clone(), t.desired_version, t.desired.clone())))
            .collect()
    }

    /// Forgets the twins of identities `keep` says are gone; returns how many.
    ///
    /// # Errors
    /// Storage.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Result<usize, TwinError> {
        let mut map = self.write();
        let gone: Vec<String> = map.keys().filter(|id| !keep(id)).cloned().collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let mut batch = self.store.batch();
        for id in &gone {
            batch.remove(&self.space, id.as_bytes().to_vec());
        }
        batch.commit(Durability::SyncAll)?;
        for id in &gone {
            map.remove(id);
        }
        Ok(gone.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn merge_compose_and_diff_agree() {
        let base = obj(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}));
        let p1 = obj(json!({"a": null, "b": {"c": 5}, "f": {"g": null, "h": 1}}));
        let p2 = obj(json!({"b": {"d": null}, "a": 7}));
        let mut step = base.clone();
        merge(&mut step, &p1);
        assert_eq!(
            Value::Object(step.clone()),
            json!({"b": {"c": 5, "d": 3}, "e": [1, 2], "f": {"h": 1}})
        );
        merge(&mut step, &p2);
        let mut composed = p1.clone();
        compose(&mut composed, &p2);
        let mut once = base.clone();
        merge(&mut once, &composed);
        assert_eq!(once, step);
        let d = diff(&base, &step);
        let mut via_diff = base.clone();
        merge(&mut via_diff, &d);
        assert_eq!(via_diff, step);
        assert!(diff(&step, &step).is_empty());
    }

    #[test]
    fn limits_are_enforced() {
        // The patch itself, then ten nested objects, the last holding a value: allowed.
        let deep = (0..12).fold(json!(1), |v, _| json!({ "x": v }));
        assert!(
            validate_patch(&deep)
                .unwrap_err()
                .to_string()
                .contains("deeper than 10")
        );
        let ok = (0..11).fold(json!(1), |v, _| json!({ "x": v }));
        validate_patch(&ok).unwrap();
        for bad in [
            json!({"a.b": 1}),
            json!({"$x": 1}),
            json!({"a b": 1}),
            json!({"": 1}),
            json!([1]),
        ] {
            assert_eq!(validate_patch(&bad).unwrap_err().status(), 400, "{bad}");
        }
        let long = json!({ "k".repeat(1025): 1 });
        assert!(validate_patch(&long).is_err());
        assert!(validate_patch(&json!({"s": "v".repeat(4097)})).is_err());
        validate_patch(&json!({"s": "v".repeat(4096)})).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, false).unwrap();
        for i in 0..8 {
            twins
                .patch_reported("d", &json!({ format!("k{i}"): "v".repeat(4000) }))
                .unwrap();
        }
        let e = twins.patch_reported("d", &json!({"k9": "v".repeat(4000)})).unwrap_err();
        assert_eq!(e.status(), 413, "{e}");
        assert_eq!(twins.get("d").reported_version, 9, "a refused patch changes nothing");
    }

    #[test]
    fn replica_keeps_one_merged_pending_patch_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let twins = Twins::open(&store, true).unwrap();
            assert_eq!(twins.patch_reported("d", &json!({"a": 1, "b": 1})).unwrap(), 2);
            twins.patch_reported("d", &json!({"a": null, "c": {"x": 1}})).unwrap();
            assert_eq!(twins.patch_desired("d", &json!({"a": 1})).unwrap_err().status(), 409);
            let ch = twins.set_desired("d", 5, obj(json!({"mode": "eco"}))).unwrap().unwrap();
            assert_eq!((ch.version, Value::Object(ch.patch)), (5, json!({"mode": "eco"})));
            assert!(
                twins
                    .set_desired("d", 5, obj(json!({"mode": "eco"})))
                    .unwrap()
                    .is_none()
            );
        }
        let store = Store::open(dir.path()).unwrap();
        let twins = Twins::open(&store, true).unwrap();
        let pending = twins.pending();
        assert_eq!(pending.len(), 1);
        let (id, generation, patch) = &pending[0];
        assert_eq!(
            (id.as_str(), Value::Object(patch.clone())),
            ("d", json!({"a": null, "b": 1, "c": {"x": 1}}))
        );
        twins.patch_reported("d", &json!({"b": 2})).unwrap();
        twins.acknowledge("d", *generation).unwrap();
        assert_eq!(twins.pending().len(), 1, "a newer patch is not dropped by an older ack");
        let generation = twins.pending()[0].1;
        twins.acknowledge("d", generation).unwrap();
        assert!(twins.pending().is_empty());
        twins.patch_reported("gone", &json!({"a": 1})).unwrap();
        assert_eq!(twins.retain(|id| id != "gone").unwrap(), 1);
        assert_eq!(twins.len(), 1);
        let t = twins.get("d");
        assert_eq!(Value::Object(t.reported), json!({"b": 2, "c": {"x": 1}}));
        assert_eq!(t.desired_version, 5);

        // A parent applies each generation from a child once.
        let v = twins.patch_reported_from("gw1", 7, "d", &json!({"b": 3})).unwrap();
        assert_eq!(twins.patch_reported_from("gw1", 7, "d", &json!({"b": 3})).unwrap(), v);
        assert_eq!(twins.patch_reported_from("gw1", 6, "d", &json!({"b": 1})).unwrap(), v);
        assert_eq!(
            twins.patch_reported_from("gw2", 1, "d", &json!({"b": 4})).unwrap(),
            v + 1
        );
    }
}
