//! `[cache]` of the node's configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[cache]`: the in-network HTTP range cache (docs/cache.md). Which
/// requests it serves is decided by the content-source plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Serve the cache. Default true.
    pub enabled: bool,
    /// TCP address of the HTTP/1.1 listener. Default `0.0.0.0:8080`; use
    /// port 80 in production (update clients expect it).
    pub listen: SocketAddr,
    /// TCP address of an HTTPS listener (HTTP/1.1 over TLS, rustls) served
    /// besides `listen`, e.g. `0.0.0.0:443`. Default none (off).
    pub tls_listen: Option<SocketAddr>,
    /// The HTTPS listener's certificate chain, PEM. Required with `tls_listen`.
    pub tls_cert: Option<PathBuf>,
    /// The HTTPS listener's private key, PEM. Required with `tls_listen`.
    pub tls_key: Option<PathBuf>,
    /// Where blocks are stored. Default `<data_dir>/cache`.
    pub dir: Option<PathBuf>,
    /// Block size in bytes: a power of two, 64 KiB-16 MiB. Default 1 MiB.
    /// Use the same size at every level of a tree. Changing it empties the cache.
    pub block_size: u64,
    /// Most bytes of blocks stored. Default 10 GiB.
    pub max_size: u64,
    /// Free space to leave on the cache's file system, bytes. Default 1 GiB.
    pub min_free: u64,
    /// The parent node's cache, e.g. `http://10.0.0.1:8080`. Misses are
    /// fetched through it (it fetches from its own parent or the origin)
    /// instead of from the origin. Default none.
    pub parent: Option<String>,
    /// Bytes a fill keeps fetching after every client that was reading it
    /// went away. Default 16 MiB.
    pub orphan_fill_bytes: u64,
    /// Timeout for connecting to an upstream and receiving its response
    /// head, and for each read of its body, ms. Default 30000.
    pub upstream_timeout_ms: u64,
    /// Extra PEM trust anchors for https origins, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Concurrent client connections. Default 1024.
    pub max_connections: usize,
    /// Concurrent connections from one client address (an IPv6 client by
    /// its /64). Default 64.
    pub max_connections_per_ip: usize,
    /// Share of `max_connections`, percent (rounded down), taken only by
    /// clients that hold no connection yet. Default 10.
    pub reserved_connections_percent: u8,
    /// Time a client has to send a whole request head, from the first byte
    /// it may send (for a kept-alive connection, from the end of the last
    /// response) to its end, ms. Default 10000.
    pub header_timeout_ms: u64,
    /// Targeted cache-control fields this cache obeys (RFC 9213), first
    /// match wins: when a response carries one, its directives replace
    /// `Cache-Control` and `Expires` for this cache. Default
    /// `["CDN-Cache-Control"]`; empty to obey `Cache-Control` only.
    pub targeted_cache_control: Vec<String>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            dir: None,
            block_size: 1 << 20,
            max_size: 10 << 30,
            min_free: 1 << 30,
            parent: None,
            orphan_fill_bytes: 16 << 20,
            upstream_timeout_ms: 30_000,
            ca_file: None,
            max_connections: 1024,
            max_connections_per_ip: 64,
            reserved_connections_percent: 10,
            header_timeout_ms: 10_000,
            targeted_cache_control: vec!["CDN-Cache-Control".to_string()],
        }
    }
}

