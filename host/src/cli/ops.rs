//! `holdfast status`, `holdfast queue …`, `holdfast clients` and
//! `holdfast init`: the operator's view of a running node.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::client::AdminClient;
use super::plugin::{PLUGIN_HEADERS, plugin_row, swap_row};
use super::print::{bytes_of, format_time, human_bytes, print_json, print_list, print_table, rows_of, str_of};

/// The annotated config `holdfast init` writes.
pub const INIT_CONFIG: &str = include_str!("../init-config.toml");

/// Writes the annotated config to `path` (refusing to overwrite unless `force`).
pub fn init(path: &Path, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!("{} exists; use --force to overwrite it", path.display());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, INIT_CONFIG).with_context(|| format!("cannot write {}", path.display()))?;
    outln!("wrote {}", path.display());
    outln!("check it:  holdfast config check {}", path.display());
    outln!("run it:    holdfast run --config {}", path.display());
    Ok(())
}

/// `2 h 5 min`-style durations.
pub(crate) fn human_ms(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".to_string() };
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `holdfast status`: the status page as text.
pub fn status(client: &AdminClient, json: bool) -> Result<()> {
    let v = client.get("/api/v1/status")?;
    if json {
        return print_json(&v);
    }
    let n = &v["node"];
    outln!(
        "node     {}  version {}  up {}",
        str_of(&n["id"]),
        str_of(&n["version"]),
        human_ms(n["uptime_seconds"].as_u64().map(|s| s * 1000))
    );
    let l = &v["link"];
    if l["kind"] == "none" {
        outln!("link     root (no upstream)");
    } else {
        outln!(
            "link     {} {} → {}  since {}  connects {}  failures {}  sent {}  acked {}",
            str_of(&l["state"]),
            str_of(&l["kind"]),
            str_of(&l["target"]),
            format_time(l["since_ms"].as_u64()),
            str_of(&l["connects"]),
            str_of(&l["failures"]),
            str_of(&l["sent"]),
            str_of(&l["acked"]),
        );
        if l["state"] != "up"
            && let Some(e) = l["last_error"].as_str()
        {
            outln!("         last error: {e}");
        }
    }
    print_backlog("backlog  ", &v["outbox"]);
    let m = &v["mqtt"];
    if m["enabled"] == true {
        let s = &m["stats"];
        outln!(
            "clients  {} connected, {} sessions, {} subscriptions, {} retained",
            str_of(&s["connections"]),
            str_of(&s["sessions"]),
            str_of(&s["subscriptions"]),
            str_of(&s["retained"])
        );
    } else {
        outln!("clients  the MQTT broker is disabled");
    }
    let d = &v["deploy"]["applied"];
    if d.is_object() {
        outln!(
            "deploy   {} (revision {}, since {})",
            str_of(&d["deployment"]),
            str_of(&d["revision"]),
            format_time(d["at_ms"].as_u64())
        );
    } else {
        outln!("deploy   none applied (this node's own config)");
    }
    outln!();
    let plugins = rows_of(&v, "plugins", plugin_row);
    print_table(PLUGIN_HEADERS, &plugins);
    let swaps: Vec<Vec<String>> = rows_of(&v, "recent_swaps", swap_row).into_iter().take(5).collect();
    if !swaps.is_empty() {
        outln!();
        print_table(&["WHEN", "SLOT", "ACTION", "FROM", "TO", "SOURCE"], &swaps);
    }
    outln!();
    let c = &v["cache"];
    if c.is_null() {
        outln!("cache    disabled");
    } else {
        let ratio = c["byte_hit_ratio"]
            .as_f64()
            .map_or_else(|| "-".to_string(), |r| format!("{:.1} %", r * 100.0));
        outln!(
            "cache    hit ratio {ratio} (bytes), {} of {} requests hits, saved {}, stored {} of {} in {} objects",
            str_of(&c["hit_requests"]),
            str_of(&c["requests"]),
            bytes_of(&c["saved_bytes"]),
            bytes_of(&c["stored_bytes"]),
            bytes_of(&c["max_size"]),
            str_of(&c["objects"]),
        );
    }
    Ok(())
}

fn lane_rows(outbox: &Value) -> Vec<Vec<String>> {
    rows_of(outbox, "lanes", |l| {
        vec![
            str_of(&l["lane"]),
            str_of(&l["messages"]),
            bytes_of(&l["bytes"]),
            str_of(&l["in_flight"]),
            human_ms(l["oldest_age_ms"].as_u64()),
            l["drain_per_s"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |r| format!("{r:.2}/s")),
            match (l["messages"].as_u64(), l["time_to_drain_s"].as_f64()) {
                (Some(0), _) => "-".to_string(),
                (_, Some(s)) => human_ms(Some((s * 1000.0) as u64)),
                (_, None) => "never at this rate".to_string(),
            },
            if l["stuck"].as_bool() == Some(true) {
                format!("STUCK for {}", human_ms(l["still_ms"].as_u64()))
            } else if l["drain_per_s"].as_f64().is_some_and(|r| r > 0.001) {
                "draining".to_string()
            } else {
                "waiting".to_string()
            },
        ]
    })
    .into_iter()
    .filter(|r| r[1] != "0")
    .collect()
}

/// `holdfast queue`: the outbox lanes.
pub fn queue(client: &AdminClient, json: bool) -> Result<()> {
    let v = client.get("/api/v1/outbox")?;
    if json {
        return print_json(&v);
    }
    print_backlog("", &v);
    Ok(())
}

/// `N messages, X of Y, oldest Z` and the table of non-empty lanes of an
/// `/api/v1/outbox` answer.
fn print_backlog(prefix: &str, outbox: &Value) {
    outln!(
        "{prefix}{} messages, {} of {}, oldest {}",
        str_of(&outbox["messages"]),
        bytes_of(&outbox["bytes"]),
        bytes_of(&outbox["max_bytes"]),
        human_ms(outbox["oldest_age_ms"].as_u64())
    );
    let rows = lane_rows(outbox);
    if !rows.is_empty() {
        print_table(
            &[
                "LANE",
                "MESSAGES",
                "BYTES",
                "IN FLIGHT",
                "OLDEST",
                "DRAIN",
                "TO DRAIN",
                "STATE",
            ],
            &rows,
        );
    }
}

/// What `wait-empty` looks at: messages and bytes of one lane or of all.
fn backlog(v: &Value, lane: Option<u8>) -> Result<(u64, u64)> {
    match lane {
        None => Ok((v["messages"].as_u64().unwrap_or(0), v["bytes"].as_u64().unwrap_or(0))),
        Some(n) => {
            let l = v["lanes"]
                .as_array()
                .and_then(|a| a.iter().find(|l| l["lane"].as_u64() == Some(u64::from(n))))
                .with_context(|| format!("the node has no lane {n}"))?;
            Ok((l["messages"].as_u64().unwrap_or(0), l["bytes"].as_u64().unwrap_or(0)))
        }
    }
}

/// `[###---]  50 %`: the share of `high` no longer waiting, rounded down,
/// so the bar is full and says 100 % only when nothing is left.
fn bar(left: u64, high: u64) -> String {
    const WIDTH: u64 = 30;
    let done = high.saturating_sub(left);
    let (filled, percent) = if left == 0 || high == 0 {
        (WIDTH, 100)
    } else {
        (done * WIDTH / high, done * 100 / high)
    };
    format!(
        "[{}{}] {percent:>3} %",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize)
    )
}

