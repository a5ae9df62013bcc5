//! End to end: how MQTT over WebSockets connections of the real `holdfast`
//! binary close, seen by paho-mqtt's websocket transport (the one the IoT Hub
//! device SDKs use), over ws:// and wss://.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

mod support;

use support::Gateway;

/// How many times the node is stopped under the clients.
const STOPS: usize = 20;

/// A CA and a server certificate for localhost, as PEM files in `dir`:
/// `ca.pem`, `server.pem`, `server.key`.
fn make_pki(dir: &std::path::Path) {
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
}

/// Four paho-mqtt clients (MQTT 3.1.1 and 5, over ws:// and wss://) publish
/// about every half millisecond while the node is stopped with SIGTERM, twenty times over.
/// Every client must see a clean close every time: for MQTT 3.1.1 the
/// WebSocket Close frame (which paho answers) and then the end of the
/// stream, for MQTT 5 the DISCONNECT 0x8B; and never a reset, a broken pipe
/// or a TLS end without close_notify in its network thread (see
/// tests/mqtt/ws_close.py). Before the closing handshake was finished, the
/// server dropped the socket with the client's last messages unread, and
/// the kernel reset the connection under the client answering the Close.
#[test]
fn websocket_clients_see_a_clean_close_every_time_the_node_stops() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let (ws, wss) = (support::free_port(), support::free_port());
    let mut gw = Gateway::start(&format!(
        "[plugins.auth.config]\nallow_anonymous = true\nanonymous_topics = [\"#\"]\n\
         [mqtt.ws]\nenabled = true\nlisten = \"127.0.0.1:{ws}\"\n\
         [mqtt.wss]\nenabled = true\nlisten = \"127.0.0.1:{wss}\"\ncert = {sc:?}\nkey = {sk:?}\n",
        sc = p("server.pem"),
        sk = p("server.key"),
    ));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/mqtt/ws_close.py");
    let clients = [
        format!("ws:{ws}:/mqtt:311"),
        format!("ws:{ws}:/$iothub/websocket:5"),
        format!("wss:{wss}:/$iothub/websocket:311"),
        format!("wss:{wss}:/mqtt:5"),
    ];
    let mut failures = Vec::new();
    for stop in 1..=STOPS {
        let mut cmd = Command::new("python3");
        cmd.args([script, "--ca", &p("ca.pem")]);
        for c in &clients {
            cmd.args(["--client", c]);
        }
        let mut py = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is not installed: run scripts/setup.sh");
        let mut stdout = BufReader::new(py.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("READY") {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                let mut err = String::new();
                py.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("stop {stop}: the clients did not start:\n{err}\n{}", gw.describe());
            }
        }
        let log_start = gw.log().len();
        // SIGTERM while every client is publishing.
        let _ = Command::new("kill").arg(gw.child.id().to_string()).status();
        let status = gw.child.wait().unwrap();
        assert!(
            status.success(),
            "stop {stop}: the node exited with {status}\n{}",
            gw.describe()
        );
        let mut report = String::new();
        stdout.read_to_string(&mut report).unwrap();
        let mut err = String::new();
        py.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        let exit = py.wait().unwrap();
        assert_eq!(
            report
                .lines()
                .filter(|l| l.starts_with("CLEAN") || l.starts_with("FAIL"))
                .count(),
            clients.len(),
            "stop {stop}: a verdict per client:\n{report}\n{err}"
        );
        if !exit.success() {
            failures.extend(
                report
                    .lines()
                    .filter(|l| !l.starts_with("CLEAN"))
                    .map(|l| format!("stop {stop}: {l}")),
            );
            // How that stop went, in the node's words.
            let log = gw.log();
            failures.extend(
                log.get(log_start..)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("stopped"))
                    .map(|l| format!("stop {stop}:   node: {l}")),
            );
        }
        if stop < STOPS {
            gw.respawn();
        }
    }
    assert!(
        failures.is_empty(),
        "{} unclean closes in {STOPS} stops of {} clients:\n{}",
        failures.len(),
        clients.len(),
        failures.join("\n")
    );
}