impl CacheConfig {
    /// Checks the values; on error the key at fault and why.
    ///
    /// # Errors
    /// A value out of range.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let c = self;
        if !c.block_size.is_power_of_two() || !(64 << 10..=16 << 20).contains(&c.block_size) {
            return Err((
                "cache.block_size",
                "must be a power of two from 65536 to 16777216".to_string(),
            ));
        }
        if c.max_size < c.block_size {
            return Err(("cache.max_size", "must be at least one block".to_string()));
        }
        if let Some(p) = &c.parent
            && let Err(e) = crate::upstream::Endpoint::parse(p)
        {
            return Err(("cache.parent", e.to_string()));
        }
        if c.upstream_timeout_ms < 100 {
            return Err(("cache.upstream_timeout_ms", "must be at least 100".to_string()));
        }
        if c.max_connections == 0 {
            return Err(("cache.max_connections", "must be at least 1".to_string()));
        }
        if c.max_connections_per_ip == 0 {
            return Err(("cache.max_connections_per_ip", "must be at least 1".to_string()));
        }
        if c.reserved_connections_percent > 90 {
            return Err(("cache.reserved_connections_percent", "must be 0-90".to_string()));
        }
        for name in &c.targeted_cache_control {
            if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(("cache.targeted_cache_control", format!("{name:?} is not a field name")));
            }
        }
        if !(100..=600_000).contains(&c.header_timeout_ms) {
            return Err(("cache.header_timeout_ms", "must be 100-600000".to_string()));
        }
        match (c.tls_listen, &c.tls_cert, &c.tls_key) {
            (Some(_), None, _) => return Err(("cache.tls_cert", "required with cache.tls_listen".to_string())),
            (Some(_), _, None) => return Err(("cache.tls_key", "required with cache.tls_listen".to_string())),
            (Some(a), _, _) if a == c.listen => {
                return Err(("cache.tls_listen", "must differ from cache.listen".to_string()));
            }
            (None, Some(_), _) | (None, _, Some(_)) => {
                return Err((
                    "cache.tls_listen",
                    "required with cache.tls_cert and cache.tls_key".to_string(),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

impl CacheConfig {
    /// `targeted_cache_control` as field names (invalid ones, which
    /// [`CacheConfig::validate`] refuses, are left out).
    pub fn targeted_fields(&self) -> Vec<hyper::header::HeaderName> {
        self.targeted_cache_control
            .iter()
            .filter_map(|n| hyper::header::HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_are_checked() {
        let ok = CacheConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            (
                ok.max_connections_per_ip,
                ok.reserved_connections_percent,
                ok.header_timeout_ms
            ),
            (64, 10, 10_000)
        );
        let bad = |f: fn(&mut CacheConfig)| {
            let mut c = CacheConfig::default();
            f(&mut c);
            c.validate().map_err(|(key, _)| key)
        };
        assert_eq!(
            bad(|c| c.max_connections_per_ip = 0),
            Err("cache.max_connections_per_ip")
        );
        assert_eq!(
            bad(|c| c.reserved_connections_percent = 91),
            Err("cache.reserved_connections_percent")
        );
        assert_eq!(bad(|c| c.reserved_connections_percent = 90), Ok(()));
        assert_eq!(bad(|c| c.header_timeout_ms = 99), Err("cache.header_timeout_ms"));
        assert_eq!(bad(|c| c.header_timeout_ms = 600_001), Err("cache.header_timeout_ms"));
    }

    #[test]
    fn the_https_listener_needs_its_certificate_and_key() {
        let with = |listen: Option<&str>, cert: bool, key: bool| {
            let c = CacheConfig {
                tls_listen: listen.map(|a| a.parse().unwrap()),
                tls_cert: cert.then(|| PathBuf::from("c.pem")),
                tls_key: key.then(|| PathBuf::from("k.pem")),
                ..CacheConfig::default()
            };
            c.validate().map_err(|(key, _)| key)
        };
        assert_eq!(with(None, false, false), Ok(()), "off by default");
        assert_eq!(with(Some("0.0.0.0:443"), true, true), Ok(()));
        assert_eq!(with(Some("0.0.0.0:443"), false, true), Err("cache.tls_cert"));
        assert_eq!(with(Some("0.0.0.0:443"), true, false), Err("cache.tls_key"));
        assert_eq!(with(Some("0.0.0.0:8080"), true, true), Err("cache.tls_listen"));
        assert_eq!(with(None, true, true), Err("cache.tls_listen"));
    }
}