/// Draws `[###---] 50 %  1000 messages (1.2 MiB) waiting  250 msg/s  about 4 s
/// left` on one terminal line, or a line every 5 s when not on a terminal.
struct Progress {
    start: Instant,
    /// The most messages seen waiting (the bar's 0 %).
    high: u64,
    tty: bool,
    /// When the last line was written (not on a terminal).
    last_line: Option<Instant>,
}

impl Progress {
    fn draw(&mut self, left: u64, bytes: u64) {
        self.high = self.high.max(left);
        let done = self.high - left;
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = if elapsed > 0.5 { done as f64 / elapsed } else { 0.0 };
        let eta = if rate > 0.0 && left > 0 {
            format!("  about {} left", human_ms(Some((left as f64 / rate * 1000.0) as u64)))
        } else {
            String::new()
        };
        let line = format!(
            "{}  {left} messages ({}) waiting  {rate:.0} msg/s{eta}",
            bar(left, self.high),
            human_bytes(bytes),
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        } else if left == 0 || self.last_line.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            // Not a terminal (a log, CI): a line every 5 s.
            let _ = writeln!(err, "{line}");
            self.last_line = Some(Instant::now());
        }
    }

    fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// `holdfast queue wait-empty`: polls the outbox until it (or one lane) is
/// empty, drawing a progress bar; an error on timeout.
pub fn wait_empty(
    client: &AdminClient,
    lane: Option<u8>,
    timeout: Option<Duration>,
    interval: Duration,
    json: bool,
) -> Result<()> {
    let start = Instant::now();
    let mut progress = Progress {
        start,
        high: 0,
        tty: std::io::stderr().is_terminal() && !json,
        last_line: None,
    };
    loop {
        let v = client.get("/api/v1/outbox")?;
        let (left, bytes) = backlog(&v, lane)?;
        if !json {
            progress.draw(left, bytes);
        }
        if left == 0 {
            progress.finish();
            let waited = start.elapsed();
            if json {
                print_json(&serde_json::json!({ "empty": true, "waited_ms": waited.as_millis() as u64 }))?;
            } else {
                outln!("outbox empty after {:.1} s", waited.as_secs_f64());
            }
            return Ok(());
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            progress.finish();
            if json {
                print_json(&serde_json::json!({ "empty": false, "messages": left, "bytes": bytes }))?;
            }
            bail!(
                "timed out after {} s with {left} messages ({}) still waiting",
                t.as_secs(),
                human_bytes(bytes)
            );
        }
        std::thread::sleep(interval);
    }
}

