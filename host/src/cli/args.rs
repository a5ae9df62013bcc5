//! The command-line arguments: every command and its options.

#[allow(unused_imports)]
use super::*;

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
    /// Fleet deployments: plugins, plugin configs and live settings rolled
    /// out down the tree, in waves, signed by the owning node.
    #[command(subcommand)]
    Deploy(DeployCommand),
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
