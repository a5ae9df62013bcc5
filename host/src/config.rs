//! The gateway configuration: one TOML file, every key optional.
//!
//! The config is the factory: [`Config`] is deserialized with every default
//! filled in here, checked by [`Config::validate`], and the runtime is built
//! from it. `docs/configuration.md` documents every key; keep them in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration error that names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    /// A key has the wrong type or is unknown.
    #[error("config key {key}: {message}")]
    Key {
        /// Dotted path of the key, e.g. `plugins.router.deadline_ms`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[node]`
    pub node: NodeConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[admin]`
    pub admin: AdminConfig,
    /// `[plugins]`
    pub plugins: PluginsConfig,
    /// `[outbox]`
    pub outbox: OutboxConfig,
    /// `[[identities]]`: identities seeded from the config.
    pub identities: Vec<IdentityConfig>,
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id, shown to plugins and in metrics. Default `holdfast`.
    pub id: String,
    /// Where all state lives. Default `./holdfast-data`.
    pub data_dir: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "holdfast".to_string(),
            data_dir: PathBuf::from("./holdfast-data"),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `holdfast=debug`. `RUST_LOG` overrides it. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin API. Default true.
    pub enabled: bool,
    /// Listen address. Default `127.0.0.1:9600` (loopback only).
    pub listen: SocketAddr,
    /// Bearer token. Default: none, a random token is generated into
    /// `<data_dir>/admin.token` (mode 0600) on first start.
    pub token: Option<String>,
    /// Require the token for `/metrics` too. Default false.
    pub metrics_require_token: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9600)),
            token: None,
            metrics_require_token: false,
        }
    }
}

/// `[plugins]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    /// Compiled-artifact cache. Default `<data_dir>/plugin-cache`.
    pub cache_dir: Option<PathBuf>,
    /// A folder watched for `router.wasm`, `auth.wasm`, `content-source.wasm`;
    /// a changed file is swapped in. Default: none.
    pub watch_dir: Option<PathBuf>,
    /// How often the watched folder is scanned, ms. Default 1000.
    pub watch_interval_ms: u64,
    /// Capacity of the instance pool shared by all slots (instances alive at
    /// once, idle or busy). Default 128.
    pub max_instances: u32,
    /// `[plugins.router]`
    pub router: SlotConfig<RouterFailurePolicy>,
    /// `[plugins.auth]`
    pub auth: SlotConfig<AuthFailurePolicy>,
    /// `[plugins.content-source]`
    #[serde(rename = "content-source")]
    pub content_source: SlotConfig<ContentFailurePolicy>,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            cache_dir: None,
            watch_dir: None,
            watch_interval_ms: 1000,
            max_instances: 128,
            router: SlotConfig::default(),
            auth: SlotConfig::default(),
            content_source: SlotConfig::default(),
        }
    }
}

/// One plugin slot: `[plugins.router]`, `[plugins.auth]`, `[plugins.content-source]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlotConfig<P> {
    /// A `.wasm` component to load instead of the embedded default.
    pub file: Option<PathBuf>,
    /// The plugin's own configuration, passed to its `init` as JSON.
    pub config: toml::Table,
    /// Deadline for one call, ms; a call running longer is interrupted. Default 10.
    pub deadline_ms: u64,
    /// Linear-memory cap per instance, MiB. Default 64.
    pub memory_mib: u64,
    /// Idle instances kept warm. Default 8.
    pub pool_size: usize,
    /// What a call that traps, times out or runs out of memory yields.
    pub on_failure: P,
}

impl<P: Default> Default for SlotConfig<P> {
    fn default() -> Self {
        SlotConfig {
            file: None,
            config: toml::Table::new(),
            deadline_ms: 10,
            memory_mib: 64,
            pool_size: 8,
            on_failure: P::default(),
        }
    }
}

/// Router failure policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterFailurePolicy {
    /// Keep the message aside in the dead-letter sink (default).
    #[default]
    DeadLetter,
    /// Drop the message, counted under reason `plugin-failure`.
    Drop,
}

/// Auth failure policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthFailurePolicy {
    /// Refuse the CONNECT / deny the operation (default).
    #[default]
    Deny,
}

/// Content-source failure policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentFailurePolicy {
    /// Forward the request uncached to the host it named (default).
    #[default]
    PassThrough,
    /// Refuse with 403.
    Deny,
}

