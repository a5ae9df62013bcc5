//! End to end: the real `holdfast` binary, started as a process, driven
//! through its CLI and admin API.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;

use support::client::Client;
use support::{BIN, Gateway, http_get};
const ALERT_ROUTER: &str = holdfast_plugins::artifacts::EXAMPLE_ALERT_ROUTER_WASM;
const TEST_ROUTER: &str = holdfast_plugins::artifacts::TEST_ROUTER_WASM;

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn swap_rollback_and_errors_through_the_cli() {
    let gw = Gateway::start("");
    let list = gw.list();
    let slots: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["slot"].as_str().unwrap())
        .collect();
    assert_eq!(slots, ["router", "auth", "content-source"]);
    assert_eq!(list["plugins"][0]["source"], "embedded");
    let default = gw.router_version();

    // A table a person can read.
    let table = gw.cli_ok(&["plugin", "list"]);
    assert!(table.starts_with("SLOT"), "{table}");
    assert!(table.contains(&default[..12]));

    // Swap in the example plugin with its own config.
    let plugin_config = gw.dir.path().join("alert.toml");
    std::fs::write(&plugin_config, "default_lane = 7\n").unwrap();
    let out = gw.cli_ok(&[
        "plugin",
        "swap",
        "router",
        ALERT_ROUTER,
        "--plugin-config",
        plugin_config.to_str().unwrap(),
    ]);
    assert!(out.starts_with("swapped router: "), "{out}");
    let example = gw.router_version();
    assert_ne!(example, default);

    // Invalid file, wrong world, failing init: one clear error, exit 1, old version active.
    let garbage = gw.dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm garbage").unwrap();
    let auth_wasm = gw.dir.path().join("auth.wasm");
    std::fs::write(
        &auth_wasm,
        holdfast_plugins::embedded_plugin(holdfast_plugins::SlotName::Auth),
    )
    .unwrap();
    let failing = gw.dir.path().join("fail.json");
    std::fs::write(&failing, r#"{"fail_init": true}"#).unwrap();
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["plugin", "swap", "router", garbage.to_str().unwrap()],
            "not a valid plugin component",
        ),
        (
            vec!["plugin", "swap", "router", auth_wasm.to_str().unwrap()],
            "does not implement the router world",
        ),
        (
            vec![
                "plugin",
                "swap",
                "router",
                TEST_ROUTER,
                "--plugin-config",
                failing.to_str().unwrap(),
            ],
            "init failure requested by config",
        ),
    ];
    for (args, want) in cases {
        let out = gw.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr_of(&out);
        assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert_eq!(gw.router_version(), example);
    }

    // Rollback to the default, then rollback again flips back.
    let out = gw.cli_ok(&["plugin", "rollback", "router"]);
    assert!(out.contains(&format!("-> {}", &default[..12])), "{out}");
    assert_eq!(gw.router_version(), default);
    let history: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["plugin", "history", "--json"])).unwrap();
    let actions: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["slot"] == "router")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["load", "swap", "rollback"]);

    // Admin API: health and metrics need no token; the API does.
    assert_eq!(http_get(gw.port, "/healthz", None).unwrap().0, 200);
    assert_eq!(http_get(gw.port, "/api/v1/plugins", None).unwrap().0, 401);
    assert_eq!(
        http_get(gw.port, "/api/v1/plugins", Some("wrong-token-wrong-token"))
            .unwrap()
            .0,
        401
    );
    assert_eq!(
        http_get(gw.port, "/api/v1/plugins", Some(gw.token().trim())).unwrap().0,
        200
    );
    let (code, metrics) = http_get(gw.port, "/metrics", None).unwrap();
    assert_eq!(code, 200);
    for want in [
        "holdfast_plugin_swaps_total{slot=\"router\",result=\"ok\"} 1",
        "holdfast_plugin_swaps_total{slot=\"router\",result=\"rejected\"} 3",
        "holdfast_plugin_rollbacks_total{slot=\"router\"} 1",
        "holdfast_plugin_call_duration_seconds_bucket",
        "holdfast_admin_requests_total{code=\"401\"} 2",
        "holdfast_outbox_depth_messages{lane=\"0\"} 0",
        "holdfast_outbox_oldest_age_seconds{lane=\"9\"} 0",
    ] {
        assert!(metrics.contains(want), "metrics lack {want}:\n{metrics}");
    }

    // The token file is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(gw.dir.path().join("data/admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let log = gw.stop();
    assert!(log.contains("plugin swapped"), "{log}");
}

