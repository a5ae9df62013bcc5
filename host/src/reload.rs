//! Applying a changed config file to a running node: SIGHUP,
//! `holdfast reload` and `POST /api/v1/reload`.
//!
//! What can change live is applied without dropping a connection: each plugin
//! slot's `config` (routes, rules, package sources, auth settings) by
//! re-initialising the running component with it, a slot's `file` by a
//! swap, the limits in [`LIVE_KEYS`], and `log.level`. Every other key that
//! differs from the running config is reported as needing a restart. A file
//! that does not parse or validate changes nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::{Config, SlotConfig};
use holdfast_broker::Broker;
use holdfast_cache::Cache;
use holdfast_deploy::Overlay;
use holdfast_link::rate::RateLimit;
use holdfast_outbox::Outbox;
use holdfast_plugins::{PluginHost, SlotName, embedded_plugin};

/// Keys besides plugin configs and files that a reload applies live (the
/// components compare them with what they run, so these are never reported
/// as needing a restart). `log.level` is applied unless `RUST_LOG` is set.
pub const LIVE_KEYS: &[&str] = holdfast_deploy::model::SETTINGS;

/// What a reload did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ReloadReport {
    /// The file read.
    pub path: String,
    /// Keys applied live.
    pub applied: Vec<String>,
    /// Keys that differ but need a restart.
    pub not_applied: Vec<String>,
    /// Keys whose live change failed (the old value stays), with the reason.
    pub failed: Vec<String>,
}

/// The running parts a reload changes live.
#[derive(Debug)]
pub struct Live {
    /// The plugin slots (their files and configs).
    pub plugins: Arc<PluginHost>,
    /// The MQTT broker's limits, when it runs.
    pub broker: Option<Arc<Broker>>,
    /// The outbox's limits.
    pub outbox: Arc<Outbox>,
    /// The range cache's limits, when it runs.
    pub cache: Option<Arc<Cache>>,
    /// The upstream byte-rate cap.
    pub link_rate: Arc<RateLimit>,
}

/// Keeps the config file's path, the file's config, the deployment
/// overlay on top of it, and the config as last applied (the two composed),
/// and applies changes to the running parts it was given.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    live: Live,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The file's config.
    base: Config,
    /// What the deployment in force sets.
    overlay: Option<Overlay>,
    /// The config in force.
    applied: Config,
}

impl Reloader {
    /// For a node started from `base` (from its `source_path`; without
    /// one, the embedded default, which cannot be reloaded), running
    /// `effective`: `base` with `overlay` on top; changes go to `live`.
    pub fn new(base: Config, overlay: Option<Overlay>, effective: Config, live: Live) -> Reloader {
        Reloader {
            path: base.source_path.clone(),
            live,
            inner: Mutex::new(Inner {
                base,
                overlay,
                applied: effective,
            }),
        }
    }

    /// Reads the file again and applies what can be applied live, with the
    /// deployment in force still on top.
    ///
    /// # Errors
    /// No file (embedded config), or the file does not load or validate;
    /// then nothing changes.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let Some(path) = &self.path else {
            return Err("the node runs on the embedded default config; there is no file to reload".into());
        };
        let new = Config::load(path).map_err(|e| format!("{}: {e}; nothing was changed", path.display()))?;
        let mut inner = holdfast_model::lock(&self.inner);
        let (effective, overlay_error) = match compose(&new, inner.overlay.as_ref()) {
            Ok(c) => (c, None),
            Err(e) => (new.clone(), Some(e)),
        };
        let mut report = apply(&self.live, &mut inner.applied, effective, &path.display().to_string());
        if let Some(e) = overlay_error {
            report
                .failed
                .push(format!("deployment: {e}; the file's values are in force"));
        }
        tracing::info!(
            applied = ?report.applied,
            not_applied = ?report.not_applied,
            failed = ?report.failed,
            "config reloaded from {}",
            report.path
        );
        inner.base = new;
        Ok(report)
    }

    /// True when the config file pins `key` against deployments.
    pub fn is_pinned(&self, key: &str) -> bool {
        holdfast_model::lock(&self.inner).base.deploy.is_pinned(key)
    }

    /// Puts `overlay` (a deployment; `None`: none) on top of the file's
    /// config and applies it live. When a key fails, what ran before is
    /// applied again and the error returned.
    ///
    /// # Errors
    /// The composed config does not validate, or a key fails to apply.
    pub fn apply_overlay(&self, overlay: Option<&Overlay>) -> Result<ReloadReport, String> {
        let mut inner = holdfast_model::lock(&self.inner);
        let effective = compose(&inner.base, overlay)?;
        let what = overlay.map_or("the config file".to_string(), |o| {
            format!("deployment {}", o.deployment)
        });
        let report = apply(&self.live, &mut inner.applied, effective, &what);
        tracing::info!(
            applied = ?report.applied,
            not_applied = ?report.not_applied,
            failed = ?report.failed,
            "config applied for {what}"
        );
        if report.failed.is_empty() {
            inner.overlay = overlay.cloned();
            return Ok(report);
        }
        // Put back what ran before.
        if let Ok(before) = compose(&inner.base, inner.overlay.clone().as_ref()) {
            let back = apply(&self.live, &mut inner.applied, before, "the previous config");
            if !back.failed.is_empty() {
                tracing::error!(failed = ?back.failed, "restoring the previous config failed");
            }
        }
        Err(report.failed.join("; "))
    }
}

