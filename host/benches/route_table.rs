//! Cost of the default router's route table: topic rules against routes
//! with conditions on properties and on the JSON body, in the sandbox and
//! natively. Prints figures; asserts nothing.
//!
//! Run: `cargo bench -p holdfast --bench route_table` (`-- --quick` for a short run).
//!
//! Method: one thread calls `PluginHost::route` (the broker's path) with the
//! embedded default router, swapped to each case's config, in rounds of N
//! messages; the median of the rounds' ns/message is printed. The native
//! column runs the same router crate (`holdfast-plugin-router`) as plain
//! Rust on the same message, so the ratio is the price of the sandbox. The
//! message is an IoT Hub telemetry message as the broker hands it over: its
//! property bag already parsed into four user properties, a 256-byte JSON body.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod common;

use std::hint::black_box;
use std::sync::Arc;

use common::{measure, plugin_host};
use holdfast_plugins::{Message, SlotName, embedded_plugin};
use holdfast_sdk::Config as PluginConfig;
use holdfast_sdk::router::{Message as SdkMessage, Router as _};

const TOPIC: &str = "devices/d1/messages/events/%24.ct=application%2Fjson&temperature=35&site=plant-7";

fn properties() -> Vec<(String, String)> {
    [
        ("$.ct", "application/json"),
        ("temperature", "35"),
        ("site", "plant-7"),
        ("$.cdid", "d1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn body() -> Vec<u8> {
    let mut b = r#"{"level":"high","temp":{"value":35.5,"unit":"C"},"pad":""#.to_string();
    while b.len() < 254 {
        b.push('x');
    }
    b.push_str("\"}");
    b.into_bytes()
}

fn cases() -> Vec<(&'static str, String)> {
    let rules: Vec<String> = (0..10)
        .map(|i| format!(r#"{{"filter":"plant/{i}/#","upstream_lane":1}}"#))
        .chain(["{\"filter\":\"devices/+/messages/events/#\",\"upstream_lane\":2}".to_string()])
        .collect();
    let routes = |cond: &dyn Fn(usize) -> String| {
        let r: Vec<String> = (0..10)
            .map(|i| format!(r#""r{i}":"FROM /messages/* WHERE {} INTO $upstream""#, cond(i)))
            .collect();
        format!(r#"{{"routes":{{{}}}}}"#, r.join(","))
    };
    vec![
        ("no rules or routes (zero-config)", "{}".to_string()),
        (
            "11 topic rules, the last matches",
            format!(r#"{{"rules":[{}]}}"#, rules.join(",")),
        ),
        (
            "10 routes on properties",
            routes(&|i| format!("temperature > {} AND site = 'plant-7'", i * 10)),
        ),
        (
            "10 routes on JSON body fields",
            routes(&|i| format!("$body.temp.value > {} AND $body.level = 'high'", i * 10)),
        ),
    ]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, n) = if quick { (5, 10_000) } else { (15, 100_000) };
    let dir = tempfile::tempdir().expect("temp dir");
    let host = plugin_host(dir.path());
    let router = embedded_plugin(SlotName::Router).to_vec();
    let mut msg = Message::new(TOPIC, body(), "d1");
    msg.properties = properties();
    let msg = Arc::new(msg);
    let mut native_msg = SdkMessage::builder(TOPIC).payload(body());
    for (k, v) in properties() {
        native_msg = native_msg.property(k, v);
    }
    let native_msg = native_msg.build();

    println!("holdfast route-table benchmark: {rounds} rounds x {n} messages, single thread, median ns/message");
    println!();
    println!("{:<36} {:>12} {:>12} {:>8}", "case", "sandbox", "native", "ratio");
    let mut base = None;
    for (name, cfg) in cases() {
        host.swap(SlotName::Router, &router, "bench".into(), Some(cfg.clone()))
            .expect("swap");
        let sample = host.route(msg.clone());
        assert!(sample.failure.is_none(), "{name}: {:?}", sample.failure);
        let sandbox = measure(rounds, n, || {
            black_box(host.route(black_box(msg.clone())));
        });
        let native_router =
            holdfast_plugin_router::DefaultRouter::init(&PluginConfig::parse(&cfg).expect("config")).expect("init");
        let native = measure(rounds, n, || {
            black_box(native_router.route(black_box(&native_msg)));
        });
        let b = *base.get_or_insert(sandbox);
        println!(
            "{name:<36} {sandbox:>12.1} {native:>12.1} {:>8.1}   ({:.2}x zero-config)",
            sandbox / native,
            sandbox / b
        );
    }
}
