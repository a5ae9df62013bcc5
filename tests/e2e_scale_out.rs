//! Scaling out past one root, for real:
//!
//! - a two-level Holdfast tree (gw1 → gw0, separate processes) drains a
//!   backlog into a stream with three replicas on a three-node JetStream
//!   cluster of `nats-server` processes, while the stream's leader is
//!   SIGKILLed, then another node, and gw0 itself; a consumer then finds
//!   every message in the stream exactly once and in order per lane;
//! - the whole cluster down for a while: the outbox keeps what arrives and
//!   drains when the cluster returns; cloud-to-device through the node's
//!   durable consumer;
//! - the MQTT bridge's server list: failover to the second broker, and back
//!   to the main one when it returns.
//!
//! The backlog is `HOLDFAST_NATS_BACKLOG` messages (default 1,000,000).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use support::client::Client;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::mosquitto::Mosquitto;
use support::nats::{NatsCluster, publish_pipelined};
use support::{Gateway, free_port};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
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

/// Creates a file stream with three replicas, retrying while the cluster
/// elects its meta leader.
async fn create_stream(js: &jetstream::Context, name: &str, subjects: &str) {
    create_stream_with(js, name, subjects, 3).await;
}

async fn create_stream_with(js: &jetstream::Context, name: &str, subjects: &str, replicas: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let made = js
            .get_or_create_stream(stream::Config {
                name: name.to_string(),
                subjects: vec![subjects.to_string()],
                num_replicas: replicas,
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(7200),
                ..Default::default()
            })
            .await;
        match made {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                eprintln!("creating {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("cannot create {name}: {e}"),
        }
    }
}

/// The stream's message count and leader, asked with a fresh connection to
/// the servers still up.
fn stream_state(rt: &tokio::runtime::Runtime, urls: &[String], name: &str) -> Option<(u64, String)> {
    rt.block_on(async {
        let fut = async {
            let js = js_of(urls).await;
            let mut s = js.get_stream(name).await.ok()?;
            let info = s.info().await.ok()?;
            let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default();
            Some((info.state.messages, leader))
        };
        tokio::time::timeout(Duration::from_secs(5), fut).await.ok().flatten()
    })
}

fn running_urls(cluster: &NatsCluster) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| format!("nats://127.0.0.1:{}", n.port))
        .collect()
}

/// Waits until the stream holds at least `at_least` messages and has a leader.
fn wait_for_count(rt: &tokio::runtime::Runtime, cluster: &NatsCluster, at_least: u64, secs: u64) -> String {
    let mut leader = String::new();
    let mut last = 0;
    wait_until(secs, "the stream to grow", || {
        match stream_state(rt, &running_urls(cluster), "HOLDFAST") {
            Some((n, l)) => {
                last = n;
                leader = l;
                n >= at_least && !leader.is_empty()
            }
            None => false,
        }
    });
    eprintln!("stream holds {last} (leader {leader})");
    leader
}

/// One message as read back.
struct Stored {
    lane: u8,
    seq: u64,
    msg_id: String,
    topic: String,
}

/// Every message of the stream, in stream order.
fn read_all(rt: &tokio::runtime::Runtime, urls: &[String], expect: u64) -> Vec<Stored> {
    rt.block_on(async {
        let js = js_of(urls).await;
        let s = js.get_stream("HOLDFAST").await.unwrap();
        let c = s
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut out = Vec::with_capacity(expect as usize);
        let mut messages = c.messages().await.unwrap();
        while (out.len() as u64) < expect {
            let m = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => panic!("reading the stream: {e}"),
                _ => break,
            };
            let h = m.headers.as_ref().unwrap();
            let get = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
            let payload = String::from_utf8_lossy(&m.payload).into_owned();
            let (lane, seq) = payload.split_once(':').unwrap();
            assert_eq!(get("holdfast-lane"), lane, "the lane header of {payload}");
            out.push(Stored {
                lane: lane.parse().unwrap(),
                seq: seq.parse().unwrap(),
                msg_id: get("Nats-Msg-Id"),
                topic: get("holdfast-topic"),
            });
        }
        // Nothing beyond what was expected.
        let extra = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        assert!(
            !matches!(extra, Ok(Some(Ok(_)))),
            "the stream holds more than {expect} messages"
        );
        out
    })
}

