//! Auth plugins: decide who may connect and what they may publish and
//! subscribe to.
//!
//! Implement [`Auth`] and export it with [`export_auth!`](crate::export_auth).
//! Credentials are checked through [`identities`] and [`crypto`]: the host
//! keeps the secrets and answers yes or no.
//!
//! ## Example
//!
//! ```
//! use holdfast_sdk::auth::{identities, Auth, ConnectInfo, Decision, Operation, Principal, Refusal, RefusalCode};
//! use holdfast_sdk::Config;
//!
//! /// Users with a password the host verifies; each may use `users/{name}/#`.
//! struct PasswordAuth;
//!
//! impl Auth for PasswordAuth {
//!     fn init(_config: &Config) -> Result<Self, String> {
//!         Ok(PasswordAuth)
//!     }
//!     fn authenticate(&self, info: &ConnectInfo) -> Result<Principal, Refusal> {
//!         let (Some(user), Some(password)) = (&info.username, &info.password) else {
//!             return Err(Refusal::new(RefusalCode::NotAuthorized, "credentials required"));
//!         };
//!         if !identities::verify_password(user, password) {
//!             return Err(Refusal::new(RefusalCode::BadCredentials, "bad username or password"));
//!         }
//!         Ok(Principal { id: user.clone(), ..Principal::default() })
//!     }
//!     fn authorize(&self, who: &Principal, _op: Operation, topic: &str) -> Decision {
//!         if topic.starts_with(&format!("users/{}/", who.id)) {
//!             Decision::Allow
//!         } else {
//!             Decision::Deny("outside the user's topics".to_string())
//!         }
//!     }
//! }
//! holdfast_sdk::export_auth!(PasswordAuth);
//!
//! // Native test: the test host plays the gateway's identity store.
//! use holdfast_sdk::testing::{TestHost, TestIdentity};
//! TestHost::new().identity(TestIdentity::user("ann", "pw")).install();
//! let auth = PasswordAuth::init(&Config::empty()).unwrap();
//! let ann = auth.authenticate(&ConnectInfo::new("c1").with_credentials("ann", "pw")).unwrap();
//! assert_eq!(auth.authorize(&ann, Operation::Publish, "users/ann/t"), Decision::Allow);
//! assert!(auth.authenticate(&ConnectInfo::new("c1").with_credentials("ann", "no")).is_err());
//! ```

use crate::Config;

/// An auth plugin.
pub trait Auth: Sized + 'static {
    /// Builds the plugin from its configuration. Called once per instance.
    ///
    /// # Errors
    /// A message for the operator; the plugin version is then rejected.
    fn init(config: &Config) -> Result<Self, String>;

    /// Decides whether a CONNECT is let in and as whom.
    ///
    /// # Errors
    /// A [`Refusal`] whose code is sent to the client.
    fn authenticate(&self, info: &ConnectInfo) -> Result<Principal, Refusal>;

    /// Decides whether `who` may perform `op` on `topic`.
    fn authorize(&self, who: &Principal, op: Operation, topic: &str) -> Decision;
}

/// The transport a client connected over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS.
    Tls,
    /// QUIC.
    Quic,
    /// WebSocket.
    WebSocket,
}

/// What a client presented in its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// MQTT client identifier.
    pub client_id: String,
    /// Username, if given.
    pub username: Option<String>,
    /// Password, if given.
    pub password: Option<Vec<u8>>,
    /// 4 for MQTT 3.1.1, 5 for MQTT 5.0.
    pub protocol_version: u8,
    /// The transport.
    pub transport: Transport,
    /// The peer's address.
    pub peer_addr: String,
    /// SHA-256 thumbprint of the verified TLS client certificate (lowercase hex).
    pub cert_thumbprint: Option<String>,
    /// Common name of the verified TLS client certificate.
    pub cert_common_name: Option<String>,
}

impl ConnectInfo {
    /// A plain TCP MQTT 5 connect with no credentials (for tests).
    pub fn new(client_id: impl Into<String>) -> Self {
        ConnectInfo {
            client_id: client_id.into(),
            username: None,
            password: None,
            protocol_version: 5,
            transport: Transport::Tcp,
            peer_addr: "127.0.0.1:50000".to_string(),
            cert_thumbprint: None,
            cert_common_name: None,
        }
    }

    /// Sets username and password (for tests).
    pub fn with_credentials(mut self, username: impl Into<String>, password: impl Into<Vec<u8>>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }
}

/// Who an authenticated client is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Principal {
    /// Identity id, or `anonymous`.
    pub id: String,
    /// Device id, for devices and modules.
    pub device_id: Option<String>,
    /// Module id, for modules.
    pub module_id: Option<String>,
    /// Attributes kept with the connection.
    pub attributes: Vec<(String, String)>,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// Bad user name or password.
    BadCredentials,
    /// Not authorized.
    NotAuthorized,
    /// Client identifier not valid.
    BadClientId,
    /// Banned.
    Banned,
}

