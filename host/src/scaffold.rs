//! `holdfast plugin new`: a plugin crate that builds against holdfast-sdk.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use holdfast_plugins::SlotName;

/// The kind of plugin to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// A router.
    Router,
    /// An auth plugin.
    Auth,
    /// A content-source plugin.
    ContentSource,
}

impl PluginKind {
    /// The slot this kind plugs into.
    pub fn slot(self) -> SlotName {
        match self {
            PluginKind::Router => SlotName::Router,
            PluginKind::Auth => SlotName::Auth,
            PluginKind::ContentSource => SlotName::ContentSource,
        }
    }
}

impl std::str::FromStr for PluginKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "router" => Ok(PluginKind::Router),
            "auth" => Ok(PluginKind::Auth),
            "content-source" => Ok(PluginKind::ContentSource),
            _ => Err(format!(
                "unknown plugin kind {s:?} (expected router, auth or content-source)"
            )),
        }
    }
}

/// The SDK of the source tree this binary was built from, if it still exists.
pub fn default_sdk_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    p.join("Cargo.toml").is_file().then(|| p.canonicalize().unwrap_or(p))
}

/// Creates `<dir>/<name>/` with a Cargo.toml, a plugin skeleton with a
/// native test, and a README. Returns the crate's path.
///
/// # Errors
/// A bad name, an existing directory, or I/O errors.
pub fn create(kind: PluginKind, name: &str, dir: &Path, sdk_path: Option<&Path>) -> Result<PathBuf> {
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || !name.starts_with(|c: char| c.is_ascii_alphabetic())
    {
        bail!("plugin name {name:?} must start with a letter and contain only letters, digits, '-' and '_'");
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    std::fs::create_dir_all(root.join("src")).with_context(|| format!("cannot create {}", root.display()))?;
    let feature = kind.slot().as_str();
    let sdk_dep = match sdk_path {
        Some(p) => format!(
            "holdfast-sdk = {{ path = {:?}, features = [\"{feature}\"] }}",
            p.display().to_string()
        ),
        None => format!("holdfast-sdk = {{ version = \"0.1\", features = [\"{feature}\"] }}"),
    };
    let cargo_toml = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the wasm component; rlib: native unit tests.
crate-type = ["cdylib", "rlib"]

[dependencies]
{sdk_dep}
serde = {{ version = "1", features = ["derive"] }}

[profile.release]
opt-level = "s"
lto = true
strip = true
codegen-units = 1

# A plugin is its own workspace, even when created inside another one.
[workspace]
"#
    );
    let lib = match kind {
        PluginKind::Router => ROUTER_TEMPLATE,
        PluginKind::Auth => AUTH_TEMPLATE,
        PluginKind::ContentSource => CONTENT_TEMPLATE,
    };
    let crate_file = name.replace('-', "_");
    let readme = format!(
        "# {name}\n\nA Holdfast {feature} plugin.\n\n```sh\ncargo test                                   # logic, natively\ncargo build --target wasm32-wasip2 --release # the component\nholdfast plugin swap {feature} target/wasm32-wasip2/release/{crate_file}.wasm\n```\n\nSee docs/plugins.md in the Holdfast repository.\n"
    );
    for (path, text) in [
        (root.join("Cargo.toml"), cargo_toml.as_str()),
        (root.join("src/lib.rs"), lib),
        (root.join("README.md"), readme.as_str()),
        (root.join(".gitignore"), "/target\n"),
    ] {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(root)
}

const ROUTER_TEMPLATE: &str = r#"//! A Holdfast router plugin.

use holdfast_sdk::router::{topic_matches, Action, Message, Router};
use holdfast_sdk::Config;

/// Configuration, from `[plugins.router.config]` in the gateway config.
///
/// Unknown keys are ignored: `holdfast plugin swap` keeps the slot's current
/// config unless `--plugin-config` replaces it, so right after a swap this
/// plugin is initialised with the config of the router it replaced (the
/// default router's `default_lane`, `routes`, ...).
#[derive(Debug, serde::Deserialize)]
struct Settings {
    #[serde(default = "default_lane")]
    lane: u8,
}

fn default_lane() -> u8 {
    5
}

/// Sends everything upstream in one lane, except `local/#`, which stays local.
pub struct MyRouter {
    lane: u8,
}

impl Router for MyRouter {
    fn init(config: &Config) -> Result<Self, String> {
        let settings: Settings = config.deserialize()?;
        if settings.lane > 9 {
            return Err(format!("lane must be 0-9, got {}", settings.lane));
        }
        Ok(MyRouter { lane: settings.lane })
    }

    fn route(&self, msg: &Message<'_>) -> Vec<Action> {
        let topic = msg.topic();
        if topic_matches("local/#", topic) {
            vec![Action::local_same_topic()]
        } else {
            vec![Action::upstream(self.lane)]
        }
    }
}

holdfast_sdk::export_router!(MyRouter);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = MyRouter::init(&Config::empty()).unwrap();
        assert_eq!(r.route(&Message::builder("a/b").build()), vec![Action::upstream(5)]);
        assert_eq!(r.route(&Message::builder("local/x").build()), vec![Action::local_same_topic()]);
    }

    #[test]
    fn accepts_the_config_of_the_router_it_replaces() {
        let config = Config::parse("{\"default_lane\": 3, \"routes\": []}").unwrap();
        assert!(MyRouter::init(&config).is_ok());
    }
}
"#;

