//! End to end: the MQTT broker of the real `holdfast` binary, driven by real
//! clients started by the tests — `mosquitto_pub`/`mosquitto_sub`, rumqttc
//! (MQTT 3.1.1 and 5), Python paho-mqtt, raw sockets for malformed input —
//! over TCP, TLS with client certificates, and QUIC.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use holdfast_mqtt as codec;
use rumqttc::v5;

mod support;

use support::{Gateway, http_get};

/// Anonymous clients may use every topic, `$test/…` included; messages go
/// upstream (lane 5) and to local subscribers.
const OPEN: &str = "[plugins.auth.config]\nallow_anonymous = true\nanonymous_topics = [\"#\", \"$test/#\"]\n";

fn mqtt_stats(gw: &Gateway) -> serde_json::Value {
    let token = gw.token();
    let (code, body) = http_get(gw.port, "/api/v1/mqtt", Some(token.trim())).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until the broker holds at least `n` subscriptions.
fn wait_subscriptions(gw: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while mqtt_stats(gw)["stats"]["subscriptions"].as_u64().unwrap_or(0) < n {
        assert!(Instant::now() < deadline, "subscriptions did not arrive");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mosquitto_pub(port: u16, args: &[&str]) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("mosquitto_pub is not installed: run scripts/setup.sh");
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mosquitto_sub(port: u16, args: &[&str]) -> std::process::Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub is not installed: run scripts/setup.sh")
}

fn output_of(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn mosquitto_clients_qos_matrix() {
    let gw = Gateway::start(OPEN);
    for version in ["mqttv311", "mqttv5"] {
        // One subscriber per QoS; each receives one message per publish QoS.
        let subs: Vec<_> = (0..3)
            .map(|s| {
                mosquitto_sub(
                    gw.mqtt,
                    &[
                        "-V",
                        version,
                        "-t",
                        &format!("m/{version}/{s}/#"),
                        "-q",
                        &s.to_string(),
                        "-F",
                        "%q %t %p",
                        "-C",
                        "3",
                        "-W",
                        "20",
                    ],
                )
            })
            .collect();
        wait_subscriptions(&gw, 3);
        for p in 0..3 {
            for s in 0..3 {
                mosquitto_pub(
                    gw.mqtt,
                    &[
                        "-V",
                        version,
                        "-t",
                        &format!("m/{version}/{s}/p{p}"),
                        "-q",
                        &p.to_string(),
                        "-m",
                        &format!("payload-{p}"),
                    ],
                );
            }
        }
        for (s, sub) in subs.into_iter().enumerate() {
            let mut lines: Vec<String> = output_of(sub).lines().map(str::to_string).collect();
            lines.sort();
            let want: Vec<String> = (0..3)
                .map(|p: usize| format!("{} m/{version}/{s}/p{p} payload-{p}", p.min(s)))
                .collect();
            assert_eq!(lines, want, "{version} subscriber at QoS {s}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while mqtt_stats(&gw)["stats"]["subscriptions"].as_u64() != Some(0) {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Routed: the default router sends everything upstream (lane 5) too.
    assert!(gw.metric("holdfast_outbox_enqueued_total{lane=\"5\"}") >= 18.0);
}

#[test]
fn retained_messages_survive_a_restart_and_clear() {
    let mut gw = Gateway::start(OPEN);
    mosquitto_pub(gw.mqtt, &["-t", "r/keep", "-m", "v1", "-r", "-q", "1"]);
    mosquitto_pub(gw.mqtt, &["-t", "r/keep", "-m", "v2", "-r", "-q", "1"]);
    mosquitto_pub(gw.mqtt, &["-t", "r/other", "-m", "o", "-r"]);
    gw.restart();
    let sub = mosquitto_sub(gw.mqtt, &["-t", "r/#", "-F", "%r %t %p", "-C", "2", "-W", "10"]);
    let mut lines: Vec<String> = output_of(sub).lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(lines, ["1 r/keep v2", "1 r/other o"]);
    // A crash right after a retained publish keeps it too.
    mosquitto_pub(gw.mqtt, &["-t", "r/crash", "-m", "c", "-r", "-q", "1"]);
    gw.crash_restart();
    let sub = mosquitto_sub(gw.mqtt, &["-t", "r/crash", "-F", "%r %p", "-C", "1", "-W", "10"]);
    assert_eq!(output_of(sub).trim(), "1 c");
    // An empty retained message clears it.
    mosquitto_pub(gw.mqtt, &["-t", "r/keep", "-n", "-r"]);
    let sub = mosquitto_sub(gw.mqtt, &["-t", "r/keep", "-C", "1", "-W", "2"]);
    assert_eq!(output_of(sub), "");
    assert_eq!(mqtt_stats(&gw)["stats"]["retained"], 2);
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Polls a v3 event loop until `f` returns `Some`, or panics after `secs`.
async fn poll_v3<T>(el: &mut rumqttc::EventLoop, secs: u64, mut f: impl FnMut(&rumqttc::Event) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .expect("timed out waiting for an MQTT event")
            .expect("MQTT connection failed");
        if let Some(t) = f(&ev) {
            return t;
        }
    }
}

async fn poll_v5<T>(el: &mut v5::EventLoop, secs: u64, mut f: impl FnMut(&v5::Event) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .expect("timed out waiting for an MQTT event")
            .expect("MQTT connection failed");
        if let Some(t) = f(&ev) {
            return t;
        }
    }
}

fn v3_options(id: &str, port: u16, clean: bool) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10)).set_clean_session(clean);
    o
}

/// Publishes QoS 1 messages `{prefix}{i}` for `i` in `range` and waits for
/// every PUBACK.
async fn publish_acked(port: u16, id: &str, topic: &str, prefix: &str, range: std::ops::Range<u32>) {
    let (client, mut el) = rumqttc::AsyncClient::new(v3_options(id, port, true), 10);
    let n = range.len();
    let poller = tokio::spawn(async move {
        let mut acked = 0;
        poll_v3(&mut el, 60, |ev| {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev {
                acked += 1;
            }
            (acked == n).then_some(())
        })
        .await;
        el
    });
    for i in range {
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, format!("{prefix}{i}"))
            .await
            .unwrap();
    }
    let mut el = poller.await.unwrap();
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
}

#[test]
fn persistent_session_survives_restart_and_crash() {
    let mut gw = Gateway::start(OPEN);
    let port = gw.mqtt;
    let rt = rt();
    // Subscribe with a persistent session, then go away.
    rt.block_on(async {
        let (client, mut el) = rumqttc::AsyncClient::new(v3_options("keeper", port, false), 10);
        client.subscribe("keep/#", rumqttc::QoS::AtLeastOnce).await.unwrap();
        poll_v3(&mut el, 10, |ev| {
            matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))).then_some(())
        })
        .await;
        client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
        publish_acked(port, "feeder-1", "keep/a", "m", 0..20).await;
    });
    gw.restart();
    rt.block_on(publish_acked(port, "feeder-2", "keep/a", "m", 20..40));
    gw.crash_restart();
    let got = rt.block_on(async {
        let (client, mut el) = rumqttc::AsyncClient::new(v3_options("keeper", port, false), 10);
        let present = poll_v3(&mut el, 10, |ev| match ev {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c)) => Some(c.session_present),
            _ => None,
        })
        .await;
        assert!(present, "session not present after restart");
        let mut got = Vec::new();
        poll_v3(&mut el, 20, |ev| {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                got.push(String::from_utf8_lossy(&p.payload).into_owned());
            }
            (got.len() >= 40).then_some(())
        })
        .await;
        client.disconnect().await.unwrap();
        got
    });
    let want: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "queued messages in order, none lost");
}

