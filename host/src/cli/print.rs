//! Tables, JSON and the formatting of values in command output.

use anyhow::Result;
use serde_json::Value;

use super::client::AdminClient;

/// A size from JSON as `1.5 MiB`, or `-`.
pub(crate) fn bytes_of(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_string(), human_bytes)
}

/// `1.5 MiB`-style sizes.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub(crate) fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => "-".to_string(),
    }
}

/// The first 12 hex digits of a version hash.
pub(crate) fn short(v: &Value) -> String {
    v.as_str()
        .map(|s| s.chars().take(12).collect())
        .unwrap_or_else(|| "-".to_string())
}

pub(crate) fn format_time(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "-".to_string() };
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = holdfast_model::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// GETs `path` and prints the array `key` of the answer as a table, or the
/// whole answer with `--json`.
pub(crate) fn print_list(
    client: &AdminClient,
    path: &str,
    json: bool,
    key: &str,
    headers: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> Result<()> {
    let v = client.get(path)?;
    if json {
        return print_json(&v);
    }
    print_table(headers, &rows_of(&v, key, row));
    Ok(())
}

/// One table row per element of the array `v[key]`.
pub(crate) fn rows_of(v: &Value, key: &str, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v[key]
        .as_array()
        .map(|a| a.iter().map(row).collect())
        .unwrap_or_default()
}

pub(crate) fn print_json(v: &Value) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        outln!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
