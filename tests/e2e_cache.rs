//! End-to-end tests of the range cache: real `holdfast` processes, a test
//! origin (`tests/cache/origin.py`) that counts what it serves and can
//! change an object mid-test, and real clients: curl, wget and apt-get.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::curl::{Got, curl_host, data};
use support::origin::Origin;
use support::{Gateway, free_port};

const MIB: usize = 1 << 20;

/// `curl` against the cache listening on `port`, Host `origin.test`.
fn curl(port: u16, path: &str, args: &[&str]) -> Got {
    curl_host(port, "origin.test", path, args)
}

fn node(id: &str, origin: &Origin, cache_extra: &str) -> Gateway {
    let port = free_port();
    let mut gw = Gateway::start_named(
        id,
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\n{cache_extra}\n{}",
            origin.sources()
        ),
    );
    gw.cache = port;
    gw
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stored_bytes(gw: &Gateway) -> u64 {
    gw.api("/api/v1/cache")["stored_bytes"].as_u64().unwrap()
}

/// Splits a `multipart/byteranges` body into (Content-Range, bytes) parts.
fn multipart(got: &Got) -> Vec<(String, Vec<u8>)> {
    let ct = got.header("content-type").unwrap();
    let boundary = ct.split("boundary=").nth(1).unwrap();
    let delim = format!("--{boundary}");
    let body = &got.body;
    let mut parts = Vec::new();
    let find = |from: usize, pat: &[u8]| body[from..].windows(pat.len()).position(|w| w == pat).map(|p| p + from);
    let mut at = find(0, delim.as_bytes()).unwrap();
    loop {
        let after = at + delim.len();
        if body[after..].starts_with(b"--") {
            break;
        }
        let head_end = find(after, b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&body[after..head_end]).to_string();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: "))
            .unwrap()
            .to_string();
        let (a, b) = range
            .strip_prefix("bytes ")
            .unwrap()
            .split_once('/')
            .unwrap()
            .0
            .split_once('-')
            .unwrap();
        let len = b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1;
        let start = head_end + 4;
        parts.push((range, body[start..start + len].to_vec()));
        at = find(start + len, delim.as_bytes()).unwrap();
    }
    parts
}

