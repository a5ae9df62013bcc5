//! Holdfast: an offline-first IoT edge gateway.
pub mod config;
pub mod identity;
pub mod metrics;
pub mod plugins;
