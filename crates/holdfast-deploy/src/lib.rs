//! # holdfast-deploy
//!
//! Fleet deployments: plugin components, plugin configs and live settings
//! that an owning node (the root, or a gateway for its own subtree) sends
//! down the tree, signed, in waves, with a health gate between waves.
//!
//! - [`model`]: the spec an operator writes, the signed document, reports.
//! - [`store`]: the fjall space `deploy` and the component files.
//! - [`Deployer`]: one per node, playing two roles over one store:
//!   - the **owner** (`owner`, `rollout`): signs the deployments it owns,
//!     resolves their target and releases waves through the gate;
//!   - the **node** (`received`, `apply`, `watch`): verifies what the
//!     parent sends (`trust`) and keeps it (so a restart needs no parent),
//!     never taking an older revision again (`revisions`), applies the
//!     deployment that wins through an [`Applier`] (the host's swap and
//!     reload path), watches the deployed plugins and rolls back by itself
//!     when they fail;
//!
//!   and both keep the report book (`reports`): every node's last report,
//!   sent up the tree.
//!
//! - [`fleet`]: the fleet view, every node of the subtree as it last
//!   reported, carried up on the same stream.
//!
//! The link carries [`proto::Msg`] between a parent and a child
//! (`holdfast-link/3`); this crate does not touch the network.

pub mod config;
pub mod fleet;
pub mod model;
pub mod proto;
pub mod store;

mod apply;
mod deployer;
mod held;
mod link_stream;
mod metrics;
mod owner;
mod received;
mod reports;
mod revisions;
mod rollout;
mod trust;
mod view;
mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use holdfast_tls::sign::{Signer, Verifier};
use model::Signed;
use store::Applied;

pub use deployer::Deployer;
pub use metrics::DeployMetrics;
pub use view::{NodeView, View};

/// Why a deployment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such deployment.
    #[error("no deployment {0:?}")]
    NotFound(String),
    /// It exists already, or the node cannot do this.
    #[error("{0}")]
    Conflict(String),
    /// A signature that is missing, wrong, or made by a node that may not
    /// deploy here.
    #[error("refused: {0}")]
    Refused(String),
    /// Component bytes that do not match their hash.
    #[error("component bytes do not match their hash: want {want}, got {got}")]
    HashMismatch {
        /// The hash named.
        want: String,
        /// The hash of the bytes.
        got: String,
    },
    /// Storage.
    #[error("storage: {0}")]
    Store(#[from] holdfast_store::StoreError),
    /// Files.
    #[error("{0}")]
    Io(String),
}

impl From<serde_json::Error> for DeployError {
    fn from(e: serde_json::Error) -> Self {
        DeployError::Invalid(e.to_string())
    }
}

/// One slot's part of what a node applies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotOverlay {
    /// The component file, when the deployment sets one.
    pub file: Option<PathBuf>,
    /// Its SHA-256.
    pub sha256: Option<String>,
    /// The plugin config, when the deployment sets one.
    pub config: Option<Value>,
}

/// What a deployment sets on top of a node's own config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overlay {
    /// The deployment.
    pub deployment: String,
    /// By slot.
    pub plugins: BTreeMap<String, SlotOverlay>,
    /// Settings by dotted key.
    pub settings: BTreeMap<String, Value>,
}

/// How a node applies deployments: implemented by the host over its swap
/// and reload path. Called from a blocking thread.
pub trait Applier: Send + Sync {
    /// Runs the node's own config with `overlay` on top (`None`: its own
    /// config alone), and checks that each component it names is the one
    /// in force (unless the node pins that slot). On error the deployer
    /// applies what ran before again. Answers the plugin versions in force
    /// by slot.
    ///
    /// # Errors
    /// Why it could not be applied.
    fn apply(&self, overlay: Option<&Overlay>) -> Result<BTreeMap<String, String>, String>;
    /// Per slot: calls and failed calls of the version in force.
    fn counters(&self) -> BTreeMap<String, (u64, u64)>;
    /// The upstream link's state and the outbox's message count.
    fn node_health(&self) -> (String, u64);
}

/// What a node shows about deployments at `GET /api/v1/deploy`.
#[derive(Debug, Clone, Serialize)]
pub struct LocalStatus {
    /// This node.
    pub node: String,
    /// Whether it takes deployments from its parent.
    pub accept: bool,
    /// Whether it can sign (own) deployments.
    pub can_sign: bool,
    /// Its ancestors, nearest first.
    pub ancestors: Vec<String>,
    /// What is applied.
    pub applied: Option<Applied>,
    /// Content it will not apply again: deployment, digest, reason.
    pub refused_content: Vec<(String, String, String)>,
}

/// An exported deployment with its components, to carry to a node that
/// cannot be reached (`holdfast deploy export` / `import`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    /// The signed document.
    pub signed: Signed,
    /// Components by SHA-256, base64.
    pub components: BTreeMap<String, String>,
}

/// What a node needs to take part in deployments.
pub struct Options {
    /// This node's id.
    pub node_id: String,
    /// The configured parent's id, if any.
    pub parent_id: Option<String>,
    /// Signs what this node owns (its fleet key, or `deploy.signing_*`).
    pub signer: Option<Signer>,
    /// Checks what the parent sends (the fleet CA).
    pub verifier: Option<Verifier>,
    /// Take deployments from the parent (`deploy.accept`).
    pub accept: bool,
    /// Largest component accepted, bytes.
    pub max_component_bytes: u64,
    /// How long a document this node signs stays valid, seconds
    /// (`deploy.expiry_seconds`). The owner signs a new revision of every
    /// live deployment when half of it has passed.
    pub expiry_seconds: u64,
    /// How often at most the fleet view's changes go to the parent
    /// (`deploy.fleet_report_seconds`).
    pub fleet_report: std::time::Duration,
}

#[cfg(test)]
mod tests;
