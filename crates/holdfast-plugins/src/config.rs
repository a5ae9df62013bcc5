//! `[plugins]` of the node's configuration.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    /// Keep the message in the node's durable dead-letter store, with the
    /// failure as its reason (`router-failure:trap`, `…:timeout`), to be
    /// listed, replayed or purged (`holdfast dead-letter`); the publisher
    /// is acknowledged once it is stored (default).
    #[default]
    DeadLetter,
    /// Drop the message, counted under reason `router-failure`.
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
    /// Forward the request uncached to the origin the slot's config
    /// (`sources[].hosts` / `origin`) names for the request's host; refuse
    /// with 403 when it names none (default). Never the host the client
    /// named by itself.
    #[default]
    PassThrough,
    /// Refuse with 403.
    Deny,
}

impl<P> SlotConfig<P> {
    /// Checks the values; on error the key at fault (under `prefix`) and why.
    ///
    /// # Errors
    /// A value out of range.
    pub fn validate(&self, prefix: &str) -> Result<(), (String, String)> {
        if !(1..=60_000).contains(&self.deadline_ms) {
            return Err((format!("{prefix}.deadline_ms"), "must be 1-60000".to_string()));
        }
        if !(1..=4096).contains(&self.memory_mib) {
            return Err((format!("{prefix}.memory_mib"), "must be 1-4096".to_string()));
        }
        if !(1..=256).contains(&self.pool_size) {
            return Err((format!("{prefix}.pool_size"), "must be 1-256".to_string()));
        }
        if let Some(f) = &self.file
            && f.as_os_str().is_empty()
        {
            return Err((format!("{prefix}.file"), "is empty".to_string()));
        }
        Ok(())
    }

    /// The plugin's config table as JSON text.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".to_string())
    }
}
