//! The hello on the control stream, without I/O: the child's HELLO, the
//! parent's judgement of it (WELCOME or REFUSE), and the child's reading
//! of the answer.

use bytes::BytesMut;

use crate::wire::{self, Frame, refuse};

/// The child's first frame.
pub fn hello(node_id: &str, instance: u64) -> Frame {
    Frame::Hello {
        version: wire::VERSION,
        node_id: node_id.to_string(),
        instance,
    }
}

/// Why the parent refuses a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code the REFUSE frame carries ([`refuse`]).
    pub code: u16,
    /// A short label for metrics.
    pub label: &'static str,
    /// Why, for the child's log.
    pub reason: String,
}

impl Refusal {
    /// The REFUSE frame, encoded (with the label as the reason when the
    /// reason is too long for the frame).
    pub fn encode(&self) -> BytesMut {
        let mut buf = BytesMut::new();
        let frame = Frame::Refuse {
            code: self.code,
            reason: self.reason.clone(),
        };
        if frame.encode(&mut buf).is_err() {
            buf.clear();
            let short = Frame::Refuse {
                code: self.code,
                reason: self.label.to_string(),
            };
            // A label always fits.
            let _ = short.encode(&mut buf);
        }
        buf
    }
}

/// The parent's judgement of a hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Welcome `child`; its outbox instance.
    Welcome {
        /// The child's node id.
        child: String,
        /// Its outbox instance.
        instance: u64,
    },
    /// Refuse it.
    Refuse {
        /// The node id it claimed (or its certificate's).
        child: String,
        /// Why.
        refusal: Refusal,
    },
}

/// Judges the first frame of a control stream (`None`: none came, or it
/// did not decode) from a peer whose certificate names `cert_id`.
/// `is_child` says whether an id is a registered child gateway of
/// `parent`; `has_room` whether one more child may connect.
pub fn judge(
    frame: Option<&Frame>,
    cert_id: &str,
    parent: &str,
    is_child: impl FnOnce(&str) -> bool,
    has_room: impl FnOnce(&str) -> bool,
) -> Verdict {
    let refuse = |child: &str, code, label, reason: String| Verdict::Refuse {
        child: child.to_string(),
        refusal: Refusal { code, label, reason },
    };
    let Some(Frame::Hello {
        version,
        node_id,
        instance,
    }) = frame
    else {
        return refuse(cert_id, refuse::PROTOCOL, "protocol", "expected a hello".into());
    };
    if *version != wire::VERSION {
        return refuse(
            node_id,
            refuse::VERSION,
            "version",
            format!("link version {version} is not supported"),
        );
    }
    if node_id != cert_id {
        return refuse(
            node_id,
            refuse::IDENTITY_MISMATCH,
            "identity-mismatch",
            format!("hello says {node_id:?} but the certificate is for {cert_id:?}"),
        );
    }
    if !is_child(node_id) {
        return refuse(
            node_id,
            refuse::NOT_A_CHILD,
            "not-a-child",
            format!("{node_id} is not a registered child gateway of {parent}"),
        );
    }
    if !has_room(node_id) {
        return refuse(node_id, refuse::BUSY, "busy", "too many child gateways".into());
    }
    Verdict::Welcome {
        child: node_id.clone(),
        instance: *instance,
    }
}

/// The parent's WELCOME.
pub fn welcome(parent: &str) -> Frame {
    Frame::Welcome {
        version: wire::VERSION,
        node_id: parent.to_string(),
    }
}

/// How a hello failed, at the child.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The parent refused this node.
    #[error("refused by the parent: {reason}")]
    Refused {
        /// [`refuse`] code.
        code: u16,
        /// The parent's reason.
        reason: String,
    },
    /// The parent speaks another format version.
    #[error("parent speaks link version {0}")]
    Version(u16),
    /// Anything else came back.
    #[error("unexpected answer to hello: {0}")]
    Unexpected(String),
}

/// The child's reading of the parent's answer: the parent's node id.
///
/// # Errors
/// A refusal, another version, or something else.
pub fn read_answer(frame: Option<Frame>) -> Result<String, HelloError> {
    match frame {
        Some(Frame::Welcome { version, node_id }) if version == wire::VERSION => Ok(node_id),
        Some(Frame::Welcome { version, .. }) => Err(HelloError::Version(version)),
        Some(Frame::Refuse { code, reason }) => Err(HelloError::Refused { code, reason }),
        Some(other) => Err(HelloError::Unexpected(other.name().to_string())),
        None => Err(HelloError::Unexpected("the end of the stream".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_child_with_its_own_certificate_is_welcomed() {
        let h = hello("gw1", 9);
        let v = judge(Some(&h), "gw1", "root", |id| id == "gw1", |_| true);
        assert_eq!(
            v,
            Verdict::Welcome {
                child: "gw1".into(),
                instance: 9
            }
        );
        assert_eq!(read_answer(Some(welcome("root"))), Ok("root".into()));
    }

    #[test]
    fn every_refusal_names_its_reason() {
        let code = |v: Verdict| match v {
            Verdict::Refuse { refusal, .. } => refusal.code,
            Verdict::Welcome { .. } => 0,
        };
        let h = hello("gw1", 1);
        assert_eq!(code(judge(None, "gw1", "root", |_| true, |_| true)), refuse::PROTOCOL);
        assert_eq!(
            code(judge(Some(&h), "gw2", "root", |_| true, |_| true)),
            refuse::IDENTITY_MISMATCH
        );
        assert_eq!(
            code(judge(Some(&h), "gw1", "root", |_| false, |_| true)),
            refuse::NOT_A_CHILD
        );
        assert_eq!(code(judge(Some(&h), "gw1", "root", |_| true, |_| false)), refuse::BUSY);
        let old = Frame::Hello {
            version: 9,
            node_id: "gw1".into(),
            instance: 1,
        };
        assert_eq!(
            code(judge(Some(&old), "gw1", "root", |_| true, |_| true)),
            refuse::VERSION
        );
        // A reason too long for the frame falls back to the label.
        let r = Refusal {
            code: 2,
            label: "not-a-child",
            reason: "x".repeat(70_000),
        };
        let bytes = r.encode();
        let mut d = crate::decode::FrameDecoder::new(1 << 20);
        d.push(&bytes);
        assert_eq!(
            read_answer(d.next_frame().unwrap()),
            Err(HelloError::Refused {
                code: 2,
                reason: "not-a-child".into()
            })
        );
    }
}
