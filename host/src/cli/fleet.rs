//! `holdfast fleet`: every node of the subtree of a running node, as a
//! table in tree order; `--watch` redraws it; `fleet forget` removes a node
//! that stopped reporting.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::Value;

use super::client::{AdminClient, segment};
use super::ops::human_ms;
use super::print::{bytes_of, format_time, print_json, print_table, str_of};

/// What to show.
#[derive(Debug, Default)]
pub struct Query {
    /// States (comma-separated or repeated).
    pub states: Vec<String>,
    /// `key=value` labels every node carries.
    pub labels: Vec<String>,
    /// Only this node and those under it.
    pub subtree: Option<String>,
    /// Nodes whose id contains this.
    pub search: Option<String>,
}

impl Query {
    fn path(&self) -> String {
        let mut q: Vec<String> = Vec::new();
        if !self.states.is_empty() {
            q.push(format!("state={}", segment(&self.states.join(","))));
        }
        if !self.labels.is_empty() {
            q.push(format!("label={}", segment(&self.labels.join(","))));
        }
        if let Some(s) = &self.subtree {
            q.push(format!("subtree={}", segment(s)));
        }
        if let Some(s) = &self.search {
            q.push(format!("q={}", segment(s)));
        }
        if q.is_empty() {
            "/api/v1/fleet".to_string()
        } else {
            format!("/api/v1/fleet?{}", q.join("&"))
        }
    }
}

/// `holdfast fleet [--watch SECS]`.
///
/// # Errors
/// The node cannot be reached or refuses the query.
pub fn fleet(client: &AdminClient, query: &Query, watch: Option<u64>, json: bool) -> Result<()> {
    let path = query.path();
    let Some(secs) = watch else {
        let v = client.get(&path)?;
        if json {
            return print_json(&v);
        }
        print_fleet(&v);
        return Ok(());
    };
    if secs == 0 {
        bail!("--watch takes a number of seconds of at least 1");
    }
    let tty = std::io::stdout().is_terminal();
    loop {
        let v = client.get(&path)?;
        if json {
            print_json(&v)?;
        } else {
            if tty {
                // Clear the screen and go home, then draw again.
                outln!("\x1b[2J\x1b[H");
            }
            outln!("{} — every {secs} s, Ctrl-C to stop", format_time(v["now_ms"].as_u64()));
            print_fleet(&v);
        }
        std::thread::sleep(Duration::from_secs(secs));
    }
}

/// The summary line and the table.
fn print_fleet(v: &Value) {
    let by_state = v["summary"]["by_state"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| format!("{} {k}", str_of(n)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    outln!(
        "fleet of {}: {} nodes ({by_state})",
        str_of(&v["node"]),
        str_of(&v["summary"]["nodes"])
    );
    let now = v["now_ms"].as_u64().unwrap_or(0);
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .map(|a| a.iter().map(|n| row(n, now)).collect())
        .unwrap_or_default();
    print_table(
        &[
            "NODE",
            "STATE",
            "LINK",
            "CONTACT",
            "BACKLOG",
            "OLDEST",
            "DRAIN",
            "TO DRAIN",
            "C2D",
            "CLIENTS",
            "OUTBOX",
            "DEPLOYMENT",
            "VERSION",
        ],
        &rows,
    );
}

fn row(n: &Value, now: u64) -> Vec<String> {
    let depth = n["depth"].as_u64().unwrap_or(0) as usize;
    let ago = |ms: Option<u64>| ms.map_or_else(|| "-".to_string(), |t| human_ms(Some(now.saturating_sub(t))));
    let contact = if n["reporting"].as_bool() == Some(true) {
        "now".to_string()
    } else {
        format!("{} ago", ago(n["last_contact_ms"].as_u64()))
    };
    let link = match n["link"].as_str() {
        // What it said last, not what it is now.
        Some(l) if n["reporting"].as_bool() != Some(true) && !l.is_empty() => format!("was {l}"),
        Some("root") => "root".to_string(),
        Some(l) if !l.is_empty() => format!("{l} {}", ago(n["link_since_ms"].as_u64())),
        _ => "-".to_string(),
    };
    let messages = n["backlog_messages"].as_u64().unwrap_or(0);
    vec![
        format!("{}{}", "  ".repeat(depth), str_of(&n["node"])),
        str_of(&n["state"]),
        link,
        contact,
        if messages == 0 {
            "0".to_string()
        } else {
            format!("{messages} ({})", bytes_of(&n["backlog_bytes"]))
        },
        human_ms(n["oldest_age_s"].as_u64().map(|s| s * 1000)),
        format!("{}/s", n["drain_per_s"].as_u64().unwrap_or(0)),
        human_ms(n["time_to_drain_s"].as_u64().map(|s| s * 1000)),
        str_of(&n["c2d_queued"]),
        str_of(&n["clients"]),
        format!("{} of {}", bytes_of(&n["outbox_bytes"]), bytes_of(&n["quota_bytes"])),
        n["deployment"].as_str().unwrap_or("-").to_string(),
        str_of(&n["version"]),
    ]
}

/// `holdfast fleet forget NODE`.
///
/// # Errors
/// The node is unknown here or still reports.
pub fn forget(client: &AdminClient, node: &str, json: bool) -> Result<()> {
    let v = client.delete(&format!("/api/v1/fleet/{}", segment(node)))?;
    if json {
        return print_json(&v);
    }
    outln!("forgot {node}: gone from this node's fleet view, and from its ancestors' once the change goes up");
    Ok(())
}