/// Waits for the upstream link to be up; on a timeout, fails with the log.
fn link_up(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.api("/api/v1/link")["link"]["state"] != "up" {
        assert!(
            Instant::now() < deadline,
            "the link did not come up: {}\n{}",
            gw.api("/api/v1/link"),
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn backlog() -> u64 {
    std::env::var("HOLDFAST_NATS_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

fn nats_upstream(cluster: &NatsCluster, extra: &str) -> String {
    format!(
        "[upstream]\nkind = \"nats\"\nprobe_interval_ms = 50\nbackoff_max_ms = 1000\nconnect_timeout_ms = 2000\n\
         [upstream.nats]\nservers = {}\nack_timeout_ms = 2000\n{extra}",
        cluster.servers_toml()
    )
}

/// Lane 1 for `alarm/#`; everything else goes to lane 5.
const LANES: &str = "[plugins.router.config]\ndefault_lane = 5\n\
    [[plugins.router.config.rules]]\nfilter = \"alarm/#\"\nupstream_lane = 1\n";

#[test]
fn a_two_level_backlog_drains_into_a_replicated_stream_exactly_once_across_kills() {
    let rt = runtime();
    let mut cluster = NatsCluster::start(3);
    rt.block_on(async {
        let js = js_of(&cluster.urls()).await;
        create_stream(&js, "HOLDFAST", "holdfast.>").await;
    });
    let total = backlog();
    let certs = fleet(&["gw0", "gw1"]);
    let c = certs.path();
    let gw0_link = free_port();
    // gw1 first: its parent is not there yet, so the backlog builds in it.
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}[outbox]\nmax_messages = 5000000\n{LANES}",
            fleet_section(c, "gw1"),
            upstream_section(addr(gw0_link), "gw0"),
        ),
    );
    let started = Instant::now();
    let messages: Vec<(String, Vec<u8>)> = (0..total)
        .map(|i| {
            // One in four on lane 1; each lane numbered on its own.
            if i % 4 == 0 {
                ("alarm/line1/pressure".to_string(), format!("1:{}", i / 4).into_bytes())
            } else {
                (
                    "site/line1.temp/x".to_string(),
                    format!("5:{}", i - i / 4 - 1).into_bytes(),
                )
            }
        })
        .collect();
    let acked = publish_pipelined(gw1.mqtt, "loader", messages, 2000);
    assert_eq!(acked, total, "gw1 acknowledged every publish");
    eprintln!(
        "backlog of {total} stored in gw1 in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let ident = "[[identities]]\nid = \"gw1\"\nkind = \"gateway\"\nparent = \"gw0\"\n";
    let mut gw0 = Gateway::start_named(
        "gw0",
        &format!(
            "{}{}{ident}[outbox]\nmax_messages = 5000000\n{}",
            fleet_section(c, "gw0"),
            listen_section(gw0_link),
            nats_upstream(&cluster, "")
        ),
    );
    let drain = Instant::now();
    // The stream's leader dies a fifth of the way in.
    let leader = wait_for_count(&rt, &cluster, total / 5, 300);
    eprintln!("SIGKILL the stream leader {leader}");
    cluster.kill(&leader);
    let second = wait_for_count(&rt, &cluster, total * 2 / 5, 300);
    cluster.respawn(&leader);
    // gw0 itself dies with publishes in flight, and comes back.
    gw0.crash_restart();
    let _ = wait_for_count(&rt, &cluster, total * 3 / 5, 300);
    // Then another node: the leader now, which is not the first one.
    let now_leader = wait_for_count(&rt, &cluster, total * 3 / 5, 60);
    let other = if now_leader == leader { second } else { now_leader };
    assert_ne!(other, leader);
    eprintln!("SIGKILL {other}");
    cluster.kill(&other);
    let _ = wait_for_count(&rt, &cluster, total * 4 / 5, 300);
    cluster.respawn(&other);
    let _ = wait_for_count(&rt, &cluster, total, 600);
    eprintln!("drained {total} in {:.1} s", drain.elapsed().as_secs_f64());
    // Both outboxes are empty and the count stays put.
    wait_until(60, "both outboxes empty", || {
        let empty = |gw: &Gateway| {
            gw.api("/api/v1/outbox")["lanes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["messages"] == 0)
        };
        empty(&gw1) && empty(&gw0)
    });
    std::thread::sleep(Duration::from_secs(2));
    let (count, _) = stream_state(&rt, &cluster.urls(), "HOLDFAST").unwrap();
    assert_eq!(count, total, "the stream holds every message exactly once");
    let all = read_all(&rt, &cluster.urls(), total);
    assert_eq!(all.len() as u64, total);
    // Exactly once: every id once, every lane's numbers once, in order.
    let ids: HashSet<&str> = all.iter().map(|s| s.msg_id.as_str()).collect();
    assert_eq!(ids.len() as u64, total, "Nats-Msg-Id repeats");
    let mut next: HashMap<u8, u64> = HashMap::new();
    for s in &all {
        let want = next.entry(s.lane).or_insert(0);
        assert_eq!(s.seq, *want, "lane {} out of order or with a gap", s.lane);
        *want += 1;
    }
    assert_eq!(next.get(&1).copied(), Some(total.div_ceil(4)));
    assert!(all.iter().any(|s| s.topic == "site/line1.temp/x"));
    let dups = gw0.metric("holdfast_link_upstream_duplicates_total");
    eprintln!("JetStream dropped {dups} resent duplicates");
    assert!(
        gw0.metric("holdfast_link_disconnects_total{reason=\"lost\"}") >= 1.0,
        "{}",
        gw0.log()
    );
}

#[test]
fn the_outbox_holds_while_the_whole_cluster_is_down_and_c2d_reaches_a_device() {
    let rt = runtime();
    let mut cluster = NatsCluster::start(3);
    rt.block_on(async {
        let js = js_of(&cluster.urls()).await;
        create_stream(&js, "HOLDFAST", "holdfast.>").await;
        // Cloud-to-device has a stream of its own (its subjects are not in HOLDFAST's).
        create_stream(&js, "C2D", "c2d.>").await;
    });
    let gw = Gateway::start_named(
        "edge-1",
        &nats_upstream(
            &cluster,
            "[upstream.nats.c2d]\nstream = \"C2D\"\nsubject_prefix = \"c2d.{node}\"\n",
        ),
    );
    link_up(&gw);
    // Cloud-to-device: a message on the node's C2D subject reaches the
    // subscribed client, and the consumer has it acknowledged.
    let mut device = Client::connect(gw.mqtt, "device-1", true).unwrap();
    device.subscribe("devices/d1/#").unwrap();
    c2d_round_trip(&rt, &cluster, &gw, &mut device, "restart", 1);
    let publish = |from: u64, to: u64| {
        let msgs = (from..to)
            .map(|i| ("tele/a".to_string(), format!("5:{i}").into_bytes()))
            .collect();
        assert_eq!(publish_pipelined(gw.mqtt, "pub", msgs, 100), to - from);
    };
    publish(0, 1000);
    let _ = wait_for_count(&rt, &cluster, 1000, 60);
    wait_until(30, "the outbox drained", || {
        gw.api("/api/v1/outbox")["lanes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["messages"] == 0)
    });
    // The whole cluster goes away; the node keeps taking messages.
    for n in ["n1", "n2", "n3"] {
        cluster.kill(n);
    }
    wait_until(30, "the link down", || gw.api("/api/v1/link")["link"]["state"] != "up");
    publish(1000, 6000);
    let held: u64 = gw.api("/api/v1/outbox")["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["messages"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 5000, "the outbox holds what arrived while the cluster was down");
    std::thread::sleep(Duration::from_secs(3));
    for n in ["n1", "n2", "n3"] {
        cluster.respawn(n);
    }
    let _ = wait_for_count(&rt, &cluster, 6000, 120);
    std::thread::sleep(Duration::from_secs(2));
    let all = read_all(&rt, &cluster.urls(), 6000);
    let seqs: Vec<u64> = all.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (0..6000).collect::<Vec<_>>(), "every message once, in order");

    // And again after the cluster's restart.
    link_up(&gw);
    c2d_round_trip(&rt, &cluster, &gw, &mut device, "again", 2);
    // At least once: a cluster killed as a whole may not have kept the
    // acknowledgement of the first, which then comes again.
    assert!(gw.metric("holdfast_link_c2d_messages_total{result=\"stored\"}") >= 2.0);
}

/// Publishes `payload` to the node's C2D subject for `devices/d1/cmd`; the
/// device gets it, and the consumer has it acknowledged (`n` so far).
fn c2d_round_trip(
    rt: &tokio::runtime::Runtime,
    cluster: &NatsCluster,
    gw: &Gateway,
    device: &mut Client,
    payload: &'static str,
    n: u64,
) {
    rt.block_on(async {
        let js = js_of(&cluster.urls()).await;
        let mut h = async_nats::HeaderMap::new();
        h.insert("reason", "reboot");
        js.publish_with_headers("c2d.edge-1.devices.d1.cmd", h, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let consumer_info = || {
        rt.block_on(async {
            let js = js_of(&cluster.urls()).await;
            let s = js.get_stream("C2D").await.unwrap();
            let mut c: consumer::PullConsumer = s.get_consumer("holdfast-edge-1").await.unwrap();
            c.info().await.unwrap().clone()
        })
    };
    let got = device.recv(Duration::from_secs(20)).unwrap();
    let got = got.unwrap_or_else(|| panic!("no C2D message: {:?}\n{}", consumer_info(), gw.log()));
    assert_eq!(got.topic, "devices/d1/cmd");
    assert_eq!(got.payload, payload);
    assert_eq!(got.prop("reason"), Some("reboot"));
    wait_until(20, "the C2D message acknowledged", || {
        let info = consumer_info();
        info.delivered.stream_sequence == n && info.num_ack_pending == 0
    });
}

#[test]
fn tls_and_nkey_authentication_to_the_servers() {
    let rt = runtime();
    let certs = fleet(&["localhost"]);
    let c = certs.path();
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    std::fs::write(c.join("user.nk"), format!("{seed}\n")).unwrap();
    let stranger = nkeys::KeyPair::new_user();
    std::fs::write(c.join("stranger.nk"), stranger.seed().unwrap()).unwrap();
    let server = NatsCluster::start_with(
        1,
        &format!(
            "tls {{ cert_file: {:?}, key_file: {:?} }}\nauthorization {{ users = [ {{ nkey: {} }} ] }}",
            c.join("localhost.pem").display().to_string(),
            c.join("localhost.key").display().to_string(),
            user.public_key()
        ),
    );
    let url = format!("tls://localhost:{}", server.nodes[0].port);
    let js = |seed: String| {
        let (url, ca) = (url.clone(), c.join("ca.pem"));
        async move {
            let client = async_nats::ConnectOptions::with_nkey(seed)
                .add_root_certificates(ca)
                .require_tls(true)
                .connect(url.as_str())
                .await
                .unwrap();
            jetstream::new(client)
        }
    };
    rt.block_on(async { create_stream_with(&js(seed.clone()).await, "HOLDFAST", "holdfast.>", 1).await });
    let config = |seed_file: &str| {
        format!(
            "[upstream]\nkind = \"nats\"\nbackoff_max_ms = 500\n[upstream.nats]\nservers = [{url:?}]\n\
             ca = {:?}\nnkey_seed = {:?}\n",
            c.join("ca.pem").display().to_string(),
            c.join(seed_file).display().to_string()
        )
    };
    let gw = Gateway::start_named("tls-gw", &config("user.nk"));
    link_up(&gw);
    let msgs = (0..10)
        .map(|i| ("tele/a".to_string(), format!("5:{i}").into_bytes()))
        .collect();
    assert_eq!(publish_pipelined(gw.mqtt, "pub", msgs, 10), 10);
    wait_until(30, "ten messages over TLS", || {
        rt.block_on(async {
            let mut s = js(seed.clone()).await.get_stream("HOLDFAST").await.unwrap();
            s.info().await.unwrap().state.messages == 10
        })
    });
    // An unknown NKey is refused, counted, and shown.
    let refused = Gateway::start_named("stranger", &config("stranger.nk"));
    wait_until(30, "the stranger refused", || {
        refused.metric("holdfast_link_connects_total{result=\"refused\"}") >= 1.0
    });
    let link = refused.api("/api/v1/link")["link"].clone();
    assert_ne!(link["state"], "up");
    assert!(link["last_error"].as_str().unwrap().contains("authorization"), "{link}");
}

#[test]
fn a_message_too_large_for_the_server_is_dead_lettered_and_the_drain_goes_on() {
    let rt = runtime();
    let server = NatsCluster::start_with(1, "max_payload: 4096");
    rt.block_on(async { create_stream_with(&js_of(&server.urls()).await, "HOLDFAST", "holdfast.>", 1).await });
    let gw = Gateway::start_named("small", &nats_upstream(&server, ""));
    link_up(&gw);
    let msgs = vec![
        ("tele/a".to_string(), b"5:0".to_vec()),
        ("tele/big".to_string(), vec![b'x'; 8192]),
        ("tele/a".to_string(), b"5:1".to_vec()),
    ];
    assert_eq!(publish_pipelined(gw.mqtt, "pub", msgs, 1), 3);
    let state = || stream_state(&rt, &server.urls(), "HOLDFAST").map(|(n, _)| n);
    wait_until(30, "the two small messages stored", || state() == Some(2));
    // Later messages go on flowing.
    let more = (2..5)
        .map(|i| ("tele/a".to_string(), format!("5:{i}").into_bytes()))
        .collect();
    assert_eq!(publish_pipelined(gw.mqtt, "pub2", more, 1), 3);
    wait_until(30, "the later messages stored", || state() == Some(5));
    let seqs: Vec<u64> = read_all(&rt, &server.urls(), 5).iter().map(|s| s.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
    assert_eq!(
        gw.metric("holdfast_link_refused_total{reason=\"too-large-for-server\"}"),
        1.0
    );
    let dead = gw.api("/api/v1/dead-letter");
    assert!(dead.to_string().contains("too-large-for-server"), "{dead}");
}

/// The bridge checks each broker of its list for that broker's own host
/// name: `localhost` has a certificate for it, `127.0.0.1` does not.
#[test]
fn the_bridge_verifies_each_brokers_certificate_for_its_own_host() {
    use std::os::unix::fs::PermissionsExt;
    let certs = fleet(&["localhost"]);
    let c = certs.path();
    // Mosquitto drops to its own user: let it read the key.
    std::fs::set_permissions(c.join("localhost.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let port = free_port();
    let conf = d.path().join("tls.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\n",
            c.join("ca.pem").display(),
            c.join("localhost.pem").display(),
            c.join("localhost.key").display()
        ),
    )
    .unwrap();
    let mut broker = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(10, "mosquitto over TLS", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let gw = Gateway::start_named(
        "gw-tls-bridge",
        &format!(
            "[upstream]\nkind = \"mqtt\"\nprobe_interval_ms = 50\nbackoff_max_ms = 500\n\
             [upstream.mqtt]\nservers = [\"127.0.0.1:{port}\", \"localhost:{port}\"]\nround_robin = true\n\
             tls = true\nca = {:?}\n",
            c.join("ca.pem").display().to_string()
        ),
    );
    // 127.0.0.1 is refused (no such name in the certificate), localhost taken.
    wait_until(30, "the bridge up on localhost", || {
        let l = gw.api("/api/v1/link")["link"].clone();
        l["state"] == "up" && l["target"] == format!("localhost:{port}")
    });
    assert!(gw.metric("holdfast_link_connects_total{result=\"tls\"}") >= 1.0);
    let mut publisher = Client::connect(gw.mqtt, "sensor", true).unwrap();
    assert!(
        publisher
            .publish_acked("site/a", "over tls", Duration::from_secs(5))
            .unwrap()
    );
    wait_until(10, "the message acknowledged by the broker", || {
        gw.metric("holdfast_link_messages_acked_total") >= 1.0
    });
    let _ = broker.kill();
    let _ = broker.wait();
}

#[test]
fn the_bridge_fails_over_along_its_server_list_and_back_to_the_main_broker() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut main = Mosquitto::start(d1.path());
    let backup = Mosquitto::start(d2.path());
    main.stop();
    let gw = Gateway::start_named(
        "gw-bridge",
        &format!(
            "[upstream]\nkind = \"mqtt\"\nprobe_interval_ms = 50\nbackoff_max_ms = 500\nconnect_timeout_ms = 1000\n\
             [upstream.mqtt]\nservers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\nkeep_alive_seconds = 2\n",
            main.port, backup.port
        ),
    );
    // The main broker is down: the bridge runs on the backup.
    let mut on_backup = Client::connect(backup.port, "watch-backup", true).unwrap();
    on_backup.subscribe("site/#").unwrap();
    wait_until(30, "the bridge on the backup", || {
        gw.api("/api/v1/link")["link"]["target"] == format!("127.0.0.1:{}", backup.port)
            && gw.api("/api/v1/link")["link"]["state"] == "up"
    });
    let mut publisher = Client::connect(gw.mqtt, "sensor", true).unwrap();
    assert!(
        publisher
            .publish_acked("site/a", "one", Duration::from_secs(5))
            .unwrap()
    );
    let got = on_backup.recv(Duration::from_secs(10)).unwrap().expect("on the backup");
    assert_eq!(got.payload, "one");
    // The main broker returns: the bridge goes back to it.
    main.spawn();
    wait_until(30, "the bridge back on the main broker", || {
        gw.api("/api/v1/link")["link"]["target"] == format!("127.0.0.1:{}", main.port)
            && gw.api("/api/v1/link")["link"]["state"] == "up"
    });
    let mut on_main = Client::connect(main.port, "watch-main", true).unwrap();
    on_main.subscribe("site/#").unwrap();
    assert!(
        publisher
            .publish_acked("site/a", "two", Duration::from_secs(5))
            .unwrap()
    );
    let got = on_main
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("on the main broker");
    assert_eq!(got.payload, "two");
    assert!(gw.metric("holdfast_link_disconnects_total{reason=\"failback\"}") >= 1.0);
}
