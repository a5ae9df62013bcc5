//! Holdfast's default router plugin: an ordered table of topic-filter rules.
//!
//! It reads only the topic of a message, so its cost does not depend on the
//! payload size. The first rule whose `filter` matches decides; a message
//! that matches no rule goes upstream in `default_lane` and, when
//! `local_by_default` is true, to local subscribers on its own topic too.
//!
//! ```toml
//! [plugins.router.config]
//! default_lane = 5          # lane 0-9 for unmatched messages
//! default_upstream = true   # false: unmatched messages do not go upstream
//! local_by_default = true   # unmatched messages also reach local subscribers
//!
//! [[plugins.router.config.rules]]
//! filter = "alerts/#"
//! upstream_lane = 0
//! ttl_seconds = 86400
//!
//! [[plugins.router.config.rules]]
//! filter = "plant/+/cmd"
//! local = true              # deliver locally only
//!
//! [[plugins.router.config.rules]]
//! filter = "debug/#"
//! drop = "debug-traffic"
//! ```
//!
//! Routes in the spirit of IoT Edge (see [`route`] for the grammar) are
//! checked when no rule matched. Every route whose source and condition
//! match applies (fan-out); a message no route takes falls back to the
//! defaults above. `priority` is the outbox lane, `ttl_seconds` the
//! message's time-to-live upstream.
//!
//! ```toml
//! [plugins.router.config.routes]
//! hot = "FROM /messages/* WHERE temperature > 30 INTO $upstream"
//! filter = { route = "FROM /messages/modules/sensor/outputs/out1 INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")" }
//! alerts = { route = "FROM /messages/* WHERE $body.level = 'critical' INTO $upstream", priority = 0, ttl_seconds = 604800 }
//! ```

pub mod route;

use std::collections::BTreeMap;

use holdfast_sdk::Config;
use holdfast_sdk::router::{Action, Message, Router, topic_matches};
use serde::Deserialize;

use crate::route::{Route, Sink, View};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_lane")]
    default_lane: u8,
    #[serde(default = "yes")]
    default_upstream: bool,
    #[serde(default = "yes")]
    local_by_default: bool,
    #[serde(default)]
    rules: Vec<RuleConfig>,
    #[serde(default)]
    routes: BTreeMap<String, serde_json::Value>,
}

/// A route given as a table rather than a string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTable {
    route: String,
    priority: Option<u8>,
    ttl_seconds: Option<u32>,
}

/// A route ready to evaluate.
#[derive(Debug)]
struct Compiled {
    route: Route,
    lane: u8,
    ttl_seconds: Option<u32>,
}

fn compile(name: &str, value: serde_json::Value, default_lane: u8) -> Result<Compiled, String> {
    let what = format!("routes.{name}");
    let table = match value {
        serde_json::Value::String(route) => RouteTable {
            route,
            priority: None,
            ttl_seconds: None,
        },
        other => serde_json::from_value::<RouteTable>(other).map_err(|e| format!("{what}: {e}"))?,
    };
    let lane = table.priority.unwrap_or(default_lane);
    check_lane(lane, &format!("{what}: priority"))?;
    let route = route::parse(&table.route).map_err(|e| format!("{what}: {e}"))?;
    Ok(Compiled {
        route,
        lane,
        ttl_seconds: table.ttl_seconds,
    })
}

fn default_lane() -> u8 {
    5
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    filter: String,
    upstream_lane: Option<u8>,
    ttl_seconds: Option<u32>,
    #[serde(default)]
    local: bool,
    local_topic: Option<String>,
    drop: Option<String>,
}

#[derive(Debug)]
struct Rule {
    filter: String,
    actions: Vec<Action>,
}

/// The default router.
#[derive(Debug)]
pub struct DefaultRouter {
    rules: Vec<Rule>,
    routes: Vec<Compiled>,
    default_lane: Option<u8>,
    local_by_default: bool,
}

fn check_lane(lane: u8, what: &str) -> Result<(), String> {
    if lane > 9 {
        Err(format!("{what}: lane must be 0-9, got {lane}"))
    } else {
        Ok(())
    }
}

fn check_filter(filter: &str, what: &str) -> Result<(), String> {
    route::check_filter(filter).map_err(|e| format!("{what}: {e}"))
}

