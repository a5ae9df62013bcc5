//! End-to-end tests of the built proxy binary against in-process UDP and TCP echo servers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::{Instant, sleep, timeout};

/// How long to wait before deciding that nothing arrives.
const QUIET: Duration = Duration::from_millis(300);
/// Generous bound for something that should arrive.
const ARRIVES: Duration = Duration::from_secs(3);

struct Proxy {
    child: Child,
    control: SocketAddr,
    udp: SocketAddr,
    tcp: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str().expect("address string").parse().expect("socket address")
}

fn spawn_proxy(udp_target: SocketAddr, tcp_target: SocketAddr) -> Proxy {
    let mut child = Command::new(env!("CARGO_BIN_EXE_holdfast-link-proxy"))
        .arg("--udp")
        .arg(format!("127.0.0.1:0={udp_target}"))
        .arg("--tcp")
        .arg(format!("127.0.0.1:0={tcp_target}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn proxy");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read ready line");
    assert!(line.starts_with("{\"control\":\"127.0.0.1:"), "ready line: {line:?}");
    let v: Value = serde_json::from_str(&line).expect("ready line is JSON");
    let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 3, "ready line: {line:?}");
    Proxy {
        child,
        control: addr(&v["control"]),
        udp: addr(&v["udp"][0]),
        tcp: addr(&v["tcp"][0]),
    }
}

/// A UDP echo server that prefixes each reply with the sender's port: `"<port>|<payload>"`.
async fn udp_echo() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            let mut reply = format!("{}|", src.port()).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, src).await;
        }
    });
    addr
}

async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Control {
    r: tokio::io::BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Control {
    async fn connect(addr: SocketAddr) -> Control {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Control {
            r: tokio::io::BufReader::new(r),
            w,
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let mut reply = String::new();
        timeout(ARRIVES, self.r.read_line(&mut reply))
            .await
            .expect("control reply")
            .unwrap();
        reply.trim_end().to_owned()
    }

    async fn ok(&mut self, line: &str) {
        assert_eq!(self.cmd(line).await, "ok", "command {line:?}");
    }

    async fn stats(&mut self) -> Value {
        let line = self.cmd("stats").await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("stats {line:?}: {e}"))
    }
}

/// Sends `payload` and waits up to `wait` for its echo; returns the upstream source port
/// the echo server saw and the reply length.
async fn udp_roundtrip(sock: &UdpSocket, payload: &[u8], wait: Duration) -> Option<(u16, usize)> {
    sock.send(payload).await.unwrap();
    udp_reply(sock, payload, wait).await
}

async fn udp_reply(sock: &UdpSocket, payload: &[u8], wait: Duration) -> Option<(u16, usize)> {
    let mut buf = vec![0u8; 65_535];
    let deadline = Instant::now() + wait;
    loop {
        let n = match timeout(deadline.saturating_duration_since(Instant::now()), sock.recv(&mut buf)).await {
            Ok(r) => r.unwrap(),
            Err(_) => return None,
        };
        let reply = &buf[..n];
        let bar = reply.iter().position(|&b| b == b'|').expect("port prefix");
        if &reply[bar + 1..] == payload {
            let port = std::str::from_utf8(&reply[..bar]).unwrap().parse().unwrap();
            return Some((port, n));
        }
        // A stale reply to an earlier datagram: skip it.
    }
}

async fn udp_client(proxy: &Proxy) -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(proxy.udp).await.unwrap();
    sock
}

async fn tcp_echo_roundtrip(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    timeout(ARRIVES, s.read_exact(&mut got))
        .await
        .expect("tcp echo in time")
        .unwrap();
    assert_eq!(got, data);
}

