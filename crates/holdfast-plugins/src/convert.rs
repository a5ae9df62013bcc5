//! The edge between the WIT types of the plugin contract and the host's
//! model types: every value that crosses into or out of a plugin is
//! converted here, so no generated type leaves this crate.

use holdfast_model::policy::{
    Action, AuthzDecision, ConnectInfo, LocalAction, Operation, Principal, Refusal, RefusalCode, Transport,
    UpstreamAction,
};
use holdfast_model::{CachePlan, ContentClass, ContentDecision, Identity, IdentityKind, RequestHead};

use crate::bindings::auth::holdfast::gateway::{authn, identities};
use crate::bindings::content::holdfast::gateway::content;
use crate::bindings::router::holdfast::gateway::routing;

pub(crate) fn connect_info(i: &ConnectInfo) -> authn::ConnectInfo {
    authn::ConnectInfo {
        client_id: i.client_id.clone(),
        username: i.username.clone(),
        password: i.password.clone(),
        protocol_version: i.protocol_version,
        transport: match i.transport {
            Transport::Tcp => authn::Transport::Tcp,
            Transport::Tls => authn::Transport::Tls,
            Transport::Quic => authn::Transport::Quic,
            Transport::Websocket => authn::Transport::Websocket,
        },
        peer_addr: i.peer_addr.clone(),
        cert_thumbprint: i.cert_thumbprint.clone(),
        cert_common_name: i.cert_common_name.clone(),
    }
}

pub(crate) fn principal_to_wit(p: &Principal) -> authn::Principal {
    authn::Principal {
        id: p.id.clone(),
        device_id: p.device_id.clone(),
        module_id: p.module_id.clone(),
        attributes: p.attributes.clone(),
    }
}

pub(crate) fn principal(p: authn::Principal) -> Principal {
    Principal {
        id: p.id,
        device_id: p.device_id,
        module_id: p.module_id,
        attributes: p.attributes,
    }
}

pub(crate) fn refusal(r: authn::Refusal) -> Refusal {
    Refusal {
        code: match r.code {
            authn::RefusalCode::BadCredentials => RefusalCode::BadCredentials,
            authn::RefusalCode::NotAuthorized => RefusalCode::NotAuthorized,
            authn::RefusalCode::BadClientId => RefusalCode::BadClientId,
            authn::RefusalCode::Banned => RefusalCode::Banned,
        },
        reason: r.reason,
    }
}

pub(crate) fn operation(op: Operation) -> authn::Operation {
    match op {
        Operation::Publish => authn::Operation::Publish,
        Operation::Subscribe => authn::Operation::Subscribe,
    }
}

pub(crate) fn decision(d: authn::Decision) -> AuthzDecision {
    match d {
        authn::Decision::Allow => AuthzDecision::Allow,
        authn::Decision::Deny(why) => AuthzDecision::Deny(why),
    }
}

/// A router action. A replacement payload becomes a `Bytes` without a copy.
pub(crate) fn action(a: routing::Action) -> Action {
    match a {
        routing::Action::Upstream(u) => Action::Upstream(UpstreamAction {
            lane: u.lane,
            ttl_seconds: u.ttl_seconds,
            topic: u.topic,
            payload: u.payload,
            add_properties: u.add_properties,
        }),
        routing::Action::Local(l) => Action::Local(LocalAction {
            topic: l.topic,
            payload: l.payload,
            add_properties: l.add_properties,
        }),
        routing::Action::Drop(reason) => Action::Drop(reason),
    }
}

pub(crate) fn request_head(r: &RequestHead) -> content::RequestHead {
    content::RequestHead {
        method: r.method.clone(),
        host: r.host.clone(),
        port: r.port,
        path_and_query: r.path_and_query.clone(),
        headers: r.headers.clone(),
    }
}

pub(crate) fn content_decision(d: content::Decision) -> ContentDecision {
    match d {
        content::Decision::Deny(reason) => ContentDecision::Deny(reason),
        content::Decision::PassThrough(origin) => ContentDecision::PassThrough(origin),
        content::Decision::Cache(p) => ContentDecision::Cache(CachePlan {
            origin: p.origin,
            origin_path: p.origin_path,
            key: p.key,
            class: match p.class {
                content::ContentClass::Immutable => ContentClass::Immutable,
                content::ContentClass::Revalidate => ContentClass::Revalidate,
            },
            ttl_seconds: p.ttl_seconds,
            max_object_size: p.max_object_size,
        }),
    }
}

pub(crate) fn identity(i: Identity) -> identities::Identity {
    identities::Identity {
        id: i.id,
        kind: match i.kind {
            IdentityKind::Device => identities::IdentityKind::Device,
            IdentityKind::Module => identities::IdentityKind::Module,
            IdentityKind::Gateway => identities::IdentityKind::Gateway,
            IdentityKind::User => identities::IdentityKind::User,
        },
        device_id: i.device_id,
        module_id: i.module_id,
        parent: i.parent,
        enabled: i.enabled,
        credentials: i.credentials,
    }
}
