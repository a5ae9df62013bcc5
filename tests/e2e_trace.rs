//! Traces across hops: one message with a W3C `traceparent` published to the
//! leaf of a three-level tree (leaf → mid → root, three processes), its
//! spans exported by each node over OTLP/HTTP to a receiver in this test,
//! which decodes them with `opentelemetry-proto`. The collector is away
//! for a while (it answers 503) and the leaf's path is cut meanwhile:
//! the spans wait and arrive later with their original times.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message as _;
use support::client::Client;
use support::delivery::Consumer;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::mosquitto::Mosquitto;
use support::proxy::Proxy;
use support::{Gateway, free_port};

/// A span as received: node, name, ids, times, attributes.
#[derive(Debug, Clone)]
struct Got {
    node: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    start: u64,
    end: u64,
    attrs: Vec<(String, String)>,
}

/// An OTLP/HTTP receiver: every span of every request, and whether it
/// answers 503 (the collector away).
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Got>>>,
    away: Arc<AtomicBool>,
    refused: Arc<Mutex<u64>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let away = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(Mutex::new(0));
        let (s, a, r) = (spans.clone(), away.clone(), refused.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                let mut first = true;
                let mut path = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if first {
                        path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                        first = false;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                if a.load(Ordering::SeqCst) {
                    *r.lock().unwrap() += 1;
                    let _ = conn.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                    continue;
                }
                assert_eq!(path, "/v1/traces");
                let req = ExportTraceServiceRequest::decode(&body[..]).expect("an OTLP trace request");
                let mut got = s.lock().unwrap();
                for rs in req.resource_spans {
                    let node = rs
                        .resource
                        .unwrap()
                        .attributes
                        .into_iter()
                        .find(|a| a.key == "service.instance.id")
                        .and_then(|a| match a.value?.value? {
                            any_value::Value::StringValue(s) => Some(s),
                            _ => None,
                        })
                        .unwrap();
                    for ss in rs.scope_spans {
                        for sp in ss.spans {
                            got.push(Got {
                                node: node.clone(),
                                name: sp.name,
                                trace: hex(&sp.trace_id),
                                span: hex(&sp.span_id),
                                parent: hex(&sp.parent_span_id),
                                start: sp.start_time_unix_nano,
                                end: sp.end_time_unix_nano,
                                attrs: sp
                                    .attributes
                                    .into_iter()
                                    .map(|kv| {
                                        let v = match kv.value.and_then(|v| v.value) {
                                            Some(any_value::Value::StringValue(s)) => s,
                                            Some(any_value::Value::IntValue(i)) => i.to_string(),
                                            other => format!("{other:?}"),
                                        };
                                        (kv.key, v)
                                    })
                                    .collect(),
                            });
                        }
                    }
                }
                drop(got);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        Receiver {
            port,
            spans,
            away,
            refused,
        }
    }

    fn of_trace(&self, trace: &str) -> Vec<Got> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == trace)
            .cloned()
            .collect()
    }
}

