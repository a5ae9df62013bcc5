//! `holdfast plugin …`: the plugins in force, their history, swaps and rollbacks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use clap::Subcommand;
use serde_json::Value;

use super::client::AdminClient;
use super::print::{format_time, print_json, print_list, short, str_of};
use crate::scaffold::PluginKind;
use holdfast_plugins::SlotName;

/// `holdfast plugin …`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// List slots: version hash, source, loaded-at, calls, traps.
    List,
    /// Show loads, swaps and rollbacks.
    History,
    /// Swap the plugin in a slot for a .wasm component.
    Swap {
        /// router, auth or content-source.
        slot: SlotName,
        /// The component, or `embedded` for this binary's default plugin.
        file: PathBuf,
        /// Replace the plugin's config with this TOML or JSON file.
        #[arg(long)]
        plugin_config: Option<PathBuf>,
    },
    /// Switch a slot back to its previous version.
    Rollback {
        /// router, auth or content-source.
        slot: SlotName,
    },
    /// Create a new plugin crate that builds against holdfast-sdk.
    New {
        /// router, auth or content-source.
        kind: PluginKind,
        /// Crate name (also the directory name).
        name: String,
        /// Parent directory. Default: the current directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the holdfast-sdk crate. Default: the SDK of the source tree this binary was built from, if present.
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
}

pub(crate) fn plugin_command(client: &AdminClient, cmd: PluginCommand, json: bool) -> Result<()> {
    match cmd {
        PluginCommand::List => print_list(client, "/api/v1/plugins", json, "plugins", PLUGIN_HEADERS, plugin_row),
        PluginCommand::History => print_list(
            client,
            "/api/v1/plugins/history",
            json,
            "history",
            &["TIME", "SLOT", "ACTION", "OLD", "NEW", "SOURCE", "MS"],
            |r| {
                let mut row = swap_row(r);
                row.push(format!("{:.1}", r["duration_ms"].as_f64().unwrap_or(0.0)));
                row
            },
        ),
        PluginCommand::Swap {
            slot,
            file,
            plugin_config,
        } => {
            // `embedded`: this binary's own default plugin for the slot, e.g. to
            // change the default router's routes.
            let wasm = if file.as_os_str() == "embedded" {
                holdfast_plugins::embedded_plugin(slot).to_vec()
            } else {
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?
            };
            let v = match plugin_config {
                Some(path) => {
                    let config = read_plugin_config(&path)?;
                    let body = serde_json::json!({
                        "wasm_base64": base64::engine::general_purpose::STANDARD.encode(&wasm),
                        "config": config,
                    });
                    client.post_json(&format!("/api/v1/plugins/{slot}/swap"), &body)?
                }
                None => client
                    .post_bytes(&format!("/api/v1/plugins/{slot}/swap"), &wasm)
                    .map_err(kept_config_hint)?,
            };
            if json {
                return print_json(&v);
            }
            outln!(
                "swapped {slot}: {} -> {} in {:.1} ms",
                short(&v["old"]),
                short(&v["new"]),
                v["duration_ms"].as_f64().unwrap_or(0.0)
            );
            Ok(())
        }
        PluginCommand::Rollback { slot } => {
            let v = client.post_bytes(&format!("/api/v1/plugins/{slot}/rollback"), &[])?;
            if json {
                return print_json(&v);
            }
            outln!("rolled back {slot}: {} -> {}", short(&v["old"]), short(&v["new"]));
            Ok(())
        }
        // `execute` handles `new` before a client is made: it talks to no node.
        PluginCommand::New { .. } => bail!("`plugin new` does not talk to a node"),
    }
}

/// A swap without `--plugin-config` initialises the new plugin with the
/// slot's current config, which belongs to the plugin it replaces. When the
/// new plugin's `init` refuses it, the error says so and how to give the
/// plugin its own.
fn kept_config_hint(e: anyhow::Error) -> anyhow::Error {
    let message = format!("{e:#}");
    if message.contains("plugin init failed") {
        anyhow!("{message}; the swap kept the slot's plugin config: give this plugin its own with --plugin-config FILE")
    } else {
        e
    }
}

pub(crate) fn read_plugin_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        serde_json::to_value(table)?
    };
    if !value.is_object() {
        bail!("{}: plugin config must be a table", path.display());
    }
    Ok(value)
}

/// The columns of [`plugin_row`].
pub(crate) const PLUGIN_HEADERS: &[&str] = &[
    "SLOT", "VERSION", "SOURCE", "LOADED", "CALLS", "TRAPS", "TIMEOUTS", "PREVIOUS",
];

/// A load, swap, reconfiguration or rollback: time, slot, action, old, new, source.
pub(crate) fn swap_row(r: &Value) -> Vec<String> {
    vec![
        format_time(r["at_unix_ms"].as_u64()),
        str_of(&r["slot"]),
        str_of(&r["action"]),
        short(&r["old"]),
        short(&r["new"]),
        str_of(&r["source"]),
    ]
}

pub(crate) fn plugin_row(p: &Value) -> Vec<String> {
    vec![
        str_of(&p["slot"]),
        short(&p["version"]),
        str_of(&p["source"]),
        format_time(p["loaded_at_unix_ms"].as_u64()),
        p["calls"].as_u64().unwrap_or(0).to_string(),
        p["traps"].as_u64().unwrap_or(0).to_string(),
        p["timeouts"].as_u64().unwrap_or(0).to_string(),
        short(&p["previous"]),
    ]
}