#[test]
fn puback_only_after_the_outbox_has_it() {
    // An upstream that is down, so the outbox keeps what it stores (a root
    // would deliver it locally and delete it).
    let mut gw = Gateway::start(&format!(
        "{OPEN}[plugins.router.config]\ndefault_lane = 3\nlocal_by_default = false\n\
         [upstream]\nkind = \"mqtt\"\nprobe_interval_ms = 0\n[upstream.mqtt]\nhost = \"127.0.0.1\"\nport = {}\n",
        support::free_port()
    ));
    let port = gw.mqtt;
    rt().block_on(publish_acked(port, "durable", "up/x", "d", 0..200));
    // Acknowledged means stored: a SIGKILL right after loses nothing.
    gw.crash_restart();
    let token = gw.token();
    let (_, body) = http_get(gw.port, "/api/v1/outbox", Some(token.trim())).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["lanes"][3]["messages"], 200, "{body}");
}

#[test]
fn will_takeover_and_v5_features_with_rumqttc() {
    let gw = Gateway::start(OPEN);
    let port = gw.mqtt;
    rt().block_on(async {
        // Watcher: v5, subscription identifier 7, no-local on its own topic.
        let mut o = v5::MqttOptions::new("watcher", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        let (watcher, mut wel) = v5::AsyncClient::new(o, 10);
        watcher
            .subscribe_with_properties(
                "w/#",
                v5::mqttbytes::QoS::AtLeastOnce,
                v5::mqttbytes::v5::SubscribeProperties {
                    id: Some(7),
                    user_properties: vec![],
                },
            )
            .await
            .unwrap();
        let mut own = v5::mqttbytes::v5::Filter::new("self/#", v5::mqttbytes::QoS::AtLeastOnce);
        own.nolocal = true;
        watcher.subscribe_many([own]).await.unwrap();
        let mut subacks = 0;
        poll_v5(&mut wel, 10, |ev| {
            if let v5::Event::Incoming(v5::mqttbytes::v5::Packet::SubAck(_)) = ev {
                subacks += 1;
            }
            (subacks == 2).then_some(())
        })
        .await;

        // A v3.1.1 client with a will dies without DISCONNECT.
        let mut o = v3_options("mortal", port, true);
        o.set_last_will(rumqttc::LastWill::new(
            "w/will",
            "gone",
            rumqttc::QoS::AtLeastOnce,
            false,
        ));
        let (_mortal, mut mel) = rumqttc::AsyncClient::new(o, 10);
        poll_v3(&mut mel, 10, |ev| {
            matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))).then_some(())
        })
        .await;
        drop(mel);
        let will = poll_v5(&mut wel, 10, |ev| match ev {
            v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p)) => Some(p.clone()),
            _ => None,
        })
        .await;
        assert_eq!(&will.topic[..], b"w/will");
        assert_eq!(&will.payload[..], b"gone");
        assert_eq!(will.properties.unwrap().subscription_identifiers, vec![7]);

        // Properties pass through; a topic alias stands for the topic.
        let mut o = v5::MqttOptions::new("talker", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        let (talker, mut tel) = v5::AsyncClient::new(o, 10);
        tokio::spawn(async move { while tel.poll().await.is_ok() {} });
        let props = v5::mqttbytes::v5::PublishProperties {
            user_properties: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
            content_type: Some("application/json".into()),
            response_topic: Some("w/reply".into()),
            correlation_data: Some(bytes::Bytes::from_static(b"corr")),
            message_expiry_interval: Some(300),
            topic_alias: Some(1),
            ..Default::default()
        };
        talker
            .publish_with_properties("w/props", v5::mqttbytes::QoS::AtLeastOnce, false, "{}", props)
            .await
            .unwrap();
        let alias_only = v5::mqttbytes::v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        };
        talker
            .publish_with_properties("", v5::mqttbytes::QoS::AtLeastOnce, false, "again", alias_only)
            .await
            .unwrap();
        // The watcher's own publish on a no-local subscription does not come back.
        watcher
            .publish("self/x", v5::mqttbytes::QoS::AtLeastOnce, false, "echo")
            .await
            .unwrap();
        let mut got = Vec::new();
        poll_v5(&mut wel, 10, |ev| {
            if let v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p)) = ev {
                got.push(p.clone());
            }
            (got.len() == 2).then_some(())
        })
        .await;
        let first = got[0].properties.clone().unwrap();
        assert_eq!(&got[0].topic[..], b"w/props");
        assert_eq!(
            first.user_properties,
            vec![("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(first.content_type.as_deref(), Some("application/json"));
        assert_eq!(first.response_topic.as_deref(), Some("w/reply"));
        assert_eq!(first.correlation_data.as_deref(), Some(&b"corr"[..]));
        assert!(first.message_expiry_interval.is_some_and(|e| (299..=300).contains(&e)));
        assert_eq!(&got[1].topic[..], b"w/props", "alias resolved to the topic");
        assert_eq!(&got[1].payload[..], b"again");
        // Nothing more arrives: no echo of self/x.
        let extra = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                if let Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p))) = wel.poll().await {
                    return p;
                }
            }
        })
        .await;
        assert!(extra.is_err(), "no-local subscription echoed: {extra:?}");

        // Session takeover: a second "watcher" connection ends the first with 0x8E.
        let mut o = v5::MqttOptions::new("watcher", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        let (_second, mut sel) = v5::AsyncClient::new(o, 10);
        poll_v5(&mut sel, 10, |ev| {
            matches!(ev, v5::Event::Incoming(v5::mqttbytes::v5::Packet::ConnAck(_))).then_some(())
        })
        .await;
        let reason = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match wel.poll().await {
                    Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::Disconnect(d))) => return d.reason_code,
                    Ok(_) => {}
                    Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect { reason_code, .. })) => {
                        return reason_code;
                    }
                    Err(e) => panic!("the first connection ended without DISCONNECT: {e:?}"),
                }
            }
        })
        .await
        .expect("the first connection was not ended");
        assert_eq!(reason, v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver);
    });
    assert!(gw.metric("holdfast_mqtt_disconnects_total{reason=\"session-taken-over\"}") >= 1.0);
}