impl DefaultRouter {
    /// The actions of every route that takes `msg`, merged: one upstream
    /// action in the highest priority any of them asked for, and each local
    /// topic once. `None` when no route takes it.
    fn by_routes(&self, msg: &Message<'_>) -> Option<Vec<Action>> {
        if self.routes.is_empty() {
            return None;
        }
        let view = View::new(msg);
        let mut upstream: Option<(u8, Option<u32>)> = None;
        let mut local: Vec<Option<String>> = Vec::new();
        let mut matched = false;
        for c in self.routes.iter().filter(|c| view.matches(&c.route)) {
            matched = true;
            let topic = match &c.route.sink {
                Sink::Upstream => {
                    upstream = match upstream {
                        Some((lane, ttl)) if lane < c.lane || (lane == c.lane && ttl >= c.ttl_seconds) => {
                            Some((lane, ttl))
                        }
                        _ => Some((c.lane, c.ttl_seconds)),
                    };
                    continue;
                }
                Sink::Local => None,
                Sink::Topic(t) => Some(t.clone()),
                Sink::Input { device, module, input } => {
                    let Some(device) = device
                        .clone()
                        .or_else(|| view.dialect().map(|t| t.device().to_string()))
                    else {
                        // A plain MQTT message has no device whose module this is.
                        continue;
                    };
                    Some(format!("devices/{device}/modules/{module}/inputs/{input}"))
                }
            };
            if !local.contains(&topic) {
                local.push(topic);
            }
        }
        if !matched {
            return None;
        }
        let mut actions = Vec::with_capacity(local.len() + 1);
        if let Some((lane, ttl)) = upstream {
            let mut a = Action::upstream(lane);
            if let Some(ttl) = ttl {
                a = a.with_ttl(ttl);
            }
            actions.push(a);
        }
        for topic in local {
            actions.push(match topic {
                Some(t) => Action::local(t),
                None => Action::local_same_topic(),
            });
        }
        Some(actions)
    }
}

impl Router for DefaultRouter {
    fn init(config: &Config) -> Result<Self, String> {
        let settings: Settings = config.deserialize()?;
        check_lane(settings.default_lane, "default_lane")?;
        let mut rules = Vec::with_capacity(settings.rules.len());
        for (i, r) in settings.rules.into_iter().enumerate() {
            let what = format!("rules[{i}]");
            check_filter(&r.filter, &what)?;
            let mut actions = Vec::new();
            if let Some(reason) = r.drop {
                if r.upstream_lane.is_some() || r.local || r.local_topic.is_some() {
                    return Err(format!("{what}: `drop` cannot be combined with other actions"));
                }
                actions.push(Action::drop(reason));
            }
            if let Some(lane) = r.upstream_lane {
                check_lane(lane, &what)?;
                let mut a = Action::upstream(lane);
                if let Some(ttl) = r.ttl_seconds {
                    a = a.with_ttl(ttl);
                }
                actions.push(a);
            } else if r.ttl_seconds.is_some() {
                return Err(format!("{what}: `ttl_seconds` needs `upstream_lane`"));
            }
            if let Some(topic) = r.local_topic {
                actions.push(Action::local(topic));
            } else if r.local {
                actions.push(Action::local_same_topic());
            }
            if actions.is_empty() {
                return Err(format!(
                    "{what}: a rule needs at least one of upstream_lane, local, local_topic, drop"
                ));
            }
            rules.push(Rule {
                filter: r.filter,
                actions,
            });
        }
        let routes = settings
            .routes
            .into_iter()
            .map(|(name, value)| compile(&name, value, settings.default_lane))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DefaultRouter {
            rules,
            routes,
            default_lane: settings.default_upstream.then_some(settings.default_lane),
            local_by_default: settings.local_by_default,
        })
    }

    fn route(&self, msg: &Message<'_>) -> Vec<Action> {
        let topic = msg.topic();
        if let Some(rule) = self.rules.iter().find(|r| topic_matches(&r.filter, topic)) {
            return rule.actions.clone();
        }
        if let Some(actions) = self.by_routes(msg) {
            return actions;
        }
        let mut actions = Vec::with_capacity(2);
        if let Some(lane) = self.default_lane {
            actions.push(Action::upstream(lane));
        }
        if self.local_by_default {
            actions.push(Action::local_same_topic());
        }
        actions
    }
}

holdfast_sdk::export_router!(DefaultRouter);

#[cfg(test)]
mod tests {
    use super::*;

    fn router(json: &str) -> Result<DefaultRouter, String> {
        DefaultRouter::init(&Config::parse(json).unwrap())
    }

    fn route(r: &DefaultRouter, topic: &str) -> Vec<Action> {
        r.route(&Message::builder(topic).payload(vec![0u8; 10]).build())
    }

    #[test]
    fn zero_config_sends_upstream_lane_5_and_delivers_locally() {
        let r = router("{}").unwrap();
        assert_eq!(route(&r, "a/b"), vec![Action::upstream(5), Action::local_same_topic()]);
    }

