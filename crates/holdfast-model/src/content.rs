//! What the range cache asks its content-source policy, and the answer.
//!
//! The cache owns these types; the plugin runtime converts them to and from
//! the `holdfast:gateway/content` WIT types at its edge, so the cache needs
//! no WebAssembly runtime (its tests use a policy written in Rust).

/// The request as the policy sees it: the path is already normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// HTTP method.
    pub method: String,
    /// Host name, lowercase, without the port.
    pub host: String,
    /// Port, when the request named one.
    pub port: Option<u16>,
    /// Path and query.
    pub path_and_query: String,
    /// Request headers in order (names lowercase).
    pub headers: Vec<(String, String)>,
}

/// How stored content is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentClass {
    /// Never changes under its key: never revalidated.
    Immutable,
    /// Revalidated with the origin once its time-to-live has passed.
    Revalidate,
}

/// Where and how to cache a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePlan {
    /// Origin base URL (`http://host:port`).
    pub origin: String,
    /// Path and query to request from the origin.
    pub origin_path: String,
    /// Cache key.
    pub key: String,
    /// How the content is kept.
    pub class: ContentClass,
    /// Time-to-live for `revalidate` content, seconds.
    pub ttl_seconds: u32,
    /// Largest object to store, bytes.
    pub max_object_size: Option<u64>,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentDecision {
    /// Refuse with 403 and this reason.
    Deny(String),
    /// Forward to this origin without caching.
    PassThrough(String),
    /// Serve from the cache, filling from the origin.
    Cache(CachePlan),
}

/// Decides, per request, whether and how the cache serves it. The node's
/// content-source plugin slot implements it; a failing plugin answers with
/// its slot's failure policy, so this never fails.
pub trait ContentPolicy: Send + Sync + 'static {
    /// The decision for `head`.
    fn classify(&self, head: &RequestHead) -> ContentDecision;
}
