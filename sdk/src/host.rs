//! Services the gateway offers every plugin: logging, clocks, node id and
//! configuration.
//!
//! In a wasm build these call the host; in a native build they are answered
//! by the thread-local [`crate::testing::TestHost`].

/// Severity of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Diagnostic detail.
    Debug,
    /// Normal operational messages.
    Info,
    /// Something unexpected that was handled.
    Warn,
    /// Something that could not be handled.
    Error,
}

/// Emits a log record through the gateway's logger. The host tags it with
/// the plugin's slot and version.
pub fn log(level: Level, message: &str) {
    imp::log(level, message)
}

/// Logs at info level.
pub fn info(message: &str) {
    log(Level::Info, message)
}

/// Logs at warn level.
pub fn warn(message: &str) {
    log(Level::Warn, message)
}

/// Logs at debug level.
pub fn debug(message: &str) {
    log(Level::Debug, message)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    imp::now_unix_ms()
}

/// Monotonic nanoseconds since an arbitrary fixed point.
pub fn monotonic_ns() -> u64 {
    imp::monotonic_ns()
}

/// The id of the node running the plugin.
pub fn node_id() -> String {
    imp::node_id()
}

/// The plugin's configuration JSON, as passed to `init`.
pub fn config_json() -> String {
    imp::config()
}

#[cfg(target_arch = "wasm32")]
#[cfg(any(feature = "router", feature = "auth", feature = "content-source"))]
mod imp {
    use super::Level;
    use crate::__wit::host as wit;

    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => wit::Level::Trace,
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        };
        wit::log(level, message)
    }
    pub fn now_unix_ms() -> u64 {
        wit::now_unix_ms()
    }
    pub fn monotonic_ns() -> u64 {
        wit::monotonic_ns()
    }
    pub fn node_id() -> String {
        wit::node_id()
    }
    pub fn config() -> String {
        wit::config()
    }
}

// A wasm build without a plugin kind has no host to call.
#[cfg(all(
    target_arch = "wasm32",
    not(any(feature = "router", feature = "auth", feature = "content-source"))
))]
compile_error!("holdfast-sdk: a wasm plugin must enable one of the features `router`, `auth`, `content-source`");

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::Level;
    use crate::testing::with_host;

    pub fn log(level: Level, message: &str) {
        with_host(|h| h.logs.push((level, message.to_string())))
    }
    pub fn now_unix_ms() -> u64 {
        with_host(|h| h.now_unix_ms)
    }
    pub fn monotonic_ns() -> u64 {
        with_host(|h| h.monotonic_ns)
    }
    pub fn node_id() -> String {
        with_host(|h| h.node_id.clone())
    }
    pub fn config() -> String {
        with_host(|h| h.config_json.clone())
    }
}