/// The file's config `base` with `overlay` on top, except the keys
/// `deploy.pinned` names.
///
/// # Errors
/// The result does not load or validate.
pub fn compose(base: &Config, overlay: Option<&Overlay>) -> Result<Config, String> {
    let Some(overlay) = overlay else {
        return Ok(base.clone());
    };
    let pinned = |k: &str| base.deploy.is_pinned(k);
    let mut v = serde_json::to_value(base).map_err(|e| e.to_string())?;
    for (slot, s) in &overlay.plugins {
        if let Some(file) = &s.file
            && !pinned(&format!("plugins.{slot}.file"))
        {
            v["plugins"][slot.as_str()]["file"] = serde_json::json!(file);
        }
        if let Some(config) = &s.config
            && !pinned(&format!("plugins.{slot}.config"))
        {
            v["plugins"][slot.as_str()]["config"] = config.clone();
        }
    }
    for (key, value) in &overlay.settings {
        if pinned(key) {
            continue;
        }
        let Some((section, name)) = key.split_once('.') else {
            return Err(format!("{key}: not a setting"));
        };
        v[section][name] = value.clone();
    }
    strip_nulls(&mut v);
    let mut c: Config = serde_json::from_value(v).map_err(|e| format!("deployment {}: {e}", overlay.deployment))?;
    c.source_path = base.source_path.clone();
    c.validate()
        .map_err(|e| format!("deployment {}: {e}", overlay.deployment))?;
    Ok(c)
}

/// Absent is what `None` reads from (TOML has no null).
fn strip_nulls(v: &mut serde_json::Value) {
    if let Some(map) = v.as_object_mut() {
        map.retain(|_, x| !x.is_null());
        map.values_mut().for_each(strip_nulls);
    }
}

