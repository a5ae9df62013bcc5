//! The README's commands, run as written against real `holdfast` nodes.
//!
//! Every ```` ```sh ```` and ```` ```toml ```` block of `README.md` has a
//! marker on the line before it: `<!-- doc-test: NAME -->` for a block
//! this test uses, or `<!-- doc-test: skip: WHY -->`. A block without a
//! marker, or a name this test does not know, fails
//! [`every_block_is_marked`], so a new block cannot slip in untested
//! without saying why.
//!
//! What is run, each block as one `bash` script with `set -e -o pipefail`
//! (a command that fails fails the test), in its node's working directory,
//! with `holdfast` an alias of the binary under test:
//!
//! - the walkthrough, on one node started from `holdfast config default`
//!   (the zero-config node) with its admin, MQTT and cache ports moved to
//!   free ones: `plugin-list`, `example-router` (the example router and its
//!   own plugin config swapped in and rolled back),
//!   `example-router-no-config` and `swap-garbage` (must fail with the
//!   documented errors), `config-check`, `mqtt-root`
//!   (mosquitto_sub must print the message), `cache` (the 403 for a host
//!   that is no source) and `status`;
//! - the nested gateways, on three nodes (`root`, `plant-gw`, `site-gw`)
//!   whose configs are the README's TOML blocks: `fleet-certs` makes the
//!   fleet CA and the certificates, `fleet-devices` registers the gateways
//!   on the root, and the test then waits until the root shows `plant-gw`
//!   and `plant-gw` shows `site-gw` as connected children.
//!
//! What changes from the README's text, each by [`Substitution`] in plain
//! sight below: the ports (9600, 8080, 1883, 15600 and the example host
//! names) become the free ones the test picked; `alias
//! holdfast=target/release/holdfast` names the binary under test;
//! `/etc/holdfast/fleet/` is where `fleet-certs` wrote the files; after a
//! command put in the background with `&` the script waits until the node
//! counts a subscription, as a person typing the next line would; the
//! example router's `cargo build … --target wasm32-wasip2 --release` is not
//! run (minutes on a cold cache): the swap takes the same crate's
//! component, built for wasm32-wasip2 by holdfast-plugins' build script.
//!
//! Not run (their markers say why): `scripts/run.sh` and `scripts/test.sh`
//! (the test starts the node itself, and is part of `scripts/test.sh`),
//! `holdfast run --config holdfast.toml` (a second node on the default
//! ports), the scaffold's `cargo build` to wasm32-wasip2 (minutes), and the
//! apt set-up (sudo, and the Debian archive over the network).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{BIN, free_port, http_get};

const README: &str = include_str!("../README.md");
const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const ALERT_ROUTER: &str = holdfast_plugins::artifacts::EXAMPLE_ALERT_ROUTER_WASM;

/// The names of the blocks this test runs; a marker naming another fails.
const KNOWN: &[&str] = &[
    "plugin-list",
    "example-router",
    "example-router-no-config",
    "swap-garbage",
    "config-check",
    "mqtt-root",
    "cache",
    "status",
    "fleet-certs",
    "fleet-node",
    "fleet-listen",
    "fleet-upstream",
    "fleet-devices",
];

/// One fenced block of a Markdown file.
#[derive(Debug)]
struct Block {
    /// The marker on the line before: `Some(Some(name))` for a block a test
    /// runs, `Some(None)` for one skipped with a reason, `None` for none.
    marker: Option<Option<String>>,
    lang: String,
    text: String,
    line: usize,
}

/// Every fenced block of `markdown` (called `file` in messages), with its
/// `<!-- doc-test: … -->` marker if it has one.
fn blocks(file: &str, markdown: &str) -> Vec<Block> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].trim_end().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let marker = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("<!-- doc-test: "))
            .and_then(|l| l.strip_suffix("-->"))
            .map(str::trim)
            .map(|m| match m.strip_prefix("skip:") {
                Some(why) => {
                    assert!(
                        !why.trim().is_empty(),
                        "{file} line {}: a skip marker must say why",
                        i + 1
                    );
                    None
                }
                None => Some(m.to_string()),
            });
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && lines[end].trim_end() != "```" {
            end += 1;
        }
        assert!(end < lines.len(), "{file} line {}: unclosed block", i + 1);
        out.push(Block {
            marker,
            lang: lang.to_string(),
            text: lines[start..end].join("\n") + "\n",
            line: i + 1,
        });
        i = end + 1;
    }
    out
}

