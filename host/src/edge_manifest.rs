//! IoT Edge deployment manifests, mapped to Holdfast settings
//! (`holdfast import edge-manifest`, `holdfast deploy create
//! --from-edge-manifest`). See docs/migrating.md.
//!
//! What maps:
//! - `$edgeHub.properties.desired.routes` (schema 1.0: name → route
//!   string; 1.1 and 1.2: name → string or `{route, priority,
//!   timeToLiveSecs}`) → the default router's route table: `priority` →
//!   the outbox lane, `timeToLiveSecs` → `ttl_seconds`. A route without a
//!   priority gets lane 9, the lowest, as IoT Edge gives it the lowest
//!   priority. Every route is checked with the router's own parser; one that
//!   does not parse is an error naming it.
//! - IoT Edge's drop-when-no-route behaviour → `default_upstream = false`,
//!   `local_by_default = false`.
//! - `storeAndForwardConfiguration.timeToLiveSecs` →
//!   `outbox.default_ttl_seconds`.
//! - the Connected Cache module's environment → content-source sources
//!   (`CACHEABLE_CUSTOM_n_HOST` / `_CANONICAL`), `cache.max_size` (the sum
//!   of `STORAGE_n_SIZE_GB`), `cache.parent` (`UPSTREAM_HOST`), and from
//!   its create options the host port of its port 80 (`cache.listen`) and
//!   its first bind (`cache.dir`).
//!
//! Everything else is listed in [`Mapped::not_mapped`] with the reason.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// One field left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotMapped {
    /// Where in the manifest, e.g. `$edgeAgent.modules.tempSensor`.
    pub path: String,
    /// Why, and what to do instead.
    pub reason: String,
}

/// A route as mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRoute {
    /// The route text, as it was.
    pub route: String,
    /// The outbox lane.
    pub priority: u8,
    /// Its time-to-live upstream, if given.
    pub ttl_seconds: Option<u32>,
}

/// A content source from the Connected Cache module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedSource {
    /// Its name (the canonical name).
    pub name: String,
    /// The names clients use.
    pub hosts: Vec<String>,
    /// Where content comes from.
    pub origin: String,
}

/// What a manifest maps to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapped {
    /// The edgeHub schema version.
    pub schema: String,
    /// Routes by name.
    pub routes: BTreeMap<String, MappedRoute>,
    /// `outbox.default_ttl_seconds`.
    pub outbox_ttl_seconds: Option<u64>,
    /// The Connected Cache module's name, if there is one.
    pub cache_module: Option<String>,
    /// `cache.max_size`, bytes.
    pub cache_max_size: Option<u64>,
    /// `cache.parent`.
    pub cache_parent: Option<String>,
    /// `cache.listen`.
    pub cache_listen: Option<String>,
    /// `cache.dir`.
    pub cache_dir: Option<String>,
    /// Content sources.
    pub sources: Vec<MappedSource>,
    /// Mapped, with something to know.
    pub notes: Vec<String>,
    /// Left out.
    pub not_mapped: Vec<NotMapped>,
}

