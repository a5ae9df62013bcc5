//! # holdfast-sdk
//!
//! Write policy plugins for the [Holdfast](https://example.invalid/holdfast)
//! edge gateway in ordinary Rust. A plugin is a WebAssembly component that
//! the gateway loads into a sandbox and can swap while traffic flows. There
//! are three kinds, one per WIT world of `holdfast:gateway@0.1.0`:
//!
//! | kind | trait | export macro | decides |
//! |---|---|---|---|
//! | router | [`router::Router`] | [`export_router!`] | where each published message goes |
//! | auth | [`auth::Auth`] | [`export_auth!`] | who may connect, and what they may do |
//! | content-source | [`content::ContentSource`] | [`export_content_source!`] | which HTTP requests the range cache serves, and how |
//!
//! This crate is not the gateway and contains no host code. It hides the
//! generated WIT bindings: a plugin implements one trait on its own type and
//! calls one macro.
//!
//! ## Choosing the kind
//!
//! Enable exactly one of the cargo features `router`, `auth` or
//! `content-source`; it selects the world the `.wasm` exports:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! holdfast-sdk = { version = "0.1", features = ["router"] }
//! ```
//!
//! ## Example: a router
//!
//! ```
//! use holdfast_sdk::router::{Action, Message, Router};
//! use holdfast_sdk::Config;
//!
//! struct Alerts;
//!
//! impl Router for Alerts {
//!     fn init(_config: &Config) -> Result<Self, String> {
//!         Ok(Alerts)
//!     }
//!     fn route(&self, msg: &Message) -> Vec<Action> {
//!         let topic = msg.topic(); // passed with the message; the payload is never copied
//!         if topic.starts_with("alerts/") {
//!             vec![Action::upstream(0)]
//!         } else {
//!             vec![Action::upstream(5)]
//!         }
//!     }
//! }
//! holdfast_sdk::export_router!(Alerts);
//!
//! // The native test harness: no wasm needed.
//! let router = Alerts::init(&Config::empty()).unwrap();
//! let msg = Message::builder("alerts/fire").payload(b"hot").build();
//! assert_eq!(router.route(&msg), vec![Action::upstream(0)]);
//! ```
//!
//! Build the component with `cargo build --target wasm32-wasip2 --release`
//! and load it with `holdfast plugin swap router target/wasm32-wasip2/release/<name>.wasm`.
//!
//! ## Native testing
//!
//! On a native target every host import is answered by a thread-local test
//! host ([`testing::TestHost`]): logs are captured, the clock is settable,
//! identities can be registered for auth plugins. Plugin logic is tested
//! with plain `cargo test`.
#![deny(missing_docs)]

#[cfg(target_arch = "wasm32")]
extern crate self as holdfast_sdk;

pub mod auth;
mod config;
pub mod content;
pub mod host;
pub mod iothub;
pub mod router;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use config::Config;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __wit;

#[cfg(all(
    target_arch = "wasm32",
    any(
        all(feature = "router", feature = "auth"),
        all(feature = "router", feature = "content-source"),
        all(feature = "auth", feature = "content-source")
    )
))]
compile_error!("holdfast-sdk: enable exactly one of the features `router`, `auth`, `content-source` for a wasm plugin");