/// Sends raw bytes after an optional CONNECT; returns what the broker sent
/// back before closing (or after a second of silence).
fn raw_exchange(port: u16, connect_v5: bool, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if connect_v5 {
        send_connect_v5(&mut s, &format!("raw-{}", std::process::id()));
        let mut ack = [0u8; 64];
        let n = s.read(&mut ack).unwrap();
        assert!(n >= 4 && ack[0] == 0x20, "no CONNACK: {:?}", &ack[..n]);
    }
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// An encoded MQTT 5 CONNECT (clean start) for `client_id`.
fn connect_v5(client_id: &str) -> BytesMut {
    let c = codec::Connect {
        version: codec::Version::V5,
        client_id: client_id.into(),
        clean_start: true,
        keep_alive: 30,
        username: None,
        password: None,
        will: None,
        properties: Default::default(),
    };
    let mut b = BytesMut::new();
    codec::encode(&codec::Packet::Connect(Box::new(c)), codec::Version::V5, &mut b);
    b
}

/// Writes an MQTT 5 CONNECT (clean start) for `client_id`.
fn send_connect_v5(s: &mut TcpStream, client_id: &str) {
    s.write_all(&connect_v5(client_id)).unwrap();
}

fn decode_all(bytes: &[u8], version: codec::Version) -> Vec<codec::Packet> {
    let mut b = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(p)) = codec::decode(&mut b, Some(version), 1 << 20) {
        out.push(p);
    }
    out
}

#[test]
fn malformed_input_closes_only_that_connection() {
    let gw = Gateway::start(&format!(
        "{OPEN}[mqtt]\nmax_packet_size = 1024\nconnect_timeout_ms = 500\n"
    ));
    let port = gw.mqtt;
    // A healthy subscriber stays connected throughout.
    let healthy = mosquitto_sub(port, &["-t", "ok/#", "-C", "1", "-W", "30"]);
    wait_subscriptions(&gw, 1);
    // Reserved packet type 0 after CONNECT: DISCONNECT 0x81, then closed.
    let back = decode_all(&raw_exchange(port, true, &[0x00, 0x00]), codec::Version::V5);
    assert!(
        matches!(back.last(), Some(codec::Packet::Disconnect(d)) if d.code == codec::reason::MALFORMED),
        "{back:?}"
    );
    // Too large: refused from the header with 0x95.
    let back = decode_all(&raw_exchange(port, true, &[0x30, 0xFF, 0xFF, 0x03]), codec::Version::V5);
    assert!(
        matches!(back.last(), Some(codec::Packet::Disconnect(d)) if d.code == codec::reason::PACKET_TOO_LARGE),
        "{back:?}"
    );
    // Garbage instead of CONNECT: closed with nothing sent.
    assert!(raw_exchange(port, false, b"GET / HTTP/1.1\r\n\r\n").is_empty());
    // Unknown protocol level: CONNACK "unacceptable protocol version".
    let back = raw_exchange(port, false, &[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 0, 0, 0]);
    assert_eq!(back, [0x20, 2, 0, 1]);
    // An idle socket is closed after the CONNECT timeout.
    let started = Instant::now();
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(idle.read(&mut buf).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(4));
    // The healthy subscriber still works.
    mosquitto_pub(port, &["-t", "ok/still", "-m", "fine"]);
    assert_eq!(output_of(healthy).trim(), "fine");
    assert!(gw.metric("holdfast_mqtt_bad_packets_total{reason=\"malformed\"}") >= 1.0);
    assert!(gw.metric("holdfast_mqtt_bad_packets_total{reason=\"protocol-error\"}") >= 1.0);
    assert!(gw.metric("holdfast_mqtt_bad_packets_total{reason=\"too-large\"}") >= 1.0);
    assert!(gw.metric("holdfast_mqtt_connects_total{result=\"timeout\"}") >= 1.0);
}

