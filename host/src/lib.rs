//! # holdfast
//!
//! An offline-first IoT edge gateway: one binary between child devices and
//! the upstream hub that keeps a site working while its uplink is down.
//! Policy (routing, authentication, content sources) runs as sandboxed
//! WebAssembly plugins that are swapped while traffic flows.
//!
//! This crate is the gateway library and the `holdfast` binary. It is not
//! the plugin SDK (that is `holdfast-sdk`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = holdfast::config::Config::embedded_default();
//! let ctrl_c = || async { let _ = tokio::signal::ctrl_c().await; };
//! holdfast::node::run(config, ctrl_c(), ctrl_c()).await?;
//! # Ok(()) }
//! ```
pub mod admin;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod edge_manifest;
pub mod fleet;
pub mod history;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod reload;
pub mod scaffold;
pub mod state;
pub mod trace_export;