fn trace_section(port: u16) -> String {
    format!(
        "[trace]\nenabled = true\nendpoint = \"http://127.0.0.1:{port}/v1/traces\"\nsample_ratio = 0.0\nexport_interval_ms = 200\n"
    )
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

#[test]
fn one_message_is_one_trace_from_the_device_to_the_root_across_a_cut() {
    let otlp = Receiver::start();
    let certs = fleet(&["root", "mid", "leaf"]);
    let c = certs.path();
    let (root_link, mid_link) = (free_port(), free_port());
    let ident =
        |id: &str, parent: &str| format!("[[identities]]\nid = \"{id}\"\nkind = \"gateway\"\nparent = \"{parent}\"\n");
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{}{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            ident("mid", "root"),
            trace_section(otlp.port)
        ),
    );
    let mid = Gateway::start_named(
        "mid",
        &format!(
            "{}{}{}{}{}",
            fleet_section(c, "mid"),
            listen_section(mid_link),
            upstream_section(addr(root_link), "root"),
            ident("leaf", "mid"),
            trace_section(otlp.port)
        ),
    );
    let cut = Proxy::start(addr(mid_link));
    let leaf = Gateway::start_named(
        "leaf",
        &format!(
            "{}{}{}",
            fleet_section(c, "leaf"),
            upstream_section(cut.udp, "mid"),
            trace_section(otlp.port)
        ),
    );
    let backend = Consumer::start(root.mqtt, "backend", "plant/#");
    wait_until(30, "the tree to link up", || {
        mid.api("/api/v1/link")["link"]["state"] == "up" && leaf.api("/api/v1/link")["link"]["state"] == "up"
    });

    // The collector is away and the leaf is cut off: the message waits in
    // the leaf's outbox, and the spans in each node's ring.
    otlp.away.store(true, Ordering::SeqCst);
    cut.cmd("cut");
    wait_until(20, "the leaf to see its link down", || {
        leaf.api("/api/v1/link")["link"]["state"] != "up"
    });
    let mut device = Client::connect(leaf.mqtt, "sensor-1", true).unwrap();
    let traceparent = format!("00-{TRACE}-{CALLER}-01");
    let published = holdfast_model::trace::now_ns();
    assert!(
        device
            .publish_acked_with(
                "plant/line-1/temp",
                "21.5",
                &[("traceparent", &traceparent)],
                Duration::from_secs(10)
            )
            .unwrap()
    );
    // An untraced message (no traceparent, sample_ratio 0) records nothing.
    assert!(
        device
            .publish_acked("plant/line-1/temp", "21.6", Duration::from_secs(10))
            .unwrap()
    );
    std::thread::sleep(Duration::from_secs(2));
    cut.cmd("up");
    wait_until(30, "the root to deliver both", || backend.len() >= 2);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        otlp.of_trace(TRACE).is_empty(),
        "nothing was exported while the collector was away"
    );
    assert!(*otlp.refused.lock().unwrap() > 0, "the nodes tried");
    let pending = leaf.metric("holdfast_trace_spans_pending");
    assert!(pending >= 4.0, "the leaf keeps its spans: {pending}");

    // The collector is back: every node's spans arrive, with their original times.
    otlp.away.store(false, Ordering::SeqCst);
    wait_until(30, "the spans of the three nodes", || {
        let got = otlp.of_trace(TRACE);
        ["leaf", "mid", "root"].iter().all(|n| got.iter().any(|s| &s.node == n))
            && got.iter().any(|s| s.name == "deliver")
    });
    std::thread::sleep(Duration::from_millis(600));
    let got = otlp.of_trace(TRACE);
    let names: Vec<(String, String)> = got.iter().map(|s| (s.node.clone(), s.name.clone())).collect();
    let want = [
        ("leaf", "receive"),
        ("leaf", "route"),
        ("leaf", "store"),
        // The default router also delivers to the leaf's own subscribers.
        ("leaf", "deliver"),
        ("leaf", "send"),
        ("mid", "receive"),
        ("mid", "send"),
        ("root", "receive"),
        ("root", "deliver"),
    ];
    for (n, s) in want {
        assert_eq!(
            names.iter().filter(|(a, b)| a == n && b == s).count(),
            1,
            "one {n}/{s} span: {names:?}"
        );
    }
    assert_eq!(got.len(), want.len(), "{names:?}");
    let span = |n: &str, s: &str| got.iter().find(|g| g.node == n && g.name == s).unwrap().clone();
    let attr = |g: &Got, k: &str| g.attrs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    // One tree: the device's span → leaf receive → store → send and mid's
    // receive → mid send and root receive → root deliver.
    let (l_recv, l_route, l_store, l_send) = (
        span("leaf", "receive"),
        span("leaf", "route"),
        span("leaf", "store"),
        span("leaf", "send"),
    );
    assert_eq!(l_recv.parent, CALLER);
    assert_eq!(l_route.parent, l_recv.span);
    assert_eq!(l_store.parent, l_recv.span);
    assert_eq!(l_send.parent, l_store.span);
    assert_eq!(
        attr(&l_route, "holdfast.route.decision").as_deref(),
        Some("upstream lane 5; local")
    );
    assert_eq!(attr(&l_send, "holdfast.parent").as_deref(), Some("mid"));
    let (m_recv, m_send) = (span("mid", "receive"), span("mid", "send"));
    assert_eq!(
        m_recv.parent, l_store.span,
        "the leaf's stored message hangs under its store span"
    );
    assert_eq!(m_send.parent, m_recv.span);
    assert_eq!(attr(&m_recv, "holdfast.child").as_deref(), Some("leaf"));
    let (r_recv, r_deliver) = (span("root", "receive"), span("root", "deliver"));
    assert_eq!(r_recv.parent, m_recv.span);
    assert_eq!(r_deliver.parent, r_recv.span);
    assert_eq!(attr(&r_deliver, "holdfast.path").as_deref(), Some("leaf/mid"));
    // Original times: the leaf received it before the cut ended, and its
    // send span covers the cut (sent on reconnect, acknowledged after).
    assert!(
        l_recv.start >= published && l_recv.start < l_send.start,
        "{l_recv:?} {l_send:?}"
    );
    assert!(l_send.end >= l_send.start && m_recv.start >= l_send.start);
    assert!(r_deliver.end >= r_recv.start);
    // The message reached the backend with the trace context, under the root's receive span.
    let traced = backend.messages().into_iter().find(|m| m.payload == "21.5").unwrap();
    let tp = traced.prop("traceparent").unwrap().to_string();
    assert_eq!(tp, format!("00-{TRACE}-{}-01", r_recv.span), "{tp}");
    let untraced = backend.messages().into_iter().find(|m| m.payload == "21.6").unwrap();
    assert!(untraced.prop("traceparent").is_none());
    // Nothing was dropped, and the rings are empty.
    for gw in [&leaf, &mid, &root] {
        assert_eq!(gw.metric("holdfast_trace_spans_total{result=\"dropped\"}"), 0.0);
        wait_until(10, "the ring to empty", || {
            gw.metric("holdfast_trace_spans_pending") == 0.0
        });
    }
}

