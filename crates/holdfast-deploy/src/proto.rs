//! The deployment messages of the link (`holdfast-link/3`), JSON in DEPLOY
//! frames on the deploy stream the child opens. Component bytes follow a
//! [`Msg::Component`] as raw BLOB frames.
//!
//! - parent → child: [`Msg::Offer`] on connect and at every change: this
//!   node and its ancestors, and every signed deployment that concerns the
//!   child's subtree; then the components the child asks for.
//! - child → parent: [`Msg::Hello`] first; [`Msg::Fetch`] for each missing
//!   component, one at a time; [`Msg::Reports`] with its own and its
//!   subtree's states, all of them on connect, then each change.

use serde::{Deserialize, Serialize};

use crate::model::{Report, Signed};

/// Largest DEPLOY frame.
pub const MAX_FRAME: usize = 4 << 20;
/// Component bytes per BLOB frame.
pub const CHUNK: usize = 256 << 10;

/// A deployment message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Msg {
    /// Child → parent: the first message.
    Hello,
    /// Parent → child: what concerns the child's subtree.
    Offer {
        /// The parent, then its ancestors.
        ancestors: Vec<String>,
        /// Signed deployments.
        deployments: Vec<Signed>,
    },
    /// Child → parent: send this component.
    Fetch {
        /// Its SHA-256.
        sha256: String,
    },
    /// Parent → child: the component follows in BLOB frames.
    Component {
        /// Its SHA-256.
        sha256: String,
        /// Its size, bytes.
        size: u64,
    },
    /// Parent → child: the component is not here (yet); ask again later.
    Missing {
        /// Its SHA-256.
        sha256: String,
    },
    /// Child → parent: node states.
    Reports {
        /// Reports.
        reports: Vec<Report>,
    },
}
