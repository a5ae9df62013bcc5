//! Native test harness: answers the host imports of a plugin compiled for
//! the machine running `cargo test`, so plugin logic is tested without wasm.
//!
//! Each test thread has its own [`TestHost`]; install one to set the clock,
//! node id, configuration or identities, and read back what the plugin logged.
//!
//! ```
//! use holdfast_sdk::testing::TestHost;
//! use holdfast_sdk::host;
//!
//! TestHost::new().node_id("site-7").now_unix_ms(1_700_000_000_000).install();
//! host::info("hello");
//! assert_eq!(host::node_id(), "site-7");
//! assert_eq!(TestHost::take_logs(), vec![(host::Level::Info, "hello".to_string())]);
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use crate::auth::{Identity, IdentityKind};
use crate::host::Level;

/// An identity with its secrets, as the host would hold it.
#[derive(Debug, Clone)]
pub struct TestIdentity {
    /// The public record.
    pub identity: Identity,
    /// Symmetric keys (primary, secondary).
    pub sas_keys: Vec<Vec<u8>>,
    /// Plain password (the host stores a hash; tests need not).
    pub password: Option<Vec<u8>>,
    /// Certificate thumbprints.
    pub thumbprints: Vec<String>,
}

impl TestIdentity {
    /// An enabled device with no credentials.
    pub fn device(id: &str) -> Self {
        TestIdentity {
            identity: Identity {
                id: id.to_string(),
                kind: IdentityKind::Device,
                device_id: id.to_string(),
                module_id: None,
                parent: None,
                enabled: true,
                credentials: Vec::new(),
            },
            sas_keys: Vec::new(),
            password: None,
            thumbprints: Vec::new(),
        }
    }

    /// A plain user with a password.
    pub fn user(name: &str, password: &str) -> Self {
        let mut t = Self::device(name);
        t.identity.kind = IdentityKind::User;
        t.identity.credentials.push("password".to_string());
        t.password = Some(password.as_bytes().to_vec());
        t
    }

    /// Adds a symmetric key.
    pub fn with_sas_key(mut self, key: &[u8]) -> Self {
        if !self.identity.credentials.iter().any(|c| c == "sas") {
            self.identity.credentials.push("sas".to_string());
        }
        self.sas_keys.push(key.to_vec());
        self
    }

    /// Marks the identity disabled.
    pub fn disabled(mut self) -> Self {
        self.identity.enabled = false;
        self
    }
}

/// The state behind the host imports in native builds.
#[derive(Debug, Clone)]
pub struct TestHost {
    pub(crate) logs: Vec<(Level, String)>,
    pub(crate) now_unix_ms: u64,
    pub(crate) monotonic_ns: u64,
    pub(crate) node_id: String,
    pub(crate) config_json: String,
    pub(crate) identities: HashMap<String, TestIdentity>,
}

impl Default for TestHost {
    fn default() -> Self {
        TestHost {
            logs: Vec::new(),
            now_unix_ms: 1_700_000_000_000,
            monotonic_ns: 0,
            node_id: "test-node".to_string(),
            config_json: "{}".to_string(),
            identities: HashMap::new(),
        }
    }
}

thread_local! {
    static HOST: RefCell<TestHost> = RefCell::new(TestHost::default());
}

pub(crate) fn with_host<R>(f: impl FnOnce(&mut TestHost) -> R) -> R {
    HOST.with(|h| f(&mut h.borrow_mut()))
}

impl TestHost {
    /// A host with defaults: node `test-node`, clock at 2023-11-14T22:13:20Z, config `{}`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the node id.
    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = id.to_string();
        self
    }

    /// Sets the wall clock.
    pub fn now_unix_ms(mut self, ms: u64) -> Self {
        self.now_unix_ms = ms;
        self
    }

    /// Sets the configuration JSON returned by `host::config_json`.
    pub fn config_json(mut self, json: &str) -> Self {
        self.config_json = json.to_string();
        self
    }

    /// Registers an identity.
    pub fn identity(mut self, identity: TestIdentity) -> Self {
        self.identities.insert(identity.identity.id.clone(), identity);
        self
    }

    /// Makes this the current thread's host.
    pub fn install(self) {
        HOST.with(|h| *h.borrow_mut() = self);
    }

    /// Advances the current host's clocks by `ms` milliseconds.
    pub fn advance_ms(ms: u64) {
        with_host(|h| {
            h.now_unix_ms += ms;
            h.monotonic_ns += ms * 1_000_000;
        })
    }

    /// Takes the log records the plugin emitted on this thread.
    pub fn take_logs() -> Vec<(Level, String)> {
        with_host(|h| std::mem::take(&mut h.logs))
    }
}
