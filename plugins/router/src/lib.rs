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

use holdfast_sdk::Config;
use holdfast_sdk::router::{Action, Message, Router, topic_matches};
use serde::Deserialize;

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
    if filter.is_empty() {
        return Err(format!("{what}: filter is empty"));
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(format!("{what}: `#` must be a whole last level in filter {filter:?}"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{what}: `+` must be a whole level in filter {filter:?}"));
        }
    }
    Ok(())
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
        Ok(DefaultRouter {
            rules,
            default_lane: settings.default_upstream.then_some(settings.default_lane),
            local_by_default: settings.local_by_default,
        })
    }

    fn route(&self, msg: &Message<'_>) -> Vec<Action> {
        let topic = msg.topic();
        if let Some(rule) = self.rules.iter().find(|r| topic_matches(&r.filter, topic)) {
            return rule.actions.clone();
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
        ];
        for (json, want) in cases {
            let err = router(json).err().unwrap_or_else(|| panic!("{json} accepted"));
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