#[test]
fn watched_folder_swaps_changed_plugins() {
    let watch = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&format!(
        "[plugins]\nwatch_dir = {:?}\nwatch_interval_ms = 100\n[plugins.router.config]\n",
        watch.path().display().to_string()
    ));
    let before = gw.router_version();
    std::fs::copy(ALERT_ROUTER, watch.path().join("router.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = gw.list();
        if list["plugins"][0]["version"] != before.as_str() {
            assert!(list["plugins"][0]["source"].as_str().unwrap().ends_with("router.wasm"));
            break;
        }
        assert!(Instant::now() < deadline, "watched plugin was not swapped in");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken file in the folder is rejected and the running version stays.
    let current = gw.router_version();
    std::fs::write(watch.path().join("router.wasm"), b"broken").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(gw.router_version(), current);
    let log = gw.stop();
    assert!(log.contains("watched plugin rejected"), "{log}");
}

#[test]
fn config_check_names_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[plugins.router]\ndeadline_ms = 0\n").unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_of(&out).trim(),
        "error: config key plugins.router.deadline_ms: must be 1-60000"
    );

    let good = dir.path().join("good.toml");
    let default = Command::new(BIN).args(["config", "default"]).output().unwrap();
    std::fs::write(&good, &default.stdout).unwrap();
    let out = Command::new(BIN).args(["config", "check"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));

    let out = Command::new(BIN).args(["run", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("plugins.router.deadline_ms"));
}

#[test]
fn admin_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\ndata_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n[mqtt.tcp]\nlisten = \"127.0.0.1:0\"\n[cache]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains(&format!("error: admin API cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
}