/// A refused CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code sent to the client.
    pub code: RefusalCode,
    /// A reason for the operator's log.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `code` and `reason`.
    pub fn new(code: RefusalCode, reason: impl Into<String>) -> Self {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

/// The operation being authorized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// PUBLISH.
    Publish,
    /// SUBSCRIBE.
    Subscribe,
}

/// An authorization decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Denied, with a reason.
    Deny(String),
}

/// What an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// A leaf device.
    Device,
    /// A module on a device.
    Module,
    /// A child gateway.
    Gateway,
    /// A plain MQTT user.
    User,
}

/// The public part of an identity known to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Registry id.
    pub id: String,
    /// What it is.
    pub kind: IdentityKind,
    /// Device id (the device a module runs on).
    pub device_id: String,
    /// Module id, for modules.
    pub module_id: Option<String>,
    /// Parent gateway id.
    pub parent: Option<String>,
    /// False when disabled.
    pub enabled: bool,
    /// Credential kinds: `sas`, `x509-thumbprint`, `password`.
    pub credentials: Vec<String>,
}

/// Identities the node may authenticate; secrets stay in the host.
///
/// Available natively and in wasm builds of auth plugins.
#[cfg(any(not(target_arch = "wasm32"), feature = "auth"))]
pub mod identities {
    use super::Identity;

    /// Looks up an identity by id.
    pub fn lookup(id: &str) -> Option<Identity> {
        imp::lookup(id)
    }

    /// True when `signature` is HMAC-SHA256(`string_to_sign`) under the
    /// identity's primary or secondary key (constant-time compare).
    pub fn verify_sas(id: &str, string_to_sign: &str, signature: &[u8]) -> bool {
        imp::verify_sas(id, string_to_sign, signature)
    }

    /// True when `password` matches the identity's stored password hash.
    pub fn verify_password(id: &str, password: &[u8]) -> bool {
        imp::verify_password(id, password)
    }

    /// True when `thumbprint` is one of the identity's certificate thumbprints.
    pub fn verify_thumbprint(id: &str, thumbprint: &str) -> bool {
        imp::verify_thumbprint(id, thumbprint)
    }

    #[cfg(all(target_arch = "wasm32", feature = "auth"))]
    mod imp {
        use super::super::{Identity, IdentityKind};
        use crate::__wit::auth::holdfast::gateway::identities as w;

        pub fn lookup(id: &str) -> Option<Identity> {
            w::lookup(id).map(|i| Identity {
                id: i.id,
                kind: match i.kind {
                    w::IdentityKind::Device => IdentityKind::Device,
                    w::IdentityKind::Module => IdentityKind::Module,
                    w::IdentityKind::Gateway => IdentityKind::Gateway,
                    w::IdentityKind::User => IdentityKind::User,
                },
                device_id: i.device_id,
                module_id: i.module_id,
                parent: i.parent,
                enabled: i.enabled,
                credentials: i.credentials,
            })
        }
        pub fn verify_sas(id: &str, sts: &str, sig: &[u8]) -> bool {
            w::verify_sas(id, sts, sig)
        }
        pub fn verify_password(id: &str, pw: &[u8]) -> bool {
            w::verify_password(id, pw)
        }
        pub fn verify_thumbprint(id: &str, tp: &str) -> bool {
            w::verify_thumbprint(id, tp)
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod imp {
        use super::Identity;
        use crate::testing::with_host;

        pub fn lookup(id: &str) -> Option<Identity> {
            with_host(|h| h.identities.get(id).map(|t| t.identity.clone()))
        }
        pub fn verify_sas(id: &str, sts: &str, sig: &[u8]) -> bool {
            with_host(|h| {
                h.identities.get(id).is_some_and(|t| {
                    t.sas_keys.iter().any(|k| {
                        crate::auth::crypto::constant_time_eq(&crate::auth::crypto::hmac_sha256(k, sts.as_bytes()), sig)
                    })
                })
            })
        }
        pub fn verify_password(id: &str, pw: &[u8]) -> bool {
            with_host(|h| {
                h.identities
                    .get(id)
                    .and_then(|t| t.password.as_ref())
                    .is_some_and(|p| crate::auth::crypto::constant_time_eq(p, pw))
            })
        }
        pub fn verify_thumbprint(id: &str, tp: &str) -> bool {
            with_host(|h| {
                h.identities
                    .get(id)
                    .is_some_and(|t| t.thumbprints.iter().any(|x| x.eq_ignore_ascii_case(tp)))
            })
        }
    }
}

/// Cryptographic helpers computed by the host.
///
/// Available natively and in wasm builds of auth plugins.
#[cfg(any(not(target_arch = "wasm32"), feature = "auth"))]
pub mod crypto {
    /// HMAC-SHA256 of `data` under `key`.
    pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
        imp::hmac_sha256(key, data)
    }

    /// SHA-256 of `data`.
    pub fn sha256(data: &[u8]) -> Vec<u8> {
        imp::sha256(data)
    }

    /// Constant-time equality of two byte strings.
    pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
        imp::constant_time_eq(a, b)
    }