/// `[outbox]`: the durable store-and-forward queue of upstream-bound messages.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Time-to-live of a message whose route sets none, seconds. Default 7200.
    pub default_ttl_seconds: u64,
    /// Byte limit of queued messages. Default 10 GiB; the effective limit is
    /// the smaller of this and 80 % of the disk space free at start.
    pub max_bytes: u64,
    /// Message-count limit. Default 10,000,000.
    pub max_messages: u64,
    /// Appends are refused (or the oldest dropped) while the disk has less
    /// free space than this, bytes. Default 256 MiB.
    pub min_free_disk_bytes: u64,
    /// What happens when a limit is reached.
    pub when_full: WhenFull,
    /// `data` (fdatasync) or `all` (fsync) before an append is acknowledged. Default `data`.
    pub sync: SyncMode,
    /// Extra time the writer waits for more appends to share an fsync, µs.
    /// Default 0: appends that arrive while an fsync runs share the next one.
    pub commit_window_us: u64,
    /// Most operations in one commit. Default 8192.
    pub max_batch: usize,
    /// How lanes share the upstream: `strict` priority, or `bounded` (strict,
    /// but a waiting lane is served at least once every `starvation_limit` batches).
    pub scheduling: Scheduling,
    /// See `scheduling`. Default 8.
    pub starvation_limit: u32,
    /// Lanes (0-9) delivered live-first: traffic newer than the moment the
    /// link came up goes before the backlog. Default none.
    pub live_first_lanes: Vec<u8>,
    /// How often expired messages are swept, ms. Default 5000.
    pub expire_interval_ms: u64,
    /// Most messages examined per sweep. Default 20000.
    pub expire_scan_limit: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            default_ttl_seconds: 7200,
            max_bytes: 10 << 30,
            max_messages: 10_000_000,
            min_free_disk_bytes: 256 << 20,
            when_full: WhenFull::RejectNew,
            sync: SyncMode::Data,
            commit_window_us: 0,
            max_batch: 8192,
            scheduling: Scheduling::Strict,
            starvation_limit: 8,
            live_first_lanes: Vec::new(),
            expire_interval_ms: 5000,
            expire_scan_limit: 20_000,
        }
    }
}

/// What the outbox does when full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Refuse the new message (MQTT 5 reason 0x97 "quota exceeded").
    #[default]
    RejectNew,
    /// Drop the oldest messages of the lowest-priority lane until it fits.
    DropOldest,
}

/// How an append is made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// fdatasync.
    #[default]
    Data,
    /// fsync.
    All,
}

/// Lane scheduling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduling {
    /// Lower lane numbers always first.
    #[default]
    Strict,
    /// Strict, with bounded starvation.
    Bounded,
}

/// `[[identities]]`: an identity seeded from the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Device id, `{device}/{module}` for a module, gateway id, or username.
    pub id: String,
    /// `device`, `module`, `gateway` or `user`. Default `device`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Parent gateway id.
    pub parent: Option<String>,
    /// Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Primary symmetric key, base64.
    pub sas_primary: Option<String>,
    /// Secondary symmetric key, base64.
    pub sas_secondary: Option<String>,
    /// Certificate thumbprints (SHA-256, hex).
    #[serde(default)]
    pub thumbprints: Vec<String>,
    /// Argon2 PHC hash (`holdfast passwd` prints one).
    pub password_hash: Option<String>,
}

fn default_kind() -> String {
    "device".to_string()
}

fn yes() -> bool {
    true
}

/// The configuration `holdfast run` uses with no file: every default.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

impl Config {
    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// Syntax errors, unknown keys, wrong types and invalid values; the error
    /// names the key.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let message = e.inner().message().to_string();
            ConfigError::key(key, message)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a file.
    ///
    /// # Errors
    /// As [`Config::parse`], plus I/O errors.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Self {
        // The embedded file is checked by a unit test; a failure here is a build defect.
        Self::parse(EMBEDDED_DEFAULT).unwrap_or_default()
    }

    /// Checks values that types alone cannot.
    ///
    /// # Errors
    /// The first invalid value, by key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.id.is_empty() || self.node.id.len() > 128 {
            return Err(ConfigError::key("node.id", "must be 1-128 characters"));
        }
        if !self
            .node
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::key(
                "node.id",
                "may contain only letters, digits, '-', '_' and '.'",
            ));
        }
        if let Some(t) = &self.admin.token
            && t.len() < 16
        {
            return Err(ConfigError::key("admin.token", "must be at least 16 characters"));
        }
        if self.plugins.watch_interval_ms < 50 {
            return Err(ConfigError::key("plugins.watch_interval_ms", "must be at least 50"));
        }
        if !(4..=10_000).contains(&self.plugins.max_instances) {
            return Err(ConfigError::key("plugins.max_instances", "must be 4-10000"));
        }
        let o = &self.outbox;
        if o.default_ttl_seconds == 0 {
            return Err(ConfigError::key("outbox.default_ttl_seconds", "must be at least 1"));
        }
        if o.max_messages == 0 || o.max_bytes == 0 {
            return Err(ConfigError::key("outbox.max_messages", "limits must be at least 1"));
        }
        if !(1..=1_000_000).contains(&o.max_batch) {
            return Err(ConfigError::key("outbox.max_batch", "must be 1-1000000"));
        }
        if o.commit_window_us > 1_000_000 {
            return Err(ConfigError::key("outbox.commit_window_us", "must be at most 1000000"));
        }
        if o.starvation_limit == 0 {
            return Err(ConfigError::key("outbox.starvation_limit", "must be at least 1"));
        }
        if let Some(l) = o.live_first_lanes.iter().find(|l| **l > 9) {
            return Err(ConfigError::key(
                "outbox.live_first_lanes",
                format!("lane {l} is not 0-9"),
            ));
        }
        if o.expire_interval_ms < 100 || o.expire_scan_limit == 0 {
            return Err(ConfigError::key(
                "outbox.expire_interval_ms",
                "must be at least 100 (and the scan limit at least 1)",
            ));
        }
        self.plugins.router.validate("plugins.router")?;
        self.plugins.auth.validate("plugins.auth")?;
        self.plugins.content_source.validate("plugins.content-source")?;
        let mut seen = std::collections::HashSet::new();
        for (i, id) in self.identities.iter().enumerate() {
            let key = |k: &str| format!("identities[{i}].{k}");
            if id.id.is_empty() {
                return Err(ConfigError::key(key("id"), "is empty"));
            }
            if !seen.insert(id.id.as_str()) {
                return Err(ConfigError::key(key("id"), format!("{:?} appears twice", id.id)));
            }
            if crate::identity::parse_kind(&id.kind).is_none() {
                return Err(ConfigError::key(key("kind"), "must be device, module, gateway or user"));
            }
            for (k, v) in [("sas_primary", &id.sas_primary), ("sas_secondary", &id.sas_secondary)] {
                if let Some(v) = v {
                    use base64::Engine as _;
                    if base64::engine::general_purpose::STANDARD.decode(v).is_err() {
                        return Err(ConfigError::key(key(k), "is not base64"));
                    }
                }
            }
            for t in &id.thumbprints {
                if t.len() != 64 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ConfigError::key(
                        key("thumbprints"),
                        format!("{t:?} is not a SHA-256 hex thumbprint"),
                    ));
                }
            }
            if let Some(h) = &id.password_hash
                && argon2::PasswordHash::new(h).is_err()
            {
                return Err(ConfigError::key(
                    key("password_hash"),
                    "is not a PHC password hash (see `holdfast passwd`)",
                ));
            }
        }
        Ok(())
    }

    /// The plugin artifact cache directory.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugins
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("plugin-cache"))
    }
}

