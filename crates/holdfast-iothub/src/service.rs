//! The messages of the link's service stream (twins, direct methods,
//! cloud-to-device messages between a parent and a child gateway). The
//! link frames and carries them; this crate produces and consumes them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::MethodResult;
use crate::c2d::{C2dMessage, Feedback, Outcome};

/// One message of the service stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Svc {
    /// Child → parent: the first frame.
    Hello,
    /// Parent → child: a twin's desired properties.
    Desired {
        /// Twin id.
        id: String,
        /// Desired version.
        version: u64,
        /// The document.
        desired: Map<String, Value>,
    },
    /// Child → parent: reported changes not yet acknowledged, merged.
    Reported {
        /// Twin id.
        id: String,
        /// The child's generation of this patch.
        generation: u64,
        /// The merged patch.
        patch: Map<String, Value>,
    },
    /// Parent → child: a reported patch is stored.
    ReportedAck {
        /// Twin id.
        id: String,
        /// The generation stored.
        generation: u64,
    },
    /// Parent → child: call a method.
    Method {
        /// Call id, echoed in the answer.
        call: u64,
        /// Device or `device/module`.
        target: String,
        /// Method name.
        name: String,
        /// JSON payload.
        payload: Value,
        /// How long the caller waits.
        timeout_ms: u64,
    },
    /// Child → parent: a method's answer.
    MethodResult {
        /// Call id.
        call: u64,
        /// The answer.
        result: MethodResult,
    },
    /// Child → parent: the child could not call the device.
    MethodFailed {
        /// Call id.
        call: u64,
        /// The status (404, 504, …).
        status: u16,
        /// Why.
        error: String,
    },
    /// Parent → child: a message for a device or module input behind the child.
    Message {
        /// Topic.
        topic: String,
        /// Payload, base64.
        payload: String,
        /// Content type.
        content_type: Option<String>,
        /// User properties.
        properties: Vec<(String, String)>,
    },
    /// Parent → child (link/2): a cloud-to-device message to store and
    /// deliver; the parent keeps it until [`Svc::C2dAck`].
    C2d {
        /// The message.
        message: Box<C2dMessage>,
    },
    /// Child → parent (link/2): a [`Svc::C2d`] is stored here.
    C2dAck {
        /// Message id.
        id: String,
    },
    /// Child → parent (link/2): feedback for a message's owner, kept by
    /// the child until [`Svc::C2dFeedbackAck`].
    C2dFeedback {
        /// The record.
        feedback: Box<Feedback>,
    },
    /// Parent → child (link/2): the feedback is stored (or sent on) here.
    C2dFeedbackAck {
        /// Message id.
        id: String,
        /// Its outcome.
        outcome: Outcome,
    },
}