/// `holdfast clients`: connected MQTT clients.
pub fn clients(client: &AdminClient, limit: usize, json: bool) -> Result<()> {
    print_list(
        client,
        &format!("/api/v1/mqtt/clients?limit={limit}"),
        json,
        "clients",
        &[
            "CLIENT ID",
            "MQTT",
            "SUBSCRIPTIONS",
            "QUEUED",
            "IN FLIGHT",
            "PERSISTENT",
        ],
        |c| {
            vec![
                str_of(&c["client_id"]),
                str_of(&c["protocol"]),
                str_of(&c["subscriptions"]),
                str_of(&c["queued"]),
                str_of(&c["in_flight"]),
                if c["persistent"] == true { "yes" } else { "no" }.to_string(),
            ]
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_ms(None), "-");
        assert_eq!(human_ms(Some(999)), "0 s");
        assert_eq!(human_ms(Some(61_000)), "1 min 1 s");
        assert_eq!(human_ms(Some(7_260_000)), "2 h 1 min");
        assert_eq!(human_ms(Some(90_000_000)), "1 d 1 h");
    }

    #[test]
    fn the_bar_is_full_only_when_nothing_is_left() {
        assert_eq!(bar(200, 200), format!("[{}]   0 %", "-".repeat(30)));
        assert_eq!(bar(100, 200), format!("[{}{}]  50 %", "#".repeat(15), "-".repeat(15)));
        assert_eq!(bar(1, 200), format!("[{}-]  99 %", "#".repeat(29)));
        assert_eq!(bar(0, 200), format!("[{}] 100 %", "#".repeat(30)));
        assert_eq!(bar(0, 0), format!("[{}] 100 %", "#".repeat(30)));
    }

    #[test]
    fn backlog_of_one_lane_or_all() {
        let v = serde_json::json!({
            "messages": 7, "bytes": 700,
            "lanes": [{"lane": 0, "messages": 2, "bytes": 200}, {"lane": 5, "messages": 5, "bytes": 500}],
        });
        assert_eq!(backlog(&v, None).unwrap(), (7, 700));
        assert_eq!(backlog(&v, Some(5)).unwrap(), (5, 500));
        assert!(backlog(&v, Some(9)).is_err());
    }

    /// Every leaf key under `v` with its value, as dotted paths; a list of
    /// tables (identities, bridge subscriptions) by its first element;
    /// plugin configs (the plugin's business) left out.
    fn leaf_keys(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    if !(path.starts_with("plugins.") && path.ends_with(".config")) {
                        leaf_keys(&path, child, out);
                    }
                }
            }
            Value::Array(items) if items.first().is_some_and(Value::is_object) => leaf_keys(prefix, &items[0], out),
            _ => out.push((prefix.to_string(), v.clone())),
        }
    }

    #[test]
    fn init_config_is_the_embedded_default_and_names_every_key() {
        use crate::config::Config;
        let init = Config::parse(INIT_CONFIG).unwrap();
        assert_eq!(
            serde_json::to_value(&init).unwrap(),
            serde_json::to_value(Config::embedded_default()).unwrap()
        );
        // `key = value` lines, commented or not, by section; a line of prose
        // that does not parse as TOML is not a key.
        let mut shown = std::collections::HashMap::new();
        let mut section = String::new();
        for line in INIT_CONFIG.lines() {
            let l = line.trim_start_matches('#').trim();
            if l.starts_with('[') {
                section = l.trim_matches(['[', ']']).to_string();
            } else if let Ok(t) = l.parse::<toml::Table>()
                && t.len() == 1
                && let Some((k, v)) = t.into_iter().next()
            {
                shown.insert(format!("{section}.{k}"), serde_json::to_value(v).unwrap());
            } else if let Some((k, "…")) = l.split_once(" = ") {
                shown.insert(format!("{section}.{k}"), Value::Null);
            }
        }
        // Every key of a config with one identity and one bridge subscription.
        let full = Config::parse("[[identities]]\nid = \"d\"\n[[upstream.mqtt.in]]\nfilter = \"a/#\"\n").unwrap();
        let mut keys = Vec::new();
        leaf_keys("", &serde_json::to_value(&full).unwrap(), &mut keys);
        assert!(keys.len() > 100, "{keys:?}");
        let missing: Vec<&String> = keys
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !shown.contains_key(*k))
            .collect();
        assert!(missing.is_empty(), "holdfast init's config lacks {missing:?}");
        // The values shown are the defaults (or the embedded config's).
        let embedded = serde_json::to_value(Config::embedded_default()).unwrap();
        for (key, default) in &keys {
            let value = &shown[key];
            if value.is_null() || default.is_null() {
                continue;
            }
            let in_embedded = key.split('.').try_fold(&embedded, |v, k| v.get(k));
            assert!(
                value == default || in_embedded == Some(value),
                "{key}: holdfast init shows {value}, the default is {default}"
            );
        }
    }
}
