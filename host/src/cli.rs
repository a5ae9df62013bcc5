//! The `holdfast` command line. Every admin operation goes through the
//! admin API; `anyhow` is used here only, at the top.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::config::Config;
use crate::scaffold::{self, PluginKind};
use holdfast_plugins::SlotName;

/// `println!` for command output. A closed pipe (`holdfast queue | head -2`)
/// ends the process quietly with status 0 instead of a panic.
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod ops;

/// Writes command output to stdout. When the reader has gone (EPIPE) the
/// command has nothing left to do: the process exits with status 0, without
/// the panic `println!` would raise. Any other write error exits with 1.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
pub use self::ops::INIT_CONFIG;

/// Holdfast: an offline-first IoT edge gateway.
#[derive(Debug, Parser)]
#[command(name = "holdfast", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Options for talking to a running node.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// How the CLI finds a running node's admin API.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Config file: `run` uses it; admin commands read the admin address and
    /// token location from it.
    #[arg(long, short, global = true, env = "HOLDFAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API base URL. Default: from --config, else http://127.0.0.1:9600.
    #[arg(long, global = true, env = "HOLDFAST_ADMIN")]
    pub admin: Option<String>,
    /// Admin bearer token. Default: the token file.
    #[arg(long, global = true, env = "HOLDFAST_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Admin token file. Default: <data_dir>/admin.token from --config, else ./holdfast-data/admin.token.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (embedded defaults unless --config is given).
    Run,
    /// Write an annotated config file: every key with its default and what it does.
    Init {
        /// Where to write it.
        #[arg(default_value = "holdfast.toml")]
        path: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// A running node at a glance: link, backlog, clients, plugins, cache.
    Status,
    /// The outbox of a running node: backlog per lane; `wait-empty` waits for it to drain.
    Queue {
        /// `wait-empty`; without one, the lanes are listed.
        #[command(subcommand)]
        command: Option<QueueCommand>,
    },
    /// MQTT clients connected to a running node.
    Clients {
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage plugins on a running node, or scaffold a new one.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Hash a password (read from stdin) for an identity's `password_hash`.
    Passwd,
    /// Create a fleet CA and issue node certificates for the QUIC link.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The upstream link of a running node.
    #[command(subcommand)]
    Link(LinkCommand),
    /// The device registry: devices, modules, child gateways, users, CAs.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Device and module twins: desired and reported properties.
    #[command(subcommand)]
    Twin(TwinCommand),
    /// Direct methods on devices and modules.
    #[command(subcommand)]
    Method(MethodCommand),
    /// The range cache of a running node: totals, stored objects, purge.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Make a running node re-read its config file (as SIGHUP does) and
    /// print what was applied live and what needs a restart.
    Reload,
    /// Tools for tests and diagnosis.
    #[command(subcommand, hide = true)]
    Debug(DebugCommand),
}

/// `holdfast debug …` (hidden).
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Appends to an outbox at full speed from several threads and prints
    /// `lane seq payload` for every acknowledged append, until killed.
    OutboxFill {
        /// The data directory (the store is `<dir>/store`).
        #[arg(long)]
        data_dir: PathBuf,
        /// Appending threads.
        #[arg(long, default_value_t = 8)]
        writers: u32,
        /// Lanes used (0..lanes).
        #[arg(long, default_value_t = 3)]
        lanes: u8,
        /// Prefix of payloads, to tell runs apart.
        #[arg(long, default_value = "run")]
        tag: String,
    },
}

/// `holdfast cert …`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a fleet CA: <dir>/ca.pem and <dir>/ca.key (mode 0600).
    Ca {
        /// Where to write. Default ./certs.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Holdfast fleet CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for a node: <out>/<node-id>.pem and <node-id>.key.
    Node {
        /// The node's id (its `node.id`).
        node_id: String,
        /// Where the CA is. Default ./certs.
        #[arg(long, default_value = "certs")]
        ca_dir: PathBuf,
        /// Where to write. Default: the CA directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `holdfast queue …`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Backlog per lane (the default).
    List,
    /// Wait until the outbox (or one lane) is empty, with a progress bar;
    /// exits non-zero on timeout.
    WaitEmpty {
        /// Only this lane (0-9).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
        lane: Option<u8>,
        /// Give up after this many seconds (default: wait for ever).
        #[arg(long)]
        timeout: Option<u64>,
        /// Poll interval, milliseconds.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..))]
        interval_ms: u64,
    },
}

/// `holdfast link …`
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Link state, counters and connected child gateways.
    Status,
}

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
    /// Send a cloud-to-device message to a device connected to this node.
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
    },
}