/// Applies what differs between `applied` (the config in force) and
/// `new`, live; reports the rest.
fn apply(live: &Live, applied: &mut Config, new: Config, path: &str) -> ReloadReport {
    let plugins = &live.plugins;
    let mut report = ReloadReport {
        path: path.to_string(),
        ..ReloadReport::default()
    };
    reload_slot(
        plugins,
        SlotName::Router,
        &mut applied.plugins.router,
        &new.plugins.router,
        &mut report,
    );
    reload_slot(
        plugins,
        SlotName::Auth,
        &mut applied.plugins.auth,
        &new.plugins.auth,
        &mut report,
    );
    reload_slot(
        plugins,
        SlotName::ContentSource,
        &mut applied.plugins.content_source,
        &new.plugins.content_source,
        &mut report,
    );
    // The limits: each component applies what differs from what it runs.
    if let Some(broker) = &live.broker {
        report.applied.extend(broker.apply_limits(&new.mqtt));
    }
    report.applied.extend(live.outbox.apply_limits(&new.outbox));
    if let Some(dead) = live.outbox.dead_letters() {
        match dead.apply_limits(&new.dead_letter) {
            Ok(changed) => report.applied.extend(changed),
            Err(e) => report
                .failed
                .push(format!("dead_letter: evicting under the new quota: {e}")),
        }
    }
    if let Some(cache) = &live.cache {
        report.applied.extend(cache.apply_limits(&new.cache));
    }
    if live.link_rate.set(new.upstream.max_bytes_per_second) {
        tracing::info!(
            bytes_per_second = new.upstream.max_bytes_per_second,
            "upstream byte-rate cap changed"
        );
        report.applied.push("upstream.max_bytes_per_second".into());
    }
    if applied.log.level != new.log.level && crate::logging::overridden() {
        // RUST_LOG rules the filter; the key is taken so it is not reported again.
        applied.log.level = new.log.level.clone();
        report
            .not_applied
            .push("log.level (RUST_LOG is set and overrides it)".into());
    } else if applied.log.level != new.log.level {
        match crate::logging::set_level(&new.log.level) {
            Ok(()) => {
                applied.log.level = new.log.level.clone();
                report.applied.push("log.level".into());
            }
            Err(e) => report.failed.push(format!("log.level: {e}")),
        }
    }
    // Everything else: report the keys that differ.
    let (old_v, new_v) = (
        serde_json::to_value(&*applied).unwrap_or_default(),
        serde_json::to_value(&new).unwrap_or_default(),
    );
    let mut differs = Vec::new();
    diff_keys("", &old_v, &new_v, 2, &mut differs);
    // The slots' own keys were handled above.
    let slots: Vec<String> = SlotName::ALL
        .iter()
        .map(|s| format!("plugins.{}", s.as_str()))
        .collect();
    for key in differs {
        if slots.iter().any(|s| key.starts_with(s.as_str())) {
            continue;
        }
        if !LIVE_KEYS.contains(&key.as_str()) {
            report.not_applied.push(key);
            continue;
        }
        let reported = |list: &[String]| list.iter().any(|k| k == &key || k.starts_with(&format!("{key} ")));
        if reported(&report.applied) || reported(&report.failed) {
            continue;
        }
        // A live key whose change is not in force: say why.
        let why = if key.starts_with("mqtt.") && live.broker.is_none() {
            "the MQTT broker is not running"
        } else if key.starts_with("cache.") && live.cache.is_none() {
            "the cache is not running"
        } else if key == "cache.max_size" {
            "the value in force is unchanged: cache.max_size is at least one block"
        } else {
            "the value in force is unchanged"
        };
        report.not_applied.push(format!("{key} ({why})"));
    }
    applied.adopt_live(&new);
    report.not_applied.sort();
    report.not_applied.dedup();
    report
}

/// Applies one slot's `file` and `config`; reports its other keys.
fn reload_slot<P: Serialize + PartialEq>(
    plugins: &PluginHost,
    slot: SlotName,
    old: &mut SlotConfig<P>,
    new: &SlotConfig<P>,
    report: &mut ReloadReport,
) {
    let name = format!("plugins.{}", slot.as_str());
    if old.file != new.file {
        let loaded = match &new.file {
            Some(p) => std::fs::read(p)
                .map(|b| (b, p.display().to_string()))
                .map_err(|e| format!("{}: {e}", p.display())),
            None => Ok((embedded_plugin(slot).to_vec(), "embedded".to_string())),
        };
        match loaded.and_then(|(bytes, source)| {
            plugins
                .swap(slot, &bytes, source, Some(new.config_json()))
                .map_err(|e| e.to_string())
        }) {
            Ok(_) => {
                old.file = new.file.clone();
                old.config = new.config.clone();
                report.applied.push(format!("{name}.file"));
            }
            Err(e) => report.failed.push(format!("{name}.file: {e}")),
        }
    } else if old.config != new.config {
        match plugins.reconfigure(slot, new.config_json()) {
            Ok(_) => {
                old.config = new.config.clone();
                report.applied.push(format!("{name}.config"));
            }
            Err(e) => report.failed.push(format!("{name}.config: {e}")),
        }
    }
    for (key, differs) in [
        ("deadline_ms", old.deadline_ms != new.deadline_ms),
        ("memory_mib", old.memory_mib != new.memory_mib),
        ("pool_size", old.pool_size != new.pool_size),
        ("on_failure", old.on_failure != new.on_failure),
    ] {
        if differs {
            report.not_applied.push(format!("{name}.{key}"));
        }
    }
}