#[test]
fn limits_refuse_with_reason_codes() {
    let gw = Gateway::start(&format!(
        "{OPEN}[mqtt]\nmax_connections = 2\nmax_subscriptions_per_client = 1\n"
    ));
    let port = gw.mqtt;
    rt().block_on(async {
        let mut o = v5::MqttOptions::new("limited", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(10));
        let (c, mut el) = v5::AsyncClient::new(o, 10);
        c.subscribe("a/1", v5::mqttbytes::QoS::AtMostOnce).await.unwrap();
        c.subscribe("a/2", v5::mqttbytes::QoS::AtMostOnce).await.unwrap();
        let mut codes = Vec::new();
        poll_v5(&mut el, 10, |ev| {
            if let v5::Event::Incoming(v5::mqttbytes::v5::Packet::SubAck(s)) = ev {
                codes.extend(s.return_codes.clone());
            }
            (codes.len() == 2).then_some(())
        })
        .await;
        assert_eq!(
            codes[0],
            v5::mqttbytes::v5::SubscribeReasonCode::Success(v5::mqttbytes::QoS::AtMostOnce)
        );
        assert_eq!(codes[1], v5::mqttbytes::v5::SubscribeReasonCode::QuotaExceeded);
        // Two connections allowed; the third gets "server busy" (3.1.1: server unavailable).
        let (_c2, mut el2) = rumqttc::AsyncClient::new(v3_options("second", port, true), 10);
        poll_v3(&mut el2, 10, |ev| {
            matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))).then_some(())
        })
        .await;
        let (_c3, mut el3) = rumqttc::AsyncClient::new(v3_options("third", port, true), 10);
        let err = tokio::time::timeout(Duration::from_secs(10), el3.poll()).await.unwrap();
        assert!(
            matches!(
                err,
                Err(rumqttc::ConnectionError::ConnectionRefused(
                    rumqttc::ConnectReturnCode::ServiceUnavailable
                ))
            ),
            "{err:?}"
        );
    });
    assert!(gw.metric("holdfast_mqtt_connects_total{result=\"connection-limit\"}") >= 1.0);
}

