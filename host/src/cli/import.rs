//! `holdfast import edge-manifest FILE`: an IoT Edge deployment manifest as
//! Holdfast config (see `crate::edge_manifest` and docs/migrating.md).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::print::print_json;
use crate::edge_manifest::{self, Mapped};

/// `holdfast import …`
#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Map an IoT Edge deployment manifest (edgeHub routes, store and
    /// forward, the Connected Cache module) to Holdfast config; print it, or
    /// write it with --out. What does not map is listed with the reason.
    EdgeManifest {
        /// The manifest (JSON), as deployed with `az iot edge set-modules`.
        file: PathBuf,
        /// Write the config here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace an existing --out file.
        #[arg(long)]
        force: bool,
    },
}

/// Reads and maps a manifest file.
///
/// # Errors
/// The file cannot be read, is not JSON, or does not map.
pub fn read_manifest(file: &Path) -> Result<Mapped> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    edge_manifest::map(&v).with_context(|| format!("{} does not map", file.display()))
}

/// What did not map, and the notes, on stderr (the config goes to stdout).
pub fn report(m: &Mapped) {
    eprintln!(
        "edgeHub schema {}: {} route(s){}{}",
        m.schema,
        m.routes.len(),
        m.outbox_ttl_seconds
            .map_or_else(String::new, |t| format!(", store and forward {t} s")),
        m.cache_module.as_ref().map_or_else(String::new, |c| format!(
            ", Connected Cache module {c} ({} source(s))",
            m.sources.len()
        ))
    );
    for n in &m.notes {
        eprintln!("note: {n}");
    }
    if !m.not_mapped.is_empty() {
        eprintln!("not mapped ({}):", m.not_mapped.len());
        for n in &m.not_mapped {
            eprintln!("  {}: {}", n.path, n.reason);
        }
    }
}

/// The mapping as JSON (`--json`).
fn as_json(m: &Mapped) -> Value {
    json!({
        "schema": m.schema,
        "settings": settings(m),
        "plugins": {
            "router": { "config": edge_manifest::router_config(m) },
            "content-source": edge_manifest::content_source_config(m).map(|c| json!({ "config": c })),
        },
        "local": {
            "cache.listen": m.cache_listen,
            "cache.parent": m.cache_parent,
            "cache.dir": m.cache_dir,
        },
        "notes": m.notes,
        "not_mapped": m.not_mapped.iter().map(|n| json!({ "path": n.path, "reason": n.reason })).collect::<Vec<_>>(),
    })
}

/// The live settings a deployment can carry.
pub fn settings(m: &Mapped) -> serde_json::Map<String, Value> {
    let mut s = serde_json::Map::new();
    if let Some(t) = m.outbox_ttl_seconds {
        s.insert("outbox.default_ttl_seconds".into(), json!(t));
    }
    if let Some(size) = m.cache_max_size {
        s.insert("cache.max_size".into(), json!(size));
    }
    s
}

/// `holdfast import …`
///
/// # Errors
/// The manifest does not map, or the file cannot be written.
pub fn import_command(cmd: ImportCommand, json: bool) -> Result<()> {
    match cmd {
        ImportCommand::EdgeManifest { file, out, force } => {
            let m = read_manifest(&file)?;
            if json {
                return print_json(&as_json(&m));
            }
            let name = file
                .file_name()
                .map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
            let text = edge_manifest::to_toml(&m, &name);
            match out {
                Some(path) => {
                    if path.exists() && !force {
                        bail!("{} exists; pass --force to replace it", path.display());
                    }
                    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
                    report(&m);
                    eprintln!("wrote {}", path.display());
                }
                None => {
                    outln!("{}", text.trim_end());
                    report(&m);
                }
            }
            Ok(())
        }
    }
}
