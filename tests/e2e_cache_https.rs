//! Issue 32, item 7: the cache's optional HTTPS listener (`cache.tls_listen`),
//! for clients that must not fetch over plain HTTP. A real `holdfast`
//! process in front of a scripted origin; curl over https trusting a test CA.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::curl::{Got, curl_host, data, parse_got};
use support::script_origin::{ScriptOrigin, ranged};
use support::{Gateway, free_port};

const HOST: &str = "site.test";

/// A CA and a certificate for `site.test` signed by it, as PEM files in
/// `dir`: (ca.pem, server.pem, server.key).
fn make_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "holdfast cache test ca");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec![HOST.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// A node serving `HOST` from `origin` on plain HTTP and on HTTPS; `extra`
/// adds `[cache]` lines. Returns it with its HTTPS port and the CA file.
fn node(origin: &ScriptOrigin, pki: &Path, extra: &str) -> (Gateway, u16, PathBuf) {
    let (ca, cert, key) = make_pki(pki);
    let (port, tls) = (free_port(), free_port());
    let mut gw = Gateway::start_named(
        "https",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\ntls_listen = \"127.0.0.1:{tls}\"\n\
             tls_cert = {cert:?}\ntls_key = {key:?}\n{extra}\n{}",
            origin.source(HOST, "")
        ),
    );
    gw.cache = port;
    (gw, tls, ca)
}

/// curl over https to the cache's HTTPS port, trusting `ca` when given.
fn curl_https(port: u16, ca: Option<&Path>, path: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let mut c = Command::new("curl");
    c.args(["-s", "--max-time", "30", "--resolve"])
        .arg(format!("{HOST}:{port}:127.0.0.1"))
        .arg("-D")
        .arg(&h)
        .arg("-o")
        .arg(&b);
    if let Some(ca) = ca {
        c.arg("--cacert").arg(ca);
    }
    let out = c
        .args(args)
        .arg(format!("https://{HOST}:{port}{path}"))
        .output()
        .expect("curl");
    parse_got(&h, &b, out.status.code().unwrap_or(-1))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The HTTPS listener serves what the plain one does, from the same
/// storage: one upstream fetch for both; a client that does not trust the
/// certificate gets no answer.
#[test]
fn the_https_listener_serves_the_cache() {
    let doc = data(71, 200_000);
    let d = doc.clone();
    let origin = ScriptOrigin::start(move |s| ranged(s, &d, &[("etag", "\"h\""), ("cache-control", "max-age=600")]));
    let pki = tempfile::tempdir().unwrap();
    let (gw, tls, ca) = node(&origin, pki.path(), "");
    let g = curl_https(tls, Some(&ca), "/doc", &[]);
    assert_eq!(
        (g.status, g.body == doc),
        (200, true),
        "exit {}: {}",
        g.exit,
        gw.describe()
    );
    let g = curl_https(tls, Some(&ca), "/doc", &["-r", "70000-70099"]);
    assert_eq!((g.status, g.body.as_slice()), (206, &doc[70_000..70_100]));
    let cs = g.header("cache-status").unwrap_or("");
    assert!(cs.starts_with("holdfast-https; hit"), "{cs}");
    let plain = curl_host(gw.cache, HOST, "/doc", &[]);
    assert_eq!((plain.status, plain.body == doc), (200, true), "plain HTTP stays");
    assert_eq!(origin.count("/doc"), 1, "one upstream fetch for both listeners");
    let untrusted = curl_https(tls, None, "/doc", &[]);
    assert_eq!(
        (untrusted.status, untrusted.exit),
        (0, 60),
        "curl refuses a certificate it cannot verify"
    );
    wait_for("the failed handshake counted", || {
        gw.metric("holdfast_cache_events_total{event=\"tls-handshake-failed\"}") >= 1.0
    });
}

/// A TLS client takes its connection slot when it connects: it counts
/// against `max_connections_per_ip` with the client's plain connections,
/// and a handshake that does not finish within `header_timeout_ms` is cut,
/// giving the slot back.
#[test]
fn tls_clients_count_against_the_connection_limits_and_handshakes_are_bounded() {
    let doc = data(72, 3000);
    let d = doc.clone();
    let origin = ScriptOrigin::start(move |s| ranged(s, &d, &[("etag", "\"l\""), ("cache-control", "max-age=600")]));
    let pki = tempfile::tempdir().unwrap();
    let (gw, tls, ca) = node(
        &origin,
        pki.path(),
        "max_connections_per_ip = 2\nreserved_connections_percent = 0\nheader_timeout_ms = 3000",
    );
    let event = |e: &str| gw.metric(&format!("holdfast_cache_events_total{{event=\"{e}\"}}"));
    // Two connections to the HTTPS port that never start a handshake.
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", tls)).unwrap())
        .collect();
    // Once the listener has taken both, this client has no slot left, on
    // either listener.
    let refused = curl_https(tls, Some(&ca), "/doc", &[]);
    assert_eq!(
        refused.status,
        0,
        "a third TLS connection is refused: {}",
        gw.describe()
    );
    let plain = curl_host(gw.cache, HOST, "/doc", &[]);
    assert_eq!(plain.status, 503, "and so is a plain one from the same client");
    assert!(event("connection-refused-per-ip") >= 2.0);
    // The silent handshakes are cut at the deadline; the slots come back.
    wait_for("the handshake deadline", || event("tls-handshake-timeout") >= 2.0);
    let g = curl_https(tls, Some(&ca), "/doc", &[]);
    assert_eq!((g.status, g.body == doc), (200, true), "{}", gw.describe());
    drop(silent);
}
