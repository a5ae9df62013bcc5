//! On-disk layout of the range cache: blocks as files under
//! `<cache_dir>/<object id in hex>/<block number>`, and the index in the
//! fjall space `cache-index`:
//!
//! - `o\0<key>` → [`ObjRecord`] (JSON): the object's id and validator;
//! - `b\0<id u64 BE><block u32 BE>` → block length (u64 LE).
//!
//! A block file is written as `<n>.part`, synced, renamed, and only then
//! recorded in the index: the index is what makes a block visible, so a
//! crash can leave an unsynced file behind but never index one. Files the
//! index does not name are deleted when the cache opens.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::range::Validator;
use super::rfc9111::{Freshness, Vary};
use holdfast_store::{Batch, Durability, Space, Store, StoreError};

/// The index space and the store that commits to it.
#[derive(Debug, Clone)]
pub struct Index {
    store: Store,
    space: Space,
}

impl Index {
    /// Opens the `cache-index` space.
    ///
    /// # Errors
    /// Storage errors.
    pub fn open(store: &Store) -> Result<Index, StoreError> {
        Ok(Index {
            store: store.clone(),
            space: store.space("cache-index")?,
        })
    }

    fn batch(&self) -> Batch {
        self.store.batch()
    }
}

/// The freshness class of a stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Served without revalidation.
    Immutable,
    /// Revalidated with the origin after its TTL.
    Revalidate,
}

/// What the index keeps per object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjRecord {
    /// Storage id: names the block directory; a new version gets a new id.
    pub id: u64,
    /// The version the blocks belong to.
    pub validator: Validator,
    /// Content-Type from the origin.
    pub content_type: Option<String>,
    /// When the origin last confirmed this version, Unix seconds.
    pub fetched_at: u64,
    /// Freshness class.
    pub class: Class,
    /// Freshness lifetime of a `revalidate` object, seconds.
    pub ttl: u32,
    /// Last use, Unix seconds (LRU order across restarts).
    pub last_used: u64,
    /// Block size the blocks were stored with.
    pub block_size: u64,
    /// Freshness (RFC 9111); absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freshness: Option<Freshness>,
    /// The origin's end-to-end response fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The request fields the response was selected by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vary: Option<Vary>,
}

/// The object's block directory.
pub fn obj_dir(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}"))
}

/// A stored block's file.
pub fn block_path(dir: &Path, id: u64, block: u32) -> PathBuf {
    obj_dir(dir, id).join(block.to_string())
}

/// The file a block is written to before it is synced.
pub fn part_path(dir: &Path, id: u64, block: u32) -> PathBuf {
    obj_dir(dir, id).join(format!("{block}.part"))
}

fn okey(key: &str) -> Vec<u8> {
    let mut k = b"o\0".to_vec();
    k.extend_from_slice(key.as_bytes());
    k
}

fn bkey(id: u64, block: u32) -> Vec<u8> {
    let mut k = b"b\0".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k
}

/// Writes an object's record.
pub fn put_object(index: &Index, key: &str, rec: &ObjRecord) -> Result<(), StoreError> {
    let value = serde_json::to_vec(rec).unwrap_or_default();
    let mut b = index.batch();
    b.insert(&index.space, okey(key), value);
    b.commit(Durability::Buffered)
}

/// Records a synced block.
pub fn put_block(index: &Index, id: u64, block: u32, len: u64) -> Result<(), StoreError> {
    let mut b = index.batch();
    b.insert(&index.space, bkey(id, block), len.to_le_bytes().to_vec());
    b.commit(Durability::Buffered)
}

/// Removes an object's record (when `key` is given) and its blocks' records,
/// then its directory.
pub fn remove_object(index: &Index, dir: &Path, key: Option<&str>, id: u64) -> Result<(), StoreError> {
    let mut b = index.batch();
    if let Some(key) = key {
        b.remove(&index.space, okey(key));
    }
    for item in index.space.range(bkey(id, 0)..=bkey(id, u32::MAX)) {
        let (k, _) = item?;
        b.remove(&index.space, k);
    }
    b.commit(Durability::Buffered)?;
    let _ = std::fs::remove_dir_all(obj_dir(dir, id));
    Ok(())
}

/// What [`load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Objects with their stored blocks (number → length).
    pub objects: Vec<(String, ObjRecord, BTreeMap<u32, u64>)>,
    /// The next free object id.
    pub next_id: u64,
    /// Files and directories removed because the index does not name them.
    pub removed_files: usize,
}

