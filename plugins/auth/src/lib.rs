//! Holdfast's default auth plugin.
//!
//! **Authentication**, in this order:
//! 1. IoT Hub SAS tokens: username `{hub}/{device}/?api-version=…` (or
//!    `{hub}/{device}/{module}/?…`), password
//!    `SharedAccessSignature sr=…&sig=…&se=…`. The expiry is checked against
//!    the host clock, the resource must name the same device (and module),
//!    the client id must be the device id (`{device}/{module}` for a module),
//!    and the signature is verified by the host against the identity's
//!    primary or secondary key with a constant-time compare.
//! 2. Username and password of a `user` identity, verified by the host
//!    against the stored hash.
//! 3. A verified TLS client certificate whose thumbprint belongs to the
//!    identity named by the client id.
//! 4. Anonymous, when `allow_anonymous` is true (the zero-config default).
//!
//! **Authorization**: the configured `rules` are evaluated first, in order;
//! the first rule that matches the principal, operation and topic decides.
//! Otherwise a device may use `devices/{device_id}/#`, `$iothub/#` and
//! `$holdfast/methods/#` (calling direct methods of identities on this
//! node; deny it with a rule), a module
//! `devices/{device_id}/modules/{module_id}/#` and the same two, a user
//! the filters in `user_topics`, and an anonymous client the filters in
//! `anonymous_topics`. A SUBSCRIBE filter is allowed only when every topic
//! it can match is allowed.
//!
//! ```toml
//! [plugins.auth.config]
//! allow_anonymous = false
//! anonymous_topics = ["#"]
//! user_topics = ["#"]
//! hub_name = "myhub.azure-devices.net"   # optional: SAS usernames must name it
//!
//! [[plugins.auth.config.rules]]
//! effect = "allow"                        # or "deny"
//! operations = ["publish", "subscribe"]
//! filter = "fleet/{device_id}/#"          # {device_id}, {module_id}, {client_id}, {principal}
//! ```

use base64::Engine as _;
use holdfast_sdk::auth::{
    ConnectInfo, Decision, Identity, IdentityKind, Operation, Principal, Refusal, RefusalCode, identities,
};
use holdfast_sdk::content::percent_decode;
use holdfast_sdk::{Config, host};
use serde::Deserialize;

/// Longest username or password accepted before any parsing.
const MAX_CREDENTIAL_LEN: usize = 4096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "yes")]
    allow_anonymous: bool,
    #[serde(default = "everything")]
    anonymous_topics: Vec<String>,
    #[serde(default = "everything")]
    user_topics: Vec<String>,
    hub_name: Option<String>,
    #[serde(default)]
    rules: Vec<Rule>,
}

fn yes() -> bool {
    true
}