    #[cfg(all(target_arch = "wasm32", feature = "auth"))]
    mod imp {
        use crate::__wit::auth::holdfast::gateway::crypto as w;
        pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
            w::hmac_sha256(key, data)
        }
        pub fn sha256(data: &[u8]) -> Vec<u8> {
            w::sha256(data)
        }
        pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
            w::constant_time_eq(a, b)
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    mod imp {
        use hmac::{Hmac, Mac};
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;

        pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
            // HMAC takes keys of any length; an empty answer never matches.
            let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
                return Vec::new();
            };
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        }
        pub fn sha256(data: &[u8]) -> Vec<u8> {
            Sha256::digest(data).to_vec()
        }
        pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
            a.len() == b.len() && bool::from(a.ct_eq(b))
        }
    }
}

/// Exports an [`Auth`] implementation as the plugin's auth world.
#[macro_export]
macro_rules! export_auth {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__wit::auth::holdfast::gateway::authn as __w;
            struct __HoldfastAuth;
            ::std::thread_local! {
                static __PLUGIN: ::core::cell::RefCell<::core::option::Option<$ty>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            impl $crate::__wit::auth::Guest for __HoldfastAuth {
                fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    let config = $crate::Config::parse(&config)?;
                    let plugin = <$ty as $crate::auth::Auth>::init(&config)?;
                    __PLUGIN.with(|p| *p.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok(())
                }
                fn authenticate(info: __w::ConnectInfo) -> ::core::result::Result<__w::Principal, __w::Refusal> {
                    let info = $crate::auth::__from_wit_info(info);
                    __PLUGIN.with(|p| match &*p.borrow() {
                        ::core::option::Option::Some(plugin) => {
                            $crate::auth::__authn_into_wit(<$ty as $crate::auth::Auth>::authenticate(plugin, &info))
                        }
                        ::core::option::Option::None => ::core::panic!("authenticate called before init"),
                    })
                }
                fn authorize(who: __w::Principal, op: __w::Operation, topic: ::std::string::String) -> __w::Decision {
                    let (who, op) = $crate::auth::__from_wit_authz(who, op);
                    __PLUGIN.with(|p| match &*p.borrow() {
                        ::core::option::Option::Some(plugin) => $crate::auth::__decision_into_wit(
                            <$ty as $crate::auth::Auth>::authorize(plugin, &who, op, &topic),
                        ),
                        ::core::option::Option::None => ::core::panic!("authorize called before init"),
                    })
                }
            }
    $crate::__wit::auth::__export_auth!(__HoldfastAuth with_types_in $crate::__wit::auth);
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn __assert_auth<T: $crate::auth::Auth>() {}
            let _ = __assert_auth::<$ty>;
        };
    };
}

#[cfg(all(target_arch = "wasm32", feature = "auth"))]
mod wit_conv {
    use super::*;
    use crate::__wit::auth::holdfast::gateway::authn as w;

    #[doc(hidden)]
    pub fn __from_wit_info(i: w::ConnectInfo) -> ConnectInfo {
        ConnectInfo {
            client_id: i.client_id,
            username: i.username,
            password: i.password,
            protocol_version: i.protocol_version,
            transport: match i.transport {
                w::Transport::Tcp => Transport::Tcp,
                w::Transport::Tls => Transport::Tls,
                w::Transport::Quic => Transport::Quic,
                w::Transport::Websocket => Transport::WebSocket,
            },
            peer_addr: i.peer_addr,
            cert_thumbprint: i.cert_thumbprint,
            cert_common_name: i.cert_common_name,
        }
    }

    fn principal_into_wit(p: Principal) -> w::Principal {
        w::Principal {
            id: p.id,
            device_id: p.device_id,
            module_id: p.module_id,
            attributes: p.attributes,
        }
    }

    #[doc(hidden)]
    pub fn __authn_into_wit(r: Result<Principal, Refusal>) -> Result<w::Principal, w::Refusal> {
        match r {
            Ok(p) => Ok(principal_into_wit(p)),
            Err(r) => Err(w::Refusal {
                code: match r.code {
                    RefusalCode::BadCredentials => w::RefusalCode::BadCredentials,
                    RefusalCode::NotAuthorized => w::RefusalCode::NotAuthorized,
                    RefusalCode::BadClientId => w::RefusalCode::BadClientId,
                    RefusalCode::Banned => w::RefusalCode::Banned,
                },
                reason: r.reason,
            }),
        }
    }

    #[doc(hidden)]
    pub fn __from_wit_authz(p: w::Principal, op: w::Operation) -> (Principal, Operation) {
        (
            Principal {
                id: p.id,
                device_id: p.device_id,
                module_id: p.module_id,
                attributes: p.attributes,
            },
            match op {
                w::Operation::Publish => Operation::Publish,
                w::Operation::Subscribe => Operation::Subscribe,
            },
        )
    }

    #[doc(hidden)]
    pub fn __decision_into_wit(d: Decision) -> w::Decision {
        match d {
            Decision::Allow => w::Decision::Allow,
            Decision::Deny(r) => w::Decision::Deny(r),
        }
    }
}
#[cfg(all(target_arch = "wasm32", feature = "auth"))]
#[doc(hidden)]
pub use wit_conv::*;