/// Dotted paths, down to `depth` levels, where two JSON values differ.
fn diff_keys(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, depth: usize, out: &mut Vec<String>) {
    if a == b {
        return;
    }
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) if depth > 0 => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = serde_json::Value::Null;
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                diff_keys(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), depth - 1, out);
            }
        }
        _ => out.push(if prefix.is_empty() {
            "(root)".into()
        } else {
            prefix.to_string()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `base` with every number in `[mqtt]`, `[outbox]`, `[cache]`, `[upstream]` and `[dead_letter]` plus
    /// one, and `when_full` turned round.
    fn everything_changed(base: &Config) -> Config {
        let mut v = serde_json::to_value(base).unwrap();
        for section in ["mqtt", "outbox", "cache", "upstream", "dead_letter"] {
            for (_, value) in v[section].as_object_mut().unwrap() {
                if let Some(n) = value.as_u64() {
                    *value = serde_json::json!(n + 1);
                }
            }
        }
        v["outbox"]["when_full"] = serde_json::json!("drop-oldest");
        // Absent is what `None` reads from (TOML has no null).
        fn strip_nulls(v: &mut serde_json::Value) {
            if let Some(map) = v.as_object_mut() {
                map.retain(|_, x| !x.is_null());
                map.values_mut().for_each(strip_nulls);
            }
        }
        strip_nulls(&mut v);
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_live_keys_are_exactly_those_adopted() {
        let base = Config::default();
        let new = everything_changed(&base);
        let mut adopted = base.clone();
        adopted.adopt_live(&new);
        let mut taken = Vec::new();
        diff_keys(
            "",
            &serde_json::to_value(&base).unwrap(),
            &serde_json::to_value(&adopted).unwrap(),
            2,
            &mut taken,
        );
        let mut live: Vec<String> = LIVE_KEYS
            .iter()
            .filter(|k| **k != "log.level")
            .map(|k| k.to_string())
            .collect();
        taken.sort();
        live.sort();
        assert_eq!(taken, live);
    }

    #[test]
    fn a_deployment_overlays_the_file_except_pinned_keys() {
        let mut base = Config::default();
        base.deploy.pinned = vec!["plugins.router".into(), "outbox.when_full".into()];
        let overlay = Overlay {
            deployment: "d1".into(),
            plugins: [
                (
                    "router".to_string(),
                    holdfast_deploy::SlotOverlay {
                        file: Some("/blobs/aa".into()),
                        sha256: Some("aa".into()),
                        config: Some(serde_json::json!({"default_lane": 2})),
                    },
                ),
                (
                    "auth".to_string(),
                    holdfast_deploy::SlotOverlay {
                        config: Some(serde_json::json!({"allow_anonymous": false})),
                        ..Default::default()
                    },
                ),
            ]
            .into(),
            settings: [
                ("outbox.when_full".to_string(), serde_json::json!("drop-oldest")),
                ("outbox.default_ttl_seconds".to_string(), serde_json::json!(60)),
            ]
            .into(),
        };
        let c = compose(&base, Some(&overlay)).unwrap();
        assert_eq!(c.plugins.router.file, base.plugins.router.file, "pinned slot");
        assert_eq!(c.plugins.router.config, base.plugins.router.config, "pinned slot");
        assert_eq!(c.plugins.auth.config["allow_anonymous"], toml::Value::Boolean(false));
        assert_eq!(c.outbox.when_full, base.outbox.when_full, "pinned setting");
        assert_eq!(c.outbox.default_ttl_seconds, 60);
        // A value the config refuses makes the whole overlay fail.
        let mut bad = overlay.clone();
        bad.settings
            .insert("outbox.default_ttl_seconds".into(), serde_json::json!("soon"));
        assert!(compose(&base, Some(&bad)).is_err());
        assert_eq!(
            compose(&base, None).unwrap().outbox.default_ttl_seconds,
            base.outbox.default_ttl_seconds
        );
    }

    #[test]
    fn differing_keys_are_named() {
        let a = serde_json::json!({"cache": {"max_size": 1, "listen": "x"}, "mqtt": {"tcp": {"listen": "a"}}});
        let b = serde_json::json!({"cache": {"max_size": 2, "listen": "x"}, "mqtt": {"tcp": {"listen": "b"}}});
        let mut out = Vec::new();
        diff_keys("", &a, &b, 2, &mut out);
        assert_eq!(out, ["cache.max_size", "mqtt.tcp"]);
    }
}