/// Reads the index, drops records of another block size or without their
/// object, and deletes files the index does not name.
pub fn load(index: &Index, dir: &Path, block_size: u64) -> Result<Loaded, StoreError> {
    let mut out = Loaded::default();
    let mut objects: HashMap<u64, (String, ObjRecord, BTreeMap<u32, u64>)> = HashMap::new();
    let mut stale = index.batch();
    for item in index.space.range(b"o\0".to_vec()..b"o\x01".to_vec()) {
        let (k, v) = item?;
        let key = String::from_utf8_lossy(&k[2..]).into_owned();
        match serde_json::from_slice::<ObjRecord>(&v) {
            Ok(rec) if rec.block_size == block_size => {
                out.next_id = out.next_id.max(rec.id + 1);
                objects.insert(rec.id, (key, rec, BTreeMap::new()));
            }
            _ => stale.remove(&index.space, k),
        }
    }
    for item in index.space.range(b"b\0".to_vec()..b"b\x01".to_vec()) {
        let (k, v) = item?;
        let parsed = (k.len() == 14)
            .then(|| {
                let id = u64::from_be_bytes(k[2..10].try_into().ok()?);
                let block = u32::from_be_bytes(k[10..14].try_into().ok()?);
                let len = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
                Some((id, block, len))
            })
            .flatten();
        match parsed.and_then(|(id, block, len)| Some((objects.get_mut(&id)?, block, len))) {
            Some((obj, block, len)) if len > 0 && len <= block_size => {
                obj.2.insert(block, len);
            }
            _ => stale.remove(&index.space, k),
        }
    }
    stale.commit(Durability::Buffered)?;
    // Delete what the index does not name.
    let known: HashSet<String> = objects.keys().map(|id| format!("{id:016x}")).collect();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = known
                .contains(&name)
                .then(|| u64::from_str_radix(&name, 16).ok())
                .flatten()
            else {
                let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
                out.removed_files += 1;
                continue;
            };
            let blocks = objects.get(&id).map(|o| &o.2);
            if let Ok(files) = std::fs::read_dir(e.path()) {
                for f in files.flatten() {
                    let fname = f.file_name().to_string_lossy().into_owned();
                    let named = fname
                        .parse::<u32>()
                        .ok()
                        .is_some_and(|b| blocks.is_some_and(|m| m.contains_key(&b)));
                    if !named {
                        let _ = std::fs::remove_file(f.path());
                        out.removed_files += 1;
                    }
                }
            }
        }
    }
    out.objects = objects.into_values().collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_store::Store;

    #[test]
    fn load_keeps_indexed_blocks_and_deletes_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("store")).unwrap();
        let index = Index::open(&store).unwrap();
        let dir = tmp.path().join("cache");
        std::fs::create_dir_all(obj_dir(&dir, 7)).unwrap();
        std::fs::create_dir_all(obj_dir(&dir, 9)).unwrap();
        let rec = ObjRecord {
            id: 7,
            validator: Validator::new(Some("\"v\""), None, 10).unwrap(),
            content_type: None,
            fetched_at: 1,
            class: Class::Immutable,
            ttl: 0,
            last_used: 1,
            block_size: 4,
            freshness: None,
            headers: Vec::new(),
            vary: None,
        };
        put_object(&index, "k", &rec).unwrap();
        std::fs::write(block_path(&dir, 7, 0), b"abcd").unwrap();
        put_block(&index, 7, 0, 4).unwrap();
        std::fs::write(block_path(&dir, 7, 1), b"efgh").unwrap(); // never indexed
        std::fs::write(part_path(&dir, 7, 2), b"ij").unwrap();
        std::fs::write(block_path(&dir, 9, 0), b"zz").unwrap(); // unknown object
        put_block(&index, 9, 0, 2).unwrap(); // block of an unknown object
        let loaded = load(&index, &dir, 4).unwrap();
        assert_eq!(loaded.objects.len(), 1);
        assert_eq!(loaded.objects[0].2, BTreeMap::from([(0, 4)]));
        assert_eq!(loaded.next_id, 8);
        assert!(block_path(&dir, 7, 0).exists());
        assert!(!block_path(&dir, 7, 1).exists());
        assert!(!part_path(&dir, 7, 2).exists());
        assert!(!obj_dir(&dir, 9).exists());
        // Another block size drops everything.
        let loaded = load(&index, &dir, 8).unwrap();
        assert!(loaded.objects.is_empty());
        assert!(!obj_dir(&dir, 7).exists());
        remove_object(&index, &dir, Some("k"), 7).unwrap();
    }
}
