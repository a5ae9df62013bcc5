//! `holdfast device …`: the device registry of a node.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::{Value, json};

use super::args::key_values;
use super::client::{AdminClient, segment};
use super::print::{format_time, print_json, print_list, print_table, rows_of, short, str_of};

/// `holdfast device …`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register an identity. Prints its keys once (`show --keys` again later).
    Add {
        /// Device id, `{device}/{module}`, gateway node id, or username.
        id: String,
        /// device, module, gateway or user. Default: module when the id has a '/', else device.
        #[arg(long)]
        kind: Option<String>,
        /// Parent gateway.
        #[arg(long)]
        parent: Option<String>,
        /// sas, x509-thumbprint, x509-ca, password or none. Default: sas (password for users).
        #[arg(long)]
        auth: Option<String>,
        /// Primary symmetric key, base64 (generated when absent).
        #[arg(long)]
        primary_key: Option<String>,
        /// Secondary symmetric key, base64 (generated when absent).
        #[arg(long)]
        secondary_key: Option<String>,
        /// Certificate thumbprint (SHA-256 hex); give twice for primary and secondary.
        #[arg(long)]
        thumbprint: Vec<String>,
        /// Read a password from stdin (for `--auth password`).
        #[arg(long)]
        password_stdin: bool,
        /// Register it disabled.
        #[arg(long)]
        disabled: bool,
        /// A label deployments can target, KEY=VALUE (repeat for more).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Replace an identity's labels (KEY=VALUE ...; none clears them).
    Label {
        /// The id.
        id: String,
        /// Labels, KEY=VALUE.
        labels: Vec<String>,
    },
    /// List identities and the registry's role.
    List {
        /// Only this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only children of this gateway.
        #[arg(long)]
        parent: Option<String>,
    },
    /// Show one identity.
    Show {
        /// The id.
        id: String,
        /// Include the symmetric keys.
        #[arg(long)]
        keys: bool,
    },
    /// Remove an identity (a device's modules go with it).
    Rm {
        /// The id.
        id: String,
    },
    /// Put an identity under a gateway, or under none with --none.
    SetParent {
        /// The id.
        id: String,
        /// The parent gateway.
        #[arg(required_unless_present = "none")]
        parent: Option<String>,
        /// Take it out from under its parent.
        #[arg(long, conflicts_with = "parent")]
        none: bool,
    },
    /// Replace symmetric keys with new random ones; connected clients using it are disconnected.
    RotateKey {
        /// The id.
        id: String,
        /// primary, secondary or both.
        #[arg(long, default_value = "both")]
        which: String,
    },
    /// Disable an identity: it is refused, and disconnected if connected.
    Disable {
        /// The id.
        id: String,
    },
    /// Enable an identity.
    Enable {
        /// The id.
        id: String,
    },
    /// Register a CA that `x509-ca` device certificates may be signed by.
    CaAdd {
        /// A name for it.
        name: String,
        /// The CA certificate, PEM.
        pem: PathBuf,
    },
    /// List registered CAs.
    CaList,
    /// Remove a registered CA.
    CaRm {
        /// Its name.
        name: String,
    },
    /// Send a cloud-to-device message to a device: delivered now if it can
    /// be, else queued (here, or at the gateway it is behind) until it can.
    Send {
        /// The device id.
        id: String,
        /// The message body (text).
        payload: String,
        /// A message property `key=value`; repeat for more.
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
        /// The content type.
        #[arg(long)]
        content_type: Option<String>,
        /// Time-to-live, seconds (default `iothub.c2d_default_ttl_seconds`).
        #[arg(long)]
        ttl: Option<u64>,
    },
    /// Cloud-to-device queues on this node, and what became of the messages
    /// sent from it (delivered, expired, rejected), newest first.
    C2d {
        /// At most this many feedback records.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

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

pub(crate) fn identity_row(v: &Value) -> Vec<String> {
    let creds: Vec<String> = v["credentials"]
        .as_array()
        .map(|a| a.iter().map(str_of).collect())
        .unwrap_or_default();
    vec![
        str_of(&v["id"]),
        str_of(&v["kind"]),
        str_of(&v["parent"]),
        if v["enabled"].as_bool().unwrap_or(false) {
            "yes"
        } else {
            "no"
        }
        .to_string(),
        if creds.is_empty() {
            "-".to_string()
        } else {
            creds.join(",")
        },
        str_of(&v["origin"]),
    ]
}

pub(crate) fn print_identity(v: &Value) {
    print_table(
        &["ID", "KIND", "PARENT", "ENABLED", "CREDENTIALS", "ORIGIN"],
        &[identity_row(v)],
    );
    for (label, key) in [("primary key", "sas_primary"), ("secondary key", "sas_secondary")] {
        if let Some(k) = v[key].as_str() {
            outln!("{label}: {k}");
        }
    }
    if let Some(t) = v["thumbprints"].as_array().filter(|a| !a.is_empty()) {
        let t: Vec<String> = t.iter().map(str_of).collect();
        outln!("thumbprints: {}", t.join(", "));
    }
}