/// Every range form, conditionals, the three ways a request reaches the
/// cache, refusals, revalidation, metrics.
#[test]
fn range_forms_conditionals_and_request_modes() {
    let origin = Origin::start();
    let a = data(1, 3 * MIB + 123_457);
    origin.put("/pool/a.bin", &a);
    origin.put("/dists/stable/Release", b"Release v1\n");
    let gw = node("c1", &origin, "");
    let port = gw.cache;
    let len = a.len();

    // Cold, a range inside one block: one aligned upstream request.
    let g = curl(port, "/pool/a.bin", &["-r", "100-199"]);
    assert_eq!(g.status, 206);
    assert_eq!(g.body, &a[100..200]);
    assert_eq!(g.header("content-range"), Some(format!("bytes 100-199/{len}").as_str()));
    assert_eq!(g.header("cache-status"), Some("holdfast-c1; fwd=uri-miss; stored"));
    assert_eq!(origin.ranges("/pool/a.bin"), ["bytes=0-1048575"]);
    let etag = g.header("etag").unwrap().to_string();
    wait_until("block 0 stored", || stored_bytes(&gw) == MIB as u64);

    // The same range again is a hit; no upstream request.
    let g = curl(port, "/pool/a.bin", &["-r", "100-199"]);
    assert_eq!((g.status, g.header("cache-status")), (206, Some("holdfast-c1; hit")));
    assert_eq!(origin.requests("/pool/a.bin"), 1);

    // Across a block boundary: only the missing block is fetched.
    let g = curl(port, "/pool/a.bin", &["-r", "1048000-1049000"]);
    assert_eq!(g.body, &a[1_048_000..1_049_001]);
    assert_eq!(origin.ranges("/pool/a.bin")[1], "bytes=1048576-2097151");

    // Suffix, open-ended, past-the-end end, whole object.
    let g = curl(port, "/pool/a.bin", &["-r", "-1000"]);
    assert_eq!(g.body, &a[len - 1000..]);
    assert_eq!(
        g.header("content-range"),
        Some(format!("bytes {}-{}/{len}", len - 1000, len - 1).as_str())
    );
    let g = curl(port, "/pool/a.bin", &["-r", "3000000-"]);
    assert_eq!(g.body, &a[3_000_000..]);
    let g = curl(port, "/pool/a.bin", &["-r", "3000000-99999999"]);
    assert_eq!(g.body, &a[3_000_000..]);
    let g = curl(port, "/pool/a.bin", &[]);
    assert_eq!((g.status, g.body.len()), (200, len));
    assert!(g.body == a, "whole object differs");
    assert_eq!(g.header("accept-ranges"), Some("bytes"));

    // Several ranges: multipart/byteranges with exact parts.
    let g = curl(port, "/pool/a.bin", &["-r", "0-9,2000000-2000009,-5"]);
    assert_eq!(g.status, 206);
    assert!(
        g.header("content-type")
            .unwrap()
            .starts_with("multipart/byteranges; boundary=")
    );
    assert_eq!(
        g.header("content-length").unwrap().parse::<usize>().unwrap(),
        g.body.len()
    );
    let parts = multipart(&g);
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[0], (format!("bytes 0-9/{len}"), a[0..10].to_vec()));
    assert_eq!(
        parts[1],
        (format!("bytes 2000000-2000009/{len}"), a[2_000_000..2_000_010].to_vec())
    );
    assert_eq!(
        parts[2],
        (format!("bytes {}-{}/{len}", len - 5, len - 1), a[len - 5..].to_vec())
    );

    // 416 with the length; an invalid Range header is ignored (200).
    let g = curl(port, "/pool/a.bin", &["-r", "99999999-"]);
    assert_eq!(g.status, 416);
    assert_eq!(g.header("content-range"), Some(format!("bytes */{len}").as_str()));
    let g = curl(port, "/pool/a.bin", &["-H", "Range: bytes=x-y"]);
    assert_eq!((g.status, g.body.len()), (200, len));

    // HEAD.
    let g = curl(port, "/pool/a.bin", &["-I"]);
    assert_eq!(g.status, 200);
    assert_eq!(g.header("content-length"), Some(len.to_string().as_str()));

    // If-Range: the current ETag keeps the range, another one gets 200.
    let g = curl(port, "/pool/a.bin", &["-r", "5-9", "-H", &format!("If-Range: {etag}")]);
    assert_eq!((g.status, g.body.as_slice()), (206, &a[5..10]));
    let g = curl(port, "/pool/a.bin", &["-r", "5-9", "-H", "If-Range: \"other\""]);
    assert_eq!((g.status, g.body.len()), (200, len));
    let g = curl(
        port,
        "/pool/a.bin",
        &["-r", "5-9", "-H", &format!("If-Range: W/{etag}")],
    );
    assert_eq!(g.status, 200, "a weak validator never matches If-Range");

    // If-None-Match: 304.
    let g = curl(port, "/pool/a.bin", &["-H", &format!("If-None-Match: {etag}")]);
    assert_eq!(g.status, 304);
    assert!(g.body.is_empty());

    // The whole object came from the origin exactly once, block by block.
    assert_eq!(origin.bytes("/pool/a.bin"), len as u64);

    // Forward proxy (absolute URI), an alias, and cacheHostOrigin.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("curl")
        .args([
            "-s",
            "-f",
            "-x",
            &format!("http://127.0.0.1:{port}"),
            "-r",
            "10-19",
            "-o",
        ])
        .arg(dir.path().join("p"))
        .arg("http://alias.test/pool/a.bin")
        .status()
        .unwrap();
    assert!(out.success());
    assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), &a[10..20]);
    let out = Command::new("curl")
        .args(["-s", "-f", "-r", "10-19", "-o"])
        .arg(dir.path().join("q"))
        .arg(format!(
            "http://127.0.0.1:{port}/pool/a.bin?cacheHostOrigin=origin.test"
        ))
        .status()
        .unwrap();
    assert!(out.success());
    assert_eq!(std::fs::read(dir.path().join("q")).unwrap(), &a[10..20]);
    assert_eq!(
        origin.bytes("/pool/a.bin"),
        len as u64,
        "aliases share the stored object"
    );

    // Refusals: unknown host, a path of no class.
    let out = Command::new("curl")
        .args(["-s", "-x", &format!("http://127.0.0.1:{port}"), "-w", "%{http_code}"])
        .arg("http://evil.test/x")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("host \"evil.test\" is not a configured source") && text.ends_with("403"),
        "{text}"
    );
    let g = curl(port, "/secret.txt", &[]);
    assert_eq!(g.status, 403);
    // Another method goes to the origin (which has no POST for it: 404).
    let g = curl(port, "/pool/a.bin", &["-X", "POST", "-d", "x"]);
    assert_eq!(g.status, 404, "other methods reach the origin");

    // An object the origin does not have: its 404 is passed on.
    let g = curl(port, "/pool/missing.bin", &[]);
    assert_eq!(g.status, 404);

    // Revalidation of an index file: after its TTL, one conditional request
    // (304) keeps it; a changed file is then served whole.
    let g = curl(port, "/dists/stable/Release", &[]);
    assert_eq!(g.body, b"Release v1\n");
    std::thread::sleep(Duration::from_millis(1100));
    let g = curl(port, "/dists/stable/Release", &[]);
    assert_eq!(g.body, b"Release v1\n");
    assert_eq!(origin.ranges("/dists/stable/Release"), ["bytes=0-", "304"]);
    origin.replace("/dists/stable/Release", b"Release v2, longer\n");
    std::thread::sleep(Duration::from_millis(1100));
    let g = curl(port, "/dists/stable/Release", &[]);
    assert_eq!(g.body, b"Release v2, longer\n");

    // Metrics.
    let hits = gw.metric("holdfast_cache_requests_total{source=\"test\",client=\"client\",result=\"hit\"}");
    assert!(hits >= 5.0, "{}", gw.metrics());
    assert!(gw.metric("holdfast_cache_bytes_total{source=\"test\",client=\"client\",result=\"hit\"}") > 3.0e6);
    assert!(gw.metric("holdfast_cache_upstream_bytes_total{source=\"test\",upstream=\"origin\"}") >= len as f64);
    assert!(gw.metric("holdfast_cache_events_total{event=\"revalidated\"}") >= 1.0);
    // Denied: the unknown host and the path of no class (other methods pass).
    assert!(gw.metric("holdfast_cache_requests_total{source=\"none\",client=\"client\",result=\"deny\"}") >= 2.0);
}

