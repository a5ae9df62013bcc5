//! `[upstream.nats]`: JetStream as the top of the tree.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[upstream.nats]`: drain the outbox into a JetStream stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// The cluster's servers: `nats://host:port`, `tls://host:port` or
    /// `host:port` (port 4222 when left out). Taken in turn: a server that
    /// cannot be reached or drops the link is followed by the next.
    pub servers: Vec<String>,
    /// The stream that must store what is published (checked at connect and
    /// on every publish with `Nats-Expected-Stream`). Default `HOLDFAST`.
    pub stream: String,
    /// Subject prefix: `{node}` is this node's id, `{lane}` the outbox lane
    /// (0-9); the topic's levels follow as tokens. Default
    /// `holdfast.{node}.{lane}`.
    pub subject_prefix: String,
    /// Strip this prefix from topics before mapping them to subjects.
    pub strip_prefix: String,
    /// Publishes awaiting JetStream's acknowledgement. 1 keeps the order of
    /// each lane in the stream even across a leader change (see
    /// docs/link.md); more pipelines. Default 256.
    pub inflight: usize,
    /// A publish not acknowledged by then ends the connection; it is sent
    /// again (the stream drops the duplicate), ms. Default 5000.
    pub ack_timeout_ms: u64,
    /// Sending pauses while the oldest publish in flight has waited this
    /// long for its acknowledgement (a leader change in progress), ms.
    /// Default 200.
    pub stall_ms: u64,
    /// Connection name shown by the server. Default: `node.id`.
    pub name: Option<String>,
    /// A `.creds` file (user JWT and NKey seed), as `nsc` writes it.
    pub credentials: Option<PathBuf>,
    /// A file holding an NKey seed (`SU...`), for NKey authentication.
    pub nkey_seed: Option<PathBuf>,
    /// User name (with `password`).
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// Require TLS (also implied by `tls://` servers). Default false.
    pub tls: bool,
    /// CA bundle for the servers' certificates, PEM. Default: the fleet CA
    /// if set (TLS needs one).
    pub ca: Option<PathBuf>,
    /// Client certificate chain, PEM (mutual TLS).
    pub cert: Option<PathBuf>,
    /// Client private key, PEM.
    pub key: Option<PathBuf>,
    /// `[upstream.nats.c2d]`: cloud-to-device through a durable consumer.
    pub c2d: NatsC2dConfig,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: Vec::new(),
            stream: "HOLDFAST".into(),
            subject_prefix: "holdfast.{node}.{lane}".into(),
            strip_prefix: String::new(),
            inflight: 256,
            ack_timeout_ms: 5000,
            stall_ms: 200,
            name: None,
            credentials: None,
            nkey_seed: None,
            username: None,
            password: None,
            token: None,
            tls: false,
            ca: None,
            cert: None,
            key: None,
            c2d: NatsC2dConfig::default(),
        }
    }
}

/// `[upstream.nats.c2d]`: messages for this node's devices, taken from a
/// durable JetStream consumer and acknowledged once stored here.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsC2dConfig {
    /// The stream holding cloud-to-device messages; empty turns this off.
    pub stream: String,
    /// Subject prefix of this node's messages (`{node}` is its id); the
    /// rest of a subject is the local topic. Default `c2d.{node}` (outside
    /// the default upstream subjects, `holdfast.>`: JetStream streams may not
    /// overlap).
    pub subject_prefix: String,
    /// The durable consumer's name (`{node}` is the node's id). Default
    /// `holdfast-{node}`.
    pub consumer: String,
    /// Add this prefix to topics before local delivery.
    pub add_prefix: String,
    /// Messages delivered and not yet acknowledged. Default 1000.
    pub max_ack_pending: i64,
}

impl Default for NatsC2dConfig {
    fn default() -> Self {
        NatsC2dConfig {
            stream: String::new(),
            subject_prefix: "c2d.{node}".into(),
            consumer: "holdfast-{node}".into(),
            add_prefix: String::new(),
            max_ack_pending: 1000,
        }
    }
}

