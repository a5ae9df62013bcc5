//! Cost of routing one message through the router plugin, beside a native
//! baseline, and the latency of a hot swap. Prints figures; asserts nothing.
//!
//! Run: `cargo bench -p holdfast --bench route` (add `-- --quick` for a short run).
//!
//! Method: one thread calls `PluginHost::route` (the same path the broker
//! uses: an `Arc` message handed over as a WIT resource, a warm pooled
//! instance, the epoch deadline, metrics) in rounds of N messages; each
//! round's ns/message is recorded and the median of the rounds is printed.
//! The native baseline is a Rust function making the same decision as the
//! default router, with the same `Arc<Message>` and the same output
//! allocation, so the ratio is the price of the sandbox.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use holdfast_plugins::{Action, LocalAction, Message, RouteOutcome, SlotName, UpstreamAction, embedded_plugin};

use common::{measure, median, plugin_host};

const TEST_ROUTER: &str = holdfast_plugins::artifacts::TEST_ROUTER_WASM;
const ALERT_ROUTER: &str = holdfast_plugins::artifacts::EXAMPLE_ALERT_ROUTER_WASM;

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// What the default router decides, natively.
#[inline(never)]
fn native_route(msg: &Arc<Message>) -> RouteOutcome {
    black_box(&msg.topic);
    RouteOutcome::Actions(vec![
        Action::Upstream(UpstreamAction {
            lane: 5,
            ttl_seconds: None,
            topic: None,
            payload: None,
            add_properties: Vec::new(),
        }),
        Action::Local(LocalAction {
            topic: None,
            payload: None,
            add_properties: Vec::new(),
        }),
    ])
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, n) = if quick { (5, 20_000) } else { (15, 200_000) };
    let dir = tempfile::tempdir().expect("temp dir");
    let default_host = plugin_host(dir.path());
    let payload_host = plugin_host(dir.path());
    let test_router = std::fs::read(TEST_ROUTER).expect("test router wasm");
    payload_host
        .swap(SlotName::Router, &test_router, "bench".into(), Some("{}".into()))
        .expect("swap test router");

    if std::env::args().any(|a| a == "--profile") {
        // For `perf record`: the topic-only case alone, for about five seconds.
        let msg = Arc::new(Message::new("telemetry/t1", vec![7u8; 256], "bench-client"));
        let t = Instant::now();
        let mut calls = 0u64;
        while t.elapsed().as_secs() < 5 {
            for _ in 0..10_000 {
                black_box(default_host.route(black_box(msg.clone())));
            }
            calls += 10_000;
        }
        println!("{:.1} ns/message", t.elapsed().as_nanos() as f64 / calls as f64);
        return;
    }

    println!("holdfast route benchmark: {rounds} rounds x {n} messages, single thread, median ns/message");
    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>14}",
        "case", "256 B", "64 KiB", "64K/256 ratio"
    );
    let mut rows = Vec::new();
    for (name, host, topic) in [
        ("native baseline (same decision, no sandbox)", None, "telemetry/t1"),
        (
            "default router, reads only the topic",
            Some(&default_host),
            "telemetry/t1",
        ),
        (
            "test router, reads the whole payload",
            Some(&payload_host),
            "payload/t1",
        ),
    ] {
        let mut cells = Vec::new();
        for size in [256usize, 64 << 10] {
            let msg = Arc::new(Message::new(topic, vec![7u8; size], "bench-client"));
            let ns = match host {
                None => measure(rounds, n, || {
                    black_box(native_route(black_box(&msg)));
                }),
                Some(h) => {
                    let sample = h.route(msg.clone());
                    assert!(sample.failure.is_none(), "{:?}", sample.failure);
                    // Payload copies are slow; fewer messages keep the run short.
                    let n = if size > 4096 && topic.starts_with("payload/") {
                        n / 10
                    } else {
                        n
                    };
                    measure(rounds, n, || {
                        black_box(h.route(black_box(msg.clone())));
                    })
                }
            };
            cells.push(ns);
        }
        println!(
            "{:<44} {:>10.1} {:>10.1} {:>14.2}",
            name,
            cells[0],
            cells[1],
            cells[1] / cells[0]
        );
        rows.push(cells);
    }
    println!();
    println!(
        "sandbox overhead, topic-only, 256 B: {:.1} ns/message ({:.1}x native)",
        rows[1][0] - rows[0][0],
        rows[1][0] / rows[0][0]
    );

    // Swap latency: bytes in hand to atomic switch (compile or cache, instantiate, init).
    let a = embedded_plugin(SlotName::Router).to_vec();
    let b = std::fs::read(ALERT_ROUTER).expect("alert router wasm");
    let cold_dir = tempfile::tempdir().expect("temp dir");
    let cold_host = plugin_host(cold_dir.path());
    let first = cold_host
        .swap(SlotName::Router, &b, "bench".into(), Some("{}".into()))
        .expect("first swap");
    let mut warm = Vec::new();
    let swaps = if quick { 10 } else { 40 };
    for i in 0..swaps {
        let bytes = if i % 2 == 0 { &a } else { &b };
        let r = cold_host
            .swap(SlotName::Router, bytes, "bench".into(), Some("{}".into()))
            .expect("swap");
        warm.push(r.duration_ms);
    }
    let mut rollbacks = Vec::new();
    for _ in 0..swaps {
        let t = Instant::now();
        cold_host.rollback(SlotName::Router).expect("rollback");
        rollbacks.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!();
    println!(
        "swap latency (ms): first swap of a new component (compile + cache write): {:.1}",
        first.duration_ms
    );
    println!(
        "swap latency (ms): compiled artifact cached on disk, {swaps} swaps: median {:.2}, p95 {:.2}",
        median(warm.clone()),
        percentile(warm, 0.95)
    );
    println!(
        "rollback latency (ms), {swaps} rollbacks: median {:.2}, p95 {:.2}",
        median(rollbacks.clone()),
        percentile(rollbacks, 0.95)
    );
}
