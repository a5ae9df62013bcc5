//! Content-source plugins: decide which HTTP requests the range cache
//! serves, from which origin, under which cache key and freshness class.
//!
//! Implement [`ContentSource`] and export it with
//! [`export_content_source!`](crate::export_content_source).
//!
//! ## Example
//!
//! ```
//! use holdfast_sdk::content::{CachePlan, ContentClass, ContentSource, Decision, RequestHead};
//! use holdfast_sdk::Config;
//!
//! /// Caches deb.debian.org: packages never change, indexes are revalidated.
//! struct Debian;
//!
//! impl ContentSource for Debian {
//!     fn init(_config: &Config) -> Result<Self, String> {
//!         Ok(Debian)
//!     }
//!     fn classify(&self, request: &RequestHead) -> Decision {
//!         if request.host != "deb.debian.org" {
//!             return Decision::Deny(format!("{} is not served here", request.host));
//!         }
//!         let class = if request.path().ends_with(".deb") {
//!             ContentClass::Immutable
//!         } else {
//!             ContentClass::Revalidate
//!         };
//!         Decision::Cache(CachePlan {
//!             origin: "http://deb.debian.org".to_string(),
//!             origin_path: request.path_and_query.clone(),
//!             key: format!("debian:{}", request.path_and_query),
//!             class,
//!             ttl_seconds: 300,
//!             max_object_size: None,
//!         })
//!     }
//! }
//! holdfast_sdk::export_content_source!(Debian);
//!
//! let source = Debian::init(&Config::empty()).unwrap();
//! let d = source.classify(&RequestHead::get("deb.debian.org", "/debian/pool/a.deb"));
//! assert!(matches!(d, Decision::Cache(CachePlan { class: ContentClass::Immutable, .. })));
//! assert!(matches!(source.classify(&RequestHead::get("evil.example", "/x")), Decision::Deny(_)));
//! ```

use crate::Config;

/// A content-source plugin.
pub trait ContentSource: Sized + 'static {
    /// Builds the plugin from its configuration. Called once per instance.
    ///
    /// # Errors
    /// A message for the operator; the plugin version is then rejected.
    fn init(config: &Config) -> Result<Self, String>;

    /// Classifies one request.
    fn classify(&self, request: &RequestHead) -> Decision;
}

/// The head of a request that reached the cache.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestHead {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Requested host, lowercase, without port.
    pub host: String,
    /// Explicit port, if any.
    pub port: Option<u16>,
    /// Path and query.
    pub path_and_query: String,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// A GET for `host` and `path_and_query` (for tests).
    pub fn get(host: impl Into<String>, path_and_query: impl Into<String>) -> Self {
        RequestHead {
            method: "GET".to_string(),
            host: host.into(),
            port: None,
            path_and_query: path_and_query.into(),
            headers: Vec::new(),
        }
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query.split('?').next().unwrap_or("")
    }

    /// The value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.path_and_query.split_once('?')?.1;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k) == name).then(|| percent_decode(v))
        })
    }
}

/// Decodes `%XX` escapes and `+` (as space); invalid escapes are kept as they are.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a cached object is kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentClass {
    /// Never changes once published.
    Immutable,
    /// Revalidated with the origin after its TTL.
    Revalidate,
}

/// How to cache a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePlan {
    /// Origin base URL, e.g. `https://deb.debian.org`.
    pub origin: String,
    /// Path and query to request from the origin.
    pub origin_path: String,
    /// Canonical cache key.
    pub key: String,
    /// Freshness class.
    pub class: ContentClass,
    /// Freshness lifetime of `Revalidate` objects, seconds.
    pub ttl_seconds: u32,
    /// Largest object to cache.
    pub max_object_size: Option<u64>,
}

/// What the cache does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// 403 with a reason.
    Deny(String),
    /// Forward to this origin base URL without storing.
    PassThrough(String),
    /// Serve from the cache.
    Cache(CachePlan),
}

/// Exports a [`ContentSource`] implementation as the plugin's content-source world.
#[macro_export]
macro_rules! export_content_source {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::__wit::content_source::holdfast::gateway::content as __w;
            struct __HoldfastContent;
            ::std::thread_local! {
                static __PLUGIN: ::core::cell::RefCell<::core::option::Option<$ty>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            impl $crate::__wit::content_source::Guest for __HoldfastContent {
                fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    let config = $crate::Config::parse(&config)?;
                    let plugin = <$ty as $crate::content::ContentSource>::init(&config)?;
                    __PLUGIN.with(|p| *p.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok(())
                }
                fn classify(request: __w::RequestHead) -> __w::Decision {
                    let request = $crate::content::__from_wit(request);
                    __PLUGIN.with(|p| match &*p.borrow() {
                        ::core::option::Option::Some(plugin) => $crate::content::__into_wit(
                            <$ty as $crate::content::ContentSource>::classify(plugin, &request),
                        ),
                        ::core::option::Option::None => ::core::panic!("classify called before init"),
                    })
                }
            }
            $crate::__wit::content_source::__export_content_source!(__HoldfastContent with_types_in $crate::__wit::content_source);
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn __assert_content<T: $crate::content::ContentSource>() {}
            let _ = __assert_content::<$ty>;
        };
    };
}

#[cfg(all(target_arch = "wasm32", feature = "content-source"))]
#[doc(hidden)]
pub fn __from_wit(r: crate::__wit::content_source::holdfast::gateway::content::RequestHead) -> RequestHead {
    RequestHead {
        method: r.method,
        host: r.host,
        port: r.port,
        path_and_query: r.path_and_query,
        headers: r.headers,
    }
}

#[cfg(all(target_arch = "wasm32", feature = "content-source"))]
#[doc(hidden)]
pub fn __into_wit(d: Decision) -> crate::__wit::content_source::holdfast::gateway::content::Decision {
    use crate::__wit::content_source::holdfast::gateway::content as w;
    match d {
        Decision::Deny(r) => w::Decision::Deny(r),
        Decision::PassThrough(o) => w::Decision::PassThrough(o),
        Decision::Cache(p) => w::Decision::Cache(w::CachePlan {
            origin: p.origin,
            origin_path: p.origin_path,
            key: p.key,
            class: match p.class {
                ContentClass::Immutable => w::ContentClass::Immutable,
                ContentClass::Revalidate => w::ContentClass::Revalidate,
            },
            ttl_seconds: p.ttl_seconds,
            max_object_size: p.max_object_size,
        }),
    }
}
