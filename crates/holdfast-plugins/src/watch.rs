//! The optional watched plugin folder: `router.wasm`, `auth.wasm` and
//! `content-source.wasm` placed there are swapped in when they change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::{PluginHost, SlotName};

/// What was last seen of a file, so an unchanged (or broken) file is not
/// reloaded on every scan.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    modified: Option<SystemTime>,
    len: u64,
}

/// Scans `dir` every `interval` until `shutdown` resolves.
pub async fn watch_folder(
    plugins: Arc<PluginHost>,
    dir: PathBuf,
    interval: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tracing::info!(dir = %dir.display(), "watching plugin folder");
    let mut seen: HashMap<SlotName, Seen> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        for slot in SlotName::ALL {
            let path = dir.join(format!("{}.wasm", slot.as_str()));
            let Ok(meta) = tokio::fs::metadata(&path).await else {
                continue;
            };
            let now = Seen {
                modified: meta.modified().ok(),
                len: meta.len(),
            };
            if seen.get(&slot) == Some(&now) {
                continue;
            }
            seen.insert(slot, now);
            let plugins = plugins.clone();
            let result = tokio::task::spawn_blocking(move || scan_one(&plugins, slot, &path)).await;
            if let Err(e) = result {
                tracing::error!("plugin folder swap task failed: {e}");
            }
        }
    }
}

fn scan_one(plugins: &PluginHost, slot: SlotName, path: &Path) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read watched plugin: {e}");
            return;
        }
    };
    if *plugins.version(slot) == *hex::encode(Sha256::digest(&bytes)) {
        return;
    }
    match plugins.swap(slot, &bytes, path.display().to_string(), None) {
        Ok(r) => tracing::info!(
            slot = slot.as_str(),
            version = &r.new[..12],
            "swapped from watched folder"
        ),
        Err(e) => tracing::error!(slot = slot.as_str(), path = %path.display(), "watched plugin rejected: {e}"),
    }
}
