//! Drain rate into a replicated JetStream stream, beside raw publishing of
//! the same messages with the same client, in the same run.
//!
//! Each round starts a three-node `nats-server` cluster on loopback with two
//! streams of three replicas (file storage, 2-hour duplicate window):
//!
//! - **raw**: `async-nats` publishes N messages with the headers Holdfast
//!   sends (`Nats-Msg-Id`, `Nats-Expected-Stream`, `holdfast-*`), 256 in
//!   flight, acknowledgements awaited in order: what the client and the
//!   cluster can do;
//! - **holdfast**: a `holdfast` node (release build) whose outbox holds N
//!   messages, published over MQTT while its stream did not exist yet; the
//!   stream is created and the time until the node counts N acknowledged
//!   (`holdfast_link_messages_acked_total`) is the drain;
//! - **bridge** (with `--mosquitto`): the same backlog drained by the MQTT
//!   bridge into Mosquitto, for reference.
//!
//! `cargo build --release -p holdfast && cargo bench -p holdfast-link --bench nats_drain -- [--messages N] [--rounds R] [--payload B] [--mosquitto]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // a benchmark: a panic is its failure

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use holdfast_mqtt::{Connect, Packet, Publish, QoS, Version};

struct Args {
    messages: u64,
    rounds: usize,
    payload: usize,
    mosquitto: bool,
    holdfast: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        messages: 200_000,
        rounds: 3,
        payload: 256,
        mosquitto: false,
        holdfast: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/holdfast"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--messages" => a.messages = it.next().unwrap().parse().unwrap(),
            "--rounds" => a.rounds = it.next().unwrap().parse().unwrap(),
            "--payload" => a.payload = it.next().unwrap().parse().unwrap(),
            "--holdfast" => a.holdfast = it.next().unwrap().into(),
            "--mosquitto" => a.mosquitto = true,
            _ => {}
        }
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn cluster(dir: &Path) -> (Procs, Vec<String>) {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
        .collect();
    let mut procs = Procs(Vec::new());
    for (i, (port, cport)) in ports.iter().enumerate() {
        let conf = dir.join(format!("n{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "server_name: n{i}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{ store_dir: {:?}, max_memory_store: 64MB, max_file_store: 16GB }}\n\
                 cluster {{ name: bench, listen: \"127.0.0.1:{cport}\", no_advertise: true, routes: [{}] }}\n",
                dir.join(format!("n{i}")).display().to_string(),
                routes.join(", ")
            ),
        )
        .unwrap();
        procs.0.push(
            Command::new("nats-server")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server (scripts/setup.sh installs it)"),
        );
    }
    for (port, _) in &ports {
        wait_until(20, "nats-server", || TcpStream::connect(("127.0.0.1", *port)).is_ok());
    }
    (
        procs,
        ports.iter().map(|(p, _)| format!("nats://127.0.0.1:{p}")).collect(),
    )
}

async fn js_of(urls: &[String]) -> jetstream::Context {
    let addrs: Vec<async_nats::ServerAddr> = urls.iter().map(|u| u.parse().unwrap()).collect();
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(addrs)
        .await
        .unwrap();
    jetstream::new(client)
}

async fn create_stream(js: &jetstream::Context, name: &str, subjects: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let config = stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            num_replicas: 3,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(7200),
            ..Default::default()
        };
        match js.get_or_create_stream(config).await {
            Ok(_) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot create {name}: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// Raw publishing: the same subjects, headers and window as the node.
async fn raw(js: &jetstream::Context, n: u64, payload: &Bytes) -> f64 {
    let started = Instant::now();
    let mut pending = FuturesOrdered::new();
    for i in 0..n {
        if pending.len() >= 256 {
            pending.next().await.unwrap();
        }
        let id = format!("0123456789abcdef-5-{i}");
        let mut h = async_nats::HeaderMap::new();
        h.insert("holdfast-id", id.as_str());
        h.insert("holdfast-path", "loader/bench");
        h.insert("holdfast-lane", "5");
        h.insert("holdfast-topic", "bench/line1/temp");
        h.insert("holdfast-expires-ms", "1796000000000");
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .headers(h)
            .message_id(&id)
            .expected_stream("RAW");
        let ack = js.send_publish("raw.bench.5.bench.line1.temp", publish).await.unwrap();
        pending.push_back(async move { ack.await.unwrap() });
    }
    while pending.next().await.is_some() {}
    n as f64 / started.elapsed().as_secs_f64()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn metric(port: u16, name: &str) -> f64 {
    http_get(port, "/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// A node whose upstream is `upstream` (a TOML section); returns it, its
/// admin port and its MQTT port once ready.
fn node(bin: &Path, dir: &Path, upstream: &str) -> (Procs, u16, u16) {
    let (admin, mqtt) = (free_port(), free_port());
    let conf = dir.join("holdfast.toml");
    std::fs::write(
        &conf,
        format!(
            "[node]\nid = \"bench\"\ndata_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [mqtt.tcp]\nlisten = \"127.0.0.1:{mqtt}\"\n[cache]\nenabled = false\n\
             [outbox]\nmax_messages = 50000000\n{upstream}",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("a release build of holdfast (cargo build --release -p holdfast)");
    let procs = Procs(vec![child]);
    wait_until(60, "the node", || {
        http_get(admin, "/metrics").is_some_and(|m| m.contains(" 200 "))
    });
    (procs, admin, mqtt)
}

/// Publishes `n` QoS 1 messages over MQTT 5, up to 1000 in flight.
fn fill(port: u16, n: u64, payload: &Bytes) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    let v = Version::V5;
    let mut out = BytesMut::new();
    let connect = Connect {
        version: v,
        client_id: "loader".into(),
        clean_start: true,
        keep_alive: 60,
        username: None,
        password: None,
        will: None,
        properties: Default::default(),
    };
    holdfast_mqtt::encode(&Packet::Connect(Box::new(connect)), v, &mut out);
    s.write_all(&out).unwrap();
    let mut rbuf = BytesMut::with_capacity(1 << 16);
    let read = |s: &mut TcpStream, rbuf: &mut BytesMut| -> Packet {
        loop {
            if let Some(p) = holdfast_mqtt::decode(rbuf, Some(v), 1 << 20).unwrap() {
                return p;
            }
            let mut chunk = [0u8; 16 << 10];
            let got = s.read(&mut chunk).unwrap();
            assert!(got > 0, "the node closed the connection");
            rbuf.extend_from_slice(&chunk[..got]);
        }
    };
    let Packet::ConnAck(ack) = read(&mut s, &mut rbuf) else {
        panic!("no CONNACK")
    };
    // In flight: 1000, or the node's receive maximum if lower.
    let window = u64::from(ack.properties.receive_maximum.unwrap_or(u16::MAX)).min(1000);
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < n {
        out.clear();
        while sent < n && sent - acked < window {
            let pkid = (sent % 65_000 + 1) as u16;
            let p = Publish::new("bench/line1/temp", payload.clone(), QoS::AtLeastOnce, pkid);
            holdfast_mqtt::encode(&Packet::Publish(p), v, &mut out);
            sent += 1;
        }
        if !out.is_empty() {
            s.write_all(&out).unwrap();
        }
        if let Packet::PubAck(_) = read(&mut s, &mut rbuf) {
            acked += 1;
        }
    }
}

/// Seconds until the node has `n` acknowledged upstream, from now.
fn drained(admin: u16, n: u64) -> f64 {
    let started = Instant::now();
    wait_until(3600, "the drain", || {
        metric(admin, "holdfast_link_messages_acked_total") >= n as f64
    });
    started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let a = args();
    let payload = Bytes::from(vec![b'x'; a.payload]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut raws, mut nodes, mut bridges) = (Vec::new(), Vec::new(), Vec::new());
    println!(
        "{} messages of {} B per round, {} rounds; three nats-server nodes, replicas = 3",
        a.messages, a.payload, a.rounds
    );
    for round in 1..=a.rounds {
        let dir = tempfile::tempdir().unwrap();
        let (_cluster, urls) = cluster(dir.path());
        let js = rt.block_on(js_of(&urls));
        rt.block_on(create_stream(&js, "RAW", "raw.>"));
        let raw_rate = rt.block_on(raw(&js, a.messages, &payload));
        // The node's backlog, while its stream does not exist yet.
        let servers: Vec<String> = urls.iter().map(|u| format!("{u:?}")).collect();
        let upstream = format!(
            "[upstream]\nkind = \"nats\"\nbackoff_max_ms = 100\n[upstream.nats]\nservers = [{}]\nstream = \"HF\"\n",
            servers.join(", ")
        );
        let node_dir = dir.path().join("node");
        std::fs::create_dir_all(&node_dir).unwrap();
        let (_node, admin, mqtt) = node(&a.holdfast, &node_dir, &upstream);
        fill(mqtt, a.messages, &payload);
        rt.block_on(create_stream(&js, "HF", "holdfast.>"));
        let secs = drained(admin, a.messages);
        let node_rate = a.messages as f64 / secs;
        let dups = metric(admin, "holdfast_link_upstream_duplicates_total");
        let mut line = format!(
            "round {round}: raw {raw_rate:.0} msg/s, holdfast drain {node_rate:.0} msg/s ({:.2} of raw; {dups} duplicates)",
            node_rate / raw_rate
        );
        raws.push(raw_rate);
        nodes.push(node_rate);
        if a.mosquitto {
            let mport = free_port();
            let mconf = dir.path().join("mosquitto.conf");
            std::fs::write(&mconf, format!("listener {mport} 127.0.0.1\nallow_anonymous true\n")).unwrap();
            let bdir = dir.path().join("bridge");
            std::fs::create_dir_all(&bdir).unwrap();
            let upstream = format!(
                "[upstream]\nkind = \"mqtt\"\nbackoff_max_ms = 100\n[upstream.mqtt]\nhost = \"127.0.0.1\"\nport = {mport}\ninflight = 256\n"
            );
            let (_bridge, admin, mqtt) = node(&a.holdfast, &bdir, &upstream);
            fill(mqtt, a.messages, &payload);
            let _mosquitto = Procs(vec![
                Command::new("mosquitto")
                    .arg("-c")
                    .arg(&mconf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            ]);
            let rate = a.messages as f64 / drained(admin, a.messages);
            line.push_str(&format!("; bridge into Mosquitto {rate:.0} msg/s"));
            bridges.push(rate);
        }
        println!("{line}");
    }
    let (r, n) = (median(raws), median(nodes));
    println!("median: raw {r:.0} msg/s, holdfast {n:.0} msg/s, ratio {:.2}", n / r);
    if !bridges.is_empty() {
        println!("median bridge into Mosquitto: {:.0} msg/s", median(bridges));
    }
}
