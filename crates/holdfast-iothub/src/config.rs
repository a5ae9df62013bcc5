//! `[iothub]` of the node's configuration.

use serde::{Deserialize, Serialize};

/// `[iothub]`: the IoT Hub device dialect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IothubConfig {
    /// Cloud-to-device messages queued per device at one node; more are
    /// refused (feedback `rejected`). Default 50, as IoT Hub's.
    pub c2d_max_queued_per_device: usize,
    /// Time-to-live of a cloud-to-device message that names none, seconds.
    /// Default 3600, as IoT Hub's.
    pub c2d_default_ttl_seconds: u64,
}

impl Default for IothubConfig {
    fn default() -> Self {
        IothubConfig {
            c2d_max_queued_per_device: 50,
            c2d_default_ttl_seconds: 3600,
        }
    }
}

/// The longest time-to-live a cloud-to-device message may have, seconds (30 days).
pub const MAX_C2D_TTL_SECONDS: u64 = 30 * 86_400;

impl IothubConfig {
    /// Checks the values; on error the key at fault and why.
    ///
    /// # Errors
    /// A value out of range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=100_000).contains(&self.c2d_max_queued_per_device) {
            return Err(("iothub.c2d_max_queued_per_device", "must be 1-100000".into()));
        }
        if !(1..=MAX_C2D_TTL_SECONDS).contains(&self.c2d_default_ttl_seconds) {
            return Err((
                "iothub.c2d_default_ttl_seconds",
                format!("must be 1-{MAX_C2D_TTL_SECONDS}"),
            ));
        }
        Ok(())
    }
}
