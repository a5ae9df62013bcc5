//! Router plugins: decide where each message published on the node goes.
//!
//! Implement [`Router`] and export it with [`export_router!`](crate::export_router).
//! The message is owned by the host; [`Message`] fetches each part only when
//! asked, so a router that looks only at the topic never copies the payload.

use crate::Config;

/// A router plugin.
pub trait Router: Sized + 'static {
    /// Builds the router from its configuration. Called once per instance.
    ///
    /// # Errors
    /// A message for the operator; the plugin version is then rejected and
    /// the previous one stays active.
    fn init(config: &Config) -> Result<Self, String>;

    /// Decides what happens to one message. Several actions fan the message
    /// out; an empty list drops it with reason `no-route`.
    fn route(&self, msg: &Message<'_>) -> Vec<Action>;
}

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    /// MQTT client identifier.
    pub client_id: String,
    /// Authenticated principal id, if any.
    pub principal: Option<String>,
    /// Node ids the message passed through, nearest last.
    pub path: Vec<String>,
}

/// A message being routed.
pub struct Message<'a> {
    inner: Inner<'a>,
}

enum Inner<'a> {
    #[cfg(all(target_arch = "wasm32", feature = "router"))]
    Host(&'a crate::__wit::router::holdfast::gateway::types::Message, String),
    #[cfg_attr(all(target_arch = "wasm32", feature = "router"), allow(dead_code))]
    Owned(Box<OwnedMessage>, std::marker::PhantomData<&'a ()>),
}

#[derive(Debug, Clone, Default)]
struct OwnedMessage {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    content_type: Option<String>,
    properties: Vec<(String, String)>,
    source: Source,
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic())
            .finish_non_exhaustive()
    }
}

impl<'a> Message<'a> {
    /// Starts building a message for native tests.
    pub fn builder(topic: impl Into<String>) -> MessageBuilder {
        MessageBuilder {
            msg: OwnedMessage {
                topic: topic.into(),
                ..OwnedMessage::default()
            },
        }
    }

    #[cfg(all(target_arch = "wasm32", feature = "router"))]
    #[doc(hidden)]
    pub fn __from_host(topic: String, msg: &'a crate::__wit::router::holdfast::gateway::types::Message) -> Self {
        Message {
            inner: Inner::Host(msg, topic),
        }
    }

    /// The topic the message was published to. The host passes it with the
    /// message, so reading it costs nothing.
    pub fn topic(&self) -> &str {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(_, topic) => topic,
            Inner::Owned(m, _) => &m.topic,
        }
    }

    /// The payload (copied from the host).
    pub fn payload(&self) -> Vec<u8> {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => m.payload(),
            Inner::Owned(m, _) => m.payload.clone(),
        }
    }

    /// The payload length in bytes, without copying it.
    pub fn payload_len(&self) -> u64 {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => m.payload_len(),
            Inner::Owned(m, _) => m.payload.len() as u64,
        }
    }

    /// MQTT QoS, 0-2.
    pub fn qos(&self) -> u8 {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => m.qos(),
            Inner::Owned(m, _) => m.qos,
        }
    }

    /// The retain flag.
    pub fn retain(&self) -> bool {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => m.retain(),
            Inner::Owned(m, _) => m.retain,
        }
    }

    /// The MQTT 5 content type, if any.
    pub fn content_type(&self) -> Option<String> {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => m.content_type(),
            Inner::Owned(m, _) => m.content_type.clone(),
        }
    }

    /// The first user property named `name`.
    pub fn property(&self, name: &str) -> Option<String> {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => m.property(name),
            Inner::Owned(m, _) => m.properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
        }
    }

    /// All user properties, in order.
    pub fn properties(&self) -> Vec<(String, String)> {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => m.properties(),
            Inner::Owned(m, _) => m.properties.clone(),
        }
    }

    /// Where the message came from.
    pub fn source(&self) -> Source {
        match &self.inner {
            #[cfg(all(target_arch = "wasm32", feature = "router"))]
            Inner::Host(m, _) => {
                let s = m.source();
                Source {
                    client_id: s.client_id,
                    principal: s.principal,
                    path: s.path,
                }
            }
            Inner::Owned(m, _) => m.source.clone(),
        }
    }
}

/// Builds a [`Message`] for native tests.
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    msg: OwnedMessage,
}

impl MessageBuilder {
    /// Sets the payload.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.msg.payload = payload.into();
        self
    }
    /// Sets the QoS.
    pub fn qos(mut self, qos: u8) -> Self {
        self.msg.qos = qos;
        self
    }
    /// Sets the retain flag.
    pub fn retain(mut self, retain: bool) -> Self {
        self.msg.retain = retain;
        self
    }
    /// Sets the content type.
    pub fn content_type(mut self, ct: impl Into<String>) -> Self {
        self.msg.content_type = Some(ct.into());
        self
    }
    /// Adds a user property.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.msg.properties.push((name.into(), value.into()));
        self
    }
    /// Sets the source.
    pub fn source(mut self, source: Source) -> Self {
        self.msg.source = source;
        self
    }
    /// Finishes the message.
    pub fn build(self) -> Message<'static> {
        Message {
            inner: Inner::Owned(Box::new(self.msg), std::marker::PhantomData),
        }
    }
}

