//! Generated bindings (wasm builds only). Not part of the public API.
#![allow(unsafe_code, missing_docs, clippy::all, rust_2018_idioms)]

#[cfg(all(feature = "router", not(any(feature = "auth", feature = "content-source"))))]
pub mod router {
    wit_bindgen::generate!({
        world: "holdfast:gateway/router@0.1.0",
        path: "../wit/holdfast-gateway-0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_router",
        default_bindings_module: "holdfast_sdk::__wit::router",
        runtime_path: "holdfast_sdk::__wit::wit_bindgen::rt",
    });
}

#[cfg(all(feature = "auth", not(any(feature = "router", feature = "content-source"))))]
pub mod auth {
    wit_bindgen::generate!({
        world: "holdfast:gateway/auth@0.1.0",
        path: "../wit/holdfast-gateway-0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_auth",
        default_bindings_module: "holdfast_sdk::__wit::auth",
        runtime_path: "holdfast_sdk::__wit::wit_bindgen::rt",
    });
}

#[cfg(all(feature = "content-source", not(any(feature = "router", feature = "auth"))))]
pub mod content_source {
    wit_bindgen::generate!({
        world: "holdfast:gateway/content-source@0.1.0",
        path: "../wit/holdfast-gateway-0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_content_source",
        default_bindings_module: "holdfast_sdk::__wit::content_source",
        runtime_path: "holdfast_sdk::__wit::wit_bindgen::rt",
    });
}

pub use wit_bindgen;

#[cfg(all(feature = "auth", not(any(feature = "router", feature = "content-source"))))]
pub use auth::holdfast::gateway::host;
#[cfg(all(feature = "content-source", not(any(feature = "router", feature = "auth"))))]
pub use content_source::holdfast::gateway::host;
/// The `host` interface of whichever world this build exports.
#[cfg(all(feature = "router", not(any(feature = "auth", feature = "content-source"))))]
pub use router::holdfast::gateway::host;
