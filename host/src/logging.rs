//! The log filter: set from `log.level` at start (unless `RUST_LOG` is set)
//! and changed by a config reload.

use std::sync::OnceLock;

type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static SET_FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Installs the function that replaces the running filter (the binary does
/// this when `log.level` is in force, not `RUST_LOG`).
pub fn install(set: SetFilter) {
    let _ = SET_FILTER.set(set);
}

/// Replaces the running filter with `level`, a `tracing` filter.
///
/// # Errors
/// The filter does not parse, or no filter is installed (`RUST_LOG` rules,
/// or the library runs without the binary's logging).
pub fn set_level(level: &str) -> Result<(), String> {
    match SET_FILTER.get() {
        Some(set) => set(level),
        None => Err("not changed: RUST_LOG overrides log.level (or this process installed no log filter)".to_string()),
    }
}

/// True when no filter is installed: `RUST_LOG` rules (or the library runs
/// without the binary's logging), so `log.level` is not applied.
pub fn overridden() -> bool {
    SET_FILTER.get().is_none()
}