/// What to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Queue for the upstream in an outbox lane.
    Upstream {
        /// Lane 0-9, 0 highest priority.
        lane: u8,
        /// Time-to-live override in seconds.
        ttl_seconds: Option<u32>,
        /// Replacement topic.
        topic: Option<String>,
        /// Replacement payload.
        payload: Option<Vec<u8>>,
        /// User properties to add.
        add_properties: Vec<(String, String)>,
    },
    /// Deliver to local subscribers.
    Local {
        /// Topic to deliver on; `None` keeps the message's own topic.
        topic: Option<String>,
        /// Replacement payload.
        payload: Option<Vec<u8>>,
        /// User properties to add.
        add_properties: Vec<(String, String)>,
    },
    /// Discard, with a reason counted in metrics.
    Drop(String),
}

impl Action {
    /// Upstream through `lane`, message unchanged.
    pub fn upstream(lane: u8) -> Self {
        Action::Upstream {
            lane,
            ttl_seconds: None,
            topic: None,
            payload: None,
            add_properties: Vec::new(),
        }
    }

    /// Local delivery on `topic`, message unchanged.
    pub fn local(topic: impl Into<String>) -> Self {
        Action::Local {
            topic: Some(topic.into()),
            payload: None,
            add_properties: Vec::new(),
        }
    }

    /// Local delivery on the message's own topic, message unchanged. Cheaper
    /// than `Action::local(msg.topic())`: no topic is copied back to the host.
    pub fn local_same_topic() -> Self {
        Action::Local {
            topic: None,
            payload: None,
            add_properties: Vec::new(),
        }
    }

    /// Drop with `reason`.
    pub fn drop(reason: impl Into<String>) -> Self {
        Action::Drop(reason.into())
    }

    /// Sets a time-to-live (upstream actions only; ignored otherwise).
    pub fn with_ttl(mut self, seconds: u32) -> Self {
        if let Action::Upstream { ttl_seconds, .. } = &mut self {
            *ttl_seconds = Some(seconds);
        }
        self
    }

    /// Replaces the payload (ignored for drops).
    pub fn with_payload(mut self, new: impl Into<Vec<u8>>) -> Self {
        match &mut self {
            Action::Upstream { payload, .. } | Action::Local { payload, .. } => *payload = Some(new.into()),
            Action::Drop(_) => {}
        }
        self
    }

    /// Replaces the topic the message is sent upstream or delivered locally on.
    pub fn with_topic(mut self, new: impl Into<String>) -> Self {
        match &mut self {
            Action::Upstream { topic, .. } => *topic = Some(new.into()),
            Action::Local { topic, .. } => *topic = Some(new.into()),
            Action::Drop(_) => {}
        }
        self
    }

    /// Adds a user property (ignored for drops).
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        match &mut self {
            Action::Upstream { add_properties, .. } | Action::Local { add_properties, .. } => {
                add_properties.push((name.into(), value.into()))
            }
            Action::Drop(_) => {}
        }
        self
    }
}

/// Matches an MQTT topic name against a topic filter with `+` and `#`
/// wildcards. A leading wildcard does not match topics starting with `$`.
///
/// ```
/// use holdfast_sdk::router::topic_matches;
/// assert!(topic_matches("alerts/#", "alerts/fire/hall"));
/// assert!(topic_matches("alerts/#", "alerts"));
/// assert!(topic_matches("a/+/c", "a/b/c"));
/// assert!(!topic_matches("#", "$SYS/uptime"));
/// ```
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Exports a [`Router`] implementation as the plugin's router world.
///
/// In a native build it only checks that the type implements [`Router`].
#[macro_export]
macro_rules! export_router {
    ($ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __HoldfastRouter;
            ::std::thread_local! {
                static __PLUGIN: ::core::cell::RefCell<::core::option::Option<$ty>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }
            impl $crate::__wit::router::Guest for __HoldfastRouter {
                fn init(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    let config = $crate::Config::parse(&config)?;
                    let plugin = <$ty as $crate::router::Router>::init(&config)?;
                    __PLUGIN.with(|p| *p.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok(())
                }
                fn route(
                    topic: ::std::string::String,
                    msg: &$crate::__wit::router::holdfast::gateway::types::Message,
                ) -> ::std::vec::Vec<$crate::__wit::router::holdfast::gateway::routing::Action> {
                    let msg = $crate::router::Message::__from_host(topic, msg);
                    __PLUGIN.with(|p| match &*p.borrow() {
                        ::core::option::Option::Some(plugin) => {
                            $crate::router::__into_wit(<$ty as $crate::router::Router>::route(plugin, &msg))
                        }
                        ::core::option::Option::None => {
                            ::core::panic!("route called before init")
                        }
                    })
                }
            }
    $crate::__wit::router::__export_router!(__HoldfastRouter with_types_in $crate::__wit::router);
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: () = {
            fn __assert_router<T: $crate::router::Router>() {}
            let _ = __assert_router::<$ty>;
        };
    };
}

#[cfg(all(target_arch = "wasm32", feature = "router"))]
#[doc(hidden)]
pub fn __into_wit(actions: Vec<Action>) -> Vec<crate::__wit::router::holdfast::gateway::routing::Action> {
    use crate::__wit::router::holdfast::gateway::routing as w;
    actions
        .into_iter()
        .map(|a| match a {
            Action::Upstream {
                lane,
                ttl_seconds,
                topic,
                payload,
                add_properties,
            } => w::Action::Upstream(w::UpstreamAction {
                lane,
                ttl_seconds,
                topic,
                payload,
                add_properties,
            }),
            Action::Local {
                topic,
                payload,
                add_properties,
            } => w::Action::Local(w::LocalAction {
                topic,
                payload,
                add_properties,
            }),
            Action::Drop(reason) => w::Action::Drop(reason),
        })
        .collect()
}
