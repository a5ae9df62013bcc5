//! `[outbox]` of the node's configuration.

use serde::{Deserialize, Serialize};

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
    /// A lane is *stuck* when it holds messages and its oldest message has not
    /// moved for this long while the link was up, seconds: logged at warn, counted
    /// and shown (`holdfast_outbox_stuck`). 0 turns the check off. Default 300.
    pub stuck_after_seconds: u64,
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
            stuck_after_seconds: 300,
        }
    }
}

impl OutboxConfig {
    /// Checks the values; on error the key at fault and why.
    ///
    /// # Errors
    /// A value out of range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let o = self;
        if o.default_ttl_seconds == 0 {
            return Err(("outbox.default_ttl_seconds", "must be at least 1".to_string()));
        }
        if o.max_messages == 0 || o.max_bytes == 0 {
            return Err(("outbox.max_messages", "limits must be at least 1".to_string()));
        }
        if !(1..=1_000_000).contains(&o.max_batch) {
            return Err(("outbox.max_batch", "must be 1-1000000".to_string()));
        }
        if o.commit_window_us > 1_000_000 {
            return Err(("outbox.commit_window_us", "must be at most 1000000".to_string()));
        }
        if o.starvation_limit == 0 {
            return Err(("outbox.starvation_limit", "must be at least 1".to_string()));
        }
        if let Some(l) = o.live_first_lanes.iter().find(|l| **l > 9) {
            return Err(("outbox.live_first_lanes", format!("lane {l} is not 0-9")));
        }
        if o.expire_interval_ms < 100 || o.expire_scan_limit == 0 {
            return Err((
                "outbox.expire_interval_ms",
                "must be at least 100 (and the scan limit at least 1)".to_string(),
            ));
        }
        Ok(())
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
