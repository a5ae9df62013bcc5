//! The on-disk cache of compiled components: one file per (component,
//! engine), written atomically and durably, validated in full before its
//! bytes reach wasmtime's (unsafe) deserializer.
//!
//! An entry is a fixed header and then the bytes of `Component::serialize`:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `HFCWASM\0` |
//! | 4 | entry format version, little-endian ([`FORMAT_VERSION`]) |
//! | 4 | reserved, zero |
//! | 32 | SHA-256 of the component's wasm bytes |
//! | 32 | the engine fingerprint (SHA-256 of wasmtime's precompile compatibility hash) |
//! | 8 | length of the serialized bytes, little-endian |
//! | 32 | SHA-256 of the serialized bytes |
//!
//! A write goes to a temporary file in the same directory, is fsynced,
//! renamed over the entry's name, and the directory is fsynced: after a
//! power cut an entry is either whole or absent. An entry that fails any
//! check (short, torn, altered, another format or engine) is removed,
//! counted, and rebuilt; it is never loaded. Temporary files left by a write
//! that was cut before its rename are removed when the cache opens.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// The entry format this build writes and accepts.
pub(crate) const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"HFCWASM\0";
/// Header length: magic, version, reserved, source hash, engine, length, checksum.
pub(crate) const HEADER_LEN: usize = 8 + 4 + 4 + 32 + 32 + 8 + 32;
/// Entries end in this; temporary files are `.<entry>.<pid>.<n>.tmp`.
const ENTRY_EXT: &str = "cwasm";
const TMP_EXT: &str = "tmp";

/// Why an entry was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Damage {
    /// Shorter than its header, or than the length its header states.
    Truncated,
    /// Longer than its header states.
    TrailingBytes,
    /// Not an entry (no magic).
    BadMagic,
    /// Written by another entry format.
    OtherFormat,
    /// Compiled from other wasm bytes than its name says.
    OtherSource,
    /// Compiled by an incompatible engine.
    OtherEngine,
    /// The serialized bytes do not match their checksum.
    Checksum,
    /// Passed every check, yet wasmtime refused it.
    Refused,
}

impl Damage {
    /// For logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Damage::Truncated => "truncated",
            Damage::TrailingBytes => "trailing bytes",
            Damage::BadMagic => "not a compiled-plugin cache entry",
            Damage::OtherFormat => "another entry format",
            Damage::OtherSource => "compiled from other wasm bytes",
            Damage::OtherEngine => "compiled by an incompatible engine",
            Damage::Checksum => "checksum mismatch",
            Damage::Refused => "refused by wasmtime",
        }
    }
}

/// Builds an entry: the header for `serialized`, then `serialized`.
pub(crate) fn encode_entry(source: &[u8; 32], engine: &[u8; 32], serialized: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + serialized.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(source);
    out.extend_from_slice(engine);
    out.extend_from_slice(&(serialized.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(serialized));
    out.extend_from_slice(serialized);
    out
}

/// Checks every header field of `entry` against what this engine expects for
/// `source` and the checksum of the body; returns the serialized bytes.
///
/// # Errors
/// The first check that fails.
pub(crate) fn check_entry<'a>(entry: &'a [u8], source: &[u8; 32], engine: &[u8; 32]) -> Result<&'a [u8], Damage> {
    let Some((header, body)) = entry.split_at_checked(HEADER_LEN) else {
        return Err(if entry.len() >= MAGIC.len() && entry[..MAGIC.len()] != MAGIC[..] {
            Damage::BadMagic
        } else {
            Damage::Truncated
        });
    };
    let (magic, rest) = header.split_at(8);
    let (version, rest) = rest.split_at(4);
    let (_reserved, rest) = rest.split_at(4);
    let (src, rest) = rest.split_at(32);
    let (eng, rest) = rest.split_at(32);
    let (len, sum) = rest.split_at(8);
    if magic != MAGIC {
        return Err(Damage::BadMagic);
    }
    if version != FORMAT_VERSION.to_le_bytes() {
        return Err(Damage::OtherFormat);
    }
    if src != source {
        return Err(Damage::OtherSource);
    }
    if eng != engine {
        return Err(Damage::OtherEngine);
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(len);
    let len = u64::from_le_bytes(len_bytes);
    match (body.len() as u64).cmp(&len) {
        std::cmp::Ordering::Less => return Err(Damage::Truncated),
        std::cmp::Ordering::Greater => return Err(Damage::TrailingBytes),
        std::cmp::Ordering::Equal => {}
    }
    if Sha256::digest(body).as_slice() != sum {
        return Err(Damage::Checksum);
    }
    Ok(body)
}

