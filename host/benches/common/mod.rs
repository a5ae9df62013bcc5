//! Shared by the plugin benchmarks: a plugin host on a temporary data
//! directory, and timing by median of rounds.

use std::sync::Arc;
use std::time::Instant;

use holdfast::config::Config;
use holdfast_model::identity::MemoryDirectory;
use holdfast_plugins::{NodeContext, PluginHost, PluginMetrics};

/// A plugin host with the embedded default plugins, its data (the compile
/// cache) in `data_dir`.
pub fn plugin_host(data_dir: &std::path::Path) -> PluginHost {
    let config = Config::parse(&format!("[node]\ndata_dir = {:?}\n", data_dir.display().to_string())).expect("config");
    PluginHost::new(
        &config.plugins,
        Some(config.plugin_cache_dir()),
        NodeContext {
            node_id: "bench".into(),
            started: Instant::now(),
            identities: Arc::new(MemoryDirectory::new()),
            metrics: Arc::new(PluginMetrics::default()),
        },
    )
    .expect("plugins")
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median ns per call of `f` over `rounds` rounds of `n` calls, after a
/// warm-up of `n / 10` calls.
pub fn measure(rounds: usize, n: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let per_round: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    median(per_round)
}