/// `holdfast plugin new` makes a crate that builds against the SDK; its
/// component loads into a running gateway on its default router config with
/// exactly the swap command the scaffold prints.
#[test]
fn scaffolded_plugin_builds_and_swaps_in() {
    let gw = Gateway::start("");
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["plugin", "new", "router", "my-router", "--dir"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let hint: Vec<&str> = printed
        .lines()
        .find_map(|l| l.strip_prefix("then: holdfast "))
        .unwrap_or_else(|| panic!("no swap hint in {printed}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        hint,
        [
            "plugin",
            "swap",
            "router",
            "target/wasm32-wasip2/release/my_router.wasm"
        ]
    );
    let krate = work.path().join("my-router");
    // Build it like an author would, sharing the plugins' target dir so the SDK is not rebuilt from scratch.
    let target_dir = Path::new(holdfast_plugins::artifacts::WASM_TARGET_DIR).join("scaffold");
    let build = Command::new(env!("CARGO"))
        .args(["build", "--target", "wasm32-wasip2", "--release", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&krate)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", stderr_of(&build));
    // The printed command, with the build's target dir in place of `target/`.
    let wasm = target_dir.join(hint[3].strip_prefix("target/").unwrap());
    let out = gw.cli_ok(&[hint[0], hint[1], hint[2], wasm.to_str().unwrap()]);
    assert!(out.starts_with("swapped router"), "{out}");
    assert_eq!(gw.list()["plugins"][0]["source"], "admin-api");
    // A second scaffold with the same name is refused.
    let again = Command::new(BIN)
        .args(["plugin", "new", "router", "my-router", "--dir"])
        .arg(work.path())
        .output()
        .unwrap();
    assert!(stderr_of(&again).contains("already exists"));
    gw.stop();
}

/// A request through the cache as a proxy: status and body.
fn proxy_get(cache_port: u16, url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}", "-x"])
        .arg(format!("http://127.0.0.1:{cache_port}"))
        .arg(url)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// SIGHUP (and `holdfast reload`) re-reads the config file: plugin configs
/// and limits are applied live without dropping a connection, other changed
/// keys are reported, a broken file changes nothing, and the process keeps
/// running.
#[test]
fn sighup_reloads_plugin_configs_and_limits_and_reports_the_rest() {
    let source = |name: &str| {
        format!(
            "[[plugins.content-source.config.sources]]\nname = \"{name}\"\nhosts = [\"{name}.test\"]\n\
             origin = \"http://127.0.0.1:1\"\nimmutable = [\"/**\"]\n"
        )
    };
    let mut gw = Gateway::start(&source("a"));
    let (code, body) = proxy_get(gw.cache, "http://b.test/x");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("host \"b.test\" is not a configured source"), "{body}");
    // A client connected before the reload.
    let mut first = Client::connect(gw.mqtt, "before-reload", true).unwrap();

    // Add a source, lower two limits, change a key that needs a restart;
    // send SIGHUP.
    let original = std::fs::read_to_string(&gw.config).unwrap();
    let changed = original.replace("[cache]\n", "[cache]\nmax_size = 5368709120\nblock_size = 2097152\n")
        + "[mqtt]\nmax_connections = 1\n[outbox]\nmax_bytes = 1000000000000000000\n"
        + &source("b");
    write_atomic(&gw.config, &changed);
    hup(&gw);
    // The new source is served: its origin is unreachable, so 502, not 403.
    wait_until("SIGHUP to apply the new source", || {
        proxy_get(gw.cache, "http://b.test/x").0 == 502
    });
    assert!(gw.log().contains("config reloaded"), "{}", gw.log());
    assert!(gw.log().contains("cache.block_size"), "{}", gw.log());
    // The limits are in force: the cache's budget is the new one, and a
    // second client is refused (0x89, server busy) while the first, connected
    // before the reload, still works.
    assert_eq!(gw.api("/api/v1/cache")["max_size"], 5_368_709_120u64);
    match Client::connect_as(gw.mqtt, "after-reload", true, None, None).unwrap() {
        Err(code) => assert_eq!(code, 0x89),
        Ok(_) => panic!("a second client connected past mqtt.max_connections = 1"),
    }
    assert!(
        first
            .publish_acked("echo/1", "still here", Duration::from_secs(5))
            .unwrap()
    );

    // `holdfast reload` reports the same: the plugin config is applied, the
    // budget needs a restart.
    let out = gw.cli_ok(&["reload"]);
    assert!(out.contains("needs a restart:\n  cache.block_size"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["reload", "--json"])).unwrap();
    assert_eq!(v["not_applied"], serde_json::json!(["cache.block_size"]));
    // The limits were applied by the SIGHUP; nothing changed since.
    assert_eq!(v["applied"], serde_json::json!([]));
    let log = gw.log();
    let applied_line = log.lines().find(|l| l.contains("config reloaded")).unwrap_or_default();
    for key in [
        "cache.max_size",
        "mqtt.max_connections",
        "plugins.content-source.config",
    ] {
        assert!(applied_line.contains(key), "{applied_line}");
    }
    // A quota above what the disk allows is applied: the byte quota in force
    // is the smaller of it and what the free space allows, at every commit.
    assert!(applied_line.contains("outbox.max_bytes"), "{applied_line}");
    assert!(
        gw.api("/api/v1/outbox")["max_bytes"].as_u64().unwrap() < 1_000_000_000_000_000_000,
        "the quota in force follows the free space"
    );
    // The plugin list shows the reconfigured slot.
    let history = gw.api("/api/v1/plugins/history");
    assert!(history.to_string().contains("reconfigure"), "{history}");

    // A broken file: the reload is refused and nothing changes, whether
    // through the CLI or SIGHUP.
    write_atomic(&gw.config, "[cache\n");
    let out = gw.cli(&["reload"]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("config is not valid TOML"),
        "{}",
        stderr_of(&out)
    );
    hup(&gw);
    wait_until("the broken file to be refused", || {
        gw.log().contains("SIGHUP: config not reloaded")
    });
    assert_eq!(
        proxy_get(gw.cache, "http://b.test/x").0,
        502,
        "the running config is kept"
    );
    assert!(gw.child.try_wait().unwrap().is_none(), "SIGHUP must not stop the node");
    write_atomic(&gw.config, &changed);
}

/// `holdfast init` writes the annotated config, which `config check` passes;
/// it does not overwrite a file without `--force`.
#[test]
fn init_writes_an_annotated_config_that_checks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("etc/holdfast.toml");
    let init = |extra: &[&str]| Command::new(BIN).arg("init").arg(&path).args(extra).output().unwrap();
    let out = init(&[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, holdfast::cli::INIT_CONFIG);
    assert!(text.contains("# shutdown_timeout_ms = 10000"), "{text}");
    let out = Command::new(BIN).args(["config", "check"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));

    std::fs::write(&path, "# mine\n").unwrap();
    let out = init(&[]);
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("exists; use --force"), "{}", stderr_of(&out));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "# mine\n");
    assert!(init(&["--force"]).status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), holdfast::cli::INIT_CONFIG);
}

/// Replaces a file in one step, as editors do (a reload never reads half a file).
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Sends SIGHUP to the node.
fn hup(gw: &Gateway) {
    let st = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The README's registry commands run as written, in order, on a node with
/// nothing registered (its config names no identity).
#[test]
fn readme_registry_commands_run_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let block = readme
        .split("```")
        .find(|b| b.starts_with("sh\n") && b.contains("holdfast device add"))
        .expect("a sh block with `holdfast device add` in README.md");
    // The README registers its gateways under the root's node id.
    let gw = Gateway::start_named("root", "");
    let mut ran = 0;
    for line in block.lines().skip(1) {
        let command = line.split('#').next().unwrap_or_default().trim();
        if command.is_empty() {
            continue;
        }
        let words: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(words[0], "holdfast", "{line}");
        gw.cli_ok(&words[1..]);
        ran += 1;
    }
    assert!(ran >= 3, "{block}");
    let v: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["device", "show", "thermostat-7", "--json"])).unwrap();
    assert_eq!(v["parent"], "site-gw", "{v}");
    gw.stop();
}