/// What a lookup found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// A whole, checked entry: the serialized component.
    Hit(Vec<u8>),
    /// No entry (or no cache directory).
    Miss,
    /// An entry that failed a check; it was removed and counted.
    Damaged,
}

/// The cache directory of one engine.
#[derive(Debug)]
pub(crate) struct CompiledCache {
    dir: PathBuf,
    engine: [u8; 32],
    engine_key: String,
    /// Entries refused as damaged (and removed) since open.
    pub(crate) damaged: AtomicU64,
    tmp_seq: AtomicU64,
}

impl CompiledCache {
    /// The cache in `dir` for the engine whose fingerprint is `engine`.
    /// Removes temporary files that a write cut before its rename left behind
    /// (those of live processes are left alone).
    pub(crate) fn open(dir: PathBuf, engine: [u8; 32]) -> Self {
        let engine_key = hex::encode(&engine[..8]);
        let cache = CompiledCache {
            dir,
            engine,
            engine_key,
            damaged: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
        };
        cache.remove_stale_temp_files();
        cache
    }

    /// Where the entry of the component whose wasm hashes to `source` lives.
    pub(crate) fn entry_path(&self, source: &[u8; 32]) -> PathBuf {
        self.dir
            .join(format!("{}-{}.{ENTRY_EXT}", hex::encode(source), self.engine_key))
    }

    /// Reads and checks the entry for `source`. A damaged entry is removed
    /// and counted, and the caller compiles instead.
    pub(crate) fn lookup(&self, source: &[u8; 32]) -> Lookup {
        let path = self.entry_path(source);
        let data = match read_file(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read compiled-plugin cache entry; compiling");
                return Lookup::Miss;
            }
        };
        match check_entry(&data, source, &self.engine) {
            Ok(body) => Lookup::Hit(body.to_vec()),
            Err(damage) => {
                self.reject(source, damage);
                Lookup::Damaged
            }
        }
    }

    /// Removes and counts the entry for `source` (damaged as `damage`).
    pub(crate) fn reject(&self, source: &[u8; 32], damage: Damage) {
        let path = self.entry_path(source);
        self.damaged.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %path.display(), reason = damage.as_str(),
            "removing damaged compiled-plugin cache entry; compiling the plugin again");
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove damaged compiled-plugin cache entry");
        }
    }

    /// Writes the entry for `source` atomically and durably: a temporary
    /// file in the same directory, written and fsynced, renamed over the
    /// entry's name, then the directory fsynced.
    ///
    /// # Errors
    /// Any I/O error; the temporary file is removed.
    pub(crate) fn store(&self, source: &[u8; 32], serialized: &[u8]) -> std::io::Result<()> {
        let created = !self.dir.exists();
        std::fs::create_dir_all(&self.dir)?;
        if created && let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        let path = self.entry_path(source);
        let tmp = self.temp_path(&path);
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(&encode_entry(source, &self.engine, serialized))?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &path)?;
            sync_dir(&self.dir)
        };
        let result = write();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn temp_path(&self, entry: &Path) -> PathBuf {
        let name = entry
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(".{name}.{}.{n}.{TMP_EXT}", std::process::id()))
    }

    fn remove_stale_temp_files(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut removed = 0u32;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = temp_file_pid(&name.to_string_lossy()) else {
                continue;
            };
            if pid != std::process::id() && process_alive(pid) {
                continue;
            }
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(path = %entry.path().display(), error = %e,
                    "cannot remove a temporary compiled-plugin cache file"),
            }
        }
        if removed > 0 {
            tracing::info!(dir = %self.dir.display(), removed,
                "removed temporary compiled-plugin cache files of an interrupted write");
        }
    }
}

/// The pid in a temporary file's name `.<entry>.<pid>.<n>.tmp`, if it is one.
fn temp_file_pid(name: &str) -> Option<u32> {
    let stem = name.strip_prefix('.')?.strip_suffix(&format!(".{TMP_EXT}"))?;
    let mut parts = stem.rsplitn(3, '.');
    let _n: u64 = parts.next()?.parse().ok()?;
    parts.next()?.parse().ok()
}

/// Whether `pid` is a running process (always false without `/proc`: a
/// leftover temporary file is then removed, which is always safe for the
/// process that owns the cache).
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut data = Vec::with_capacity(usize::try_from(f.metadata()?.len()).unwrap_or(0));
    f.read_to_end(&mut data)?;
    Ok(data)
}

/// Makes a rename or creation in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