/// Across the MQTT bridge the trace context travels as a user property, and
/// the bridge's send span ends with Mosquitto's PUBACK.
#[test]
fn the_bridge_carries_the_trace_context_to_mosquitto() {
    let otlp = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path());
    let mut backend = Client::connect(mosquitto.port, "backend", true).unwrap();
    backend.subscribe("plant/#").unwrap();
    let gw = Gateway::start_named(
        "gw",
        &format!(
            "[upstream]\nkind = \"mqtt\"\n[upstream.mqtt]\nhost = \"127.0.0.1\"\nport = {}\n{}",
            mosquitto.port,
            trace_section(otlp.port)
        ),
    );
    wait_until(20, "the bridge up", || gw.api("/api/v1/link")["link"]["state"] == "up");
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut device = Client::connect(gw.mqtt, "sensor-2", true).unwrap();
    assert!(
        device
            .publish_acked_with(
                "plant/line-2/temp",
                "19.0",
                &[
                    ("traceparent", &format!("00-{trace}-b7ad6b7169203331-01")),
                    ("tracestate", "vendor=1")
                ],
                Duration::from_secs(10)
            )
            .unwrap()
    );
    let got = backend
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("the message at Mosquitto");
    wait_until(20, "the bridge's send span", || {
        otlp.of_trace(trace).iter().any(|s| s.name == "send")
    });
    let spans = otlp.of_trace(trace);
    let store = spans.iter().find(|s| s.name == "store").unwrap();
    let send = spans.iter().find(|s| s.name == "send").unwrap();
    assert_eq!(send.parent, store.span);
    assert!(
        send.attrs
            .iter()
            .any(|(k, v)| k == "holdfast.broker" && v.ends_with(&mosquitto.port.to_string())),
        "{send:?}"
    );
    assert_eq!(
        got.prop("traceparent"),
        Some(format!("00-{trace}-{}-01", store.span).as_str())
    );
    assert_eq!(got.prop("tracestate"), Some("vendor=1"), "passed on as it is");
}