/// `holdfast queue | head -2`: output into a pipe that closes early ends the
/// command quietly, without a panic.
#[test]
fn cli_output_into_a_closed_pipe_exits_quietly() {
    let gw = Gateway::start("");
    for args in [
        vec!["queue"],
        vec!["status"],
        vec!["config", "default"],
        vec!["plugin", "list"],
    ] {
        let mut child = gw
            .cli_args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the reading end before the command writes (it has yet to
        // start up, and `queue` and `status` ask the node first): its
        // first write gets EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.trim().is_empty(), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
    gw.stop();
}

/// The hostile test router, swapped into a running node, is driven into a
/// trap, an endless loop and a memory bomb by several clients at once.
/// Every publisher gets its PUBACK, each failure is counted under its kind
/// with the guest's message in the log, no connection is left behind (the
/// clients list, the connection gauge, reconnecting with the same id), the
/// memory comes back, and SIGTERM does not wait for anything.
#[test]
fn hostile_router_never_breaks_a_connection() {
    // A 100 ms deadline: the bombs reach the 16 MiB cap whatever the load.
    let gw = Gateway::start("[plugins.router]\nmemory_mib = 16\ndeadline_ms = 100\n");
    let out = gw.cli_ok(&["plugin", "swap", "router", TEST_ROUTER]);
    assert!(out.starts_with("swapped router"), "{out}");
    let rss_kib = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", gw.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
    };
    let rss_before = rss_kib();

    const ROUNDS: usize = 4;
    let topics = ["hostile/trap", "hostile/loop", "hostile/bomb"];
    let ids: Vec<String> = (0..6).map(|i| format!("hostile-{i}")).collect();
    let port = gw.mqtt;
    let threads: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (id, topic) = (id.clone(), topics[i % topics.len()]);
            std::thread::spawn(move || {
                let mut c = Client::connect(port, &id, true).unwrap();
                for _ in 0..ROUNDS {
                    assert!(
                        c.publish_acked(topic, "x", Duration::from_secs(10)).unwrap(),
                        "{id}: no PUBACK for {topic}"
                    );
                }
                // The connection still works after its messages failed.
                assert!(c.publish_acked("other", "x", Duration::from_secs(10)).unwrap());
                c
            })
        })
        .collect();
    let clients: Vec<Client> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let per_kind = (ROUNDS * 2) as f64;
    for kind in ["trap", "timeout", "memory"] {
        let line = format!("holdfast_plugin_failures_total{{slot=\"router\",kind=\"{kind}\"}}");
        assert_eq!(gw.metric(&line), per_kind, "{kind}\n{}", gw.describe());
    }
    let log = gw.log();
    assert!(log.contains("test-router: trap requested"), "{log}");
    assert!(log.contains("memory allocation"), "{log}");
    // The guest's panic is in the log; the host never panicked.
    assert!(log.contains("panicked at tests/plugins/test-router"), "{log}");
    for host_panic in [
        "Cannot start a runtime",
        "panicked in the host",
        "connection task panicked",
    ] {
        assert!(!log.contains(host_panic), "{host_panic}: {log}");
    }

    // Every client is listed while connected, and none once gone.
    let listed = |gw: &Gateway| -> usize {
        let v: serde_json::Value = serde_json::from_str(&gw.cli_ok(&["clients", "--json"])).unwrap();
        v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["client_id"].as_str().unwrap_or_default().starts_with("hostile-"))
            .count()
    };
    assert_eq!(listed(&gw), ids.len());
    drop(clients);
    support::fleet::wait_until(10, "the clients to be gone", || {
        listed(&gw) == 0 && gw.metric("holdfast_mqtt_connections{transport=\"tcp\"}") == 0.0
    });
    // The same client ids connect again at once.
    for id in &ids {
        let mut c = Client::connect(gw.mqtt, id, true).unwrap();
        assert!(c.publish_acked("other", "x", Duration::from_secs(10)).unwrap());
    }

    // The discarded instances gave their memory back (16 MiB bombs, 8 of them).
    let out = gw.cli_ok(&["plugin", "rollback", "router"]);
    assert!(out.contains("rolled back"), "{out}");
    let rss_after = rss_kib();
    eprintln!("RSS before {rss_before} KiB, after the hostile calls and rollback {rss_after} KiB");
    assert!(rss_after < rss_before + 64 * 1024, "{rss_before} -> {rss_after} KiB");

    // SIGTERM finds nothing hanging: well within the 10 s shutdown limit.
    let started = Instant::now();
    gw.stop();
    let took = started.elapsed();
    eprintln!("stopped in {took:?}");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
}