    #[test]
    fn first_matching_rule_wins() {
        let r = router(
            r#"{"rules":[
                {"filter":"alerts/#","upstream_lane":0,"ttl_seconds":60},
                {"filter":"debug/#","drop":"debug-traffic"},
                {"filter":"plant/+/cmd","local":true},
                {"filter":"plant/#","upstream_lane":3,"local_topic":"mirror/plant"}
            ], "default_upstream": false, "local_by_default": false}"#,
        )
        .unwrap();
        assert_eq!(route(&r, "alerts/fire/x"), vec![Action::upstream(0).with_ttl(60)]);
        assert_eq!(route(&r, "debug/x"), vec![Action::drop("debug-traffic")]);
        assert_eq!(route(&r, "plant/7/cmd"), vec![Action::local_same_topic()]);
        assert_eq!(
            route(&r, "plant/7/temp"),
            vec![Action::upstream(3), Action::local("mirror/plant")]
        );
        assert_eq!(route(&r, "other"), Vec::<Action>::new());
    }

    #[test]
    fn routes_fan_out_and_merge_upstream() {
        let r = router(
            r#"{"default_upstream": false, "local_by_default": false, "routes": {
                "hot": "FROM /messages/* WHERE temperature > 30 INTO $upstream",
                "critical": {"route": "FROM /messages/* WHERE $body.level = 'critical' INTO $upstream", "priority": 0, "ttl_seconds": 600},
                "filter": "FROM /messages/modules/sensor/outputs/out1 INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")",
                "mirror": "FROM /topics/plant/# INTO topic('mirror/plant')",
                "plain-input": "FROM /topics/plant/# INTO BrokeredEndpoint('/modules/filter/inputs/in1')"
            }}"#,
        )
        .unwrap();
        let m = |topic: &str, props: &[(&str, &str)], body: &str| {
            let mut b = Message::builder(topic).payload(body.as_bytes().to_vec());
            for (k, v) in props {
                b = b.property(*k, *v);
            }
            r.route(&b.build())
        };
        assert_eq!(
            m("devices/d/messages/events/", &[("temperature", "31")], "{}"),
            vec![Action::upstream(5)]
        );
        assert_eq!(
            m(
                "devices/d/messages/events/",
                &[("temperature", "31")],
                r#"{"level":"critical"}"#
            ),
            vec![Action::upstream(0).with_ttl(600)]
        );
        assert_eq!(
            m("devices/d/messages/events/", &[("temperature", "20")], "{}"),
            Vec::<Action>::new()
        );
        assert_eq!(
            m("devices/d/modules/sensor/messages/events/", &[("$.on", "out1")], ""),
            vec![Action::local("devices/d/modules/filter/inputs/in1")]
        );
        // A plain topic has no device for a short BrokeredEndpoint; the other route still applies.
        assert_eq!(m("plant/1", &[], ""), vec![Action::local("mirror/plant")]);
    }

    #[test]
    fn unmatched_by_routes_falls_back_to_the_defaults() {
        let r = router(r#"{"routes": {"a": "FROM /topics/x INTO $local"}}"#).unwrap();
        assert_eq!(route(&r, "x"), vec![Action::local_same_topic()]);
        assert_eq!(route(&r, "y"), vec![Action::upstream(5), Action::local_same_topic()]);
    }

    #[test]
    fn bad_rules_are_rejected_with_their_index() {
        let cases = [
            (
                r#"{"rules":[{"filter":"a/#/b","local":true}]}"#,
                "rules[0]: `#` must be",
            ),
            (
                r#"{"rules":[{"filter":"a","upstream_lane":10}]}"#,
                "rules[0]: lane must be 0-9",
            ),
            (
                r#"{"rules":[{"filter":"a","local":true},{"filter":"b"}]}"#,
                "rules[1]: a rule needs",
            ),
            (
                r#"{"rules":[{"filter":"a","drop":"x","local":true}]}"#,
                "cannot be combined",
            ),
            (r#"{"default_lane":11}"#, "default_lane: lane must be 0-9"),
            (r#"{"rulez":[]}"#, "unknown field `rulez`"),
            (
                r#"{"routes":{"r1":"FROM /* WHERE a = INTO $upstream"}}"#,
                "routes.r1: column 19: expected a value",
            ),
            (
                r#"{"routes":{"r2":{"route":"FROM /* INTO $upstream","priority":12}}}"#,
                "routes.r2: priority: lane must be 0-9",
            ),
            (
                r#"{"routes":{"r3":{"route":"FROM /* INTO $upstream","prio":1}}}"#,
                "routes.r3: unknown field `prio`",
            ),
        ];
        for (json, want) in cases {
            let err = router(json).err().unwrap_or_else(|| panic!("{json} accepted"));
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