/// `holdfast twin …`
#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Show a twin: desired and reported properties and their versions.
    Show {
        /// Device id or `{device}/{module}`.
        id: String,
    },
    /// Merge a JSON patch into the desired properties (null deletes a key).
    /// Connected devices get the patch; gateways below get it over the link.
    SetDesired {
        /// Device id or `{device}/{module}`.
        id: String,
        /// The patch, e.g. '{"mode":"eco","fan":null}'.
        patch: String,
    },
}

/// `holdfast cache …`
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Totals: objects, bytes stored, budget, free space, fills in flight.
    Stats,
    /// Stored objects, largest first.
    Objects {
        /// Most objects to list.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Delete stored objects: one key, every key with a prefix, or all.
    Purge {
        /// A cache key, e.g. `debian:/debian/pool/main/c/curl/curl_8.deb`.
        #[arg(long, conflicts_with_all = ["prefix", "all"])]
        key: Option<String>,
        /// Every key starting with this, e.g. `debian:`.
        #[arg(long, conflicts_with = "all")]
        prefix: Option<String>,
        /// Everything.
        #[arg(long)]
        all: bool,
    },
}

/// `holdfast method …`
#[derive(Debug, Subcommand)]
pub enum MethodCommand {
    /// Call a direct method and print the device's answer.
    Invoke {
        /// Device id or `{device}/{module}`.
        target: String,
        /// Method name.
        name: String,
        /// JSON payload. Default: null.
        payload: Option<String>,
        /// Seconds to wait for the answer (at most 300).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// `holdfast config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file; errors name the key.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print the embedded default configuration.
    Default,
}

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

/// Runs a parsed command line (everything except `run`, which `main` owns).
///
/// # Errors
/// Whatever the command hit, with context.
pub fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => bail!("`run` is handled by main"),
        Command::Init { path, force } => ops::init(&path, force),
        Command::Status => ops::status(&AdminClient::discover(&cli.admin)?, cli.admin.json),
        Command::Queue { command } => {
            let client = AdminClient::discover(&cli.admin)?;
            match command.unwrap_or(QueueCommand::List) {
                QueueCommand::List => ops::queue(&client, cli.admin.json),
                QueueCommand::WaitEmpty {
                    lane,
                    timeout,
                    interval_ms,
                } => ops::wait_empty(
                    &client,
                    lane,
                    timeout.map(Duration::from_secs),
                    Duration::from_millis(interval_ms),
                    cli.admin.json,
                ),
            }
        }
        Command::Clients { limit } => ops::clients(&AdminClient::discover(&cli.admin)?, limit, cli.admin.json),
        Command::Config(ConfigCommand::Check { file }) => {
            Config::load(&file)?;
            outln!("{}: ok", file.display());
            Ok(())
        }
        Command::Config(ConfigCommand::Default) => {
            out!("{}", crate::config::EMBEDDED_DEFAULT);
            Ok(())
        }
        Command::Passwd => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                bail!("empty password on stdin");
            }
            let hash = holdfast_model::identity::hash_password(password).map_err(|e| anyhow!("hashing failed: {e}"))?;
            outln!("{hash}");
            Ok(())
        }
        Command::Plugin(PluginCommand::New {
            kind,
            name,
            dir,
            sdk_path,
        }) => {
            let sdk = sdk_path.or_else(scaffold::default_sdk_path);
            let path = scaffold::create(kind, &name, &dir, sdk.as_deref())?;
            outln!("created {}", path.display());
            outln!(
                "next: cd {} && cargo build --target wasm32-wasip2 --release",
                path.display()
            );
            outln!(
                "then: holdfast plugin swap {} target/wasm32-wasip2/release/{}.wasm",
                kind.slot(),
                name.replace('-', "_")
            );
            Ok(())
        }
        Command::Debug(DebugCommand::OutboxFill {
            data_dir,
            writers,
            lanes,
            tag,
        }) => outbox_fill(&data_dir, writers, lanes.clamp(1, 10), &tag),
        Command::Plugin(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            plugin_command(&client, cmd, cli.admin.json)
        }
        Command::Cert(CertCommand::Ca { dir, name, days, force }) => {
            let (cert, key) = holdfast_tls::issue::ca(&dir, &name, days, force)?;
            outln!("fleet CA: {} (key {}, keep it safe)", cert.display(), key.display());
            Ok(())
        }
        Command::Cert(CertCommand::Node {
            node_id,
            ca_dir,
            out,
            days,
            force,
        }) => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            let (cert, key) = holdfast_tls::issue::node(&ca_dir, &out, &node_id, days, force)?;
            outln!("node {node_id}: {} (key {})", cert.display(), key.display());
            Ok(())
        }
        Command::Link(LinkCommand::Status) => {
            let client = AdminClient::discover(&cli.admin)?;
            link_status(&client, cli.admin.json)
        }
        Command::Device(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            device_command(&client, cmd, cli.admin.json)
        }
        Command::Twin(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            twin_command(&client, cmd, cli.admin.json)
        }
        Command::Cache(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            cache_command(&client, cmd, cli.admin.json)
        }
        Command::Reload => {
            let client = AdminClient::discover(&cli.admin)?;
            let v = client.post_json("/api/v1/reload", &json!({}))?;
            if cli.admin.json {
                return print_json(&v);
            }
            outln!("reloaded {}", str_of(&v["path"]));
            for (title, key) in [
                ("applied live", "applied"),
                ("needs a restart", "not_applied"),
                ("failed (old value kept)", "failed"),
            ] {
                let items: Vec<String> = v[key]
                    .as_array()
                    .map(|a| a.iter().map(str_of).collect())
                    .unwrap_or_default();
                if !items.is_empty() {
                    outln!("{title}:");
                    for i in items {
                        outln!("  {i}");
                    }
                }
            }
            Ok(())
        }
        Command::Method(MethodCommand::Invoke {
            target,
            name,
            payload,
            timeout,
        }) => {
            let client = AdminClient::discover(&cli.admin)?;
            let payload: Value = match payload {
                Some(p) => serde_json::from_str(&p).context("the payload must be JSON")?,
                None => Value::Null,
            };
            let body = serde_json::json!({ "payload": payload, "timeout_s": timeout });
            let v = client.post_json(
                &format!("/api/v1/devices/{}/methods/{}", segment(&target), segment(&name)),
                &body,
            )?;
            if cli.admin.json {
                return print_json(&v);
            }
            outln!("status {}", str_of(&v["status"]));
            outln!("{}", serde_json::to_string_pretty(&v["payload"])?);
            Ok(())
        }
    }
}

