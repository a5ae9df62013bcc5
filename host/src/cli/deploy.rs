//! `holdfast deploy …`: fleet deployments.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{Value, json};

use super::args::{key_values, slot_values};
use super::client::{AdminClient, segment};
use super::plugin::read_plugin_config;
use super::print::{format_time, print_json, print_list, print_table, rows_of, short, str_of};

/// `holdfast deploy …`
#[derive(Debug, Subcommand)]
pub enum DeployCommand {
    /// Create a deployment owned by this node and start its rollout.
    Create {
        /// Its id.
        id: String,
        /// Target every gateway of this node's subtree, and this node.
        #[arg(long)]
        all: bool,
        /// Target this node id (repeat for more).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Target gateways with this label, KEY=VALUE (repeat: all must match).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Priority: the highest of the deployments targeting a node applies.
        #[arg(long, default_value_t = 0)]
        priority: i32,
        /// A component for a slot, SLOT=FILE.wasm (router, auth, content-source).
        #[arg(long = "plugin")]
        plugins: Vec<String>,
        /// A slot's plugin config, SLOT=FILE (.toml or .json).
        #[arg(long = "plugin-config")]
        plugin_configs: Vec<String>,
        /// A live setting, KEY=VALUE (e.g. outbox.default_ttl_seconds=600).
        #[arg(long = "set")]
        settings: Vec<String>,
        /// Take the routes, the store-and-forward TTL and the Connected Cache
        /// settings from an IoT Edge deployment manifest (as `holdfast import
        /// edge-manifest` maps them); --plugin-config and --set add to it.
        #[arg(long, value_name = "FILE")]
        from_edge_manifest: Option<std::path::PathBuf>,
        /// Waves, cumulative, comma-separated: counts or percentages (e.g. 1,10%,100%).
        #[arg(long, default_value = "100%")]
        waves: String,
        /// Seconds every node of a wave must run it healthy before the next wave.
        #[arg(long, default_value_t = 30)]
        soak: u64,
        /// A node rolls back when more than this share of plugin calls fail.
        #[arg(long, default_value_t = 0.1)]
        max_failure_rate: f64,
        /// ... once it has seen this many calls.
        #[arg(long, default_value_t = 10)]
        min_calls: u64,
        /// Seconds a node watches the deployed plugins after applying (and
        /// on while it has seen fewer than --min-calls calls).
        #[arg(long, default_value_t = 300)]
        watch: u64,
        /// Release the next wave even when the last wave's nodes saw fewer
        /// than --min-calls calls to the deployed plugins (by default a
        /// wave waits for that traffic).
        #[arg(long)]
        release_without_traffic: bool,
    },
    /// Deployments owned here and received from the parent.
    List,
    /// One deployment: every node of its target and its state.
    Show {
        /// The id.
        id: String,
    },
    /// Roll a deployment back: every node returns to what it ran before.
    Rollback {
        /// The id.
        id: String,
    },
    /// Delete a deployment (nodes return to what they ran before; a signed
    /// tombstone stays until it expires, so no older revision is taken again).
    Delete {
        /// The id.
        id: String,
    },
    /// Write a deployment and its components to a file, for `import` at a
    /// node that cannot be reached.
    Export {
        /// The id.
        id: String,
        /// The file.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Import an exported deployment (verified like one from the parent).
    Import {
        /// The file.
        file: PathBuf,
    },
    /// This node: the deployment applied, its ancestors, refused content.
    Status,
}

pub(crate) fn deploy_command(client: &AdminClient, cmd: DeployCommand, json: bool) -> Result<()> {
    let path = |id: &str, rest: &str| format!("/api/v1/deployments/{}{rest}", segment(id));
    match cmd {
        DeployCommand::Create {
            id,
            all,
            nodes,
            labels,
            priority,
            plugins,
            plugin_configs,
            settings,
            from_edge_manifest,
            waves,
            soak,
            max_failure_rate,
            min_calls,
            watch,
            release_without_traffic,
        } => {
            let mut slots = serde_json::Map::new();
            let mut set = serde_json::Map::new();
            if let Some(file) = &from_edge_manifest {
                let m = super::import::read_manifest(file)?;
                super::import::report(&m);
                slots.insert(
                    "router".into(),
                    json!({ "config": crate::edge_manifest::router_config(&m) }),
                );
                if let Some(c) = crate::edge_manifest::content_source_config(&m) {
                    slots.insert("content-source".into(), json!({ "config": c }));
                }
                set = super::import::settings(&m);
                for (key, v) in [
                    ("cache.listen", &m.cache_listen),
                    ("cache.parent", &m.cache_parent),
                    ("cache.dir", &m.cache_dir),
                ] {
                    if let Some(v) = v {
                        eprintln!(
                            "not deployable: {key} = {v:?} is set in each node's config file (it needs a restart)"
                        );
                    }
                }
            }
            for (slot, file) in slot_values(&plugins, "--plugin")? {
                let bytes = std::fs::read(&file).with_context(|| format!("cannot read {file}"))?;
                let up = client.post_bytes("/api/v1/deployments/components", &bytes)?;
                slots.entry(slot).or_insert_with(|| json!({}))["sha256"] = up["sha256"].clone();
            }
            for (slot, file) in slot_values(&plugin_configs, "--plugin-config")? {
                let config = read_plugin_config(Path::new(&file))?;
                let entry = slots.entry(slot.clone()).or_insert_with(|| json!({}));
                if from_edge_manifest.is_some() && entry.get("config").is_some() {
                    anyhow::bail!(
                        "--plugin-config {slot}=… and --from-edge-manifest both set the {slot} plugin's config"
                    );
                }
                entry["config"] = config;
            }
            for (k, v) in key_values(&settings, "--set")? {
                let text = v.as_str().unwrap_or_default();
                // Numbers and booleans as such; anything else as a string.
                let value = serde_json::from_str::<Value>(text)
                    .ok()
                    .filter(|v| v.is_number() || v.is_boolean())
                    .unwrap_or(v);
                set.insert(k, value);
            }
            let spec = json!({
                "id": id,
                "target": { "all": all, "nodes": nodes, "labels": key_values(&labels, "--label")? },
                "priority": priority,
                "plugins": slots,
                "settings": set,
                "rollout": {
                    "waves": waves.split(',').map(str::trim).filter(|w| !w.is_empty()).collect::<Vec<_>>(),
                    "soak_seconds": soak,
                    "max_failure_rate": max_failure_rate,
                    "min_calls": min_calls,
                    "watch_seconds": watch,
                    "release_without_traffic": release_without_traffic,
                },
            });
            let v = client.post_json("/api/v1/deployments", &spec)?;
            if json {
                return print_json(&v);
            }
            outln!(
                "created {}: {} node(s), {} released in the first wave",
                str_of(&v["spec"]["id"]),
                v["nodes"].as_array().map_or(0, Vec::len),
                v["released"]
            );
            Ok(())
        }
        DeployCommand::List => print_list(
            client,
            "/api/v1/deployments",
            json,
            "deployments",
            &[
                "ID",
                "OWNER",
                "PRIORITY",
                "PHASE",
                "REVISION",
                "RELEASED",
                "APPLIED",
                "NOT APPLIED",
            ],
            |d| {
                let states: Vec<&Value> = d["node_states"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                let applied = states.iter().filter(|s| s["state"] == "applied").count();
                vec![
                    str_of(&d["spec"]["id"]),
                    str_of(&d["owner"]),
                    str_of(&d["spec"]["priority"]),
                    phase_of(d),
                    str_of(&d["revision"]),
                    format!("{}/{}", str_of(&d["released"]), states.len()),
                    applied.to_string(),
                    (states.len() - applied).to_string(),
                ]
            },
        ),
        DeployCommand::Show { id } => {
            let v = client.get(&path(&id, ""))?;
            if json {
                return print_json(&v);
            }
            outln!(
                "deployment {} (owner {}, revision {})",
                str_of(&v["spec"]["id"]),
                str_of(&v["owner"]),
                str_of(&v["revision"])
            );
            let phase = &v["phase"];
            match phase["reason"].as_str().or(v["waiting"].as_str()) {
                Some(r) => outln!("phase:    {} ({r})", phase_of(&v)),
                None => outln!("phase:    {}", phase_of(&v)),
            }
            if let Some(ms) = v["expires_ms"].as_u64() {
                outln!("expires:  {}", format_time(Some(ms)));
            }
            outln!("priority: {}", str_of(&v["spec"]["priority"]));
            for (slot, p) in v["spec"]["plugins"].as_object().into_iter().flatten() {
                let what = match (p["sha256"].is_string(), p["config"].is_object()) {
                    (true, true) => format!("component {} and config", short(&p["sha256"])),
                    (true, false) => format!("component {}", short(&p["sha256"])),
                    _ => "config".to_string(),
                };
                outln!("plugin:   {slot}: {what}");
            }
            for (k, val) in v["spec"]["settings"].as_object().into_iter().flatten() {
                outln!("setting:  {k} = {val}");
            }
            let rows = rows_of(&v, "node_states", |n| {
                let r = &n["report"];
                vec![
                    str_of(&n["node"]),
                    if n["released"] == true {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                    str_of(&n["state"]),
                    format_time(r["since_ms"].as_u64()),
                    format_time(r["at_ms"].as_u64()),
                    if r["health"]["calls"].is_u64() {
                        format!("{}/{}", str_of(&r["health"]["failures"]), str_of(&r["health"]["calls"]))
                    } else {
                        "-".into()
                    },
                    r["reason"].as_str().unwrap_or("").to_string(),
                ]
            });
            print_table(
                &[
                    "NODE",
                    "RELEASED",
                    "STATE",
                    "SINCE",
                    "LAST REPORT",
                    "FAILED/CALLS",
                    "REASON",
                ],
                &rows,
            );
            Ok(())
        }
        DeployCommand::Rollback { id } => {
            let v = client.post_json(&path(&id, "/rollback"), &Value::Null)?;
            if json {
                return print_json(&v);
            }
            outln!(
                "rolled back {}: every node returns to what it ran before",
                str_of(&v["spec"]["id"])
            );
            Ok(())
        }
        DeployCommand::Delete { id } => {
            let v = client.delete(&path(&id, ""))?;
            if json {
                return print_json(&v);
            }
            outln!("deleted {}", str_of(&v["deleted"]));
            Ok(())
        }
        DeployCommand::Export { id, out } => {
            let v = client.get(&path(&id, "/export"))?;
            std::fs::write(&out, serde_json::to_vec(&v)?).with_context(|| format!("cannot write {}", out.display()))?;
            outln!("wrote {}", out.display());
            Ok(())
        }
        DeployCommand::Import { file } => {
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let bundle: Value =
                serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", file.display()))?;
            let v = client.post_json("/api/v1/deployments/import", &bundle)?;
            if json {
                return print_json(&v);
            }
            outln!("imported {} (owner {})", str_of(&v["spec"]["id"]), str_of(&v["owner"]));
            Ok(())
        }
        DeployCommand::Status => {
            let v = client.get("/api/v1/deploy")?;
            if json {
                return print_json(&v);
            }
            let a = &v["applied"];
            if a.is_object() {
                outln!(
                    "applied:   {} (revision {}, {})",
                    str_of(&a["deployment"]),
                    str_of(&a["revision"]),
                    format_time(a["at_ms"].as_u64())
                );
                for (slot, ver) in a["versions"].as_object().into_iter().flatten() {
                    outln!("  {slot}: {}", short(ver));
                }
            } else {
                outln!("applied:   none (this node's own config)");
            }
            let anc: Vec<String> = v["ancestors"]
                .as_array()
                .map(|a| a.iter().map(str_of).collect())
                .unwrap_or_default();
            outln!(
                "ancestors: {}",
                if anc.is_empty() {
                    "-".to_string()
                } else {
                    anc.join(" > ")
                }
            );
            outln!("accept:    {}", str_of(&v["accept"]));
            outln!("can sign:  {}", str_of(&v["can_sign"]));
            for r in v["refused_content"].as_array().into_iter().flatten() {
                outln!("refused:   {} ({})", str_of(&r[0]), str_of(&r[2]));
            }
            Ok(())
        }
    }
}

/// A deployment's phase as shown: `deleted` for a tombstone.
fn phase_of(d: &Value) -> String {
    if d["deleted"] == true {
        "deleted".into()
    } else {
        str_of(&d["phase"]["state"])
    }
}
