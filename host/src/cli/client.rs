//! The admin API client the commands use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::args::AdminArgs;
use crate::config::Config;

/// A client of a node's admin API.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl AdminClient {
    /// Finds the admin URL and token from flags, environment and config.
    ///
    /// # Errors
    /// No token could be found, or the config does not load.
    pub fn discover(args: &AdminArgs) -> Result<Self> {
        let config = match &args.config {
            Some(path) => Some(Config::load(path)?),
            None => None,
        };
        let base = match (&args.admin, &config) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Some(c)) => format!("http://{}", loopback_for(c.admin.listen)),
            (None, None) => "http://127.0.0.1:9600".to_string(),
        };
        let token_file = args.token_file.clone().unwrap_or_else(|| match &config {
            Some(c) => c.node.data_dir.join("admin.token"),
            None => PathBuf::from("./holdfast-data/admin.token"),
        });
        let token = match (&args.token, config.as_ref().and_then(|c| c.admin.token.clone())) {
            (Some(t), _) => t.clone(),
            (None, Some(t)) => t,
            (None, None) => std::fs::read_to_string(&token_file)
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "no admin token: pass --token, set HOLDFAST_ADMIN_TOKEN, or make {} readable",
                        token_file.display()
                    )
                })?,
        };
        Ok(Self::new(base, token))
    }

    /// A client for `base` (e.g. `http://127.0.0.1:9600`) with `token`.
    pub fn new(base: String, token: String) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        AdminClient { base, token, agent }
    }

    fn finish(&self, what: &str, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value> {
        let mut response = result.map_err(|e| anyhow!("cannot reach the admin API at {}: {e}", self.base))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {what}"))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{what}: {message} (HTTP {})", status.as_u16());
        }
        Ok(value)
    }

    /// GET a JSON document.
    ///
    /// # Errors
    /// Transport errors and non-2xx answers, with the server's message.
    pub fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(&format!("GET {path}"), r)
    }

    /// POST raw bytes.
    ///
    /// # Errors
    /// As [`AdminClient::get`].
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/wasm")
            .send(body);
        self.finish(&format!("POST {path}"), r)
    }

    /// DELETE a resource.
    ///
    /// # Errors
    /// As [`AdminClient::get`].
    pub fn delete(&self, path: &str) -> Result<Value> {
        let r = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(&format!("DELETE {path}"), r)
    }

    /// POST a JSON document.
    ///
    /// # Errors
    /// As [`AdminClient::get`].
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body.to_string().as_bytes());
        self.finish(&format!("POST {path}"), r)
    }
}

/// The address a local client should use for a listen address.
pub(crate) fn loopback_for(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => SocketAddr::from(([127, 0, 0, 1], a.port())),
        SocketAddr::V6(a) if a.ip().is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port())),
        other => other,
    }
}

/// Percent-encodes one path segment (a module id has a '/').
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
