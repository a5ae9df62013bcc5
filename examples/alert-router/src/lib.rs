//! An example third-party router built only on `holdfast-sdk`.
//!
//! - `alerts/#` goes upstream in lane 0, the highest priority, with a 24 h TTL;
//! - `debug/#` is dropped (reason `debug-traffic`);
//! - everything else goes upstream in the lane set by `default_lane` (default 5).
//!
//! Unknown config keys are refused, so a typo fails `init` instead of being
//! ignored. A swap without `--plugin-config` keeps the slot's config, the
//! default router's (`local_by_default`, …), which this router refuses:
//! swap it in with its own, `alert-router.toml` beside this crate. From the
//! repository's root:
//!
//! ```sh
//! cargo build -p holdfast-example-alert-router --target wasm32-wasip2 --release
//! holdfast plugin swap router target/wasm32-wasip2/release/holdfast_example_alert_router.wasm \
//!     --plugin-config examples/alert-router/alert-router.toml
//! ```

use holdfast_sdk::router::{Action, Message, Router, topic_matches};
use holdfast_sdk::{Config, host};
use serde::Deserialize;

/// The plugin's configuration (`[plugins.router.config]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_lane")]
    default_lane: u8,
}

fn default_lane() -> u8 {
    5
}

/// Routes alerts first and drops debug chatter.
pub struct AlertRouter {
    default_lane: u8,
}

impl Router for AlertRouter {
    fn init(config: &Config) -> Result<Self, String> {
        let settings: Settings = config.deserialize()?;
        if settings.default_lane > 9 {
            return Err(format!("default_lane must be 0-9, got {}", settings.default_lane));
        }
        host::info(&format!("alert-router ready on node {}", host::node_id()));
        Ok(AlertRouter {
            default_lane: settings.default_lane,
        })
    }

    fn route(&self, msg: &Message<'_>) -> Vec<Action> {
        let topic = msg.topic();
        if topic_matches("alerts/#", topic) {
            vec![Action::upstream(0).with_ttl(86_400)]
        } else if topic_matches("debug/#", topic) {
            vec![Action::drop("debug-traffic")]
        } else {
            vec![Action::upstream(self.default_lane)]
        }
    }
}

holdfast_sdk::export_router!(AlertRouter);

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_sdk::testing::TestHost;

    #[test]
    fn routes_alerts_first_and_drops_debug() {
        TestHost::new().node_id("site-1").install();
        let router = AlertRouter::init(&Config::empty()).unwrap();
        let route = |t: &str| router.route(&Message::builder(t).build());
        assert_eq!(route("alerts/fire"), vec![Action::upstream(0).with_ttl(86_400)]);
        assert_eq!(route("debug/trace"), vec![Action::drop("debug-traffic")]);
        assert_eq!(route("telemetry/t1"), vec![Action::upstream(5)]);
        assert_eq!(
            TestHost::take_logs(),
            vec![(
                holdfast_sdk::host::Level::Info,
                "alert-router ready on node site-1".to_string()
            )]
        );
    }

    #[test]
    fn config_sets_the_default_lane_and_rejects_bad_values() {
        let router = AlertRouter::init(&Config::parse(r#"{"default_lane": 7}"#).unwrap()).unwrap();
        assert_eq!(router.route(&Message::builder("x").build()), vec![Action::upstream(7)]);
        let err = AlertRouter::init(&Config::parse(r#"{"default_lane": 12}"#).unwrap())
            .err()
            .unwrap();
        assert!(err.contains("default_lane must be 0-9"), "{err}");
        let err = AlertRouter::init(&Config::parse(r#"{"lane": 1}"#).unwrap())
            .err()
            .unwrap();
        assert!(err.contains("unknown field"), "{err}");
    }
}
