//! The commands that talk to a node: devices, the cache, twins, plugins, the link, and the outbox filler.

#[allow(unused_imports)]
use super::*;

pub(crate) fn device_command(client: &AdminClient, cmd: DeviceCommand, json: bool) -> Result<()> {
    let path = |id: &str, rest: &str| format!("/api/v1/devices/{}{rest}", segment(id));
    let v = match cmd {
        DeviceCommand::Add {
            id,
            kind,
            parent,
            auth,
            primary_key,
            secondary_key,
            thumbprint,
            password_stdin,
            disabled,
            labels,
        } => {
            let password = if password_stdin {
                let mut p = String::new();
                std::io::stdin()
                    .read_to_string(&mut p)
                    .context("reading the password from stdin")?;
                Some(p.trim_end_matches(['\n', '\r']).to_string())
            } else {
                None
            };
            let body = serde_json::json!({
                "id": id, "kind": kind, "parent": parent, "auth": auth,
                "sas_primary": primary_key, "sas_secondary": secondary_key,
                "thumbprints": thumbprint, "password": password, "enabled": !disabled,
                "labels": key_values(&labels, "--label")?,
            });
            client.post_json("/api/v1/devices", &body)?
        }
        DeviceCommand::List { kind, parent } => {
            let mut query = Vec::new();
            if let Some(k) = kind {
                query.push(format!("kind={}", segment(&k)));
            }
            if let Some(p) = parent {
                query.push(format!("parent={}", segment(&p)));
            }
            let q = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            let list = client.get(&format!("/api/v1/devices{q}"))?;
            if json {
                return print_json(&list);
            }
            let summary = client.get("/api/v1/registry")?;
            match summary["role"].as_str() {
                Some("replica") => outln!(
                    "registry: replica of {}'s scope; last full sync {}, last change {}",
                    str_of(&summary["parent"]),
                    format_time(summary["sync"]["full_sync_ms"].as_u64()),
                    format_time(summary["sync"]["last_change_ms"].as_u64()),
                ),
                _ => outln!("registry: owner"),
            }
            let rows = rows_of(&list, "identities", identity_row);
            print_table(&["ID", "KIND", "PARENT", "ENABLED", "CREDENTIALS", "ORIGIN"], &rows);
            return Ok(());
        }
        DeviceCommand::Show { id, keys } => client.get(&path(&id, if keys { "?keys=true" } else { "" }))?,
        DeviceCommand::Label { id, labels } => client.post_json(
            &path(&id, "/labels"),
            &json!({ "labels": key_values(&labels, "label")? }),
        )?,
        DeviceCommand::Rm { id } => {
            let v = client.delete(&path(&id, ""))?;
            if json {
                return print_json(&v);
            }
            let removed: Vec<String> = v["removed"]
                .as_array()
                .map(|a| a.iter().map(str_of).collect())
                .unwrap_or_default();
            outln!("removed {}", removed.join(", "));
            return Ok(());
        }
        DeviceCommand::SetParent { id, parent, none } => {
            let parent = if none { None } else { parent };
            client.post_json(&path(&id, "/parent"), &serde_json::json!({ "parent": parent }))?
        }
        DeviceCommand::RotateKey { id, which } => {
            client.post_json(&path(&id, "/rotate-key"), &serde_json::json!({ "which": which }))?
        }
        DeviceCommand::Disable { id } => client.post_json(&path(&id, "/disable"), &Value::Null)?,
        DeviceCommand::Enable { id } => client.post_json(&path(&id, "/enable"), &Value::Null)?,
        DeviceCommand::CaAdd { name, pem } => {
            let pem = std::fs::read_to_string(&pem).with_context(|| format!("cannot read {}", pem.display()))?;
            let v = client.post_json("/api/v1/registry/cas", &serde_json::json!({ "name": name, "pem": pem }))?;
            if json {
                return print_json(&v);
            }
            outln!(
                "CA {} registered: {} ({})",
                str_of(&v["name"]),
                str_of(&v["subject"]),
                str_of(&v["thumbprint"])
            );
            return Ok(());
        }
        DeviceCommand::CaList => {
            return print_list(
                client,
                "/api/v1/registry/cas",
                json,
                "cas",
                &["NAME", "SUBJECT", "THUMBPRINT", "ORIGIN"],
                |c| {
                    vec![
                        str_of(&c["name"]),
                        str_of(&c["subject"]),
                        short(&c["thumbprint"]),
                        str_of(&c["origin"]),
                    ]
                },
            );
        }
        DeviceCommand::Send {
            id,
            payload,
            properties,
            content_type,
            ttl,
        } => {
            let mut props = serde_json::Map::new();
            for p in properties {
                let (k, v) = p
                    .split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .with_context(|| format!("--property {p:?}: expected KEY=VALUE"))?;
                props.insert(k.to_string(), Value::String(v.to_string()));
            }
            let v = client.post_json(
                &path(&id, "/messages"),
                &json!({ "payload": payload, "properties": props, "content_type": content_type, "ttl_seconds": ttl }),
            )?;
            if json {
                return print_json(&v);
            }
            outln!(
                "sent to {id} on {} ({}, message {})",
                str_of(&v["topic"]),
                str_of(&v["state"]),
                str_of(&v["id"])
            );
            return Ok(());
        }
        DeviceCommand::C2d { limit } => {
            let v = client.get(&format!("/api/v1/c2d?limit={limit}"))?;
            if json {
                return print_json(&v);
            }
            let queues = v["queues"].as_array().cloned().unwrap_or_default();
            if queues.is_empty() {
                outln!("no messages queued here");
            }
            for q in &queues {
                outln!("queued for {}: {}", str_of(&q["device"]), q["messages"]);
            }
            let feedback = v["feedback"].as_array().cloned().unwrap_or_default();
            if !feedback.is_empty() {
                outln!(
                    "{:<26} {:<20} {:<10} {:<16} {}",
                    "MESSAGE",
                    "DEVICE",
                    "OUTCOME",
                    "AT NODE",
                    "REASON"
                );
            }
            for f in &feedback {
                outln!(
                    "{:<26} {:<20} {:<10} {:<16} {}",
                    str_of(&f["id"]),
                    str_of(&f["device"]),
                    str_of(&f["outcome"]),
                    str_of(&f["node"]),
                    f["reason"].as_str().unwrap_or("")
                );
            }
            return Ok(());
        }
        DeviceCommand::CaRm { name } => {
            let v = client.delete(&format!("/api/v1/registry/cas/{}", segment(&name)))?;
            if json {
                return print_json(&v);
            }
            outln!("CA {name} removed");
            return Ok(());
        }
    };
    if json {
        return print_json(&v);
    }
    print_identity(&v);
    Ok(())
}