const AUTH_TEMPLATE: &str = r#"//! A Holdfast auth plugin.

use holdfast_sdk::auth::{identities, Auth, ConnectInfo, Decision, Operation, Principal, Refusal, RefusalCode};
use holdfast_sdk::Config;

/// Lets in users whose password the host verifies; each may use `users/{name}/#`.
pub struct MyAuth;

impl Auth for MyAuth {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(MyAuth)
    }

    fn authenticate(&self, info: &ConnectInfo) -> Result<Principal, Refusal> {
        let (Some(user), Some(password)) = (&info.username, &info.password) else {
            return Err(Refusal::new(RefusalCode::NotAuthorized, "credentials required"));
        };
        if !identities::verify_password(user, password) {
            return Err(Refusal::new(RefusalCode::BadCredentials, "bad username or password"));
        }
        Ok(Principal {
            id: user.clone(),
            ..Principal::default()
        })
    }

    fn authorize(&self, who: &Principal, _op: Operation, topic: &str) -> Decision {
        if topic.starts_with(&format!("users/{}/", who.id)) {
            Decision::Allow
        } else {
            Decision::Deny(format!("{} may only use users/{}/#", who.id, who.id))
        }
    }
}

holdfast_sdk::export_auth!(MyAuth);

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_sdk::testing::{TestHost, TestIdentity};

    #[test]
    fn users_get_their_own_topics() {
        TestHost::new().identity(TestIdentity::user("ann", "pw")).install();
        let a = MyAuth::init(&Config::empty()).unwrap();
        let who = a.authenticate(&ConnectInfo::new("c").with_credentials("ann", "pw")).unwrap();
        assert_eq!(a.authorize(&who, Operation::Publish, "users/ann/x"), Decision::Allow);
        assert!(a.authenticate(&ConnectInfo::new("c").with_credentials("ann", "no")).is_err());
    }
}
"#;

const CONTENT_TEMPLATE: &str = r#"//! A Holdfast content-source plugin.

use holdfast_sdk::content::{CachePlan, ContentClass, ContentSource, Decision, RequestHead};
use holdfast_sdk::Config;

/// Caches one repository host; `.deb` files never change, everything else is revalidated.
pub struct MySource;

impl ContentSource for MySource {
    fn init(_config: &Config) -> Result<Self, String> {
        Ok(MySource)
    }

    fn classify(&self, request: &RequestHead) -> Decision {
        if request.host != "deb.debian.org" {
            return Decision::Deny(format!("{} is not served here", request.host));
        }
        let class = if request.path().ends_with(".deb") {
            ContentClass::Immutable
        } else {
            ContentClass::Revalidate
        };
        Decision::Cache(CachePlan {
            origin: "http://deb.debian.org".to_string(),
            origin_path: request.path_and_query.clone(),
            key: format!("debian:{}", request.path_and_query),
            class,
            ttl_seconds: 300,
            max_object_size: None,
        })
    }
}

holdfast_sdk::export_content_source!(MySource);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let s = MySource::init(&Config::empty()).unwrap();
        assert!(matches!(s.classify(&RequestHead::get("deb.debian.org", "/a.deb")), Decision::Cache(_)));
        assert!(matches!(s.classify(&RequestHead::get("x.example", "/a.deb")), Decision::Deny(_)));
    }
}
"#;