impl<P> SlotConfig<P> {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if !(1..=60_000).contains(&self.deadline_ms) {
            return Err(ConfigError::key(format!("{prefix}.deadline_ms"), "must be 1-60000"));
        }
        if !(1..=4096).contains(&self.memory_mib) {
            return Err(ConfigError::key(format!("{prefix}.memory_mib"), "must be 1-4096"));
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err(ConfigError::key(format!("{prefix}.pool_size"), "must be 1-256"));
        }
        if let Some(f) = &self.file
            && f.as_os_str().is_empty()
        {
            return Err(ConfigError::key(format!("{prefix}.file"), "is empty"));
        }
        Ok(())
    }

    /// The plugin's config table as JSON text.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_matches_the_built_in_defaults() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.node.data_dir, PathBuf::from("./holdfast-data"));
        assert_eq!(c.admin.listen, "127.0.0.1:9600".parse().unwrap());
        assert_eq!(c.plugins.router.deadline_ms, 10);
        assert_eq!(c.plugins.router.memory_mib, 64);
        assert!(c.plugins.auth.config.get("allow_anonymous").is_some());
        assert_eq!(Config::parse("").unwrap().plugins.router.deadline_ms, 10);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "[plugins.router]\ndeadline_ms = \"fast\"",
                "config key plugins.router.deadline_ms: invalid type",
            ),
            (
                "[plugins.router]\ndeadline_ms = 0",
                "config key plugins.router.deadline_ms: must be 1-60000",
            ),
            (
                "[plugins.auth]\non_failure = \"allow\"",
                "config key plugins.auth.on_failure: unknown variant `allow`",
            ),
            (
                "[admin]\nlisten = \"nowhere\"",
                "config key admin.listen: invalid socket address",
            ),
            ("[nodes]\nid = \"x\"", "unknown field `nodes`"),
            ("[node]\nid = \"a b\"", "config key node.id: may contain only"),
            (
                "[[identities]]\nid = \"d\"\nsas_primary = \"!!\"",
                "config key identities[0].sas_primary: is not base64",
            ),
            (
                "[[identities]]\nid = \"d\"\nkind = \"robot\"",
                "config key identities[0].kind",
            ),
            (
                "[plugins.content-source]\nmemory_mib = 99999",
                "config key plugins.content-source.memory_mib",
            ),
            ("node = 3 = 4", "config is not valid TOML"),
        ];
        for (text, want) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn example_configs_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                checked += 1;
            }
        }
        assert!(checked >= 1);
        // The documented password of the example user is the real one.
        let example = Config::load(&dir.join("single-node.toml")).unwrap();
        let identities = crate::identity::MemoryDirectory::from_config(&example);
        use crate::identity::IdentityDirectory as _;
        assert!(identities.verify_password("operator", b"secret"));
    }

    #[test]
    fn plugin_config_becomes_json() {
        let c = Config::parse("[plugins.router.config]\ndefault_lane = 3\nrules = [{filter = \"a/#\", local = true}]")
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&c.plugins.router.config_json()).unwrap();
        assert_eq!(v["default_lane"], 3);
        assert_eq!(v["rules"][0]["filter"], "a/#");
    }
}