/// The block of `markdown` marked `<!-- doc-test: NAME -->`.
fn block_of(file: &str, markdown: &str, name: &str) -> String {
    let all = blocks(file, markdown);
    let mut found = all.iter().filter(|b| matches!(&b.marker, Some(Some(n)) if n == name));
    let b = found
        .next()
        .unwrap_or_else(|| panic!("{file} has no block marked `doc-test: {name}`"));
    assert!(found.next().is_none(), "two blocks of {file} are marked {name}");
    b.text.clone()
}

/// The README block named `name`.
fn block(name: &str) -> String {
    block_of("README.md", README, name)
}

/// A change to a block's text before it runs: `from` must occur in it, so
/// a README edit that removes it fails here instead of running something
/// else.
struct Substitution<'a> {
    from: &'a str,
    to: String,
}

fn sub(from: &str, to: impl Into<String>) -> Substitution<'_> {
    Substitution { from, to: to.into() }
}

fn apply(name: &str, text: &str, subs: &[Substitution<'_>]) -> String {
    let mut text = text.to_string();
    for s in subs {
        assert!(
            text.contains(s.from),
            "README block {name} no longer contains {:?}; update the test's substitutions",
            s.from
        );
        text = text.replace(s.from, &s.to);
    }
    text
}

/// A `holdfast` node started in its own working directory, the way the
/// README starts one: `holdfast run --config <file>` from that directory,
/// so `./holdfast-data` is its data directory.
struct Node {
    child: Child,
    dir: PathBuf,
    admin: u16,
}

impl Node {
    fn start(dir: &Path, config: &str) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("node.toml"), config).unwrap();
        let admin = config
            .lines()
            .skip_while(|l| l.trim() != "[admin]")
            .find_map(|l| l.trim().strip_prefix("listen = \"127.0.0.1:"))
            .and_then(|p| p.trim_end_matches('"').parse().ok())
            .expect("the test's config has an [admin] listen on 127.0.0.1");
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config", "node.toml"])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env_remove("HOLDFAST_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut node = Node {
            child,
            dir: dir.to_path_buf(),
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = node.child.try_wait() {
                panic!("holdfast exited early with {status}: {}", node.log());
            }
            if http_get(admin, "/healthz", None).is_some_and(|(code, _)| code == 200) {
                return node;
            }
            assert!(Instant::now() < deadline, "node did not start: {}", node.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// GET an admin API path with the node's token, as JSON.
    fn api(&self, path: &str) -> serde_json::Value {
        let token = std::fs::read_to_string(self.dir.join("holdfast-data/admin.token")).unwrap();
        let (code, body) = http_get(self.admin, path, Some(token.trim())).unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Runs a README block in this node's directory, with the CLI pointed
    /// at this node.
    fn run(&self, name: &str, script: &str) -> Script {
        Script::start(&self.dir, name, script, &[("HOLDFAST_ADMIN", self.url())])
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A block running as a bash script in its own process group, its stdout
/// and stderr in one file.
struct Script {
    child: Child,
    name: String,
    text: String,
    out: PathBuf,
}

const PRELUDE: &str = "set -e -o pipefail\nshopt -s expand_aliases\n";

impl Script {
    fn start(dir: &Path, name: &str, text: &str, env: &[(&str, String)]) -> Script {
        let file = dir.join(format!("readme-{name}.sh"));
        let out = dir.join(format!("readme-{name}.out"));
        // The alias a reader set in the walkthrough's first block holds in
        // the blocks after it.
        std::fs::write(&file, format!("{PRELUDE}alias holdfast={BIN:?}\n{text}")).unwrap();
        let log = std::fs::File::create(&out).unwrap();
        let mut cmd = Command::new("bash");
        cmd.arg(&file)
            .current_dir(dir)
            .env_remove("HOLDFAST_ADMIN_TOKEN")
            .env_remove("HOLDFAST_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Script {
            child: cmd.spawn().unwrap(),
            name: name.to_string(),
            text: text.to_string(),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!(
            "README block {}:\n{}\n--- its output ---\n{}",
            self.name,
            self.text,
            self.output()
        )
    }

    /// Waits for the script's end (30 s at most): whether it succeeded.
    fn finish(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "still running after 30 s: {}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The script must exit 0.
    fn succeeds(mut self) -> Script {
        assert!(self.finish(), "failed: {}", self.describe());
        self
    }

    /// The script must exit non-zero.
    fn fails(mut self) -> Script {
        assert!(!self.finish(), "succeeded but must fail: {}", self.describe());
        self
    }

    /// `text` must be in the output, within 10 s (a background command
    /// may print after the script ended).
    fn prints(self, text: &str) -> Script {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.output().contains(text) {
            assert!(
                Instant::now() < deadline,
                "does not print {text:?}: {}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        // The group: a block's background commands (`mosquitto_sub &`) too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// After each line that puts a command in the background, wait until the
/// node counts a subscription: the README's next line assumes
/// `mosquitto_sub` is listening, as it is by the time a person types it.
fn wait_after_background(text: &str, admin: u16) -> String {
    let wait = format!(
        "until curl -s -H \"Authorization: Bearer $(cat holdfast-data/admin.token)\" \
         127.0.0.1:{admin}/api/v1/mqtt | grep -q '\"subscriptions\":[1-9]'; do sleep 0.05; done"
    );
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim_end().ends_with('&') {
            out.push_str(&wait);
            out.push('\n');
        }
    }
    out
}

#[test]
fn every_block_is_marked() {
    let all = blocks("README.md", README);
    for b in all.iter().filter(|b| b.lang == "sh" || b.lang == "toml") {
        match &b.marker {
            None => panic!(
                "README.md line {}: a ```{} block without a `<!-- doc-test: NAME -->` or \
                 `<!-- doc-test: skip: WHY -->` marker on the line before",
                b.line, b.lang
            ),
            Some(Some(name)) => assert!(
                KNOWN.contains(&name.as_str()),
                "README.md line {}: block `{name}` is not run by tests/e2e_readme.rs",
                b.line
            ),
            Some(None) => {}
        }
    }
    let names: BTreeSet<&str> = all.iter().filter_map(|b| b.marker.as_ref()?.as_deref()).collect();
    for name in KNOWN {
        assert!(names.contains(name), "README.md has no block marked {name}");
    }
    assert!(
        all.iter().filter(|b| b.marker == Some(None)).count() >= 4,
        "the README's skipped blocks are found too"
    );
}

/// The five-minute walkthrough on a zero-config node.
#[test]
fn walkthrough_runs_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("walkthrough");
    std::fs::create_dir_all(&dir).unwrap();
    let (admin, mqtt, cache) = (free_port(), free_port(), free_port());

    // `scripts/run.sh` runs the embedded defaults; the same file, with
    // the three ports moved.
    let defaults = Command::new(BIN).args(["config", "default"]).output().unwrap();
    assert!(defaults.status.success());
    let config = apply(
        "(holdfast config default)",
        &String::from_utf8(defaults.stdout).unwrap(),
        &[
            sub("listen = \"127.0.0.1:9600\"", format!("listen = \"127.0.0.1:{admin}\"")),
            sub("listen = \"0.0.0.0:8080\"", format!("listen = \"127.0.0.1:{cache}\"")),
        ],
    ) + &format!("\n[mqtt.tcp]\nlisten = \"127.0.0.1:{mqtt}\"\n");
    let node = Node::start(&dir, &config);

    let out = node
        .run(
            "plugin-list",
            &apply(
                "plugin-list",
                &block("plugin-list"),
                &[sub(
                    "alias holdfast=target/release/holdfast",
                    format!("alias holdfast={BIN:?}"),
                )],
            ),
        )
        .succeeds()
        .output();
    for slot in ["router", "auth", "content-source"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{slot} ")) && l.contains("embedded")),
            "{slot} embedded: {out}"
        );
    }
    let default_router = node.api("/api/v1/plugins")["plugins"][0]["version"].clone();

    // The example router comes with its own plugin config; the default
    // router's would be refused by its init.
    let example = format!("{WORKSPACE}/examples/alert-router/alert-router.toml");
    node.run(
        "example-router",
        &apply(
            "example-router",
            &block("example-router"),
            &[
                sub(
                    "cargo build -p holdfast-example-alert-router --target wasm32-wasip2 --release",
                    "# (built for wasm32-wasip2 by holdfast-plugins' build script)",
                ),
                sub(
                    "target/wasm32-wasip2/release/holdfast_example_alert_router.wasm",
                    ALERT_ROUTER,
                ),
                sub("examples/alert-router/alert-router.toml", example.clone()),
            ],
        ),
    )
    .succeeds()
    .prints("swapped router: ")
    .prints("rolled back router: ");
    let history = node.api("/api/v1/plugins/history");
    assert!(
        history.to_string().contains("\"swap\""),
        "the example was swapped in: {history}"
    );
    assert_eq!(
        node.api("/api/v1/plugins")["plugins"][0]["version"],
        default_router,
        "rolled back to the default router"
    );

    node.run(
        "example-router-no-config",
        &apply(
            "example-router-no-config",
            &block("example-router-no-config"),
            &[sub(
                "target/wasm32-wasip2/release/holdfast_example_alert_router.wasm",
                ALERT_ROUTER,
            )],
        ),
    )
    .fails()
    .prints("unknown field `local_by_default`")
    .prints("(HTTP 422); the swap kept the slot's plugin config: give this plugin its own with --plugin-config FILE");
    assert_eq!(
        node.api("/api/v1/plugins")["plugins"][0]["version"],
        default_router,
        "the default router stays"
    );

    node.run("swap-garbage", &block("swap-garbage"))
        .fails()
        .prints("error: POST /api/v1/plugins/router/swap: not a valid plugin component: ")
        .prints("(HTTP 422)");

    node.run("config-check", &block("config-check"))
        .succeeds()
        .prints("holdfast.toml: ok");
    assert!(dir.join("holdfast.toml").exists());

    let port = |p: &str| format!("127.0.0.1:{p}");
    node.run(
        "mqtt-root",
        &wait_after_background(
            &apply(
                "mqtt-root",
                &block("mqtt-root"),
                &[
                    sub("-h 127.0.0.1", format!("-h 127.0.0.1 -p {mqtt}")),
                    sub("127.0.0.1:9600", port(&admin.to_string())),
                ],
            ),
            admin,
        ),
    )
    .succeeds()
    .prints("site/temp 21.5")
    .prints("\"lanes\":[");

    node.run(
        "cache",
        &apply(
            "cache",
            &block("cache"),
            &[sub("127.0.0.1:8080", port(&cache.to_string()))],
        ),
    )
    .succeeds()
    .prints("max size")
    .prints("host \"evil.example\" is not a configured source\n(HTTP 403)\n");

    node.run("status", &block("status"))
        .succeeds()
        .prints("link     root (no upstream)")
        .prints("outbox empty");
}

/// The nested gateways: the README's certificates, configs and
/// registrations make a root, a plant gateway and a site gateway whose
/// links come up.
#[test]
fn nested_gateways_run_as_written() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_machine = tmp.path().join("ca-machine");
    std::fs::create_dir_all(&ca_machine).unwrap();
    Script::start(&ca_machine, "fleet-certs", &block("fleet-certs"), &[]).succeeds();
    let files = ca_machine.join("fleet-ca");
    for f in ["ca.pem", "root.pem", "root.key", "plant-gw.pem", "site-gw.key"] {
        assert!(files.join(f).exists(), "fleet-certs wrote {f}");
    }

    let root_link = free_port();
    let plant_link = free_port();
    // A node's config: the README's blocks for it, then the test's ports.
    let config = |id: &str, listen: Option<u16>, parent: Option<(&str, u16)>| {
        let mut c = apply(
            "fleet-node",
            &block("fleet-node"),
            &[
                sub("id = \"plant-gw\"", format!("id = {id:?}")),
                sub("/etc/holdfast/fleet/", format!("{}/", files.display())),
                sub("plant-gw.pem", format!("{id}.pem")),
                sub("plant-gw.key", format!("{id}.key")),
            ],
        );
        if let Some(port) = listen {
            c += &apply(
                "fleet-listen",
                &block("fleet-listen"),
                &[sub(
                    "enabled = true",
                    format!("enabled = true\nlisten = \"127.0.0.1:{port}\""),
                )],
            );
        }
        if let Some((parent_id, port)) = parent {
            c += &apply(
                "fleet-upstream",
                &block("fleet-upstream"),
                &[
                    sub("\"root.example.net:15600\"", format!("\"127.0.0.1:{port}\"")),
                    sub("parent_id = \"root\"", format!("parent_id = {parent_id:?}")),
                ],
            );
        }
        c + &format!(
            "\n[admin]\nlisten = \"127.0.0.1:{}\"\n[mqtt.tcp]\nlisten = \"127.0.0.1:{}\"\n\
             [cache]\nlisten = \"127.0.0.1:{}\"\n",
            free_port(),
            free_port(),
            free_port()
        )
    };
    let root = Node::start(&tmp.path().join("root"), &config("root", Some(root_link), None));
    let plant = Node::start(
        &tmp.path().join("plant-gw"),
        &config("plant-gw", Some(plant_link), Some(("root", root_link))),
    );
    let site = Node::start(
        &tmp.path().join("site-gw"),
        &config("site-gw", None, Some(("plant-gw", plant_link))),
    );

    root.run("fleet-devices", &block("fleet-devices"))
        .succeeds()
        .prints("primary key: ");

    let children = |n: &Node| n.api("/api/v1/link")["link"]["children"].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while children(&root).get("plant-gw").is_none() || children(&plant).get("site-gw").is_none() {
        assert!(
            Instant::now() < deadline,
            "the links did not come up: root {}, plant-gw {}\n--- plant-gw ---\n{}\n--- site-gw ---\n{}",
            root.api("/api/v1/link"),
            plant.api("/api/v1/link"),
            plant.log(),
            site.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(site.api("/api/v1/link")["link"]["state"], "up");
    // thermostat-7 reached site-gw by scope sync, disabled.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let devices = site.api("/api/v1/devices");
        if devices.to_string().contains("thermostat-7") {
            break;
        }
        assert!(Instant::now() < deadline, "site-gw's scope: {devices}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const IOTHUB_MD: &str = include_str!("../docs/iothub.md");

/// The block of docs/iothub.md named `name`.
fn iothub_block(name: &str) -> String {
    block_of("docs/iothub.md", IOTHUB_MD, name)
}

/// The Python with the Azure IoT device SDK: `HOLDFAST_AZURE_PYTHON`, else
/// the virtual environment `scripts/setup.sh` makes (the SDK pins
/// paho-mqtt 1.x, the other tests' paho is 2.x).
fn azure_python() -> PathBuf {
    let python = std::env::var_os("HOLDFAST_AZURE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(WORKSPACE).join("target/azure-iot-venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import azure.iot.device"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import azure.iot.device: run scripts/setup.sh",
        python.display()
    );
    python
}

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// docs/iothub.md's recipe for the Azure IoT device SDKs, run as written
/// with the real Python SDK, over MQTT (port 8883) and MQTT over
/// WebSockets (port 443): the SDK's ports are fixed, so this test binds
/// 127.0.0.1:8883 and 127.0.0.1:443 (as root, as the tests run) and no
/// other test may use them.
///
/// Changed from the page: the gateway's name `gw1.plant.example.net`
/// becomes `localhost` (which resolves here), the listeners bind the
/// loopback address, the files are where the first block wrote them, the
/// key is the one `holdfast device add` printed. The script gets an
/// ending: it prints `ready`, waits until the test has sent a
/// cloud-to-device message and called a method, then shuts down.
#[test]
fn iothub_sdk_recipe_runs_as_written() {
    let python = azure_python();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gw1");
    std::fs::create_dir_all(&dir).unwrap();

    Script::start(
        &dir,
        "sdk-cert",
        &apply(
            "sdk-cert",
            &iothub_block("sdk-cert"),
            &[sub("gw1.plant.example.net", "localhost")],
        ),
        &[],
    )
    .succeeds()
    .prints("node localhost: tls/localhost.pem (key tls/localhost.key)");

    let config = format!(
        "[node]\nid = \"gw1\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[mqtt.tcp]\nlisten = \"127.0.0.1:{}\"\n\
         [cache]\nlisten = \"127.0.0.1:{}\"\n",
        free_port(),
        free_port(),
        free_port()
    ) + &apply(
        "sdk-listeners",
        &iothub_block("sdk-listeners"),
        &[
            sub("0.0.0.0:8883", "127.0.0.1:8883"),
            sub("0.0.0.0:443", "127.0.0.1:443"),
            sub(
                "/etc/holdfast/tls/gw1.plant.example.net",
                format!("{}/tls/localhost", dir.display()),
            ),
        ],
    );
    let node = Node::start(&dir, &config);

    let added = node
        .run("sdk-device", &iothub_block("sdk-device"))
        .succeeds()
        .prints("primary key: ")
        .output();
    let key = added
        .lines()
        .find_map(|l| l.strip_prefix("primary key: "))
        .unwrap()
        .trim()
        .to_string();

    for (run, (transport, websockets)) in [("mqtt", "websockets=False"), ("websockets", "websockets=True")]
        .into_iter()
        .enumerate()
    {
        let script = apply(
            "sdk-python",
            &iothub_block("sdk-python"),
            &[
                sub("CSFSrRrzx7reeDofRDvF5ENijVAnduOmNfdu1bMpgzE=", key.clone()),
                sub("gw1.plant.example.net", "localhost"),
                sub("websockets=False", websockets),
            ],
        ) + "print(\"ready\", flush=True)\nimport sys\nsys.stdin.readline()\nclient.shutdown()\nprint(\"done\")\n";
        let file = dir.join(format!("device-{transport}.py"));
        std::fs::write(&file, &script).unwrap();
        let out_path = dir.join(format!("device-{transport}.out"));
        let out = std::fs::File::create(&out_path).unwrap();
        let mut device = Killed(
            Command::new(&python)
                .arg(&file)
                .current_dir(&dir)
                .env("PYTHONUNBUFFERED", "1")
                .stdin(Stdio::piped())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
        );
        let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
        let wait_for = |text: &str, device: &mut Killed| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !output().contains(text) {
                if let Ok(Some(status)) = device.0.try_wait() {
                    panic!("{transport}: the device exited with {status}:\n{}", output());
                }
                assert!(
                    Instant::now() < deadline,
                    "{transport}: no {text:?} from the device:\n{}\n--- node ---\n{}",
                    output(),
                    node.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        wait_for("ready", &mut device);
        assert!(
            output().contains("'reported': {"),
            "{transport}: twin GET: {}",
            output()
        );

        node.run(
            &format!("sdk-send-{transport}"),
            "holdfast device send thermostat-7 hello --property k=v\n\
             holdfast method invoke thermostat-7 reboot '{\"delay\":5}'\n",
        )
        .succeeds()
        .prints("sent to thermostat-7")
        .prints("status 200")
        .prints("\"done\": true");
        wait_for("c2d: b'hello' {'k': 'v'}", &mut device);

        drop(device.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = device.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{transport}: the device did not shut down");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{transport}: {status}:\n{}", output());
        let twin = node.api("/api/v1/twins/thermostat-7");
        assert_eq!(twin["reported"]["firmware"], "1.2", "{transport}: {twin}");
        // The telemetry message was routed (upstream: the default router).
        let metrics = http_get(node.admin, "/metrics", None).unwrap().1;
        let routed = format!("holdfast_mqtt_messages_routed_total{{action=\"upstream\"}} {}", run + 1);
        assert!(
            metrics.lines().any(|l| l == routed),
            "{transport}: no {routed:?} in\n{metrics}"
        );
    }
}

/// docs/link.md's troubleshooting row for "not a registered child gateway":
/// a gateway added without `--parent` (as the README once said) is refused,
/// and the row's fix, `holdfast device set-parent X P` on the root, lets it
/// in with no restart.
#[test]
fn link_troubleshooting_a_gateway_without_parent() {
    let row = include_str!("../docs/link.md")
        .lines()
        .find(|l| l.contains("is not a registered child gateway of P"))
        .expect("link.md's troubleshooting row")
        .to_string();
    for text in [
        "holdfast device add X --kind gateway --parent P",
        "holdfast device set-parent X P",
        "no restart",
    ] {
        assert!(row.contains(text), "the row says {text:?}: {row}");
    }

    let certs = support::fleet::fleet(&["root", "plant-gw"]);
    let link = free_port();
    let root = support::Gateway::start_named(
        "root",
        &(support::fleet::fleet_section(certs.path(), "root") + &support::fleet::listen_section(link)),
    );
    let plant = support::Gateway::start_named(
        "plant-gw",
        &(support::fleet::fleet_section(certs.path(), "plant-gw")
            + &support::fleet::upstream_section(support::fleet::addr(link), "root")),
    );
    root.cli_ok(&["device", "add", "plant-gw", "--kind", "gateway"]);
    support::fleet::wait_until(30, "the refusal", || {
        plant.api("/api/v1/link")["link"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("plant-gw is not a registered child gateway of root"))
    });
    root.cli_ok(&["device", "set-parent", "plant-gw", "root"]);
    support::fleet::wait_until(30, "plant-gw's link", || {
        root.api("/api/v1/link")["link"]["children"].get("plant-gw").is_some()
    });
}
