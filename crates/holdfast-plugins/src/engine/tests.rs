//! The compiled-plugin cache: damaged entries are refused and rebuilt, an
//! interrupted write leaves nothing that is ever loaded.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::compiled_cache::{Damage, FORMAT_VERSION, HEADER_LEN, check_entry, encode_entry};
use super::{Runtime, engine_fingerprint};
use crate::{PluginMetrics, SlotName, embedded_plugin};

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "holdfast-compiled-cache-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runtime(dir: &Path) -> Runtime {
    Runtime::new(4, 64 << 20, Some(dir.to_path_buf()))
        .unwrap()
        .with_metrics(&PluginMetrics::default())
}

fn source_of(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The one entry in `dir`.
fn entry(dir: &Path) -> PathBuf {
    let names = files(dir);
    assert_eq!(names.len(), 1, "{names:?}");
    dir.join(&names[0])
}

/// Compiles the embedded router with a fresh runtime (as a restart does) and
/// returns (hits, misses, damaged).
fn start(dir: &Path) -> (u64, u64, u64) {
    let rt = runtime(dir);
    let bytes = embedded_plugin(SlotName::Router);
    rt.compile(bytes, "").unwrap();
    let counts = rt.cache_counts();
    // What the node exports as holdfast_plugin_compiled_cache_total{result}.
    let m = &rt.cache_metrics;
    assert_eq!((m.hit.get(), m.compiled.get(), m.damaged.get()), counts);
    counts
}

#[test]
fn check_entry_refuses_every_kind_of_damage() {
    let (src, eng) = ([1u8; 32], [2u8; 32]);
    let body = b"serialized component bytes".as_slice();
    let good = encode_entry(&src, &eng, body);
    assert_eq!(check_entry(&good, &src, &eng), Ok(body));

    for len in [0, 7, 8, HEADER_LEN - 1, HEADER_LEN, good.len() - 1] {
        assert_eq!(
            check_entry(&good[..len], &src, &eng),
            Err(Damage::Truncated),
            "cut at {len}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    assert_eq!(check_entry(&longer, &src, &eng), Err(Damage::TrailingBytes));
    assert_eq!(check_entry(&[0x5a; 4096], &src, &eng), Err(Damage::BadMagic));
    assert_eq!(check_entry(b"garbage!", &src, &eng), Err(Damage::BadMagic));
    let mut version = good.clone();
    version[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    assert_eq!(check_entry(&version, &src, &eng), Err(Damage::OtherFormat));
    assert_eq!(check_entry(&good, &[9; 32], &eng), Err(Damage::OtherSource));
    assert_eq!(check_entry(&good, &src, &[9; 32]), Err(Damage::OtherEngine));
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert_eq!(check_entry(&flipped, &src, &eng), Err(Damage::Checksum));
    let mut zeroed = good;
    zeroed[HEADER_LEN..].fill(0);
    assert_eq!(check_entry(&zeroed, &src, &eng), Err(Damage::Checksum));
}

#[test]
fn entries_are_written_whole_and_loaded_on_the_next_start() {
    let dir = TempDir::new("roundtrip");
    assert_eq!(start(&dir.0), (0, 1, 0));
    // No temporary file is left, and the entry checks out.
    let path = entry(&dir.0);
    assert!(path.to_string_lossy().ends_with(".cwasm"), "{path:?}");
    let rt = runtime(&dir.0);
    let data = std::fs::read(&path).unwrap();
    let src = source_of(embedded_plugin(SlotName::Router));
    assert!(check_entry(&data, &src, &engine_fingerprint(&rt.engine)).is_ok());
    assert_eq!(start(&dir.0), (1, 0, 0));
}

/// Each kind of damage a power cut (or a stray write) can leave: the entry
/// is refused before wasmtime sees it, removed, counted, and rebuilt whole.
#[test]
fn damaged_entries_are_refused_removed_and_rebuilt() {
    type Damager = fn(&mut Vec<u8>);
    let cases: [(&str, Damager); 6] = [
        ("empty", |d| d.clear()),
        ("truncated in the header", |d| d.truncate(HEADER_LEN / 2)),
        ("truncated in the body", |d| d.truncate(d.len() - 1000)),
        ("garbage", |d| d.iter_mut().for_each(|b| *b = 0xa5)),
        // Every other byte intact: only the format version says no.
        ("another format version", |d| {
            d[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        }),
        ("a flipped body byte", |d| {
            let i = d.len() / 2;
            d[i] ^= 0x40;
        }),
    ];
    for (what, damage) in cases {
        let dir = TempDir::new("damaged");
        assert_eq!(start(&dir.0), (0, 1, 0), "{what}");
        let path = entry(&dir.0);
        let mut data = std::fs::read(&path).unwrap();
        damage(&mut data);
        std::fs::write(&path, &data).unwrap();

        assert_eq!(start(&dir.0), (0, 1, 1), "{what}: refused and rebuilt");
        assert_ne!(std::fs::read(entry(&dir.0)).unwrap(), data, "{what}: rewritten");
        assert_eq!(start(&dir.0), (1, 0, 0), "{what}: the rebuilt entry loads");
    }
}

/// A whole, correctly checksummed entry of another component placed under
/// this component's name is refused: it would deserialize fine.
#[test]
fn an_entry_of_other_wasm_bytes_is_never_loaded() {
    let dir = TempDir::new("other-source");
    let rt = runtime(&dir.0);
    rt.compile(embedded_plugin(SlotName::Auth), "").unwrap();
    let auth_entry = entry(&dir.0);
    let router_entry = dir.0.join(auth_entry.file_name().unwrap().to_string_lossy().replace(
        &hex::encode(source_of(embedded_plugin(SlotName::Auth))),
        &hex::encode(source_of(embedded_plugin(SlotName::Router))),
    ));
    std::fs::copy(&auth_entry, &router_entry).unwrap();
    assert_eq!(start(&dir.0), (0, 1, 1));
}

/// A write cut before its rename leaves only a temporary file: the next
/// start removes it, never loads it, and compiles.
#[test]
fn an_interrupted_write_leaves_nothing_that_is_loaded() {
    let dir = TempDir::new("interrupted");
    assert_eq!(start(&dir.0), (0, 1, 0));
    let path = entry(&dir.0);
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let whole = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    // A process that is gone (no such pid), one whole temporary file and one
    // torn one; and one of this process's pid (a container's pid 1 again).
    let dead = 999_999_999u32;
    std::fs::write(dir.0.join(format!(".{name}.{dead}.0.tmp")), &whole).unwrap();
    std::fs::write(dir.0.join(format!(".{name}.{dead}.1.tmp")), &whole[..whole.len() / 3]).unwrap();
    std::fs::write(dir.0.join(format!(".{name}.{}.7.tmp", std::process::id())), &whole).unwrap();

    let rt = runtime(&dir.0);
    assert!(
        files(&dir.0).is_empty(),
        "temporary files removed at start: {:?}",
        files(&dir.0)
    );
    rt.compile(embedded_plugin(SlotName::Router), "").unwrap();
    assert_eq!(
        rt.cache_counts(),
        (0, 1, 0),
        "compiled, not loaded from a temporary file"
    );
    assert_eq!(files(&dir.0), vec![name]);
}

/// A runtime without a cache directory compiles every time and writes nothing.
#[test]
fn without_a_cache_directory_every_load_compiles() {
    let rt = Runtime::new(4, 64 << 20, None).unwrap();
    rt.compile(embedded_plugin(SlotName::Router), "").unwrap();
    rt.compile(embedded_plugin(SlotName::Router), "").unwrap();
    assert_eq!(rt.cache_counts(), (0, 2, 0));
}