#[test]
fn swapping_the_auth_plugin_drops_cached_decisions() {
    let gw = Gateway::start(OPEN);
    let port = gw.mqtt;
    let narrow = gw.dir.path().join("narrow.toml");
    std::fs::write(&narrow, "allow_anonymous = true\nanonymous_topics = [\"other/#\"]\n").unwrap();
    let auth_wasm = gw.dir.path().join("auth.wasm");
    std::fs::write(
        &auth_wasm,
        holdfast_plugins::embedded_plugin(holdfast_plugins::SlotName::Auth),
    )
    .unwrap();
    let rt = rt();
    rt.block_on(async {
        let mut o = v5::MqttOptions::new("cached", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (c, mut el) = v5::AsyncClient::new(o, 10);
        c.publish("a/b", v5::mqttbytes::QoS::AtLeastOnce, false, "1")
            .await
            .unwrap();
        let first = poll_v5(&mut el, 10, |ev| match ev {
            v5::Event::Incoming(v5::mqttbytes::v5::Packet::PubAck(a)) => Some(a.reason),
            _ => None,
        })
        .await;
        assert_eq!(first, v5::mqttbytes::v5::PubAckReason::Success);
        // Swap in the same plugin with a narrower config while connected.
        let out = gw.cli_ok(&[
            "plugin",
            "swap",
            "auth",
            auth_wasm.to_str().unwrap(),
            "--plugin-config",
            narrow.to_str().unwrap(),
        ]);
        assert!(out.starts_with("swapped auth"), "{out}");
        c.publish("a/b", v5::mqttbytes::QoS::AtLeastOnce, false, "2")
            .await
            .unwrap();
        let second = poll_v5(&mut el, 10, |ev| match ev {
            v5::Event::Incoming(v5::mqttbytes::v5::Packet::PubAck(a)) => Some(a.reason),
            _ => None,
        })
        .await;
        assert_eq!(second, v5::mqttbytes::v5::PubAckReason::NotAuthorized);
    });
    assert!(gw.metric("holdfast_mqtt_denied_total{reason=\"publish-not-authorized\"}") >= 1.0);
}

struct Pki {
    dir: std::path::PathBuf,
    /// Of `tls-device` and `tls-watcher`.
    thumbprints: Vec<String>,
}

/// A CA, a server certificate for localhost and client certificates for
/// `tls-device` and `tls-watcher`, as PEM files.
fn make_pki(dir: &std::path::Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "holdfast test ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", server.pem()),
        ("server.key", server_key.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
    let mut thumbprints = Vec::new();
    for device in ["tls-device", "tls-watcher"] {
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params.distinguished_name.push(DnType::CommonName, device);
        let client = client_params.signed_by(&client_key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{device}.pem")), client.pem()).unwrap();
        std::fs::write(dir.join(format!("{device}.key")), client_key.serialize_pem()).unwrap();
        let (thumbprint, cn) = holdfast_tls::describe_cert(client.der());
        assert_eq!(cn.as_deref(), Some(device));
        thumbprints.push(thumbprint);
    }
    Pki {
        dir: dir.to_path_buf(),
        thumbprints,
    }
}

#[test]
fn tls_client_certificates_and_quic() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let p = |f: &str| pki.dir.join(f).display().to_string();
    let tls_port = support::free_port();
    let quic_port = support::free_port();
    let gw = Gateway::start(&format!(
        "[plugins.auth.config]\nallow_anonymous = false\n\
         [[plugins.auth.config.rules]]\neffect = \"allow\"\noperations = [\"subscribe\"]\nfilter = \"devices/#\"\n\
         [[identities]]\nid = \"tls-device\"\nkind = \"device\"\nthumbprints = [\"{tp}\"]\n\
         [[identities]]\nid = \"tls-watcher\"\nkind = \"device\"\nthumbprints = [\"{tw}\"]\n\
         [mqtt.tls]\nenabled = true\nlisten = \"127.0.0.1:{tls_port}\"\ncert = {sc:?}\nkey = {sk:?}\nclient_ca = {ca:?}\n\
         [mqtt.quic]\nenabled = true\nlisten = \"127.0.0.1:{quic_port}\"\ncert = {sc:?}\nkey = {sk:?}\nclient_ca = {ca:?}\n",
        tp = pki.thumbprints[0],
        tw = pki.thumbprints[1],
        sc = p("server.pem"),
        sk = p("server.key"),
        ca = p("ca.pem"),
    ));
    let tls = |extra: &[&str]| {
        let mut args = vec![
            "-p".to_string(),
            tls_port.to_string(),
            "--cafile".into(),
            p("ca.pem"),
            "-i".into(),
            "tls-watcher".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // With its client certificate the watcher is authenticated by thumbprint.
    let sub_args = tls(&[
        "--cert",
        &p("tls-watcher.pem"),
        "--key",
        &p("tls-watcher.key"),
        "-t",
        "devices/tls-device/#",
        "-C",
        "1",
        "-W",
        "20",
        "-F",
        "%t %p",
    ]);
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "localhost"])
        .args(&sub_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_subscriptions(&gw, 1);
    // Over QUIC, the device (its own certificate) publishes into its topic space.
    quic_publish(quic_port, &pki, "devices/tls-device/telemetry", b"over-quic");
    let out = sub.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "devices/tls-device/telemetry over-quic",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without a certificate (and no anonymous access) the CONNECT is refused.
    let out = Command::new("mosquitto_pub")
        .args(["-h", "localhost"])
        .args(tls(&["-t", "devices/tls-device/x", "-m", "no"]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(gw.metric("holdfast_mqtt_connects_total{result=\"not-authorized\"}") >= 1.0);
    assert!(gw.metric("holdfast_mqtt_connections{transport=\"tls\"}") >= 0.0);
}

/// Without `client_ca`, the TLS listener takes any client certificate and
/// the auth plugin decides: a registered thumbprint, or a chain to a CA in
/// the registry that names the identity.
#[test]
fn registered_ca_and_thumbprint_certificates() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let p = |f: &str| pki.dir.join(f).display().to_string();
    let tls_port = support::free_port();
    let gw = Gateway::start(&format!(
        "[plugins.auth.config]\nallow_anonymous = false\n\
         [mqtt.tls]\nenabled = true\nlisten = \"127.0.0.1:{tls_port}\"\ncert = {sc:?}\nkey = {sk:?}\n",
        sc = p("server.pem"),
        sk = p("server.key"),
    ));
    // A certificate outside the CA, for a device that claims `x509-ca`.
    let rogue_key = rcgen::KeyPair::generate().unwrap();
    let mut rogue = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    rogue.distinguished_name.push(rcgen::DnType::CommonName, "rogue");
    let rogue = rogue.self_signed(&rogue_key).unwrap();
    std::fs::write(pki.dir.join("rogue.pem"), rogue.pem()).unwrap();
    std::fs::write(pki.dir.join("rogue.key"), rogue_key.serialize_pem()).unwrap();

    gw.cli_ok(&["device", "ca-add", "plant", &p("ca.pem")]);
    gw.cli_ok(&["device", "add", "tls-device", "--auth", "x509-ca"]);
    gw.cli_ok(&["device", "add", "rogue", "--auth", "x509-ca"]);
    gw.cli_ok(&[
        "device",
        "add",
        "tls-watcher",
        "--auth",
        "x509-thumbprint",
        "--thumbprint",
        &pki.thumbprints[1],
    ]);
    let publish = |id: &str, cert: &str| {
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &tls_port.to_string(),
                "--cafile",
                &p("ca.pem"),
                "-q",
                "1",
            ])
            .args([
                "-i",
                id,
                "--cert",
                &p(&format!("{cert}.pem")),
                "--key",
                &p(&format!("{cert}.key")),
            ])
            .args(["-t", &format!("devices/{id}/messages/events/"), "-m", "x"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        publish("tls-device", "tls-device"),
        "signed by the registered CA\n{}",
        gw.describe()
    );
    assert!(publish("tls-watcher", "tls-watcher"), "registered thumbprint");
    assert!(
        !publish("tls-device", "tls-watcher"),
        "a CA-signed certificate naming someone else"
    );
    assert!(!publish("rogue", "rogue"), "not signed by a registered CA");
    gw.cli_ok(&["device", "ca-rm", "plant"]);
    assert!(!publish("tls-device", "tls-device"), "its CA was removed");
    assert!(publish("tls-watcher", "tls-watcher"), "thumbprints need no CA");
}

/// Connects over QUIC with the client certificate, publishes one QoS 1
/// message and waits for its PUBACK.
fn quic_publish(port: u16, pki: &Pki, topic: &str, payload: &[u8]) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    rt().block_on(async {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(pki.dir.join("ca.pem")).unwrap())
            .unwrap();
        let certs = vec![CertificateDer::from_pem_file(pki.dir.join("tls-device.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(pki.dir.join("tls-device.key")).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap();
        tls.alpn_protocols = vec![b"mqtt".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint
            .connect(([127, 0, 0, 1], port).into(), "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut b = BytesMut::new();
        let c = codec::Connect {
            version: codec::Version::V5,
            client_id: "tls-device".into(),
            clean_start: true,
            keep_alive: 30,
            username: None,
            password: None,
            will: None,
            properties: Default::default(),
        };
        codec::encode(&codec::Packet::Connect(Box::new(c)), codec::Version::V5, &mut b);
        codec::encode(
            &codec::Packet::Publish(codec::Publish::new(topic, payload.to_vec(), codec::QoS::AtLeastOnce, 1)),
            codec::Version::V5,
            &mut b,
        );
        send.write_all(&b).await.unwrap();
        let mut rbuf = BytesMut::new();
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !seen.iter().any(|p| matches!(p, codec::Packet::PubAck(_))) {
            let mut chunk = [0u8; 512];
            let n = tokio::time::timeout_at(deadline, recv.read(&mut chunk))
                .await
                .expect("no PUBACK over QUIC")
                .unwrap()
                .expect("stream closed");
            rbuf.extend_from_slice(&chunk[..n]);
            while let Some(p) = codec::decode(&mut rbuf, Some(codec::Version::V5), 1 << 20).unwrap() {
                seen.push(p);
            }
        }
        assert!(matches!(&seen[0], codec::Packet::ConnAck(a) if a.code == 0), "{seen:?}");
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
}

#[test]
fn paho_conformance_suite() {
    let gw = Gateway::start(OPEN);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/mqtt/conformance.py");
    let out = Command::new("python3")
        .args([script, "--host", "127.0.0.1", "--port", &gw.mqtt.to_string()])
        .output()
        .expect("python3 is not installed: run scripts/setup.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "paho conformance failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PASS"), "{stdout}");
}

/// A blocking MQTT 5 client on a raw socket, for flows the client libraries
/// do not let a test stop in the middle of.
struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    fn connect(port: u16, client_id: &str, clean_start: bool) -> (Raw, codec::ConnAck) {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut raw = Raw {
            s,
            buf: BytesMut::new(),
        };
        raw.send(&codec::Packet::Connect(Box::new(codec::Connect {
            version: codec::Version::V5,
            client_id: client_id.into(),
            clean_start,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            properties: codec::Properties {
                session_expiry_interval: Some(300),
                ..Default::default()
            },
        })));
        match raw.recv() {
            codec::Packet::ConnAck(a) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, p: &codec::Packet) {
        let mut b = BytesMut::new();
        codec::encode(p, codec::Version::V5, &mut b);
        self.s.write_all(&b).unwrap();
    }

    fn recv(&mut self) -> codec::Packet {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(codec::Version::V5), 1 << 20).unwrap() {
                return p;
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("no packet from the broker");
            assert!(n > 0, "the broker closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[test]
fn qos2_release_state_survives_a_restart() {
    let mut gw = Gateway::start(OPEN);
    let (mut sub, _) = Raw::connect(gw.mqtt, "q2-keeper", true);
    sub.send(&codec::Packet::Subscribe(codec::Subscribe {
        pkid: 1,
        filters: vec![(
            "q2/#".into(),
            codec::SubOptions {
                qos: codec::QoS::ExactlyOnce,
                ..Default::default()
            },
        )],
        properties: Default::default(),
    }));
    assert!(matches!(sub.recv(), codec::Packet::SubAck(_)));
    mosquitto_pub(gw.mqtt, &["-t", "q2/x", "-m", "exactly-once", "-q", "2"]);
    let pkid = match sub.recv() {
        codec::Packet::Publish(p) => {
            assert_eq!(&p.payload[..], b"exactly-once");
            p.pkid
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    // PUBREC, then the broker's PUBREL; the client goes away before PUBCOMP.
    sub.send(&codec::Packet::PubRec(codec::Ack::new(pkid)));
    assert!(matches!(sub.recv(), codec::Packet::PubRel(a) if a.pkid == pkid));
    drop(sub);
    gw.restart();
    let (mut sub, ack) = Raw::connect(gw.mqtt, "q2-keeper", false);
    assert!(ack.session_present);
    // Only the PUBREL comes again, for the same packet id; the message is not redelivered.
    assert!(matches!(sub.recv(), codec::Packet::PubRel(a) if a.pkid == pkid));
    sub.send(&codec::Packet::PubComp(codec::Ack::new(pkid)));
    sub.send(&codec::Packet::PingReq);
    assert!(matches!(sub.recv(), codec::Packet::PingResp));
}

/// An MQTT 5 client that sends more QoS 1 messages than the receive maximum
/// and keeps writing gets DISCONNECT 0x93 and an orderly close: the server
/// reads (and discards) what is still coming for a short grace before it
/// closes, so no reset destroys the reason code before the client reads it.
#[test]
fn receive_maximum_exceeded_reaches_a_client_that_keeps_writing() {
    let gw = Gateway::start("[mqtt]\nmax_inflight = 2\n");
    let mut s = TcpStream::connect(("127.0.0.1", gw.mqtt)).unwrap();
    send_connect_v5(&mut s, "flood");
    // About 64 KiB of QoS 1 publishes, written again and again.
    let mut flood = BytesMut::new();
    for pkid in 1..=600u16 {
        let p = codec::Publish::new(
            "flood/t",
            bytes::Bytes::from(vec![7u8; 64]),
            codec::QoS::AtLeastOnce,
            pkid,
        );
        codec::encode(&codec::Packet::Publish(p), codec::Version::V5, &mut flood);
    }
    // Like a single-threaded client library: write, then look at what came
    // back; a write that fails before the DISCONNECT was read loses the reason.
    s.set_write_timeout(Some(Duration::from_secs(4))).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 65536];
    let has_disconnect = |got: &[u8]| {
        decode_all(got, codec::Version::V5)
            .iter()
            .any(|p| matches!(p, codec::Packet::Disconnect(_)))
    };
    let until = Instant::now() + Duration::from_secs(4);
    while !has_disconnect(&got) && Instant::now() < until {
        // One write per packet, a look at the socket every 600 packets.
        for packet in flood.chunks(flood.len() / 600) {
            if let Err(e) = s.write_all(packet) {
                panic!(
                    "the write failed ({e}) before the DISCONNECT was read\n{}",
                    gw.describe()
                );
            }
        }
        match s.read(&mut chunk) {
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    // Then the server closes in order.
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let end = loop {
        match s.read(&mut chunk) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => break format!("error: {e}"),
        }
    };
    let packets = decode_all(&got, codec::Version::V5);
    let disconnect = packets.iter().find_map(|p| match p {
        codec::Packet::Disconnect(d) => Some(d.code),
        _ => None,
    });
    assert_eq!(
        disconnect,
        Some(0x93),
        "ended with {end} after {} packets\n{}",
        packets.len(),
        gw.describe()
    );
    assert_eq!(end, "eof");
    gw.stop();
}

/// MQTT over WebSockets: paho-mqtt's websocket transport (MQTT 3.1.1 and 5)
/// over ws:// and wss:// on both paths; a raw WebSocket client that splits a
/// CONNECT over three messages and sends several packets in one; refused
/// upgrades (another path, no `mqtt` subprotocol).
#[test]
fn mqtt_over_websockets_plain_and_tls() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path());
    let p = |f: &str| pki.dir.join(f).display().to_string();
    let (ws, wss) = (support::free_port(), support::free_port());
    let gw = Gateway::start(&format!(
        "{OPEN}[mqtt.ws]\nenabled = true\nlisten = \"127.0.0.1:{ws}\"\n\
         [mqtt.wss]\nenabled = true\nlisten = \"127.0.0.1:{wss}\"\ncert = {sc:?}\nkey = {sk:?}\n",
        sc = p("server.pem"),
        sk = p("server.key"),
    ));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/mqtt/websocket.py");
    let ca = p("ca.pem");
    for (port, path, protocol, tls) in [
        (ws, "/mqtt", "311", false),
        (ws, "/$iothub/websocket", "5", false),
        (wss, "/$iothub/websocket", "311", true),
        (wss, "/mqtt", "5", true),
    ] {
        let mut cmd = Command::new("python3");
        cmd.args([
            script,
            "--port",
            &port.to_string(),
            "--path",
            path,
            "--protocol",
            protocol,
        ]);
        if tls {
            cmd.args(["--ca", &ca]);
        }
        let out = cmd.output().expect("python3 is not installed: run scripts/setup.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("PASS"),
            "paho over {} {path} (MQTT {protocol}):\n{stdout}\n{}\n{}",
            if tls { "wss" } else { "ws" },
            String::from_utf8_lossy(&out.stderr),
            gw.describe()
        );
    }

    rt().block_on(async {
        let open = |path: &str, protocol: Option<&str>| {
            let mut req = format!("ws://127.0.0.1:{ws}{path}").into_client_request().unwrap();
            if let Some(p) = protocol {
                req.headers_mut().insert("sec-websocket-protocol", p.parse().unwrap());
            }
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ws)).await.unwrap();
                tokio_tungstenite::client_async(req, tcp).await
            }
        };
        // Refused upgrades.
        for (path, protocol, status) in [("/elsewhere", Some("mqtt"), 404), ("/mqtt", None, 400)] {
            match open(path, protocol).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), status, "{path}"),
                other => panic!("{path}: expected HTTP {status}, got {:?}", other.map(|_| ())),
            }
        }
        let (mut s, resp) = open("/mqtt", Some("mqtt")).await.unwrap();
        assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
        let packet = |p: codec::Packet| {
            let mut b = BytesMut::new();
            codec::encode(&p, codec::Version::V5, &mut b);
            b.to_vec()
        };
        let connect = connect_v5("raw-ws").to_vec();
        // The CONNECT in three messages, cut inside its header and payload.
        for part in [&connect[..1], &connect[1..5], &connect[5..]] {
            s.send(Message::Binary(part.to_vec().into())).await.unwrap();
        }
        // SUBSCRIBE, a QoS 1 PUBLISH to it and a PINGREQ in one message.
        let mut several = packet(codec::Packet::Subscribe(codec::Subscribe {
            pkid: 1,
            filters: vec![(
                "ws/raw/#".into(),
                codec::SubOptions {
                    qos: codec::QoS::AtLeastOnce,
                    ..codec::SubOptions::default()
                },
            )],
            properties: codec::Properties::default(),
        }));
        several.extend(packet(codec::Packet::Publish(codec::Publish::new(
            "ws/raw/t",
            bytes::Bytes::from_static(b"in one frame"),
            codec::QoS::AtLeastOnce,
            2,
        ))));
        several.extend(packet(codec::Packet::PingReq));
        s.send(Message::Binary(several.into())).await.unwrap();
        let mut bytes = Vec::new();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let next = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
            match next {
                Ok(Some(Ok(Message::Binary(b)))) => bytes.extend_from_slice(&b),
                Ok(Some(Ok(_))) => continue,
                _ => break,
            }
            got = decode_all(&bytes, codec::Version::V5);
            let has = |f: &dyn Fn(&codec::Packet) -> bool| got.iter().any(f);
            if has(&|p| matches!(p, codec::Packet::PingResp))
                && has(&|p| matches!(p, codec::Packet::Publish(m) if &m.payload[..] == b"in one frame"))
                && has(&|p| matches!(p, codec::Packet::PubAck(a) if a.pkid == 2))
            {
                break;
            }
        }
        assert!(
            matches!(got.first(), Some(codec::Packet::ConnAck(a)) if a.code == 0),
            "{got:?}"
        );
        assert!(got.iter().any(|p| matches!(p, codec::Packet::SubAck(_))), "{got:?}");
        assert!(
            got.iter().any(|p| matches!(p, codec::Packet::PubAck(a) if a.pkid == 2)),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|p| matches!(p, codec::Packet::Publish(m) if &m.payload[..] == b"in one frame")),
            "{got:?}"
        );
        assert!(got.iter().any(|p| matches!(p, codec::Packet::PingResp)), "{got:?}");
        assert!(gw.metric("holdfast_mqtt_connections{transport=\"websocket\"}") >= 1.0);
        // A text message ends the connection.
        s.send(Message::Text("not mqtt".into())).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(m)) = s.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
        assert!(end.is_ok(), "the connection was not closed");
    });
    assert!(gw.metric("holdfast_mqtt_connects_total{result=\"websocket-path\"}") >= 1.0);
    assert!(gw.metric("holdfast_mqtt_connects_total{result=\"websocket-subprotocol\"}") >= 1.0);
}

/// Issue 28, items 5 and 7: the WebSocket listener answers every refused
/// upgrade in HTTP (a plain GET, a bad key, a wrong version, another
/// path), cuts a request head that drips in at the one deadline, bounds
/// the upgrades in progress per client address, and still upgrades a
/// client from another address meanwhile.
#[test]
fn websocket_upgrades_are_answered_and_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ws = support::free_port();
    let gw = Gateway::start(&format!(
        "{OPEN}[mqtt]\nconnect_timeout_ms = 1500\n\
         [mqtt.ws]\nenabled = true\nlisten = \"127.0.0.1:{ws}\"\nmax_handshakes = 16\nmax_handshakes_per_ip = 2\n"
    ));
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    let upgrade = |path: &str, version: &str, key: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
    };
    rt().block_on(async {
        let connect_from = |from: &'static str| async move {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{from}:0").parse().unwrap()).unwrap();
            s.connect(format!("127.0.0.1:{ws}").parse().unwrap()).await.unwrap()
        };
        // Sends `request`; everything the server answers until it closes.
        let exchange = |request: String| async move {
            let mut s = connect_from("127.0.0.1").await;
            s.write_all(request.as_bytes()).await.unwrap();
            let mut got = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
            assert!(r.is_ok(), "the server neither answered nor closed");
            String::from_utf8_lossy(&got).into_owned()
        };
        let plain = exchange("GET /mqtt HTTP/1.1\r\nHost: gw\r\n\r\n".into()).await;
        assert!(
            plain.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "plain GET: {plain:?}"
        );
        assert!(plain.contains("Upgrade: websocket\r\n"), "{plain}");
        let root = exchange("GET / HTTP/1.1\r\nHost: gw\r\n\r\n".into()).await;
        assert!(root.starts_with("HTTP/1.1 404 "), "GET /: {root:?}");
        let bad_key = exchange(upgrade("/mqtt", "13", "abc")).await;
        assert!(bad_key.starts_with("HTTP/1.1 400 "), "bad key: {bad_key:?}");
        let version = exchange(upgrade("/mqtt", "8", KEY)).await;
        assert!(version.starts_with("HTTP/1.1 426 "), "version 8: {version:?}");
        assert!(version.contains("Sec-WebSocket-Version: 13\r\n"), "{version}");
        let garbage = exchange("\x10\x0c\x00\x04MQTT\x05\x02\x00\x3c\x00\x00".into()).await;
        assert!(
            garbage.starts_with("HTTP/1.1 400 "),
            "MQTT on the WebSocket port: {garbage:?}"
        );

        // Two slow clients from 127.0.0.1, a header line every 200 ms.
        let mut drips = Vec::new();
        for _ in 0..2 {
            let mut s = connect_from("127.0.0.1").await;
            s.write_all(b"GET /mqtt HTTP/1.1\r\n").await.unwrap();
            drips.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..100 {
                    tokio::select! {
                        r = s.read_to_end(&mut got) => { let _ = r; break; }
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if s.write_all(format!("X-Drip-{i}: 1\r\n").as_bytes()).await.is_err() {
                        let _ = s.read_to_end(&mut got).await;
                        break;
                    }
                }
                String::from_utf8_lossy(&got).into_owned()
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A third from the same address is turned away at once.
        let third = exchange(upgrade("/mqtt", "13", KEY)).await;
        assert!(
            third.starts_with("HTTP/1.1 429 "),
            "a third upgrade from 127.0.0.1: {third:?}"
        );
        // A client from another address upgrades and speaks MQTT meanwhile.
        let mut other = connect_from("127.0.0.2").await;
        other.write_all(upgrade("/mqtt", "13", KEY).as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(
                other.read(&mut b).await.unwrap(),
                1,
                "{}",
                String::from_utf8_lossy(&head)
            );
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        let mut client = tokio_tungstenite::WebSocketStream::from_raw_socket(
            other,
            tokio_tungstenite::tungstenite::protocol::Role::Client,
            None,
        )
        .await;
        use futures_util::{SinkExt, StreamExt};
        client
            .send(tokio_tungstenite::tungstenite::Message::Binary(
                connect_v5("ws-other").to_vec().into(),
            ))
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let got = decode_all(&m.into_data(), codec::Version::V5);
        assert!(
            matches!(got.first(), Some(codec::Packet::ConnAck(a)) if a.code == 0),
            "{got:?}"
        );
        // The drips are cut at the deadline, with an answer, though they
        // never stop sending.
        for d in drips {
            let answer = tokio::time::timeout(Duration::from_secs(20), d).await.unwrap().unwrap();
            assert!(answer.starts_with("HTTP/1.1 408 "), "a dripping head: {answer:?}");
        }
        // Their slots are free again.
        let again = exchange(upgrade("/elsewhere", "13", KEY)).await;
        assert!(again.starts_with("HTTP/1.1 404 "), "{again:?}");
    });
    for result in [
        "websocket-not-upgrade",
        "websocket-key",
        "websocket-version",
        "websocket-bad-request",
        "websocket-per-ip-limit",
        "websocket-handshake-timeout",
    ] {
        assert!(
            gw.metric(&format!("holdfast_mqtt_connects_total{{result=\"{result}\"}}")) >= 1.0,
            "{result}: {}",
            gw.metrics()
        );
    }
    gw.stop();
}
