//! Shared by the end-to-end tests: a `holdfast` process with its own data
//! directory, admin port and MQTT port.

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod browser;
pub mod client;
pub mod curl;
pub mod delivery;
pub mod device;
pub mod fleet;
pub mod mosquitto;
pub mod nats;
pub mod origin;
pub mod powercut;
pub mod proxy;
pub mod sas;
pub mod script_origin;

pub const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// A port nothing listens on now, and not handed out before in this test
/// process: the OS can give the same ephemeral port to two binds in a row,
/// and a node whose admin and MQTT ports collide does not start.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub struct Gateway {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Admin API port.
    pub port: u16,
    /// MQTT TCP port.
    pub mqtt: u16,
    /// Range cache port (0 when `extra` configures its own `[cache]`).
    pub cache: u16,
    /// Environment of every start of the process (e.g. the power-cut shim).
    pub env: Vec<(String, String)>,
}

impl Gateway {
    /// Starts a gateway; `extra` is appended to its config. Unless `extra`
    /// has its own `[mqtt.tcp]`, MQTT listens on a free loopback port.
    pub fn start(extra: &str) -> Gateway {
        Gateway::start_named("e2e", extra)
    }

    /// [`Gateway::start`] with node id `id`.
    pub fn start_named(id: &str, extra: &str) -> Gateway {
        Gateway::start_prepared(id, extra, |_| {})
    }

    /// [`Gateway::start_named`], after `prepare` has been given the data
    /// directory (not created yet) to fill.
    pub fn start_prepared(id: &str, extra: &str, prepare: impl FnOnce(&Path)) -> Gateway {
        Gateway::start_with_env(id, extra, |data| {
            prepare(data);
            Vec::new()
        })
    }

    /// [`Gateway::start_named`], every start of the process with the
    /// environment that `env` returns for the data directory (not created yet).
    pub fn start_with_env(id: &str, extra: &str, env: impl FnOnce(&Path) -> Vec<(String, String)>) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let env = env(&dir.path().join("data"));
        let port = free_port();
        let mqtt = free_port();
        let config = dir.path().join("holdfast.toml");
        let mqtt_section = if extra.contains("[mqtt.tcp]") {
            String::new()
        } else {
            format!("[mqtt.tcp]\nlisten = \"127.0.0.1:{mqtt}\"\n")
        };
        let (cache, cache_section) = if extra.contains("[cache]") {
            (0, String::new())
        } else {
            let p = free_port();
            (p, format!("[cache]\nlisten = \"127.0.0.1:{p}\"\n"))
        };
        std::fs::write(
            &config,
            format!(
                "[node]\nid = {id:?}\ndata_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n{mqtt_section}{cache_section}{extra}",
                dir.path().join("data").display().to_string()
            ),
        )
        .unwrap();
        let child = spawn(&config, &env);
        let mut gw = Gateway {
            child,
            dir,
            config,
            port,
            mqtt,
            cache,
            env,
        };
        gw.wait_ready();
        gw
    }

    /// Stops the process (SIGTERM) and starts it again on the same config and data.
    pub fn restart(&mut self) {
        self.terminate();
        self.child = spawn(&self.config, &self.env);
        self.wait_ready();
    }

    /// Kills the process with SIGKILL and starts it again.
    pub fn crash_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.config, &self.env);
        self.wait_ready();
    }

    /// Kills the process with SIGKILL and leaves it down.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again after [`Gateway::kill`].
    pub fn respawn(&mut self) {
        self.respawn_unready();
        self.wait_ready();
    }

    /// Starts the process again after [`Gateway::kill`], not waiting for it
    /// to be ready.
    pub fn respawn_unready(&mut self) {
        self.child = spawn(&self.config, &self.env);
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// GET an admin API path with the node's token, as JSON.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let (code, body) = http_get(self.port, path, Some(self.token().trim())).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("holdfast exited early with {status}: {}", self.log());
            }
            if http_get(self.port, "/healthz", None).is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("holdfast did not become ready");
    }

    /// POST a JSON body to an admin API path with the node's token: status and body.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, String) {
        http_request(
            self.port,
            "POST",
            path,
            Some(self.token().trim()),
            Some(&body.to_string()),
        )
        .unwrap()
    }

    /// The CLI command for `args` against this node, not yet run.
    pub fn cli_args(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("HOLDFAST_ADMIN_TOKEN");
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_args(args).output().unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `holdfast device add <args> --json`: the new identity's SAS keys
    /// (primary, secondary), empty when it has none.
    pub fn add_identity(&self, args: &[&str]) -> (String, String) {
        let mut all = vec!["device", "add"];
        all.extend_from_slice(args);
        all.push("--json");
        let v: serde_json::Value = serde_json::from_str(&self.cli_ok(&all)).unwrap();
        let key = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        (key("sas_primary"), key("sas_secondary"))
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/admin.token")).unwrap()
    }

    /// `holdfast plugin list --json`.
    pub fn list(&self) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["plugin", "list", "--json"])).unwrap()
    }

    /// The active router version.
    pub fn router_version(&self) -> String {
        self.list()["plugins"][0]["version"].as_str().unwrap().to_string()
    }

    /// The Prometheus text of the node.
    pub fn metrics(&self) -> String {
        http_get(self.port, "/metrics", None).unwrap().1
    }

    /// The value of one metric line (exact name with labels), 0 if absent.
    pub fn metric(&self, line: &str) -> f64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    fn terminate(&mut self) -> String {
        // SIGTERM, then wait for a clean exit.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let err = self.log();
                assert!(status.success(), "exit {status}: {err}");
                return err;
            }
            assert!(Instant::now() < deadline, "holdfast did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(mut self) -> String {
        self.terminate()
    }

    /// Everything the process (and earlier runs on this config) logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(log_path(&self.config)).unwrap_or_default()
    }

    /// Node id and log, for a failing assertion's message.
    pub fn describe(&self) -> String {
        format!("--- log of {} ---\n{}", self.config.display(), self.log())
    }
}

fn log_path(config: &std::path::Path) -> PathBuf {
    config.with_extension("log")
}

/// Starts `holdfast run`; its log is appended to `<config>.log`. With
/// `HOLDFAST_TEST_LOG=<filter>` it goes to the test's stderr at that level
/// instead, for debugging.
fn spawn(config: &std::path::Path, env: &[(String, String)]) -> Child {
    let log = std::env::var("HOLDFAST_TEST_LOG").ok();
    let stderr = if log.is_some() {
        Stdio::inherit()
    } else {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(config))
            .unwrap();
        Stdio::from(file)
    };
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", log.as_deref().unwrap_or("info"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET over a raw socket: status and body.
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    http_request(port, "GET", path, token, None)
}

/// A minimal HTTP/1.1 request over a raw socket, with an optional JSON body:
/// status and body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let content = body
        .map(|b| format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}{content}Connection: close\r\n\r\n{}",
        body.unwrap_or("")
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split(' ').nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}
