//! The default plugins, built for wasm32-wasip2 by `build.rs` and embedded
//! in the binary so `holdfast run` needs no plugin files.

use super::SlotName;

static ROUTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/router.wasm"));
static AUTH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/auth.wasm"));
static CONTENT_SOURCE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/content-source.wasm"));

/// The embedded default plugin for `slot`.
pub fn embedded_plugin(slot: SlotName) -> &'static [u8] {
    match slot {
        SlotName::Router => ROUTER,
        SlotName::Auth => AUTH,
        SlotName::ContentSource => CONTENT_SOURCE,
    }
}

/// Where `build.rs` left the components it built, for tests and benches:
/// the test router (trap, loop and memory-bomb topics), the test content
/// source (the same by path), the example alert router and the default auth
/// plugin.
pub mod artifacts {
    /// `tests/plugins/test-router`, built for wasm32-wasip2.
    pub const TEST_ROUTER_WASM: &str = env!("HOLDFAST_TEST_ROUTER_WASM");
    /// `tests/plugins/test-content-source`, built for wasm32-wasip2.
    pub const TEST_CONTENT_SOURCE_WASM: &str = env!("HOLDFAST_TEST_CONTENT_SOURCE_WASM");
    /// `examples/alert-router`, built for wasm32-wasip2.
    pub const EXAMPLE_ALERT_ROUTER_WASM: &str = env!("HOLDFAST_EXAMPLE_ALERT_ROUTER_WASM");
    /// `plugins/auth`, built for wasm32-wasip2.
    pub const AUTH_WASM: &str = env!("HOLDFAST_AUTH_WASM");
    /// The cargo target directory the wasm components are built in.
    pub const WASM_TARGET_DIR: &str = env!("HOLDFAST_WASM_TARGET_DIR");
}