/// N clients at once: one upstream fetch of each block; clients at
/// different offsets of a cold object each start where they asked.
#[test]
fn concurrent_clients_share_one_upstream_fetch() {
    let origin = Origin::start();
    let b = data(2, 4 * MIB + 17);
    origin.put("/pool/b.bin", &b);
    let c = data(3, 8 * MIB);
    origin.put("/pool/c.bin", &c);
    let gw = node("c2", &origin, "");
    let port = gw.cache;

    // Eight clients for the whole object while the origin is slow to answer.
    origin.configure("delay_ms=300");
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || curl(port, "/pool/b.bin", &[])))
        .collect();
    for t in clients {
        let g = t.join().unwrap();
        assert_eq!(g.status, 200);
        assert!(g.body == b, "a client got other bytes");
    }
    assert_eq!(origin.requests("/pool/b.bin"), 1, "{:?}", origin.ranges("/pool/b.bin"));
    assert_eq!(origin.bytes("/pool/b.bin"), b.len() as u64);

    // Eight clients at eight offsets of a cold object, origin at 16 MB/s.
    origin.configure("delay_ms=50&throttle=16000000");
    let clients: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let r = format!("{}-", i * MIB + 1000);
                (i, curl(port, "/pool/c.bin", &["-r", &r]))
            })
        })
        .collect();
    for t in clients {
        let (i, g) = t.join().unwrap();
        assert_eq!(g.status, 206);
        assert!(g.body == c[i * MIB + 1000..], "client {i} got other bytes");
    }
    let fetched = origin.bytes("/pool/c.bin");
    assert!(
        fetched <= (c.len() + 2 * MIB) as u64,
        "fetched {fetched} bytes for an object of {}: {:?}",
        c.len(),
        origin.ranges("/pool/c.bin")
    );
    origin.configure("delay_ms=0&throttle=0");
}

