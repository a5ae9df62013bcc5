//! The one place the host runs `bindgen!` for the plugin contract
//! `holdfast:gateway@0.1.0`. Everything else uses these types.

/// Router world bindings. Owns the shared `host` and `types` interfaces.
pub mod router {
    wasmtime::component::bindgen!({
        world: "holdfast:gateway/router@0.1.0",
        path: "../../wit/holdfast-gateway-0.1.0",
        additional_derives: [PartialEq, Eq],
        imports: { default: trappable },
        with: {
            "holdfast:gateway/types.message": crate::message::MessageRep,
        },
    });
}

/// Auth world bindings.
pub mod auth {
    wasmtime::component::bindgen!({
        world: "holdfast:gateway/auth@0.1.0",
        path: "../../wit/holdfast-gateway-0.1.0",
        additional_derives: [PartialEq, Eq],
        imports: { default: trappable },
        with: {
            "holdfast:gateway/host": crate::bindings::router::holdfast::gateway::host,
            "holdfast:gateway/types": crate::bindings::router::holdfast::gateway::types,
        },
    });
}

/// Content-source world bindings.
pub mod content {
    wasmtime::component::bindgen!({
        world: "holdfast:gateway/content-source@0.1.0",
        path: "../../wit/holdfast-gateway-0.1.0",
        additional_derives: [PartialEq, Eq],
        imports: { default: trappable },
        with: {
            "holdfast:gateway/host": crate::bindings::router::holdfast::gateway::host,
            "holdfast:gateway/types": crate::bindings::router::holdfast::gateway::types,
        },
    });
}

pub use auth::holdfast::gateway::authn::{
    ConnectInfo, Decision as AuthzDecision, Operation, Principal, Refusal, RefusalCode, Transport,
};
pub use auth::holdfast::gateway::identities::{Identity, IdentityKind};
pub use content::holdfast::gateway::content::{CachePlan, ContentClass, Decision as ContentDecision, RequestHead};
pub use router::holdfast::gateway::host::Level as LogLevel;
pub use router::holdfast::gateway::routing::{Action, LocalAction, UpstreamAction};
pub use router::holdfast::gateway::types::Source;
