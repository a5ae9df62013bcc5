//! The gateway configuration: one TOML file, every key optional.
//!
//! The config is the factory: [`Config`] is deserialized with every default
//! filled in here, checked by [`Config::validate`], and the runtime is built
//! from it. `docs/configuration.md` documents every key; keep them in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use holdfast_broker::config::{MqttConfig, TcpListenerConfig, TlsListenerConfig};
pub use holdfast_cache::config::CacheConfig;
pub use holdfast_link::config::{
    BridgeConfig, BridgeInConfig, BridgeProtocol, FleetConfig, LinkConfig, Sections as LinkSections, UpstreamConfig,
    UpstreamKind, UpstreamQuicConfig,
};
pub use holdfast_outbox::config::{OutboxConfig, Scheduling, SyncMode, WhenFull};
pub use holdfast_plugins::config::{
    AuthFailurePolicy, ContentFailurePolicy, PluginsConfig, RouterFailurePolicy, SlotConfig,
};
pub use holdfast_registry::IdentityConfig;

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
    /// `[dead_letter]`: the quota of the dead-letter store.
    pub dead_letter: holdfast_outbox::dead_letter::DeadLetterConfig,
    /// `[mqtt]`
    pub mqtt: MqttConfig,
    /// `[fleet]`: this node's certificate in the fleet.
    pub fleet: FleetConfig,
    /// `[link]`: the QUIC listener child gateways connect to.
    pub link: LinkConfig,
    /// `[upstream]`: where the outbox drains to.
    pub upstream: UpstreamConfig,
    /// `[[identities]]`: identities seeded from the config.
    pub identities: Vec<IdentityConfig>,
    /// `[cache]`: the HTTP range cache for update and package content.
    pub cache: CacheConfig,
    /// `[iothub]`: the IoT Hub device dialect (cloud-to-device queues).
    pub iothub: holdfast_iothub::config::IothubConfig,
    /// `[deploy]`: fleet deployments (pins, signing key).
    pub deploy: holdfast_deploy::config::DeployConfig,
    /// `[trace]`: traces of messages across hops, exported over OTLP/HTTP.
    pub trace: crate::trace_export::TraceConfig,
    /// The file this config was read from (`None`: the embedded default).
    #[serde(skip)]
    pub source_path: Option<PathBuf>,
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id, shown to plugins and in metrics. Default `holdfast`.
    pub id: String,
    /// Where all state lives. Default `./holdfast-data`.
    pub data_dir: PathBuf,
    /// How long a SIGTERM may take: connections finish the writes they
    /// started, tasks stop, then the store is synced. Default 10000.
    pub shutdown_timeout_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: "holdfast".to_string(),
            data_dir: PathBuf::from("./holdfast-data"),
            shutdown_timeout_ms: 10_000,
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

/// The configuration `holdfast run` uses with no file: every default.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-config.toml");

