//! The node's side of fleet deployments: how a deployment is applied (the
//! reload path, with the deployment's overlay on the config file), and the
//! signing and verifying keys.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::Config;
use crate::reload::Reloader;
use holdfast_deploy::{Applier, Overlay};
use holdfast_link::Status;
use holdfast_outbox::Outbox;
use holdfast_plugins::PluginHost;
use holdfast_tls::sign::{Signer, Verifier};

/// Applies deployments through [`Reloader::apply_overlay`], and tells the
/// deployer what runs and how the node fares.
#[derive(Debug)]
pub struct NodeApplier {
    reloader: Arc<Reloader>,
    plugins: Arc<PluginHost>,
    link: Arc<Status>,
    outbox: Arc<Outbox>,
}

impl NodeApplier {
    /// Over the node's reloader, with the plugins it checks, and the link
    /// and outbox it reports on.
    pub fn new(
        reloader: Arc<Reloader>,
        plugins: Arc<PluginHost>,
        link: Arc<Status>,
        outbox: Arc<Outbox>,
    ) -> NodeApplier {
        NodeApplier {
            reloader,
            plugins,
            link,
            outbox,
        }
    }
}

impl Applier for NodeApplier {
    fn apply(&self, overlay: Option<&Overlay>) -> Result<BTreeMap<String, String>, String> {
        self.reloader.apply_overlay(overlay)?;
        let versions: BTreeMap<String, String> = self
            .plugins
            .list()
            .into_iter()
            .map(|s| (s.slot.as_str().to_string(), s.version))
            .collect();
        let pinned = |slot: &str| self.reloader.is_pinned(&format!("plugins.{slot}.file"));
        for (slot, s) in overlay.iter().flat_map(|o| o.plugins.iter()) {
            if let Some(sha) = &s.sha256
                && !pinned(slot)
                && versions.get(slot) != Some(sha)
            {
                let err = format!(
                    "{slot}: the component in force is {} but the deployment names {sha}",
                    versions.get(slot).map_or("none", String::as_str)
                );
                // The deployer puts back what ran before.
                return Err(err);
            }
        }
        Ok(versions)
    }

    fn counters(&self) -> BTreeMap<String, (u64, u64)> {
        self.plugins
            .list()
            .into_iter()
            .map(|s| (s.slot.as_str().to_string(), (s.calls, s.traps)))
            .collect()
    }

    fn node_health(&self) -> (String, u64) {
        let link = serde_json::to_value(self.link.snapshot().state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let messages = self.outbox.stats().iter().map(|l| l.messages).sum();
        (link, messages)
    }
}

/// The key this node signs its deployments with: `deploy.signing_*`, else
/// its fleet certificate. `None` (logged) when there is none or it does
/// not load.
pub fn signer(config: &Config) -> Option<Signer> {
    let (cert, key) = match (&config.deploy.signing_cert, &config.deploy.signing_key) {
        (Some(c), Some(k)) => (c, k),
        _ => (config.fleet.cert.as_ref()?, config.fleet.key.as_ref()?),
    };
    match Signer::load(cert, key) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "deploy: no signing key; this node cannot own deployments");
            None
        }
    }
}

/// Checks deployments against the fleet CA (`fleet.ca`).
pub fn verifier(config: &Config) -> Option<Verifier> {
    let ca = config.fleet.ca.as_ref()?;
    match holdfast_tls::load_roots(ca) {
        Ok(roots) => Some(Verifier::new(roots)),
        Err(e) => {
            tracing::warn!(error = %e, "deploy: fleet.ca does not load; deployments from the parent are refused");
            None
        }
    }
}
