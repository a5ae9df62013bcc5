//! A content-source plugin for tests. Behaviour is chosen per request by
//! the first segment of its path, so one loaded plugin can be driven into
//! every failure mode:
//!
//! | path | behaviour |
//! |---|---|
//! | `/hostile/loop...` | spins forever (must be interrupted by the epoch deadline) |
//! | `/hostile/bomb...` | allocates until memory runs out (must hit the memory cap) |
//! | `/hostile/trap...` | panics, which traps |
//! | anything else | `deny("test-content-source: <host>")` |
//!
//! Its config is accepted whatever it holds, so it can carry the `sources`
//! the host's failure policy reads (docs/configuration.md).

use holdfast_sdk::Config;
use holdfast_sdk::content::{ContentSource, Decision, RequestHead};

/// See the crate docs.
#[derive(Debug)]
pub struct TestContentSource;

impl ContentSource for TestContentSource {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(TestContentSource)
    }

    fn classify(&self, request: &RequestHead) -> Decision {
        let path = request.path();
        if path.starts_with("/hostile/loop") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        } else if path.starts_with("/hostile/bomb") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                let mut block = vec![0u8; 1 << 20];
                block[0] = 1;
                hoard.push(std::hint::black_box(block));
            }
        } else if path.starts_with("/hostile/trap") {
            panic!("test-content-source: trap requested");
        }
        Decision::Deny(format!("test-content-source: {}", request.host))
    }
}

holdfast_sdk::export_content_source!(TestContentSource);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_hostile() {
        let p = TestContentSource::init(&Config::parse(r#"{"sources":[]}"#).unwrap()).unwrap();
        assert_eq!(
            p.classify(&RequestHead::get("a.test", "/x")),
            Decision::Deny("test-content-source: a.test".into())
        );
    }
}
