//! A router for tests and benchmarks. Behaviour is chosen per message by
//! topic, so one loaded plugin can be driven into every failure mode:
//!
//! | topic | behaviour |
//! |---|---|
//! | `hostile/loop` | spins forever (must be interrupted by the epoch deadline) |
//! | `hostile/bomb` | allocates until memory runs out (must hit the memory cap) |
//! | `hostile/trap` | panics, which traps |
//! | `hostile/sleepy` | spins for `spin_ms` milliseconds of host monotonic time, then answers |
//! | `payload/...` | reads the whole payload and routes by a checksum of it |
//! | anything else | `drop("test-router:<tag>")` where `tag` comes from the config |
//!
//! With `fail_init = true` in its config, `init` fails.

use holdfast_sdk::router::{Action, Message, Router};
use holdfast_sdk::{Config, host};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Settings {
    #[serde(default)]
    fail_init: bool,
    #[serde(default = "default_tag")]
    tag: String,
    #[serde(default = "default_spin")]
    spin_ms: u64,
}

fn default_tag() -> String {
    "ok".to_string()
}

fn default_spin() -> u64 {
    5
}

/// See the crate docs.
pub struct TestRouter {
    settings: Settings,
}

impl Router for TestRouter {
    fn init(config: &Config) -> Result<Self, String> {
        let settings: Settings = config.deserialize()?;
        if settings.fail_init {
            return Err("test-router: init failure requested by config".to_string());
        }
        Ok(TestRouter { settings })
    }

    fn route(&self, msg: &Message<'_>) -> Vec<Action> {
        let topic = msg.topic();
        match topic {
            "hostile/loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "hostile/bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = vec![0u8; 1 << 20];
                    block[0] = 1;
                    hoard.push(std::hint::black_box(block));
                }
            }
            "hostile/trap" => panic!("test-router: trap requested"),
            "hostile/sleepy" => {
                let until = host::monotonic_ns() + self.settings.spin_ms * 1_000_000;
                while host::monotonic_ns() < until {}
                vec![Action::drop(format!("test-router:{}", self.settings.tag))]
            }
            t if t.starts_with("payload/") => {
                let sum = msg.payload().iter().fold(0u32, |a, b| a.wrapping_add(*b as u32));
                vec![Action::upstream((sum % 10) as u8)]
            }
            _ => vec![Action::drop(format!("test-router:{}", self.settings.tag))],
        }
    }
}

holdfast_sdk::export_router!(TestRouter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_with_its_tag_and_routes_payloads_by_checksum() {
        let r = TestRouter::init(&Config::parse(r#"{"tag":"A"}"#).unwrap()).unwrap();
        assert_eq!(
            r.route(&Message::builder("x").build()),
            vec![Action::drop("test-router:A")]
        );
        let m = Message::builder("payload/1").payload(vec![3u8, 4u8]).build();
        assert_eq!(r.route(&m), vec![Action::upstream(7)]);
        assert!(TestRouter::init(&Config::parse(r#"{"fail_init":true}"#).unwrap()).is_err());
    }
}