pub(crate) fn cache_command(client: &AdminClient, cmd: CacheCommand, json: bool) -> Result<()> {
    match cmd {
        CacheCommand::Stats => {
            let v = client.get("/api/v1/cache")?;
            if json {
                return print_json(&v);
            }
            let bytes = |k: &str| bytes_of(&v[k]);
            print_table(
                &[
                    "listen", "objects", "stored", "max size", "min free", "free", "fills", "parent",
                ],
                &[vec![
                    str_of(&v["listen"]),
                    str_of(&v["objects"]),
                    bytes("stored_bytes"),
                    bytes("max_size"),
                    bytes("min_free"),
                    bytes("free_bytes"),
                    str_of(&v["fills_in_flight"]),
                    str_of(&v["parent"]),
                ]],
            );
        }
        CacheCommand::Objects { limit } => print_list(
            client,
            &format!("/api/v1/cache/objects?limit={limit}"),
            json,
            "objects",
            &["key", "stored", "length", "blocks", "class", "etag"],
            |o| {
                vec![
                    str_of(&o["key"]),
                    bytes_of(&o["stored_bytes"]),
                    bytes_of(&o["length"]),
                    str_of(&o["blocks"]),
                    str_of(&o["class"]),
                    str_of(&o["etag"]),
                ]
            },
        )?,
        CacheCommand::Purge { key, prefix, all } => {
            if key.is_none() && prefix.is_none() && !all {
                bail!("give --key, --prefix or --all");
            }
            let body = json!({ "key": key, "prefix": prefix, "all": all });
            let body = match body {
                Value::Object(m) => Value::Object(
                    m.into_iter()
                        .filter(|(_, v)| !v.is_null() && *v != json!(false))
                        .collect(),
                ),
                other => other,
            };
            let v = client.post_json("/api/v1/cache/purge", &body)?;
            if json {
                return print_json(&v);
            }
            outln!("purged {} objects ({})", str_of(&v["objects"]), bytes_of(&v["bytes"]));
        }
    }
    Ok(())
}

pub(crate) fn twin_command(client: &AdminClient, cmd: TwinCommand, json: bool) -> Result<()> {
    let v = match cmd {
        TwinCommand::Show { id } => client.get(&format!("/api/v1/twins/{}", segment(&id)))?,
        TwinCommand::SetDesired { id, patch } => {
            let patch: Value = serde_json::from_str(&patch).context("the patch must be JSON")?;
            let v = client.post_json(&format!("/api/v1/twins/{}/desired", segment(&id)), &patch)?;
            if json {
                return print_json(&v);
            }
            outln!(
                "{id}: desired properties now at version {}",
                str_of(&v["desired_version"])
            );
            return Ok(());
        }
    };
    if json {
        return print_json(&v);
    }
    outln!("twin {}", str_of(&v["id"]));
    outln!(
        "desired (version {}, owned by {}):",
        str_of(&v["desired_version"]),
        str_of(&v["desired_owner"])
    );
    outln!("{}", serde_json::to_string_pretty(&v["desired"])?);
    outln!("reported (version {}):", str_of(&v["reported_version"]));
    outln!("{}", serde_json::to_string_pretty(&v["reported"])?);
    if !v["pending_upstream"].is_null() {
        outln!("not yet pushed upstream:");
        outln!("{}", serde_json::to_string_pretty(&v["pending_upstream"])?);
    }
    Ok(())
}