/// Whether the connection is closed (EOF or reset) within `wait`.
async fn tcp_closed(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(timeout(wait, s.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[tokio::test]
async fn up_forwards_blackhole_drops_and_stats_count() {
    let proxy = spawn_proxy(udp_echo().await, tcp_echo().await);
    let mut ctl = Control::connect(proxy.control).await;

    let s = ctl.stats().await;
    assert_eq!(s["mode"], "up");
    assert_eq!(num(&s, "udp_flows"), 0);
    assert_eq!(num(&s, "forwarded_datagrams"), 0);

    // up: datagrams go through, all from one upstream port.
    let sock = udp_client(&proxy).await;
    let mut bytes = 0;
    let mut port = None;
    for i in 0..5 {
        let payload = format!("ping-{i}");
        let (p, reply_len) = udp_roundtrip(&sock, payload.as_bytes(), ARRIVES)
            .await
            .expect("echo while up");
        assert!(port.is_none_or(|q| q == p), "one mapping per client");
        port = Some(p);
        bytes += payload.len() + reply_len;
    }
    let s = ctl.stats().await;
    assert_eq!(num(&s, "udp_flows"), 1);
    assert_eq!(num(&s, "forwarded_datagrams"), 10);
    assert_eq!(num(&s, "forwarded_bytes"), bytes as u64);
    assert_eq!(num(&s, "dropped_datagrams"), 0);

    let mut tcp = TcpStream::connect(proxy.tcp).await.unwrap();
    tcp_echo_roundtrip(&mut tcp, b"hello").await;
    let s = ctl.stats().await;
    assert_eq!(num(&s, "tcp_flows"), 1);
    assert_eq!(num(&s, "forwarded_bytes"), bytes as u64 + 10);

    // blackhole: nothing comes back, but the mapping and the connection stay.
    ctl.ok("blackhole").await;
    for _ in 0..3 {
        sock.send(b"0123456789").await.unwrap();
    }
    tcp.write_all(b"lost").await.unwrap();
    let mut buf = [0u8; 16];
    let (udp_got, tcp_got) = tokio::join!(
        udp_reply(&sock, b"0123456789", QUIET),
        timeout(QUIET, tcp.read(&mut buf))
    );
    assert!(udp_got.is_none(), "no UDP echo in blackhole");
    assert!(tcp_got.is_err(), "no TCP data and no close in blackhole: {tcp_got:?}");
    let s = ctl.stats().await;
    assert_eq!(s["mode"], "blackhole");
    assert_eq!(num(&s, "udp_flows"), 1);
    assert_eq!(num(&s, "tcp_flows"), 1);
    assert_eq!(num(&s, "dropped_datagrams"), 3);
    assert_eq!(num(&s, "dropped_bytes"), 34);

    // up again: the same mapping (same upstream port), the same TCP connection.
    ctl.ok("up").await;
    let (p, _) = udp_roundtrip(&sock, b"again", ARRIVES).await.expect("echo after up");
    assert_eq!(Some(p), port, "blackhole keeps the UDP mapping");
    tcp_echo_roundtrip(&mut tcp, b"back").await;

    // Bad input gets errors; the connection stays usable; other connections work too.
    assert_eq!(ctl.cmd("bogus").await, "error unknown command");
    for bad in [
        "",
        "delay",
        "delay abc",
        "delay -1",
        "delay 99999999999999999999",
        "flap 10",
        "flap 0 10",
        "up now",
    ] {
        assert!(ctl.cmd(bad).await.starts_with("error "), "{bad:?}");
    }
    let mut ctl2 = Control::connect(proxy.control).await;
    assert_eq!(ctl2.stats().await["mode"], "up");
    assert_eq!(ctl.stats().await["mode"], "up");
}

#[tokio::test]
async fn cut_forgets_udp_mapping_and_closes_tcp() {
    let proxy = spawn_proxy(udp_echo().await, tcp_echo().await);
    let mut ctl = Control::connect(proxy.control).await;

    let sock = udp_client(&proxy).await;
    let (p1, _) = udp_roundtrip(&sock, b"one", ARRIVES).await.expect("echo while up");
    let mut tcp = TcpStream::connect(proxy.tcp).await.unwrap();
    tcp_echo_roundtrip(&mut tcp, b"a").await;

    ctl.ok("cut").await;
    assert!(tcp_closed(&mut tcp, ARRIVES).await, "cut closes open TCP connections");
    assert!(
        udp_roundtrip(&sock, b"two", QUIET).await.is_none(),
        "no UDP echo while cut"
    );
    let mut refused = TcpStream::connect(proxy.tcp).await.unwrap();
    assert!(
        tcp_closed(&mut refused, ARRIVES).await,
        "new TCP connections are closed while cut"
    );
    let s = ctl.stats().await;
    assert_eq!(s["mode"], "cut");
    assert_eq!(num(&s, "udp_flows"), 0);
    assert!(num(&s, "dropped_datagrams") >= 1);
    let deadline = Instant::now() + ARRIVES;
    while num(&ctl.stats().await, "tcp_flows") != 0 {
        assert!(Instant::now() < deadline, "TCP flows gone after cut");
        sleep(Duration::from_millis(20)).await;
    }

    ctl.ok("up").await;
    let (p2, _) = udp_roundtrip(&sock, b"three", ARRIVES).await.expect("echo after up");
    assert_ne!(p1, p2, "after a cut the target sees the client from a new port");
    let mut tcp = TcpStream::connect(proxy.tcp).await.unwrap();
    tcp_echo_roundtrip(&mut tcp, b"b").await;
}

#[tokio::test]
async fn delay_adds_latency_in_both_directions_in_order() {
    let proxy = spawn_proxy(udp_echo().await, tcp_echo().await);
    let mut ctl = Control::connect(proxy.control).await;
    let sock = udp_client(&proxy).await;
    let mut tcp = TcpStream::connect(proxy.tcp).await.unwrap();
    tcp_echo_roundtrip(&mut tcp, b"warm").await;
    udp_roundtrip(&sock, b"warm", ARRIVES).await.expect("echo while up");

    ctl.ok("delay 150").await;
    assert_eq!(num(&ctl.stats().await, "delay_ms"), 150);
    // Several datagrams in a burst: each comes back at least 2 × 150 ms after it left,
    // and in order.
    let start = Instant::now();
    for i in 0..5u8 {
        sock.send(&[b'd', b'0' + i]).await.unwrap();
    }
    for i in 0..5u8 {
        udp_reply(&sock, &[b'd', b'0' + i], ARRIVES)
            .await
            .expect("delayed echo in order");
        assert!(
            start.elapsed() >= Duration::from_millis(300),
            "UDP round trip {:?}",
            start.elapsed()
        );
    }
    let start = Instant::now();
    tcp_echo_roundtrip(&mut tcp, b"slow").await;
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "TCP round trip {:?}",
        start.elapsed()
    );

    ctl.ok("delay 0").await;
    let start = Instant::now();
    udp_roundtrip(&sock, b"fast", ARRIVES)
        .await
        .expect("echo without delay");
    tcp_echo_roundtrip(&mut tcp, b"fast").await;
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "no delay after delay 0: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn flap_alternates_between_up_and_blackhole() {
    let proxy = spawn_proxy(udp_echo().await, tcp_echo().await);
    let mut ctl = Control::connect(proxy.control).await;
    let sock = udp_client(&proxy).await;
    udp_roundtrip(&sock, b"warm", ARRIVES).await.expect("echo while up");

    ctl.ok("flap 150 150").await;
    assert_eq!(ctl.stats().await["mode"], "flap");
    // Probe every 20 ms for 1.2 s: about four up and four down phases.
    let mut outcomes = Vec::new();
    let start = Instant::now();
    for i in 0..60u32 {
        let payload = format!("flap-{i}");
        outcomes.push(
            udp_roundtrip(&sock, payload.as_bytes(), Duration::from_millis(15))
                .await
                .is_some(),
        );
        tokio::time::sleep_until(start + Duration::from_millis(20 * u64::from(i + 1))).await;
    }
    let delivered = outcomes.iter().filter(|&&ok| ok).count();
    let transitions = outcomes.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(outcomes[0], "flap starts with an up phase: {outcomes:?}");
    assert!(delivered > 0 && delivered < outcomes.len(), "{outcomes:?}");
    assert!(transitions >= 3, "{transitions} transitions: {outcomes:?}");

    ctl.ok("up").await;
    // Longer than a whole flap cycle: every probe gets through.
    for i in 0..20 {
        let payload = format!("steady-{i}");
        assert!(
            udp_roundtrip(&sock, payload.as_bytes(), ARRIVES).await.is_some(),
            "up ends the flap"
        );
        sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ctl.stats().await["mode"], "up");
}
