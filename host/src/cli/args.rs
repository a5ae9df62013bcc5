//! The command-line arguments: every command and its options.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use super::cache::CacheCommand;
use super::deadletter::DeadLetterCommand;
use super::deploy::DeployCommand;
use super::device::DeviceCommand;
use super::import::ImportCommand;
use super::plugin::PluginCommand;
use super::twin::TwinCommand;

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
    /// Every node of a running node's subtree: state, link, backlog, drain,
    /// clients, deployment (the root sees the whole fleet).
    Fleet {
        /// `forget NODE`; without one, the nodes are listed.
        #[command(subcommand)]
        command: Option<FleetCommand>,
        /// Only nodes in these states: ok, warning, stuck, offline, not-reporting, unknown.
        #[arg(long, value_delimiter = ',')]
        state: Vec<String>,
        /// Only nodes carrying this label (key=value; repeat for all of several).
        #[arg(long)]
        label: Vec<String>,
        /// Only this node and the nodes under it.
        #[arg(long)]
        subtree: Option<String>,
        /// Only nodes whose id contains this.
        #[arg(long, short = 'q')]
        search: Option<String>,
        /// Redraw every SECS seconds (default 2) until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2", value_name = "SECS")]
        watch: Option<u64>,
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
    /// What the node could not route or deliver: list, show, replay, purge.
    #[command(subcommand)]
    DeadLetter(DeadLetterCommand),
    /// Fleet deployments: plugins, plugin configs and live settings rolled
    /// out down the tree, in waves, signed by the owning node.
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// Take another gateway's configuration as it is: an IoT Edge
    /// deployment manifest (`import edge-manifest`).
    #[command(subcommand)]
    Import(ImportCommand),
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

/// `holdfast fleet …`
#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Remove a node that stopped reporting (decommissioned or moved) from
    /// this node's view; the removal goes up to its ancestors.
    Forget {
        /// The node.
        node: String,
    },
}

/// `holdfast link …`
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Link state, counters and connected child gateways.
    Status,
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

/// `KEY=VALUE` arguments as a JSON object of strings.
pub(crate) fn key_values(items: &[String], what: &str) -> Result<serde_json::Map<String, Value>> {
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
pub(crate) fn slot_values(items: &[String], what: &str) -> Result<Vec<(String, String)>> {
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