impl NatsConfig {
    /// The servers as URLs (a bare `host:port` gets `nats://`).
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| {
                if s.contains("://") {
                    s.clone()
                } else {
                    format!("nats://{s}")
                }
            })
            .collect()
    }

    /// The servers as `host:port`, in the order of [`NatsConfig::urls`].
    pub fn targets(&self) -> Vec<String> {
        self.urls()
            .iter()
            .map(|u| {
                let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
                // Credentials in the URL are not part of the address.
                let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
                let rest = rest.split('/').next().unwrap_or(rest);
                crate::config::with_port(rest, 4222)
            })
            .collect()
    }

    /// Checks the values; on error the key at fault and why.
    ///
    /// # Errors
    /// A value out of range or unusable.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.servers.is_empty() {
            return Err(("upstream.nats.servers", "at least one server is required".into()));
        }
        for (u, t) in self.urls().iter().zip(self.targets()) {
            if !unambiguous(&t) {
                return Err((
                    "upstream.nats.servers",
                    format!("{u:?}: write an IPv6 address in brackets, [addr]:port"),
                ));
            }
            let scheme = u.split_once("://").map_or("", |(s, _)| s);
            if !matches!(scheme, "nats" | "tls") {
                return Err((
                    "upstream.nats.servers",
                    format!("{u:?}: the scheme must be nats:// or tls://"),
                ));
            }
        }
        if self.stream.is_empty() || self.stream.contains(['.', '*', '>', ' ']) {
            return Err((
                "upstream.nats.stream",
                format!("{:?} is not a stream name", self.stream),
            ));
        }
        let sample = super::subject::prefix(&self.subject_prefix, "node", 0);
        if !self.subject_prefix.contains("{lane}") {
            return Err((
                "upstream.nats.subject_prefix",
                "must contain {lane}: each lane has subjects of its own".into(),
            ));
        }
        if !super::subject::valid_subject(&sample) {
            return Err((
                "upstream.nats.subject_prefix",
                format!("{:?} does not give a valid subject", self.subject_prefix),
            ));
        }
        if !(1..=65_536).contains(&self.inflight) {
            return Err(("upstream.nats.inflight", "must be 1-65536".into()));
        }
        if self.ack_timeout_ms == 0 {
            return Err(("upstream.nats.ack_timeout_ms", "must be at least 1".into()));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(("upstream.nats.cert", "cert and key go together".into()));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(("upstream.nats.username", "a password needs a user name".into()));
        }
        let c = &self.c2d;
        if !c.stream.is_empty() {
            if !super::subject::valid_subject(&super::subject::prefix(&c.subject_prefix, "node", 0)) {
                return Err((
                    "upstream.nats.c2d.subject_prefix",
                    format!("{:?} does not give a valid subject", c.subject_prefix),
                ));
            }
            if c.consumer.is_empty() || c.consumer.contains(['.', '*', '>', ' ']) {
                return Err((
                    "upstream.nats.c2d.consumer",
                    format!("{:?} is not a consumer name", c.consumer),
                ));
            }
            if c.max_ack_pending < 1 {
                return Err(("upstream.nats.c2d.max_ack_pending", "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

/// False for `host:port` whose host is an IPv6 address without brackets
/// (`fe80::1:4222` could be read two ways).
pub fn unambiguous(target: &str) -> bool {
    target.starts_with('[') || target.matches(':').count() <= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_become_urls_and_targets() {
        let c = NatsConfig {
            servers: vec![
                "n1:4223".into(),
                "nats://n2".into(),
                "tls://user:pw@n3:4333".into(),
                "[::1]".into(),
            ],
            ..NatsConfig::default()
        };
        assert_eq!(c.urls()[0], "nats://n1:4223");
        assert_eq!(c.targets(), ["n1:4223", "n2:4222", "n3:4333", "[::1]:4222"]);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |f: fn(&mut NatsConfig)| {
            let mut c = NatsConfig {
                servers: vec!["n1".into()],
                ..NatsConfig::default()
            };
            f(&mut c);
            c.validate().unwrap_err().0
        };
        assert_eq!(bad(|c| c.servers.clear()), "upstream.nats.servers");
        assert_eq!(bad(|c| c.servers = vec!["http://x".into()]), "upstream.nats.servers");
        assert_eq!(bad(|c| c.servers = vec!["fe80::1".into()]), "upstream.nats.servers");
        assert_eq!(bad(|c| c.stream = "a.b".into()), "upstream.nats.stream");
        assert_eq!(
            bad(|c| c.subject_prefix = "x.{node}".into()),
            "upstream.nats.subject_prefix"
        );
        assert_eq!(
            bad(|c| c.subject_prefix = "x..{lane}".into()),
            "upstream.nats.subject_prefix"
        );
        assert_eq!(bad(|c| c.inflight = 0), "upstream.nats.inflight");
        assert_eq!(bad(|c| c.cert = Some("c".into())), "upstream.nats.cert");
        assert_eq!(
            bad(|c| {
                c.c2d.stream = "C2D".into();
                c.c2d.consumer = "a b".into();
            }),
            "upstream.nats.c2d.consumer"
        );
    }
}
