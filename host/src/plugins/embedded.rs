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