/// An https origin, fetched over rustls, trusting a CA from `cache.ca_file`.
#[test]
fn https_origin_over_rustls() {
    let certs = tempfile::tempdir().unwrap();
    let p = |name: &str| certs.path().join(name).display().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for args in [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "2",
                "-subj",
                "/CN=test-ca",
                "-keyout",
                &p("ca.key"),
                "-out",
                &ca,
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &["-subj", "/CN=localhost", "-keyout", &key, "-out", &p("leaf.csr")],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            &p("leaf.csr"),
            "-CA",
            &ca,
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &p("ext.cnf"),
            "-out",
            &cert,
        ],
    ] {
        let st = Command::new("openssl")
            .args(&args)
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args:?}");
    }
    let origin = Origin::start_with(&["--tls-cert", &cert, "--tls-key", &key]);
    let t = data(12, MIB + 5);
    origin.put("/pool/t.bin", &t);
    let sources = origin.sources().replace("http://127.0.0.1:", "https://localhost:");
    let port = free_port();
    let gw = Gateway::start_named(
        "tls",
        &format!("[cache]\nlisten = \"127.0.0.1:{port}\"\nca_file = {ca:?}\n{sources}"),
    );
    let g = curl(port, "/pool/t.bin", &["-r", "1048570-"]);
    assert_eq!((g.status, g.body.as_slice()), (206, &t[1_048_570..]), "{}", gw.log());
    let g = curl(port, "/pool/t.bin", &[]);
    assert!(g.body == t);
    assert_eq!(origin.bytes("/pool/t.bin"), t.len() as u64);
    // Without the CA the origin's certificate is refused: 502, nothing served.
    drop(gw);
    let port = free_port();
    let _gw = Gateway::start_named("notls", &format!("[cache]\nlisten = \"127.0.0.1:{port}\"\n{sources}"));
    let g = curl(port, "/pool/t.bin", &["-r", "0-9"]);
    assert_eq!(g.status, 502);
    assert!(
        String::from_utf8_lossy(&g.body).contains("cannot connect"),
        "{:?}",
        String::from_utf8_lossy(&g.body)
    );
}

/// A fill goes on after its client disconnects, up to `orphan_fill_bytes`.
#[test]
fn a_fill_outlives_its_client_within_a_bound() {
    let origin = Origin::start();
    let o = data(11, 12 * MIB);
    origin.put("/pool/o.bin", &o);
    let gw = node("c6", &origin, "orphan_fill_bytes = 2097152\n");
    origin.configure("throttle=4000000");
    // The client gives up after 0.6 s, having received about 2.4 MB.
    let g = curl(gw.cache, "/pool/o.bin", &["--max-time", "0.6"]);
    assert_eq!(g.exit, 28, "curl should have timed out");
    let received = g.body.len() as u64;
    assert!(received > 0 && received < 6 * MIB as u64, "{received}");
    wait_until("the fill to stop", || {
        gw.metric("holdfast_cache_fills_in_flight") == 0.0 && gw.api("/api/v1/cache")["reserved_bytes"] == 0
    });
    let stored = stored_bytes(&gw);
    // The block in progress and two more (2 MiB) were fetched after the
    // client left; then the fill stopped.
    assert!(
        stored >= received + 2 * MIB as u64 && stored <= received + 4 * MIB as u64,
        "received {received}, stored {stored}"
    );
    assert!(origin.bytes("/pool/o.bin") < o.len() as u64 - 4 * MIB as u64);
    origin.configure("throttle=0");
    // What was stored is served; the rest is fetched.
    let g = curl(gw.cache, "/pool/o.bin", &[]);
    assert!(g.body == o);
}

/// The origin's connection breaks in the middle of a fill: the client still
/// gets every byte (a new fill resumes at the broken block), and the block
/// finished before the break is kept.
#[test]
fn a_fill_broken_midway_is_resumed_and_keeps_what_it_finished() {
    let origin = Origin::start();
    let u = data(13, 3 * MIB);
    origin.put("/pool/u.bin", &u);
    let gw = node("c7", &origin, "");
    origin.configure("cut_after=1572864");
    let g = curl(gw.cache, "/pool/u.bin", &[]);
    assert_eq!((g.status, g.exit), (200, 0));
    assert!(g.body == u, "the client's bytes differ");
    assert_eq!(origin.ranges("/pool/u.bin"), ["bytes=0-", "bytes=1048576-3145727"]);
    wait_until("all three blocks stored", || stored_bytes(&gw) == 3 * MIB as u64);
    assert_eq!(origin.bytes("/pool/u.bin"), (3 * MIB + MIB / 2) as u64);
}

