//! Tables, JSON and the formatting of values in command output.

#[allow(unused_imports)]
use super::*;

pub(crate) fn identity_row(v: &Value) -> Vec<String> {
    let creds: Vec<String> = v["credentials"]
        .as_array()
        .map(|a| a.iter().map(str_of).collect())
        .unwrap_or_default();
    vec![
        str_of(&v["id"]),
        str_of(&v["kind"]),
        str_of(&v["parent"]),
        if v["enabled"].as_bool().unwrap_or(false) {
            "yes"
        } else {
            "no"
        }
        .to_string(),
        if creds.is_empty() {
            "-".to_string()
        } else {
            creds.join(",")
        },
        str_of(&v["origin"]),
    ]
}

pub(crate) fn print_identity(v: &Value) {
    print_table(
        &["ID", "KIND", "PARENT", "ENABLED", "CREDENTIALS", "ORIGIN"],
        &[identity_row(v)],
    );
    for (label, key) in [("primary key", "sas_primary"), ("secondary key", "sas_secondary")] {
        if let Some(k) = v[key].as_str() {
            outln!("{label}: {k}");
        }
    }
    if let Some(t) = v["thumbprints"].as_array().filter(|a| !a.is_empty()) {
        let t: Vec<String> = t.iter().map(str_of).collect();
        outln!("thumbprints: {}", t.join(", "));
    }
}

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

pub(crate) fn read_plugin_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?
    } else {
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        serde_json::to_value(table)?
    };
    if !value.is_object() {
        bail!("{}: plugin config must be a table", path.display());
    }
    Ok(value)
}

/// The columns of [`plugin_row`].
pub(crate) const PLUGIN_HEADERS: &[&str] = &[
    "SLOT", "VERSION", "SOURCE", "LOADED", "CALLS", "TRAPS", "TIMEOUTS", "PREVIOUS",
];

/// A load, swap, reconfiguration or rollback: time, slot, action, old, new, source.
pub(crate) fn swap_row(r: &Value) -> Vec<String> {
    vec![
        format_time(r["at_unix_ms"].as_u64()),
        str_of(&r["slot"]),
        str_of(&r["action"]),
        short(&r["old"]),
        short(&r["new"]),
        str_of(&r["source"]),
    ]
}

pub(crate) fn plugin_row(p: &Value) -> Vec<String> {
    vec![
        str_of(&p["slot"]),
        short(&p["version"]),
        str_of(&p["source"]),
        format_time(p["loaded_at_unix_ms"].as_u64()),
        p["calls"].as_u64().unwrap_or(0).to_string(),
        p["traps"].as_u64().unwrap_or(0).to_string(),
        p["timeouts"].as_u64().unwrap_or(0).to_string(),
        short(&p["previous"]),
    ]
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
