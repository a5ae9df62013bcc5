//! # holdfast-model
//!
//! The types the gateway's crates share, owned by the host rather than by
//! the plugin contract: a [`Message`] and its [`MessageId`] and [`Source`],
//! an [`Identity`] and the [`IdentityDirectory`] the auth policy reads, and
//! the [`ports`] through which the link reaches the rest of the node, the
//! [`trace`] context and spans of traced messages, and
//! the few helpers every crate needs (wall clock, randomness, calendar
//! arithmetic, a poison-ignoring lock, live limits).
//!
//! Nothing here does I/O beyond reading the clock and the OS random source,
//! and nothing depends on wasmtime, fjall or quinn: the plugin runtime
//! converts the WIT types to and from these at its edge.

pub mod codec;
pub mod content;
pub mod hop;
pub mod identity;
pub mod message;
pub mod policy;
pub mod ports;
pub mod sys;
pub mod time;
pub mod trace;

pub use content::{CachePlan, ContentClass, ContentDecision, ContentPolicy, RequestHead};
pub use hop::{HopId, HopMarks};
pub use identity::{
    Identity, IdentityDirectory, IdentityKind, IdentityRecord, MemoryDirectory, hash_password, thumbprint_listed,
};
pub use message::{Message, MessageId, Source};
pub use sys::{fill_random, lock, panic_message, random_u64, store_limits};
pub use time::{civil_from_days, days_from_civil, unix_ms};