/// An object that changes at the origin: a response never mixes versions.
#[test]
fn a_changed_object_is_never_spliced() {
    let origin = Origin::start();
    let v1 = data(4, 4 * MIB);
    let v2 = data(5, 4 * MIB);
    origin.put("/pool/f.bin", &v1);
    let gw = node("c3", &origin, "");
    let port = gw.cache;

    // Block 0 is stored (v1); the object changes; a whole-object request
    // must fetch blocks 1..3, learns of v2 before its head, and serves v2.
    let g = curl(port, "/pool/f.bin", &["-r", "0-1048575"]);
    assert_eq!(g.body, &v1[..MIB]);
    let etag1 = g.header("etag").unwrap().to_string();
    wait_until("block 0 stored", || stored_bytes(&gw) == MIB as u64);
    origin.replace("/pool/f.bin", &v2);
    let g = curl(port, "/pool/f.bin", &[]);
    assert_eq!(g.status, 200);
    assert!(g.body == v2, "the response mixes versions or is the old one");
    assert_ne!(g.header("etag").unwrap(), etag1);
    assert!(gw.metric("holdfast_cache_events_total{event=\"invalidated\"}") >= 1.0);
    // And the stored copy is now v2 only.
    let g = curl(port, "/pool/f.bin", &["-r", "0-99"]);
    assert_eq!(g.body, &v2[..100]);

    // Mid-download: client 1 streams v2 slowly; the object changes to v3;
    // client 2 asks for a block nobody fetched yet and gets v3; client 1
    // still gets all of v2.
    let v3 = data(6, 4 * MIB);
    origin.put("/pool/g.bin", &v2);
    origin.configure("throttle=4000000");
    let slow = std::thread::spawn(move || curl(port, "/pool/g.bin", &[]));
    wait_until("client 1 started", || {
        origin.requests("/pool/g.bin") > 0 || stored_bytes(&gw) > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    origin.replace("/pool/g.bin", &v3);
    let g = curl(port, "/pool/g.bin", &["-r", "3145728-"]);
    assert_eq!(g.status, 206);
    assert!(g.body == v3[3 * MIB..], "client 2 did not get the new version");
    let g1 = slow.join().unwrap();
    assert_eq!((g1.status, g1.exit), (200, 0));
    assert!(g1.body == v2, "client 1's download mixes versions");
    origin.configure("throttle=0");
}

/// Partial objects survive a crash; the disk budget evicts the least
/// recently used object; purge through the CLI.
#[test]
fn restart_eviction_and_purge() {
    let origin = Origin::start();
    let h = data(7, 3 * MIB);
    origin.put("/pool/h.bin", &h);
    let mut gw = node("c4", &origin, "max_size = 4194304\nmin_free = 0\n");
    let port = gw.cache;
    let g = curl(port, "/pool/h.bin", &["-r", "0-9"]);
    assert_eq!(g.body, &h[..10]);
    let g = curl(port, "/pool/h.bin", &["-r", "2097152-2097161"]);
    assert_eq!(g.body, &h[2 * MIB..2 * MIB + 10]);
    wait_until("two blocks stored", || stored_bytes(&gw) == 2 * MIB as u64);
    gw.crash_restart();
    assert_eq!(stored_bytes(&gw), 2 * MIB as u64, "the partial object survived");
    let g = curl(port, "/pool/h.bin", &["-r", "2097152-2097161"]);
    assert_eq!(g.header("cache-status"), Some("holdfast-c4; hit"));
    assert_eq!(origin.requests("/pool/h.bin"), 2);
    // The whole object: only block 1 is fetched.
    let g = curl(port, "/pool/h.bin", &[]);
    assert!(g.body == h);
    assert_eq!(origin.ranges("/pool/h.bin")[2], "bytes=1048576-2097151");
    wait_until("three blocks stored", || stored_bytes(&gw) == 3 * MIB as u64);

    // Budget 4 MiB: a second 2 MiB object evicts the first (least recently used).
    let x = data(8, 2 * MIB);
    origin.put("/pool/x.bin", &x);
    let g = curl(port, "/pool/x.bin", &[]);
    assert!(g.body == x);
    wait_until("eviction", || gw.metric("holdfast_cache_evictions_total") >= 1.0);
    wait_until("x stored", || stored_bytes(&gw) == 2 * MIB as u64);
    let objects = gw.cli_ok(&["cache", "objects"]);
    assert!(
        objects.contains("test:/pool/x.bin") && !objects.contains("h.bin"),
        "{objects}"
    );
    let g = curl(port, "/pool/h.bin", &["-r", "0-9"]);
    assert_eq!(g.header("cache-status"), Some("holdfast-c4; fwd=uri-miss; stored"));

    // Purge everything.
    let out = gw.cli_ok(&["cache", "purge", "--all"]);
    assert!(out.starts_with("purged 2 objects"), "{out}");
    wait_until("purged", || stored_bytes(&gw) == 0);
    let stats = gw.cli_ok(&["cache", "stats"]);
    assert!(stats.contains("4.0 MiB"), "{stats}");
    let g = curl(port, "/pool/x.bin", &["-r", "0-9"]);
    assert_eq!(g.header("cache-status"), Some("holdfast-c4; fwd=uri-miss; stored"));
}

/// Three levels as separate processes: a leaf's miss goes up through the
/// middle node to the root and is stored at every level; a cycle is refused.
#[test]
fn three_levels_and_the_loop_guard() {
    let origin = Origin::start();
    let n = data(9, 3 * MIB);
    origin.put("/pool/n.bin", &n);
    let root = node("root", &origin, "");
    let mid = node("mid", &origin, &format!("parent = \"http://127.0.0.1:{}\"", root.cache));
    let leaf = node("leaf", &origin, &format!("parent = \"http://127.0.0.1:{}\"", mid.cache));

    let g = curl(leaf.cache, "/pool/n.bin", &["-r", "1048576-1048675"]);
    assert_eq!(g.status, 206);
    assert_eq!(g.body, &n[MIB..MIB + 100]);
    assert_eq!(origin.ranges("/pool/n.bin"), ["bytes=1048576-2097151"]);
    for gw in [&root, &mid, &leaf] {
        wait_until("block stored at every level", || stored_bytes(gw) == MIB as u64);
    }
    assert_eq!(
        root.metric("holdfast_cache_requests_total{source=\"test\",client=\"child-cache\",result=\"miss\"}"),
        1.0
    );
    assert_eq!(
        leaf.metric("holdfast_cache_upstream_requests_total{source=\"test\",upstream=\"parent\"}"),
        1.0
    );
    // A hit at the leaf, then at the middle node; nothing reaches the origin.
    let g = curl(leaf.cache, "/pool/n.bin", &["-r", "1048576-1048675"]);
    assert_eq!(g.header("cache-status"), Some("holdfast-leaf; hit"));
    let g = curl(mid.cache, "/pool/n.bin", &["-r", "1048700-1048799"]);
    assert_eq!(
        (g.header("cache-status"), g.body.as_slice()),
        (Some("holdfast-mid; hit"), &n[1_048_700..1_048_800])
    );
    assert_eq!(origin.requests("/pool/n.bin"), 1);
    // The whole object through the leaf: the two missing blocks go up.
    let g = curl(leaf.cache, "/pool/n.bin", &[]);
    assert!(g.body == n);
    assert_eq!(origin.bytes("/pool/n.bin"), n.len() as u64);

    // A node whose parent is itself: the loop guard refuses the cycle.
    let port = free_port();
    let looped = Gateway::start_named(
        "loop",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\nparent = \"http://127.0.0.1:{port}\"\n{}",
            origin.sources()
        ),
    );
    let g = curl(port, "/pool/n.bin", &["-r", "0-9"]);
    assert_eq!(g.status, 508, "{:?}", String::from_utf8_lossy(&g.body));
    assert!(looped.metric("holdfast_cache_events_total{event=\"loop\"}") >= 1.0);
}

fn proxy_env(cmd: &mut Command, port: u16) -> &mut Command {
    cmd.env("http_proxy", format!("http://127.0.0.1:{port}"))
        .env_remove("HTTP_PROXY")
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
}

/// Resuming downloads with `curl -C -` and `wget -c`, and apt-get through
/// the cache as an HTTP proxy against a local Debian-format repository.
#[test]
fn wget_curl_resume_and_apt() {
    let origin = Origin::start();
    let a = data(10, 2 * MIB + 999);
    origin.put("/pool/r.bin", &a);
    let gw = node("c5", &origin, "");
    let port = gw.cache;
    let work = tempfile::tempdir().unwrap();

    // wget -c continues a partial file.
    let part = work.path().join("r-wget.bin");
    std::fs::write(&part, &a[..1_500_000]).unwrap();
    let st = proxy_env(Command::new("wget").args(["-q", "-c", "-O"]).arg(&part), port)
        .arg("http://origin.test/pool/r.bin")
        .status()
        .expect("wget");
    assert!(st.success());
    assert!(std::fs::read(&part).unwrap() == a, "wget -c result differs");
    // curl -C - too.
    let part = work.path().join("r-curl.bin");
    std::fs::write(&part, &a[..700_000]).unwrap();
    let st = Command::new("curl")
        .args(["-s", "-f", "-C", "-", "-x", &format!("http://127.0.0.1:{port}"), "-o"])
        .arg(&part)
        .arg("http://origin.test/pool/r.bin")
        .status()
        .unwrap();
    assert!(st.success());
    assert!(std::fs::read(&part).unwrap() == a, "curl -C - result differs");

    // apt-get update && apt-get download through the cache.
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/cache/make_repo.py"))
        .arg("--root")
        .arg(origin.root.path())
        .output()
        .expect("make_repo.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deb_path = format!("/debian/{}", String::from_utf8_lossy(&out.stdout).trim());
    let apt = AptRoot::new(work.path(), port);
    apt.run(&["update"]);
    let dl = work.path().join("dl1");
    std::fs::create_dir_all(&dl).unwrap();
    apt.run_in(&dl, &["download", "holdfast-test"]);
    let deb = std::fs::read(dl.join("holdfast-test_1.0_all.deb")).unwrap();
    assert_eq!(
        deb,
        std::fs::read(origin.root.path().join(deb_path.trim_start_matches('/'))).unwrap()
    );
    assert_eq!(origin.requests(&deb_path), 1);
    // A second machine behind the same cache: index files revalidated at
    // most once each, the package served from the cache.
    let apt2 = AptRoot::new(&work.path().join("second"), port);
    apt2.run(&["update"]);
    let dl = work.path().join("dl2");
    std::fs::create_dir_all(&dl).unwrap();
    apt2.run_in(&dl, &["download", "holdfast-test"]);
    assert_eq!(std::fs::read(dl.join("holdfast-test_1.0_all.deb")).unwrap(), deb);
    assert_eq!(origin.requests(&deb_path), 1, "the package came from the cache");
    assert!(gw.metric("holdfast_cache_requests_total{source=\"test\",client=\"client\",result=\"hit\"}") >= 1.0);
}

/// apt-get with its own state directories (no root, no system sources).
struct AptRoot {
    dir: PathBuf,
    proxy: u16,
}

impl AptRoot {
    fn new(base: &Path, proxy: u16) -> AptRoot {
        let dir = base.join("apt");
        for d in [
            "state/lists/partial",
            "cache/archives/partial",
            "etc/apt.conf.d",
            "etc/preferences.d",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("state/status"), "").unwrap();
        std::fs::write(
            dir.join("etc/sources.list"),
            "deb [trusted=yes] http://origin.test/debian stable main\n",
        )
        .unwrap();
        AptRoot { dir, proxy }
    }

    fn run(&self, args: &[&str]) {
        self.run_in(&self.dir, args);
    }

    fn run_in(&self, cwd: &Path, args: &[&str]) {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let opts = [
            format!("Dir::Etc={}", d("etc")),
            format!("Dir::Etc::SourceList={}", d("etc/sources.list")),
            "Dir::Etc::SourceParts=/nonexistent".to_string(),
            format!("Dir::Etc::Parts={}", d("etc/apt.conf.d")),
            format!("Dir::Etc::PreferencesParts={}", d("etc/preferences.d")),
            format!("Dir::State={}", d("state")),
            format!("Dir::State::status={}", d("state/status")),
            format!("Dir::Cache={}", d("cache")),
            "Debug::NoLocking=1".to_string(),
            "APT::Sandbox::User=root".to_string(),
            "APT::Architecture=amd64".to_string(),
            "APT::Architectures=amd64".to_string(),
            "Acquire::Languages=none".to_string(),
            format!("Acquire::http::Proxy=http://127.0.0.1:{}", self.proxy),
        ];
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(cwd).arg("-q");
        for o in &opts {
            cmd.args(["-o", o]);
        }
        let out = cmd.args(args).output().expect("apt-get");
        assert!(
            out.status.success(),
            "apt-get {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Path rules cannot be bypassed with dot segments, plain or
/// percent-encoded: the path is normalised before the content-source plugin
/// sees it, the normalised path is what goes upstream, and a path that
/// climbs above the root is refused with 400.
#[test]
fn dot_segments_cannot_bypass_path_rules() {
    let origin = Origin::start();
    let a = data(7, 1000);
    origin.put("/pool/a.bin", &a);
    origin.put("/private/x.bin", b"secret");
    let gw = node("c1", &origin, "");
    let port = gw.cache;
    // curl --path-as-is sends the dot segments as written.
    let get = |path: &str| curl(port, path, &["--path-as-is"]);
    assert_eq!(get("/private/x.bin").status, 403);
    for sneaky in [
        "/pool/../private/x.bin",
        "/pool/%2e%2e/private/x.bin",
        "/pool/%2E%2e/private/x.bin",
        "/pool/.%2e/private/x.bin",
        "/pool/./../private/x.bin",
    ] {
        let g = get(sneaky);
        assert_eq!(g.status, 403, "{sneaky}: {}", String::from_utf8_lossy(&g.body));
    }
    for escaping in [
        "/../private/x.bin",
        "/pool/../../private/x.bin",
        "/%2e%2e/x",
        "/pool/a%zz.bin",
    ] {
        let g = get(escaping);
        assert_eq!(g.status, 400, "{escaping}: {}", String::from_utf8_lossy(&g.body));
        assert!(String::from_utf8_lossy(&g.body).starts_with("bad request path: "));
    }
    // The origin never saw the private file nor a dot segment.
    for path in ["/private/x.bin", "/pool/../private/x.bin", "/pool/%2e%2e/private/x.bin"] {
        assert!(origin.stats(path).is_null(), "{path} reached the origin");
    }
    // What is allowed is served under its normalised path and key.
    let g = get("/pool/./sub/../a.bin");
    assert_eq!((g.status, &g.body), (200, &a));
    let g = get("/pool/%61.bin");
    assert_eq!((g.status, &g.body), (200, &a));
    assert_eq!(g.header("cache-status"), Some("holdfast-c1; hit"));
    assert_eq!(origin.requests("/pool/a.bin"), 1);
    assert_eq!(gw.metric("holdfast_cache_events_total{event=\"bad-path\"}"), 4.0);
    gw.stop();
}

/// `Range: bytes=0-,0-,…` cannot multiply an object: overlapping and
/// adjacent ranges are coalesced, so an answer never carries a byte twice.
#[test]
fn overlapping_ranges_are_coalesced_not_amplified() {
    let origin = Origin::start();
    let a = data(8, 3 * MIB);
    origin.put("/pool/big.bin", &a);
    let gw = node("c1", &origin, "");
    let port = gw.cache;
    let len = a.len();
    // 64 times the whole object (about 200 header bytes): one 206 of the object.
    let many = vec!["0-"; 64].join(",");
    let g = curl(port, "/pool/big.bin", &["-r", &many]);
    assert_eq!(g.status, 206);
    assert_eq!(g.body.len(), len);
    assert!(g.body == a);
    assert_eq!(
        g.header("content-range"),
        Some(format!("bytes 0-{}/{len}", len - 1).as_str())
    );
    // Overlapping and touching ranges merge; a separate one stays a part.
    let g = curl(port, "/pool/big.bin", &["-r", "100-199,150-299,300-399,-10,0-9"]);
    assert_eq!(g.status, 206);
    let parts = multipart(&g);
    let want = [(0, 10), (100, 400), (len - 10, len)];
    assert_eq!(
        parts.len(),
        want.len(),
        "{:?}",
        parts.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for ((range, body), (start, end)) in parts.iter().zip(want) {
        assert_eq!(range, &format!("bytes {start}-{}/{len}", end - 1));
        assert!(body[..] == a[start..end]);
    }
    // Many small distinct ranges in order are kept as asked.
    let spread: Vec<String> = (0..10).map(|i| format!("{0}-{0}", i * 1000)).collect();
    let g = curl(port, "/pool/big.bin", &["-r", &spread.join(",")]);
    assert_eq!(multipart(&g).len(), 10);
    gw.stop();
}
