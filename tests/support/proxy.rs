//! The fault-injection link proxy (tools/link-proxy) between a child
//! gateway and its parent.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::BIN;

/// The link proxy (tools/link-proxy), forwarding UDP to `target`.
pub struct Proxy {
    child: Child,
    control: SocketAddr,
    /// Where the child should send its QUIC packets.
    pub udp: SocketAddr,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let bin = Path::new(BIN).with_file_name("holdfast-link-proxy");
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build -p holdfast-link-proxy` (cargo test --workspace does)",
            bin.display()
        );
        let mut child = Command::new(bin)
            .args(["--udp", &format!("127.0.0.1:0={target}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        Proxy {
            child,
            control: v["control"].as_str().unwrap().parse().unwrap(),
            udp: v["udp"][0].as_str().unwrap().parse().unwrap(),
        }
    }

    pub fn cmd(&self, c: &str) {
        let mut s = std::net::TcpStream::connect(self.control).unwrap();
        writeln!(s, "{c}").unwrap();
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap();
        assert_eq!(reply.trim(), "ok", "proxy command {c:?}");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