fn everything() -> Vec<String> {
    vec!["#".to_string()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Publish,
    Subscribe,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    effect: Effect,
    operations: Vec<Op>,
    filter: String,
}

/// The default auth plugin.
#[derive(Debug)]
pub struct DefaultAuth {
    settings: Settings,
}

fn refuse(code: RefusalCode, reason: impl Into<String>) -> Refusal {
    Refusal::new(code, reason)
}

/// True when every topic matched by `filter` is matched by `allowed`.
fn filter_within(filter: &str, allowed: &str) -> bool {
    // Wildcards in the first level never cover `$` topics.
    if filter.starts_with('$') && (allowed.starts_with('#') || allowed.starts_with('+')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut a = allowed.split('/');
    loop {
        match (f.next(), a.next()) {
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some(_), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(x), Some(y)) if x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The parts of an IoT Hub SAS username.
struct SasUser<'a> {
    hub: &'a str,
    device: &'a str,
    module: Option<&'a str>,
}

fn parse_sas_username(username: &str) -> Option<SasUser<'_>> {
    let path = username.split('?').next()?;
    let mut parts = path.trim_end_matches('/').split('/');
    let hub = parts.next().filter(|s| !s.is_empty())?;
    let device = parts.next().filter(|s| !s.is_empty())?;
    let module = parts.next().filter(|s| !s.is_empty());
    if parts.next().is_some() {
        return None;
    }
    Some(SasUser { hub, device, module })
}

struct SasToken {
    /// `sr` exactly as sent (URL-encoded): it is what was signed.
    resource_raw: String,
    resource: String,
    signature: Vec<u8>,
    expiry: u64,
}

fn parse_sas_token(password: &str) -> Result<SasToken, String> {
    let fields = password
        .strip_prefix("SharedAccessSignature ")
        .ok_or("not a SharedAccessSignature")?;
    let (mut sr, mut sig, mut se) = (None, None, None);
    for pair in fields.split('&') {
        let (k, v) = pair.split_once('=').ok_or("malformed SAS field")?;
        match k {
            "sr" => sr = Some(v),
            "sig" => sig = Some(v),
            "se" => se = Some(v),
            "skn" => {}
            _ => return Err(format!("unknown SAS field {k:?}")),
        }
    }
    let sr = sr.ok_or("SAS token has no sr")?;
    let sig = sig.ok_or("SAS token has no sig")?;
    let se = se.ok_or("SAS token has no se")?;
    let expiry = se.parse::<u64>().map_err(|_| "SAS expiry is not a number")?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(percent_decode(sig).as_bytes())
        .map_err(|_| "SAS signature is not base64")?;
    Ok(SasToken {
        resource_raw: sr.to_string(),
        resource: percent_decode(sr),
        signature,
        expiry,
    })
}

impl DefaultAuth {
    fn authenticate_sas(&self, info: &ConnectInfo, username: &str, password: &str) -> Result<Principal, Refusal> {
        let user = parse_sas_username(username).ok_or_else(|| {
            refuse(
                RefusalCode::BadCredentials,
                "SAS username is not {hub}/{device}[/{module}]/?api-version=…",
            )
        })?;
        if let Some(hub) = &self.settings.hub_name
            && !hub.eq_ignore_ascii_case(user.hub)
        {
            return Err(refuse(
                RefusalCode::NotAuthorized,
                format!("hub {:?} is not this hub", user.hub),
            ));
        }
        let token = parse_sas_token(password).map_err(|e| refuse(RefusalCode::BadCredentials, e))?;
        let now_s = host::now_unix_ms() / 1000;
        if token.expiry <= now_s {
            return Err(refuse(RefusalCode::NotAuthorized, "SAS token expired"));
        }
        let mut expected = format!("{}/devices/{}", user.hub, user.device);
        let id = match user.module {
            Some(m) => {
                expected.push_str("/modules/");
                expected.push_str(m);
                format!("{}/{}", user.device, m)
            }
            None => user.device.to_string(),
        };
        if !token.resource.trim_end_matches('/').eq_ignore_ascii_case(&expected) {
            return Err(refuse(
                RefusalCode::NotAuthorized,
                "SAS resource does not name this device",
            ));
        }
        if info.client_id != id {
            return Err(refuse(RefusalCode::BadClientId, format!("client id must be {id:?}")));
        }
        let identity = self.enabled_identity(&id)?;
        let string_to_sign = format!("{}\n{}", token.resource_raw, token.expiry);
        if !identities::verify_sas(&id, &string_to_sign, &token.signature) {
            return Err(refuse(RefusalCode::NotAuthorized, "SAS signature does not verify"));
        }
        Ok(principal_of(&identity))
    }

    fn enabled_identity(&self, id: &str) -> Result<Identity, Refusal> {
        let identity = identities::lookup(id).ok_or_else(|| {
            refuse(
                RefusalCode::NotAuthorized,
                format!("identity {id:?} is not in this node's scope (not registered here, or not synced yet)"),
            )
        })?;
        if !identity.enabled {
            return Err(refuse(
                RefusalCode::NotAuthorized,
                format!("identity {id:?} is disabled"),
            ));
        }
        Ok(identity)
    }

    fn rule_decision(&self, who: &Principal, op: Operation, topic: &str) -> Option<Decision> {
        for rule in &self.settings.rules {
            let op_matches = rule.operations.iter().any(|o| {
                matches!(
                    (o, op),
                    (Op::Publish, Operation::Publish) | (Op::Subscribe, Operation::Subscribe)
                )
            });
            if !op_matches {
                continue;
            }
            let Some(filter) = substitute(&rule.filter, who) else {
                continue;
            };
            if filter_within(topic, &filter) {
                return Some(match rule.effect {
                    Effect::Allow => Decision::Allow,
                    Effect::Deny => Decision::Deny(format!("denied by rule {:?}", rule.filter)),
                });
            }
        }
        None
    }
}

/// Replaces `{device_id}`, `{module_id}`, `{client_id}` and `{principal}`;
/// `None` when the principal lacks a value the filter needs.
fn substitute(filter: &str, who: &Principal) -> Option<String> {
    let mut out = filter.replace("{principal}", &who.id);
    if out.contains("{client_id}") {
        let client = who
            .attributes
            .iter()
            .find(|(k, _)| k == "client_id")
            .map(|(_, v)| v.as_str())?;
        out = out.replace("{client_id}", client);
    }
    if out.contains("{device_id}") {
        out = out.replace("{device_id}", who.device_id.as_deref()?);
    }
    if out.contains("{module_id}") {
        out = out.replace("{module_id}", who.module_id.as_deref()?);
    }
    Some(out)
}

fn principal_of(identity: &Identity) -> Principal {
    let kind = match identity.kind {
        IdentityKind::Device => "device",
        IdentityKind::Module => "module",
        IdentityKind::Gateway => "gateway",
        IdentityKind::User => "user",
    };
    let is_device = matches!(
        identity.kind,
        IdentityKind::Device | IdentityKind::Module | IdentityKind::Gateway
    );
    Principal {
        id: identity.id.clone(),
        device_id: is_device.then(|| identity.device_id.clone()),
        module_id: identity.module_id.clone(),
        attributes: vec![("kind".to_string(), kind.to_string())],
    }
}

impl holdfast_sdk::auth::Auth for DefaultAuth {
    fn init(config: &Config) -> Result<Self, String> {
        let settings: Settings = config.deserialize()?;
        for (i, r) in settings.rules.iter().enumerate() {
            if r.filter.is_empty() {
                return Err(format!("rules[{i}]: filter is empty"));
            }
            if r.operations.is_empty() {
                return Err(format!("rules[{i}]: operations is empty"));
            }
        }
        Ok(DefaultAuth { settings })
    }

    fn authenticate(&self, info: &ConnectInfo) -> Result<Principal, Refusal> {
        if info.username.as_ref().is_some_and(|u| u.len() > MAX_CREDENTIAL_LEN)
            || info.password.as_ref().is_some_and(|p| p.len() > MAX_CREDENTIAL_LEN)
        {
            return Err(refuse(RefusalCode::BadCredentials, "username or password too long"));
        }
        let mut principal = match (&info.username, &info.password) {
            (Some(username), Some(password)) => {
                let password = std::str::from_utf8(password).ok();
                match password {
                    Some(p) if p.starts_with("SharedAccessSignature ") => self.authenticate_sas(info, username, p)?,
                    _ => {
                        let identity = self.enabled_identity(username)?;
                        if identity.kind != IdentityKind::User
                            || !identities::verify_password(username, info.password.as_deref().unwrap_or_default())
                        {
                            return Err(refuse(RefusalCode::BadCredentials, "bad username or password"));
                        }
                        principal_of(&identity)
                    }
                }
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(refuse(
                    RefusalCode::BadCredentials,
                    "username and password must come together",
                ));
            }
            (None, None) => match &info.cert_thumbprint {
                Some(tp) => {
                    let identity = self.enabled_identity(&info.client_id)?;
                    if !identities::verify_thumbprint(&info.client_id, tp) {
                        return Err(refuse(
                            RefusalCode::NotAuthorized,
                            "certificate thumbprint does not match",
                        ));
                    }
                    principal_of(&identity)
                }
                None if self.settings.allow_anonymous => Principal {
                    id: "anonymous".to_string(),
                    device_id: None,
                    module_id: None,
                    attributes: vec![("kind".to_string(), "anonymous".to_string())],
                },
                None => return Err(refuse(RefusalCode::NotAuthorized, "anonymous clients are not allowed")),
            },
        };
        principal
            .attributes
            .push(("client_id".to_string(), info.client_id.clone()));
        Ok(principal)
    }

    fn authorize(&self, who: &Principal, op: Operation, topic: &str) -> Decision {
        if let Some(d) = self.rule_decision(who, op, topic) {
            return d;
        }
        let kind = who
            .attributes
            .iter()
            .find(|(k, _)| k == "kind")
            .map(|(_, v)| v.as_str());
        let allowed: Vec<String> = match kind {
            Some("anonymous") => self.settings.anonymous_topics.clone(),
            Some("user") => self.settings.user_topics.clone(),
            _ => match (&who.device_id, &who.module_id) {
                (Some(d), Some(m)) => vec![
                    format!("devices/{d}/modules/{m}/#"),
                    "$iothub/#".to_string(),
                    "$holdfast/methods/#".to_string(),
                ],
                (Some(d), None) => vec![
                    format!("devices/{d}/#"),
                    "$iothub/#".to_string(),
                    "$holdfast/methods/#".to_string(),
                ],
                _ => Vec::new(),
            },
        };
        if allowed.iter().any(|a| filter_within(topic, a)) {
            Decision::Allow
        } else {
            Decision::Deny(format!("{} may not use {topic:?}", who.id))
        }
    }
}

holdfast_sdk::export_auth!(DefaultAuth);

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_sdk::auth::{Auth, crypto};
    use holdfast_sdk::testing::{TestHost, TestIdentity};

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW_MS: u64 = 1_700_000_000_000;

    fn sas(resource: &str, key: &[u8], expiry: u64) -> String {
        let sr = resource.replace('/', "%2F");
        let sig = crypto::hmac_sha256(key, format!("{sr}\n{expiry}").as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(sig);
        let sig = sig.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
        format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}")
    }

    fn setup(config: &str) -> DefaultAuth {
        TestHost::new()
            .now_unix_ms(NOW_MS)
            .identity(TestIdentity::device("dev1").with_sas_key(KEY))
            .identity(TestIdentity::device("dev2").with_sas_key(b"other-key"))
            .identity(TestIdentity::device("off").with_sas_key(KEY).disabled())
            .identity(TestIdentity::user("alice", "s3cret"))
            .install();
        DefaultAuth::init(&Config::parse(config).unwrap()).unwrap()
    }

    fn connect(client: &str, user: &str, pass: &str) -> ConnectInfo {
        ConnectInfo::new(client).with_credentials(user, pass)
    }

    #[test]
    fn sas_tokens_valid_expired_wrong_key_other_device() {
        let auth = setup("{}");
        let exp = NOW_MS / 1000 + 3600;
        let user = "hub.example/dev1/?api-version=2021-04-12";
        let ok = auth
            .authenticate(&connect("dev1", user, &sas("hub.example/devices/dev1", KEY, exp)))
            .unwrap();
        assert_eq!(ok.device_id.as_deref(), Some("dev1"));

        let expired = auth.authenticate(&connect(
            "dev1",
            user,
            &sas("hub.example/devices/dev1", KEY, NOW_MS / 1000 - 1),
        ));
        assert_eq!(expired.unwrap_err().reason, "SAS token expired");

        let wrong_key = auth.authenticate(&connect("dev1", user, &sas("hub.example/devices/dev1", b"nope", exp)));
        assert_eq!(wrong_key.unwrap_err().code, RefusalCode::NotAuthorized);

        let other = auth.authenticate(&connect("dev1", user, &sas("hub.example/devices/dev2", KEY, exp)));
        assert_eq!(other.unwrap_err().reason, "SAS resource does not name this device");

        let wrong_client = auth.authenticate(&connect("dev2", user, &sas("hub.example/devices/dev1", KEY, exp)));
        assert_eq!(wrong_client.unwrap_err().code, RefusalCode::BadClientId);

        let disabled = auth.authenticate(&connect(
            "off",
            "hub.example/off/?api-version=1",
            &sas("hub.example/devices/off", KEY, exp),
        ));
        assert!(disabled.unwrap_err().reason.contains("disabled"));
    }

    #[test]
    fn malformed_tokens_are_refused_not_panicking() {
        let auth = setup("{}");
        for pass in [
            "SharedAccessSignature ",
            "SharedAccessSignature sr=a",
            "SharedAccessSignature sr=a&sig=%%%&se=1",
            "SharedAccessSignature sr=a&sig=AAAA&se=soon",
            "SharedAccessSignature sr=a&sig=AAAA&se=99999999999&x=1",
        ] {
            let r = auth.authenticate(&connect("dev1", "hub.example/dev1/?api-version=1", pass));
            assert!(r.is_err(), "{pass}");
        }
        let huge = "x".repeat(MAX_CREDENTIAL_LEN + 1);
        assert_eq!(
            auth.authenticate(&connect("c", &huge, "p")).unwrap_err().code,
            RefusalCode::BadCredentials
        );
        let mut garbage = ConnectInfo::new("c");
        garbage.username = Some("u".into());
        garbage.password = Some(vec![0xff, 0xfe, 0x00]);
        assert!(auth.authenticate(&garbage).is_err());
    }

    #[test]
    fn users_and_anonymous() {
        let auth = setup(r#"{"allow_anonymous": false}"#);
        assert_eq!(
            auth.authenticate(&connect("c1", "alice", "s3cret")).unwrap().id,
            "alice"
        );
        assert_eq!(
            auth.authenticate(&connect("c1", "alice", "wrong")).unwrap_err().code,
            RefusalCode::BadCredentials
        );
        assert_eq!(
            auth.authenticate(&ConnectInfo::new("anon")).unwrap_err().code,
            RefusalCode::NotAuthorized
        );
        let open = setup("{}");
        assert_eq!(open.authenticate(&ConnectInfo::new("anon")).unwrap().id, "anonymous");
    }

    #[test]
    fn devices_stay_in_their_topic_space_and_rules_come_first() {
        let auth = setup(
            r#"{"rules":[
                {"effect":"allow","operations":["subscribe"],"filter":"fleet/{device_id}/#"},
                {"effect":"deny","operations":["publish"],"filter":"devices/{device_id}/secret"}
            ]}"#,
        );
        let exp = NOW_MS / 1000 + 60;
        let p = auth
            .authenticate(&connect(
                "dev1",
                "hub/dev1/?api-version=1",
                &sas("hub/devices/dev1", KEY, exp),
            ))
            .unwrap();
        let allow = |op, t: &str| auth.authorize(&p, op, t) == Decision::Allow;
        assert!(allow(Operation::Publish, "devices/dev1/messages/events/a=b"));
        assert!(allow(Operation::Subscribe, "devices/dev1/messages/devicebound/#"));
        assert!(allow(Operation::Subscribe, "$iothub/twin/res/#"));
        assert!(allow(Operation::Publish, "$holdfast/methods/POST/dev2/reboot/?$rid=1"));
        assert!(!allow(Operation::Publish, "devices/dev2/messages/events/"));
        assert!(!allow(Operation::Subscribe, "devices/+/messages/devicebound/#"));
        assert!(!allow(Operation::Subscribe, "#"));
        assert!(allow(Operation::Subscribe, "fleet/dev1/config"));
        assert!(!allow(Operation::Publish, "fleet/dev1/config"));
        assert!(!allow(Operation::Publish, "devices/dev1/secret"));
    }

    #[test]
    fn filter_within_is_a_subset_check() {
        assert!(filter_within("a/b", "a/#"));
        assert!(filter_within("a/+/c", "a/+/c"));
        assert!(filter_within("a/+/c", "a/#"));
        assert!(!filter_within("a/#", "a/+"));
        assert!(!filter_within("a/+", "a/b"));
        assert!(!filter_within("$SYS/x", "#"));
        assert!(filter_within("$iothub/twin/GET/?$rid=1", "$iothub/#"));
    }
}