pub(crate) fn outbox_fill(data_dir: &Path, writers: u32, lanes: u8, tag: &str) -> Result<()> {
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};
    let store = holdfast_store::Store::open(&data_dir.join("store"))?;
    let metrics = Arc::new(holdfast_metrics::Metrics::new());
    let outbox = Arc::new(holdfast_outbox::Outbox::open(
        &store,
        data_dir,
        crate::config::OutboxConfig::default(),
        metrics,
        Arc::new(holdfast_outbox::SystemTimeSource),
    )?);
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (outbox, out, tag) = (outbox.clone(), out.clone(), tag.to_string());
            std::thread::spawn(move || -> Result<()> {
                for i in 0u64.. {
                    let lane = ((i + u64::from(w)) % u64::from(lanes)) as u8;
                    let payload = format!("{tag}:{w}:{i}");
                    let msg = Arc::new(holdfast_plugins::Message::new(
                        "fill",
                        payload.clone().into_bytes(),
                        "fill",
                    ));
                    let id = outbox.append_blocking(lane, msg, None)?;
                    let mut o = holdfast_model::lock(&out);
                    writeln!(o, "{} {} {payload}", id.lane, id.seq)?;
                    o.flush()?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow!("writer thread panicked"))??;
    }
    Ok(())
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

pub(crate) fn link_status(client: &AdminClient, json: bool) -> Result<()> {
    let v = client.get("/api/v1/link")?;
    if json {
        return print_json(&v);
    }
    let l = &v["link"];
    let kind = str_of(&l["kind"]);
    if kind == "none" {
        outln!("upstream: none (root)");
    } else {
        outln!("upstream: {kind} {}", str_of(&l["target"]));
        outln!(
            "state:    {} since {}",
            str_of(&l["state"]),
            format_time(l["since_ms"].as_u64())
        );
        outln!(
            "connects: {}   failures: {}   sent: {}   acked: {}   window: {}",
            l["connects"],
            l["failures"],
            l["sent"],
            l["acked"],
            l["window"]
        );
        if let Some(e) = l["last_error"].as_str() {
            outln!("last error: {e}");
        }
    }
    if let Some(addr) = v["listen"].as_str() {
        outln!("children listen on {addr} (udp)");
        let rows: Vec<Vec<String>> = l["children"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(id, c)| {
                        vec![
                            id.clone(),
                            str_of(&c["addr"]),
                            format_time(c["since_ms"].as_u64()),
                            c["received"].to_string(),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print_table(&["CHILD", "ADDRESS", "SINCE", "RECEIVED"], &rows);
    }
    Ok(())
}

/// `KEY=VALUE` arguments as a JSON object of strings.
fn key_values(items: &[String], what: &str) -> Result<serde_json::Map<String, Value>> {
    let mut out = serde_json::Map::new();
    for p in items {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .with_context(|| format!("{what} {p:?}: expected KEY=VALUE"))?;
        out.insert(k.to_string(), Value::String(v.to_string()));
    }
    Ok(out)
}

/// `SLOT=VALUE` arguments.
fn slot_values(items: &[String], what: &str) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|p| {
            p.split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{what} {p:?}: expected SLOT=FILE"))
        })
        .collect()
}

/// A deployment's phase as shown: `deleted` for a tombstone.
fn phase_of(d: &Value) -> String {
    if d["deleted"] == true {
        "deleted".into()
    } else {
        str_of(&d["phase"]["state"])
    }
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
            waves,
            soak,
            max_failure_rate,
            min_calls,
            watch,
            release_without_traffic,
        } => {
            let mut slots = serde_json::Map::new();
            for (slot, file) in slot_values(&plugins, "--plugin")? {
                let bytes = std::fs::read(&file).with_context(|| format!("cannot read {file}"))?;
                let up = client.post_bytes("/api/v1/deployments/components", &bytes)?;
                slots.insert(slot, json!({ "sha256": up["sha256"] }));
            }
            for (slot, file) in slot_values(&plugin_configs, "--plugin-config")? {
                let config = read_plugin_config(Path::new(&file))?;
                let entry = slots.entry(slot).or_insert_with(|| json!({}));
                entry["config"] = config;
            }
            let mut set = serde_json::Map::new();
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
