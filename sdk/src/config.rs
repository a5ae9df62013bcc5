//! The plugin's read-only configuration.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// The plugin's configuration: the `[plugins.<slot>.config]` table of the
/// gateway config, handed to `init` as JSON.
///
/// ```
/// use holdfast_sdk::Config;
/// #[derive(serde::Deserialize)]
/// struct Settings { lane: u8 }
/// let config = Config::parse(r#"{"lane": 3}"#).unwrap();
/// let settings: Settings = config.deserialize().unwrap();
/// assert_eq!(settings.lane, 3);
/// assert_eq!(config.get("lane").and_then(|v| v.as_u64()), Some(3));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    value: Value,
}

impl Config {
    /// An empty configuration (`{}`).
    pub fn empty() -> Self {
        Config {
            value: Value::Object(Default::default()),
        }
    }

    /// Parses configuration JSON. An empty string is an empty configuration.
    ///
    /// # Errors
    /// The text is not JSON, or not a JSON object.
    pub fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::empty());
        }
        let value: Value = serde_json::from_str(json).map_err(|e| format!("plugin config is not valid JSON: {e}"))?;
        if !value.is_object() {
            return Err("plugin config must be a table (JSON object)".to_string());
        }
        Ok(Config { value })
    }

    /// Builds a configuration from a JSON value (for tests).
    pub fn from_value(value: Value) -> Self {
        Config { value }
    }

    /// Deserializes the whole configuration into `T`.
    ///
    /// # Errors
    /// The configuration does not have the shape of `T`; the message names the
    /// offending field.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_value(self.value.clone()).map_err(|e| format!("plugin config: {e}"))
    }

    /// The value under a top-level key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key)
    }

    /// The configuration as a JSON value.
    pub fn as_value(&self) -> &Value {
        &self.value
    }
}