/// Why a manifest cannot be mapped.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not the shape of a deployment manifest.
    #[error("not an IoT Edge deployment manifest: {0}")]
    Shape(String),
    /// A route that the route language does not take.
    #[error("route {name:?}: {reason}")]
    Route {
        /// The route's name.
        name: String,
        /// What is wrong (with the column).
        reason: String,
    },
    /// A value of the wrong type or range.
    #[error("{path}: {reason}")]
    Value {
        /// Where.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

fn bad(path: &str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Value {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// The `modulesContent` object, at the top or under `content`.
fn modules_content(manifest: &Value) -> Result<&Map<String, Value>, ManifestError> {
    manifest
        .get("modulesContent")
        .or_else(|| manifest.get("content").and_then(|c| c.get("modulesContent")))
        .and_then(Value::as_object)
        .ok_or_else(|| ManifestError::Shape("no modulesContent (nor content.modulesContent)".into()))
}

/// Maps a manifest.
///
/// # Errors
/// Not a manifest, an unknown edgeHub schema version, a route that does not
/// parse, or a value of the wrong type.
pub fn map(manifest: &Value) -> Result<Mapped, ManifestError> {
    let content = modules_content(manifest)?;
    let mut m = Mapped::default();
    let hub = content
        .get("$edgeHub")
        .and_then(Value::as_object)
        .ok_or_else(|| ManifestError::Shape("no $edgeHub".into()))?;
    map_hub(hub, &mut m)?;
    if let Some(agent) = content.get("$edgeAgent").and_then(Value::as_object) {
        map_agent(agent, &mut m)?;
    } else {
        m.notes
            .push("no $edgeAgent: no modules, so no Connected Cache settings".into());
    }
    for (name, v) in content {
        if name.starts_with('$') {
            if name != "$edgeHub" && name != "$edgeAgent" {
                m.not_mapped.push(NotMapped {
                    path: name.clone(),
                    reason: "unknown system module".into(),
                });
            }
            continue;
        }
        let desired = v
            .get("properties.desired")
            .map(Value::to_string)
            .unwrap_or_else(|| "{}".into());
        m.not_mapped.push(NotMapped {
            path: format!("{name}.properties.desired"),
            reason: format!(
                "module {name}'s twin: once the module's identity exists, set it with `holdfast twin set-desired <gateway>/{name} '{}'`",
                abbreviate(&desired, 120)
            ),
        });
    }
    check_router(&m)?;
    Ok(m)
}

fn abbreviate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// `$edgeHub`: routes, store and forward, and what else it holds.
fn map_hub(hub: &Map<String, Value>, m: &mut Mapped) -> Result<(), ManifestError> {
    // The desired properties, whole or as layered keys (`properties.desired.routes.x`).
    let mut desired: Map<String, Value> = Map::new();
    for (k, v) in hub {
        if k == "properties.desired" {
            let obj = v
                .as_object()
                .ok_or_else(|| bad("$edgeHub.properties.desired", "expected an object"))?;
            desired.extend(obj.clone());
        } else if let Some(rest) = k.strip_prefix("properties.desired.") {
            if let Some(route) = rest.strip_prefix("routes.") {
                let routes = desired.entry("routes").or_insert_with(|| Value::Object(Map::new()));
                if let Some(r) = routes.as_object_mut() {
                    r.insert(route.to_string(), v.clone());
                }
            } else {
                desired.insert(rest.to_string(), v.clone());
            }
        } else {
            m.not_mapped.push(NotMapped {
                path: format!("$edgeHub.{k}"),
                reason: "not a desired property".into(),
            });
        }
    }
    m.schema = match desired.get("schemaVersion") {
        None => "1.0".to_string(),
        Some(Value::String(s)) if ["1.0", "1.1", "1.2"].contains(&s.as_str()) => s.clone(),
        Some(other) => {
            return Err(bad(
                "$edgeHub.schemaVersion",
                format!("{other}: this import knows the edgeHub schemas 1.0, 1.1 and 1.2"),
            ));
        }
    };
    for (k, v) in &desired {
        match k.as_str() {
            "schemaVersion" => {}
            "routes" => {
                let routes = v.as_object().ok_or_else(|| bad("$edgeHub.routes", "expected an object"))?;
                for (name, r) in routes {
                    map_route(name, r, m)?;
                }
            }
            "storeAndForwardConfiguration" => {
                let obj = v
                    .as_object()
                    .ok_or_else(|| bad("$edgeHub.storeAndForwardConfiguration", "expected an object"))?;
                for (sk, sv) in obj {
                    if sk == "timeToLiveSecs" {
                        let ttl = sv.as_u64().filter(|t| *t > 0).ok_or_else(|| {
                            bad(
                                "$edgeHub.storeAndForwardConfiguration.timeToLiveSecs",
                                "expected a positive number of seconds",
                            )
                        })?;
                        m.outbox_ttl_seconds = Some(ttl);
                    } else {
                        m.not_mapped.push(NotMapped {
                            path: format!("$edgeHub.storeAndForwardConfiguration.{sk}"),
                            reason: "no equivalent; the outbox's limits are [outbox] max_bytes and max_messages".into(),
                        });
                    }
                }
            }
            "mqttBroker" => m.not_mapped.push(NotMapped {
                path: "$edgeHub.mqttBroker".into(),
                reason: "edgeHub's MQTT broker authorizations and bridges: Holdfast's auth plugin decides who may publish and subscribe (docs/plugins.md), and an MQTT upstream is [upstream] kind = \"mqtt\"".into(),
            }),
            other => m.not_mapped.push(NotMapped {
                path: format!("$edgeHub.{other}"),
                reason: "an edgeHub desired property with no equivalent".into(),
            }),
        }
    }
    if m.routes.is_empty() {
        m.notes.push(
            "no routes: with IoT Edge's behaviour (drop what no route takes) nothing goes upstream until routes are added".into(),
        );
    }
    Ok(())
}

fn map_route(name: &str, r: &Value, m: &mut Mapped) -> Result<(), ManifestError> {
    let route_err = |reason: String| ManifestError::Route {
        name: name.to_string(),
        reason,
    };
    let (text, priority, ttl) = match r {
        Value::String(s) => (s.clone(), None, None),
        Value::Object(o) => {
            if m.schema == "1.0" {
                m.notes.push(format!(
                    "route {name} is an object, which edgeHub takes from schema 1.1 on (the manifest says 1.0); mapped as 1.1"
                ));
            }
            let text = o
                .get("route")
                .and_then(Value::as_str)
                .ok_or_else(|| route_err("an object route needs \"route\", a string".into()))?
                .to_string();
            let priority = match o.get("priority") {
                None | Some(Value::Null) => None,
                Some(p) => Some(
                    p.as_u64()
                        .filter(|p| *p <= 9)
                        .ok_or_else(|| route_err(format!("priority {p}: expected 0-9")))? as u8,
                ),
            };
            let ttl = match o.get("timeToLiveSecs") {
                None | Some(Value::Null) => None,
                Some(t) => Some(
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .filter(|t| *t > 0)
                        .ok_or_else(|| route_err(format!("timeToLiveSecs {t}: expected 1-4294967295")))?,
                ),
            };
            for k in o
                .keys()
                .filter(|k| !["route", "priority", "timeToLiveSecs"].contains(&k.as_str()))
            {
                m.not_mapped.push(NotMapped {
                    path: format!("$edgeHub.routes.{name}.{k}"),
                    reason: "an unknown route field".into(),
                });
            }
            (text, priority, ttl)
        }
        other => return Err(route_err(format!("expected a string or an object, found {other}"))),
    };
    holdfast_plugin_router::route::parse(&text).map_err(|e| route_err(format!("{e}: {text}")))?;
    m.routes.insert(
        name.to_string(),
        MappedRoute {
            route: text,
            // No priority: the lowest, as in IoT Edge.
            priority: priority.unwrap_or(9),
            ttl_seconds: ttl,
        },
    );
    Ok(())
}

/// `$edgeAgent`: the modules, the Connected Cache module among them.
fn map_agent(agent: &Map<String, Value>, m: &mut Mapped) -> Result<(), ManifestError> {
    let Some(desired) = agent.get("properties.desired").and_then(Value::as_object) else {
        m.not_mapped.push(NotMapped {
            path: "$edgeAgent".into(),
            reason: "no properties.desired (a layered deployment's $edgeAgent keys are not read)".into(),
        });
        return Ok(());
    };
    for (k, v) in desired {
        match k.as_str() {
            "schemaVersion" => {}
            "runtime" => m.not_mapped.push(NotMapped {
                path: "$edgeAgent.runtime".into(),
                reason: "the container runtime's settings (registry credentials, Docker options): Holdfast runs no containers".into(),
            }),
            "systemModules" => {
                for (name, module) in v.as_object().into_iter().flatten() {
                    let reason = if name == "edgeHub" {
                        format!(
                            "edgeHub itself: Holdfast takes its place. Its listeners are [mqtt] (1883; 8883 with [mqtt.tls] and a server certificate; MQTT over WebSockets with [mqtt.ws] and [mqtt.wss]); AMQP is not served.{}",
                            create_options_summary(module)
                        )
                    } else {
                        "edgeAgent: Holdfast is one process and needs no agent; run it under systemd (docs/operator-guide.md)".into()
                    };
                    m.not_mapped.push(NotMapped {
                        path: format!("$edgeAgent.systemModules.{name}"),
                        reason,
                    });
                }
            }
            "modules" => {
                for (name, module) in v.as_object().into_iter().flatten() {
                    if is_connected_cache(module) {
                        if let Some(first) = &m.cache_module {
                            m.not_mapped.push(NotMapped {
                                path: format!("$edgeAgent.modules.{name}"),
                                reason: format!("a second Connected Cache module; {first} was mapped"),
                            });
                            continue;
                        }
                        m.cache_module = Some(name.clone());
                        map_cache(name, module, m)?;
                    } else {
                        let image = module
                            .pointer("/settings/image")
                            .and_then(Value::as_str)
                            .unwrap_or("no image");
                        m.not_mapped.push(NotMapped {
                            path: format!("$edgeAgent.modules.{name}"),
                            reason: format!(
                                "custom module ({image}): Holdfast runs no containers. Run it beside Holdfast as an MQTT client with its module identity (devices/<gateway>/modules/{name}), or under IoT Edge's agent; its routes above work as they are.{}",
                                create_options_summary(module)
                            ),
                        });
                    }
                }
            }
            other => m.not_mapped.push(NotMapped {
                path: format!("$edgeAgent.{other}"),
                reason: "an edgeAgent setting with no equivalent".into(),
            }),
        }
    }
    Ok(())
}

/// The Connected Cache module: its image, or its identity variables.
fn is_connected_cache(module: &Value) -> bool {
    let image = module.pointer("/settings/image").and_then(Value::as_str).unwrap_or("");
    let env = module.get("env");
    image.contains("/mcc/")
        || (env.and_then(|e| e.get("CUSTOMER_ID")).is_some() && env.and_then(|e| e.get("CACHE_NODE_ID")).is_some())
}

/// An env entry's value (`{"value": …}`, or a plain value).
fn env_value(v: &Value) -> Option<String> {
    match v.get("value").unwrap_or(v) {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The module's create options, parsed (a JSON string, possibly split over
/// `createOptions01`, `createOptions02`, … as IoT Edge allows).
fn create_options(module: &Value) -> Option<Value> {
    let settings = module.get("settings")?.as_object()?;
    let mut text = settings
        .get("createOptions")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    for i in 1..=8 {
        if let Some(more) = settings.get(&format!("createOptions{i:02}")).and_then(Value::as_str) {
            text.push_str(more);
        }
    }
    if text.is_empty() {
        return None;
    }
    serde_json::from_str(&text).ok()
}

fn create_options_summary(module: &Value) -> String {
    match create_options(module) {
        Some(o) => {
            let ports: Vec<String> = o
                .pointer("/HostConfig/PortBindings")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default();
            if ports.is_empty() {
                " Its createOptions are not mapped.".into()
            } else {
                format!(" Its createOptions (ports {}) are not mapped.", ports.join(", "))
            }
        }
        None => String::new(),
    }
}

fn map_cache(name: &str, module: &Value, m: &mut Mapped) -> Result<(), ManifestError> {
    let path = |k: &str| format!("$edgeAgent.modules.{name}.env.{k}");
    let mut hosts: BTreeMap<u32, (Option<String>, Option<String>)> = BTreeMap::new();
    let mut storage_gb: u64 = 0;
    for (k, v) in module.get("env").and_then(Value::as_object).into_iter().flatten() {
        let value = env_value(v).ok_or_else(|| bad(&path(k), "expected {\"value\": …}"))?;
        if let Some(n) = k
            .strip_prefix("STORAGE_")
            .and_then(|r| r.strip_suffix("_SIZE_GB"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            let _ = n;
            storage_gb += value
                .trim()
                .parse::<u64>()
                .map_err(|_| bad(&path(k), format!("{value:?}: expected a whole number of GB")))?;
        } else if let Some(rest) = k.strip_prefix("CACHEABLE_CUSTOM_") {
            let (n, which) = rest
                .split_once('_')
                .and_then(|(n, w)| Some((n.parse::<u32>().ok()?, w)))
                .ok_or_else(|| bad(&path(k), "expected CACHEABLE_CUSTOM_<n>_HOST or _CANONICAL"))?;
            let e = hosts.entry(n).or_default();
            match which {
                "HOST" => e.0 = Some(value),
                "CANONICAL" => e.1 = Some(value),
                _ => {
                    return Err(bad(&path(k), "expected CACHEABLE_CUSTOM_<n>_HOST or _CANONICAL"));
                }
            }
        } else {
            match k.as_str() {
                "UPSTREAM_HOST" => {
                    m.cache_parent = Some(format!("http://{}", value.trim()));
                    m.notes.push(format!(
                        "UPSTREAM_HOST {value}: cache.parent = http://{value} (port 80, where Connected Cache listens); once the parent runs Holdfast, use its cache.listen port",
                    ));
                }
                "CUSTOMER_ID" | "CACHE_NODE_ID" | "CUSTOMER_KEY" => m.not_mapped.push(NotMapped {
                    path: path(k),
                    reason: "the cache node's registration with Microsoft's service: Holdfast's cache needs none".into(),
                }),
                "IS_SUMMARY_PUBLIC" | "IS_SUMMARY_ACCESS_UNRESTRICTED" => m.not_mapped.push(NotMapped {
                    path: path(k),
                    reason: "the summary page: Holdfast's cache figures are on the status page and /metrics (admin listener)".into(),
                }),
                "UPSTREAM_PROXY" => m.not_mapped.push(NotMapped {
                    path: path(k),
                    reason: "an outbound proxy: the cache fetches origins directly or through cache.parent".into(),
                }),
                _ => m.not_mapped.push(NotMapped {
                    path: path(k),
                    reason: "a Connected Cache variable this import does not know".into(),
                }),
            }
        }
    }
    if storage_gb > 0 {
        m.cache_max_size = Some(storage_gb * 1_000_000_000);
    }
    for (n, (host, canonical)) in hosts {
        let (host, canonical) = match (host, canonical) {
            (Some(h), Some(c)) => (h, c),
            (Some(h), None) => (h.clone(), h),
            (None, Some(c)) => {
                return Err(bad(
                    &path(&format!("CACHEABLE_CUSTOM_{n}_CANONICAL")),
                    format!("{c}: no CACHEABLE_CUSTOM_{n}_HOST to go with it"),
                ));
            }
            (None, None) => continue,
        };
        let mut names = vec![canonical.clone()];
        if host != canonical {
            names.push(host.clone());
        }
        let name: String = canonical
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
            .collect();
        m.sources.push(MappedSource {
            name,
            hosts: names,
            origin: format!("http://{host}"),
        });
    }
    if let Some(o) = create_options(module) {
        if let Some(bindings) = o.pointer("/HostConfig/PortBindings").and_then(Value::as_object) {
            for (port, b) in bindings {
                let host_port = b.pointer("/0/HostPort").and_then(Value::as_str).unwrap_or("");
                if port == "80/tcp" && !host_port.is_empty() {
                    m.cache_listen = Some(format!("0.0.0.0:{host_port}"));
                } else {
                    m.not_mapped.push(NotMapped {
                        path: format!(
                            "$edgeAgent.modules.{name}.settings.createOptions.HostConfig.PortBindings.{port}"
                        ),
                        reason: "Holdfast's cache serves one port, cache.listen".into(),
                    });
                }
            }
        }
        if let Some(bind) = o.pointer("/HostConfig/Binds/0").and_then(Value::as_str)
            && let Some((host_dir, _)) = bind.split_once(':')
        {
            m.cache_dir = Some(host_dir.to_string());
            m.notes.push(format!(
                "cache.dir = {host_dir} (the module's first bind); Holdfast stores blocks in its own layout, so what Connected Cache stored there is not reused: point it at an empty directory or let it be emptied"
            ));
        }
    }
    Ok(())
}

/// The router config the routes make, as JSON (what the router plugin takes).
pub fn router_config(m: &Mapped) -> Value {
    let routes: Map<String, Value> = m
        .routes
        .iter()
        .map(|(name, r)| {
            let mut t = Map::new();
            t.insert("route".into(), Value::String(r.route.clone()));
            t.insert("priority".into(), Value::from(r.priority));
            if let Some(ttl) = r.ttl_seconds {
                t.insert("ttl_seconds".into(), Value::from(ttl));
            }
            (name.clone(), Value::Object(t))
        })
        .collect();
    serde_json::json!({
        "default_upstream": false,
        "local_by_default": false,
        "default_lane": 9,
        "routes": routes,
    })
}

/// The content-source config the sources make (JSON), if there are any.
pub fn content_source_config(m: &Mapped) -> Option<Value> {
    if m.sources.is_empty() {
        return None;
    }
    let sources: Vec<Value> = m
        .sources
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "hosts": s.hosts,
                "origin": s.origin,
                "other": "revalidate",
            })
        })
        .collect();
    Some(serde_json::json!({ "sources": sources }))
}

/// Checks the router config with the default router itself.
fn check_router(m: &Mapped) -> Result<(), ManifestError> {
    use holdfast_sdk::router::Router as _;
    let config = holdfast_sdk::Config::from_value(router_config(m));
    holdfast_plugin_router::DefaultRouter::init(&config).map_err(|e| bad("routes", e))?;
    Ok(())
}

/// A TOML string literal.
fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The Holdfast config, as an annotated TOML file: the mapped settings, and
/// what was left out as comments.
pub fn to_toml(m: &Mapped, from: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# Made by `holdfast import edge-manifest` from {from}\n# (edgeHub schema {}). See docs/migrating.md.\n",
        m.schema
    ));
    out.push_str("# Merge these sections into the node's config; run `holdfast config check` on the result.\n\n");
    if let Some(ttl) = m.outbox_ttl_seconds {
        out.push_str("[outbox]\n# storeAndForwardConfiguration.timeToLiveSecs\n");
        out.push_str(&format!("default_ttl_seconds = {ttl}\n\n"));
    }
    out.push_str("[plugins.router.config]\n# IoT Edge drops what no route takes.\ndefault_upstream = false\nlocal_by_default = false\n");
    out.push_str("# A route without a priority has the lowest, as in IoT Edge.\ndefault_lane = 9\n\n");
    out.push_str("[plugins.router.config.routes]\n");
    for (name, r) in &m.routes {
        let mut fields = vec![format!("route = {}", q(&r.route)), format!("priority = {}", r.priority)];
        if let Some(ttl) = r.ttl_seconds {
            fields.push(format!("ttl_seconds = {ttl}"));
        }
        let key = if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            name.clone()
        } else {
            q(name)
        };
        out.push_str(&format!("{key} = {{ {} }}\n", fields.join(", ")));
    }
    if let Some(module) = &m.cache_module {
        out.push_str(&format!("\n# From the Connected Cache module {module}.\n[cache]\n"));
        if let Some(l) = &m.cache_listen {
            out.push_str(&format!("listen = {}\n", q(l)));
        }
        if let Some(size) = m.cache_max_size {
            out.push_str(&format!("max_size = {size}   # STORAGE_*_SIZE_GB\n"));
        }
        if let Some(p) = &m.cache_parent {
            out.push_str(&format!("parent = {}   # UPSTREAM_HOST\n", q(p)));
        }
        if let Some(d) = &m.cache_dir {
            out.push_str(&format!("dir = {}\n", q(d)));
        }
        for s in &m.sources {
            out.push_str("\n[[plugins.content-source.config.sources]]\n");
            out.push_str(&format!("name = {}\n", q(&s.name)));
            let hosts: Vec<String> = s.hosts.iter().map(|h| q(h)).collect();
            out.push_str(&format!("hosts = [{}]\n", hosts.join(", ")));
            out.push_str(&format!("origin = {}\n", q(&s.origin)));
            out.push_str("other = \"revalidate\"   # cached as the origin's headers allow (RFC 9111)\n");
        }
    }
    if !m.notes.is_empty() {
        out.push_str("\n# Notes:\n");
        for n in &m.notes {
            out.push_str(&format!("# - {n}\n"));
        }
    }
    if !m.not_mapped.is_empty() {
        out.push_str("\n# Not mapped:\n");
        for n in &m.not_mapped {
            out.push_str(&format!("# - {}: {}\n", n.path, n.reason));
        }
    }
    out
}

#[cfg(test)]
#[path = "edge_manifest_tests.rs"]
mod tests;