/// Percent-encodes one path segment (a module id has a '/').
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn identity_row(v: &Value) -> Vec<String> {
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

fn print_identity(v: &Value) {
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

fn device_command(client: &AdminClient, cmd: DeviceCommand, json: bool) -> Result<()> {
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
                &json!({ "payload": payload, "properties": props, "content_type": content_type }),
            )?;
            if json {
                return print_json(&v);
            }
            outln!("sent to {id} on {}", str_of(&v["topic"]));
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

fn cache_command(client: &AdminClient, cmd: CacheCommand, json: bool) -> Result<()> {
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

/// A size from JSON as `1.5 MiB`, or `-`.
fn bytes_of(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_string(), human_bytes)
}

/// `1.5 MiB`-style sizes.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn twin_command(client: &AdminClient, cmd: TwinCommand, json: bool) -> Result<()> {
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

fn outbox_fill(data_dir: &Path, writers: u32, lanes: u8, tag: &str) -> Result<()> {
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
                    let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
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

fn plugin_command(client: &AdminClient, cmd: PluginCommand, json: bool) -> Result<()> {
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
                None => client.post_bytes(&format!("/api/v1/plugins/{slot}/swap"), &wasm)?,
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

fn link_status(client: &AdminClient, json: bool) -> Result<()> {
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

fn read_plugin_config(path: &Path) -> Result<Value> {
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
const PLUGIN_HEADERS: &[&str] = &[
    "SLOT", "VERSION", "SOURCE", "LOADED", "CALLS", "TRAPS", "TIMEOUTS", "PREVIOUS",
];

/// A load, swap, reconfiguration or rollback: time, slot, action, old, new, source.
fn swap_row(r: &Value) -> Vec<String> {
    vec![
        format_time(r["at_unix_ms"].as_u64()),
        str_of(&r["slot"]),
        str_of(&r["action"]),
        short(&r["old"]),
        short(&r["new"]),
        str_of(&r["source"]),
    ]
}

fn plugin_row(p: &Value) -> Vec<String> {
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

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "-".to_string(),
    }
}

/// The first 12 hex digits of a version hash.
fn short(v: &Value) -> String {
    v.as_str()
        .map(|s| s.chars().take(12).collect())
        .unwrap_or_else(|| "-".to_string())
}

fn format_time(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".to_string() };
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = holdfast_model::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// GETs `path` and prints the array `key` of the answer as a table, or the
/// whole answer with `--json`.
fn print_list(
    client: &AdminClient,
    path: &str,
    json: bool,
    key: &str,
    headers: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<()> {
    let v = client.get(path)?;
    if json {
        return print_json(&v);
    }
    print_table(headers, &rows_of(&v, key, row));
    Ok(())
}

/// One table row per element of the array `v[key]`.
fn rows_of(v: &Value, key: &str, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v[key]
        .as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default()
}

fn print_json(v: &Value) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A client of a node's admin API.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl AdminClient {
    /// Finds the admin URL and token from flags, environment and config.
    ///
    /// # Errors
    /// No token could be found, or the config does not load.
    pub fn discover(args: &AdminArgs) -> Result<Self> {
        let config = match &args.config {
            Some(path) => Some(Config::load(path)?),
            None => None,
        };
        let base = match (&args.admin, &config) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(c)) => format!("http://{}", loopback_for(c.admin.listen)),
            (None, None) => "http://127.0.0.1:9600".to_string(),
        };
        let token_file = args.token_file.clone().unwrap_or_else(|| match &config {
            Some(c) => c.node.data_dir.join("admin.token"),
            None => PathBuf::from("./holdfast-data/admin.token"),
        });
        let token = match (&args.token, config.as_ref().and_then(|c| c.admin.token.clone())) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => t,
            (None, None) => std::fs::read_to_string(&token_file)
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "no admin token: pass --token, set HOLDFAST_ADMIN_TOKEN, or make {} readable",
                        token_file.display()
                    )
                })?,
        };
        Ok(Self::new(base, token))
    }

    /// A client for `base` (e.g. `http://127.0.0.1:9600`) with `token`.
    pub fn new(base: String, token: String) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        AdminClient { base, token, agent }
    }

    fn finish(&self, what: &str, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value> {
        let mut response = result.map_err(|e| anyhow!("cannot reach the admin API at {}: {e}", self.base))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {what}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{what}: {message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    /// GET a JSON document.
    ///
    /// # Errors
    /// Transport errors and non-2xx answers, with the server's message.
    pub fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(&format!("GET {path}"), r)
    }

    /// POST raw bytes.
    ///
    /// # Errors
    /// As [`AdminClient::get`].
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/wasm")
            .send(body);
        self.finish(&format!("POST {path}"), r)
    }

    /// DELETE a resource.
    ///
    /// # Errors
    /// As [`AdminClient::get`].
    pub fn delete(&self, path: &str) -> Result<Value> {
        let r = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(&format!("DELETE {path}"), r)
    }

    /// POST a JSON document.
    ///
    /// # Errors
    /// As [`AdminClient::get`].
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes());
        self.finish(&format!("POST {path}"), r)
    }
}

/// The address a local client should use for a listen address.
fn loopback_for(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port())),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(format_time(Some(0)), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(Some(1_700_000_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(format_time(Some(951_782_400_000)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["holdfast", "plugin", "swap", "router", "x.wasm", "--json"]).unwrap();
        assert!(cli.admin.json);
        assert!(Cli::try_parse_from(["holdfast", "plugin", "swap", "nope", "x.wasm"]).is_err());
    }
}