impl Config {
    /// The sections the link reads.
    pub fn link_sections(&self) -> LinkSections<'_> {
        LinkSections {
            fleet: &self.fleet,
            link: &self.link,
            upstream: &self.upstream,
        }
    }

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
        let mut config = Self::parse(&text)?;
        config.source_path = Some(path.to_path_buf());
        Ok(config)
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Self {
        // The embedded file is checked by a unit test; a failure here is a build defect.
        Self::parse(EMBEDDED_DEFAULT).unwrap_or_default()
    }

    /// Takes `new`'s values of the keys a reload applies live
    /// (`reload::LIVE_KEYS` except `log.level`, which the reloader sets
    /// itself once it is in force), so the next reload compares with them.
    pub fn adopt_live(&mut self, new: &Config) {
        let (m, o, c) = (&mut self.mqtt, &mut self.outbox, &mut self.cache);
        m.max_connections = new.mqtt.max_connections;
        m.max_queued_messages = new.mqtt.max_queued_messages;
        m.max_retained = new.mqtt.max_retained;
        o.default_ttl_seconds = new.outbox.default_ttl_seconds;
        o.max_messages = new.outbox.max_messages;
        o.max_bytes = new.outbox.max_bytes;
        o.min_free_disk_bytes = new.outbox.min_free_disk_bytes;
        o.when_full = new.outbox.when_full;
        c.max_size = new.cache.max_size;
        c.min_free = new.cache.min_free;
        c.orphan_fill_bytes = new.cache.orphan_fill_bytes;
        self.upstream.max_bytes_per_second = new.upstream.max_bytes_per_second;
        self.dead_letter = new.dead_letter.clone();
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
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::key("log.level", format!("not a tracing filter: {e}")));
        }
        if !(100..=600_000).contains(&self.node.shutdown_timeout_ms) {
            return Err(ConfigError::key("node.shutdown_timeout_ms", "must be 100-600000"));
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
        self.cache.validate().map_err(|(key, why)| ConfigError::key(key, why))?;
        self.iothub
            .validate()
            .map_err(|(key, why)| ConfigError::key(key, why))?;
        self.outbox
            .validate()
            .map_err(|(key, why)| ConfigError::key(key, why))?;
        self.mqtt.validate().map_err(|(key, why)| ConfigError::key(key, why))?;
        self.deploy
            .validate()
            .map_err(|(key, why)| ConfigError::key(key, why))?;
        self.trace.validate().map_err(|(key, why)| ConfigError::key(key, why))?;
        self.validate_link()?;
        self.plugins
            .router
            .validate("plugins.router")
            .map_err(|(key, why)| ConfigError::key(key, why))?;
        self.plugins
            .auth
            .validate("plugins.auth")
            .map_err(|(key, why)| ConfigError::key(key, why))?;
        self.plugins
            .content_source
            .validate("plugins.content-source")
            .map_err(|(key, why)| ConfigError::key(key, why))?;
        let mut seen = std::collections::HashSet::new();
        for (i, id) in self.identities.iter().enumerate() {
            let key = |k: &str| format!("identities[{i}].{k}");
            if id.id.is_empty() {
                return Err(ConfigError::key(key("id"), "is empty"));
            }
            if !seen.insert(id.id.as_str()) {
                return Err(ConfigError::key(key("id"), format!("{:?} appears twice", id.id)));
            }
            let Some(kind) = holdfast_registry::Kind::parse(&id.kind) else {
                return Err(ConfigError::key(key("kind"), "must be device, module, gateway or user"));
            };
            if let Err(e) = holdfast_registry::check_id(&id.id, kind) {
                return Err(ConfigError::key(key("id"), e.to_string()));
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

    fn validate_link(&self) -> Result<(), ConfigError> {
        let f = &self.fleet;
        let fleet_needed = self.link.enabled || self.upstream.kind == UpstreamKind::Quic;
        if fleet_needed {
            let id = &self.node.id;
            if id.len() > 63 || id.contains('_') {
                return Err(ConfigError::key(
                    "node.id",
                    "a node on a QUIC link is named in its certificate: at most 63 letters, digits, '-' or '.'",
                ));
            }
            for (k, v) in [("ca", &f.ca), ("cert", &f.cert), ("key", &f.key)] {
                if v.is_none() {
                    return Err(ConfigError::key(
                        format!("fleet.{k}"),
                        "is required for the QUIC link (see `holdfast cert`)",
                    ));
                }
            }
        }
        if self.link.max_children == 0 {
            return Err(ConfigError::key("link.max_children", "must be at least 1"));
        }
        if self.link.max_batch_bytes < 4096 {
            return Err(ConfigError::key("link.max_batch_bytes", "must be at least 4096"));
        }
        let u = &self.upstream;
        if !(1..=100_000).contains(&u.batch_messages) {
            return Err(ConfigError::key("upstream.batch_messages", "must be 1-100000"));
        }
        if !(1..=10_000_000).contains(&u.window_messages) {
            return Err(ConfigError::key("upstream.window_messages", "must be 1-10000000"));
        }
        if u.backoff_initial_ms == 0 || u.backoff_max_ms < u.backoff_initial_ms {
            return Err(ConfigError::key(
                "upstream.backoff_max_ms",
                "backoff_initial_ms must be at least 1 and at most backoff_max_ms",
            ));
        }
        if u.probe_interval_ms != 0 && u.probe_interval_ms < 10 {
            return Err(ConfigError::key(
                "upstream.probe_interval_ms",
                "must be 0 (off) or at least 10",
            ));
        }
        if u.connect_timeout_ms < 100 {
            return Err(ConfigError::key("upstream.connect_timeout_ms", "must be at least 100"));
        }
        if !(1..=19).contains(&u.compression_level) {
            return Err(ConfigError::key("upstream.compression_level", "must be 1-19"));
        }
        match u.kind {
            UpstreamKind::None => {}
            UpstreamKind::Quic => {
                let q = &u.quic;
                if q.parent.is_empty() {
                    return Err(ConfigError::key("upstream.quic.parent", "is required (host:port)"));
                }
                if q.parent
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .is_none()
                {
                    return Err(ConfigError::key("upstream.quic.parent", "must be host:port"));
                }
                if q.parent_id.is_empty() || rustls_pki_types::ServerName::try_from(q.parent_id.as_str()).is_err() {
                    return Err(ConfigError::key(
                        "upstream.quic.parent_id",
                        "must be the parent's node id (a DNS-style name)",
                    ));
                }
                if q.keep_alive_ms < 10 || q.idle_timeout_ms <= q.keep_alive_ms {
                    return Err(ConfigError::key(
                        "upstream.quic.idle_timeout_ms",
                        "must be greater than keep_alive_ms (at least 10)",
                    ));
                }
            }
            UpstreamKind::Nats => {
                u.nats.validate().map_err(|(k, why)| ConfigError::key(k, why))?;
                let n = &u.nats;
                let tls = n.tls || n.urls().iter().any(|s| s.starts_with("tls://"));
                if tls && n.ca.is_none() && f.ca.is_none() {
                    return Err(ConfigError::key("upstream.nats.ca", "is required with TLS"));
                }
                if !n.c2d.add_prefix.is_empty() && !holdfast_mqtt::topic::valid_name(&n.c2d.add_prefix) {
                    return Err(ConfigError::key(
                        "upstream.nats.c2d.add_prefix",
                        "is not a valid topic prefix",
                    ));
                }
            }
            UpstreamKind::Mqtt => {
                let m = &u.mqtt;
                if m.host.is_empty() && m.servers.is_empty() {
                    return Err(ConfigError::key(
                        "upstream.mqtt.host",
                        "is required (or upstream.mqtt.servers)",
                    ));
                }
                if let Some(i) = m.servers.iter().position(|s| {
                    s.trim().is_empty() || s.contains("://") || !holdfast_link::nats::config::unambiguous(s)
                }) {
                    return Err(ConfigError::key(
                        format!("upstream.mqtt.servers[{i}]"),
                        "must be host, host:port or [IPv6]:port",
                    ));
                }
                if m.inflight == 0 {
                    return Err(ConfigError::key("upstream.mqtt.inflight", "must be 1-65535"));
                }
                if m.tls && m.ca.is_none() && f.ca.is_none() {
                    return Err(ConfigError::key("upstream.mqtt.ca", "is required with tls = true"));
                }
                if m.cert.is_some() != m.key.is_some() {
                    return Err(ConfigError::key("upstream.mqtt.cert", "cert and key go together"));
                }
                if m.cert.is_some() && !m.tls {
                    return Err(ConfigError::key("upstream.mqtt.cert", "needs tls = true"));
                }
                if !m.add_prefix.is_empty() && !holdfast_mqtt::topic::valid_name(&m.add_prefix) {
                    return Err(ConfigError::key(
                        "upstream.mqtt.add_prefix",
                        "is not a valid topic prefix",
                    ));
                }
                for (i, r) in m.inbound.iter().enumerate() {
                    if !holdfast_mqtt::topic::valid_filter(&r.filter) {
                        return Err(ConfigError::key(
                            format!("upstream.mqtt.in[{i}].filter"),
                            "is not a valid topic filter",
                        ));
                    }
                    if r.qos.is_some_and(|q| q > 1) {
                        return Err(ConfigError::key(format!("upstream.mqtt.in[{i}].qos"), "must be 0 or 1"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The range cache's block directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .dir
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("cache"))
    }

    /// The plugin artifact cache directory.
    pub fn plugin_cache_dir(&self) -> PathBuf {
        self.plugins
            .cache_dir
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("plugin-cache"))
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
    fn a_quic_table_without_listen_keeps_the_quic_port() {
        let c = Config::parse("[mqtt.quic]\nenabled = false\n[mqtt.tls]\nenabled = false\n").unwrap();
        assert_eq!(c.mqtt.quic.listen.port(), 14567);
        assert_eq!(c.mqtt.tls.listen.port(), 8883);
        let c = Config::parse("[mqtt.quic]\nlisten = \"127.0.0.1:9999\"\n").unwrap();
        assert_eq!(c.mqtt.quic.listen.port(), 9999);
        let e = Config::parse("[mqtt.quic]\nlisen = \"127.0.0.1:9999\"\n").unwrap_err();
        assert!(e.to_string().contains("lisen"), "{e}");
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
            (
                "[mqtt]\nmax_client_id_length = 70000",
                "config key mqtt.max_client_id_length: must be 1-65535",
            ),
            (
                "[mqtt.tls]\nenabled = true",
                "config key mqtt.tls.cert: cert and key are required",
            ),
            (
                "[upstream]\nkind = \"quic\"",
                "config key fleet.ca: is required for the QUIC link",
            ),
            (
                "[fleet]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[upstream]\nkind = \"quic\"\n[upstream.quic]\nparent = \"x\"",
                "config key upstream.quic.parent: must be host:port",
            ),
            (
                "[upstream]\nkind = \"mqtt\"\n[[upstream.mqtt.in]]\nfilter = \"a/#/b\"",
                "config key upstream.mqtt.host: is required",
            ),
            (
                "[upstream]\nkind = \"mqtt\"\n[upstream.mqtt]\nhost = \"h\"\n[[upstream.mqtt.in]]\nfilter = \"a/#/b\"",
                "config key upstream.mqtt.in[0].filter",
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
        let identities = holdfast_registry::directory_from_config(&example.identities);
        use holdfast_model::identity::IdentityDirectory as _;
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
