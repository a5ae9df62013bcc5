//! A fleet for link tests: a CA, node certificates, and config sections.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::BIN;

/// Creates a fleet CA and a certificate for every node id.
pub fn fleet(ids: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["cert", "ca", "--dir", certs]);
    for id in ids {
        run(&["cert", "node", id, "--ca-dir", certs]);
    }
    dir
}

pub fn fleet_section(certs: &Path, id: &str) -> String {
    format!(
        "[fleet]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        certs.join("ca.pem"),
        certs.join(format!("{id}.pem")),
        certs.join(format!("{id}.key"))
    )
}

pub fn listen_section(port: u16) -> String {
    format!("[link]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n")
}

/// A child whose link notices a dead path within 1.5 s.
pub fn upstream_section(parent: SocketAddr, parent_id: &str) -> String {
    format!(
        "[upstream]\nkind = \"quic\"\nprobe_interval_ms = 50\nbackoff_max_ms = 2000\n\
         [upstream.quic]\nparent = \"{parent}\"\nparent_id = \"{parent_id}\"\nkeep_alive_ms = 250\nidle_timeout_ms = 1500\n"
    )
}

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until `f` holds, or panics with `what` after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}
