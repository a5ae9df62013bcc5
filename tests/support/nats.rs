//! A NATS JetStream cluster started for real (`nats-server` from Debian),
//! on loopback, and a pipelined MQTT QoS 1 publisher to fill an outbox fast.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::fleet::wait_until;
use super::free_port;

/// One server of the cluster.
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl NatsNode {
    fn spawn(&mut self) {
        let log = self.conf.with_extension("log");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).map(Stdio::from).unwrap_or(Stdio::null()))
            .spawn()
            .expect("nats-server is installed (scripts/setup.sh)");
        self.child = Some(child);
        let port = self.port;
        wait_until(20, "nats-server listening", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A JetStream cluster of `nats-server` processes on loopback.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    pub fn start(size: usize) -> NatsCluster {
        NatsCluster::start_with(size, "")
    }

    /// A cluster whose servers' configs end with `extra`; one server (no
    /// cluster block) when `size` is 1.
    pub fn start_with(size: usize, extra: &str) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("\"nats-route://127.0.0.1:{c}\""))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, cluster)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let conf = dir.path().join(format!("{name}.conf"));
            let cluster_block = if size > 1 {
                format!(
                    "cluster {{ name: holdfast-test, listen: \"127.0.0.1:{cluster}\", no_advertise: true, routes: [{}] }}\n",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
                     jetstream {{ store_dir: {:?}, max_memory_store: 64MB, max_file_store: 8GB }}\n\
                     {cluster_block}{extra}\n",
                    store.display().to_string(),
                ),
            )
            .unwrap();
            nodes.push(NatsNode {
                name,
                port: *port,
                conf,
                child: None,
            });
        }
        for n in &mut nodes {
            n.spawn();
        }
        NatsCluster { nodes, _dir: dir }
    }

    /// The servers as `nats://` URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    /// `servers = [...]` for a Holdfast config.
    pub fn servers_toml(&self) -> String {
        let list: Vec<String> = self.urls().iter().map(|u| format!("{u:?}")).collect();
        format!("[{}]", list.join(", "))
    }

    pub fn node(&mut self, name: &str) -> &mut NatsNode {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    pub fn kill(&mut self, name: &str) {
        self.node(name).kill();
    }

    pub fn respawn(&mut self, name: &str) {
        self.node(name).spawn();
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// Publishes `messages` (topic, payload) over MQTT 3.1.1 at QoS 1 with up
/// to `window` unacknowledged; returns how many were acknowledged. Panics
/// if the broker closes the connection.
pub fn publish_pipelined(port: u16, client_id: &str, messages: Vec<(String, Vec<u8>)>, window: u64) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = vec![0x10];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(&body);
    s.write_all(&p).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack[3], 0, "CONNACK refused");
    let total = messages.len() as u64;
    let acked = Arc::new(AtomicU64::new(0));
    let mut reader = s.try_clone().unwrap();
    let a = acked.clone();
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 4];
        while a.load(Ordering::SeqCst) < total {
            if reader.read_exact(&mut buf).is_err() {
                return;
            }
            assert_eq!(buf[0], 0x40, "expected PUBACK, got {buf:?}");
            a.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut out = Vec::with_capacity(64 << 10);
    for (i, (topic, payload)) in messages.into_iter().enumerate() {
        let sent = i as u64;
        while sent - acked.load(Ordering::SeqCst) >= window {
            if !out.is_empty() {
                s.write_all(&out).unwrap();
                out.clear();
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let pkid = (i % 65_535 + 1) as u16;
        out.push(0x32);
        remaining_length(2 + topic.len() + 2 + payload.len(), &mut out);
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(&pkid.to_be_bytes());
        out.extend_from_slice(&payload);
        if out.len() > 32 << 10 {
            s.write_all(&out).unwrap();
            out.clear();
        }
    }
    s.write_all(&out).unwrap();
    wait_until(600, "every PUBACK", || {
        acked.load(Ordering::SeqCst) >= total || reading.is_finished()
    });
    let n = acked.load(Ordering::SeqCst);
    let _ = s.write_all(&[0xe0, 0]);
    n
}
