//! Direct methods: calls waiting for their answers, made to a device
//! connected here (`$iothub/methods/POST/{name}/?$rid={call}`, answered on
//! `$iothub/methods/res/{status}/`) or through the child gateway it is
//! behind (answered on the link).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_model::lock;
use holdfast_registry::{Hop, Registry};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::clients::Port;
use crate::links::Links;
use crate::metrics::IothubMetrics;
use crate::service::Svc;

/// Longest a method call may wait for its answer.
pub const MAX_METHOD_TIMEOUT: Duration = Duration::from_secs(300);
/// What a method call waits for when the caller does not say.
pub const DEFAULT_METHOD_TIMEOUT: Duration = Duration::from_secs(30);
/// Calls that may wait for answers at once on a node.
pub const MAX_WAITING_CALLS: usize = 4096;

/// A method's answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MethodResult {
    /// The status the device answered with.
    pub status: i32,
    /// The JSON payload it answered with.
    pub payload: Value,
}

/// Why a method call got no answer from the device.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MethodError {
    /// Not registered here.
    #[error("no identity {0} in this node's scope")]
    NotFound(String),
    /// Registered, not connected (or not subscribed to methods).
    #[error("{0} is not online (not connected, or not subscribed to $iothub/methods/POST/#)")]
    NotOnline(String),
    /// The child gateway the device is behind is not connected.
    #[error("gateway offline: {target} is behind {gateway}, which is not connected")]
    GatewayOffline {
        /// The device or module called.
        target: String,
        /// Its gateway.
        gateway: String,
    },
    /// No answer in time.
    #[error("{target} did not answer {name} within {ms} ms")]
    Timeout {
        /// Target.
        target: String,
        /// Method.
        name: String,
        /// The timeout.
        ms: u64,
    },
    /// Bad request.
    #[error("{0}")]
    Invalid(String),
    /// Too many calls are waiting for answers on this node.
    #[error("too many method calls are waiting ({0}); try again later")]
    Busy(usize),
    /// A child gateway could not call the device: its status and reason.
    #[error("{1}")]
    Downstream(u16, String),
}

impl MethodError {
    /// The status IoT Hub would answer with.
    pub fn status(&self) -> u16 {
        match self {
            MethodError::NotFound(_) | MethodError::NotOnline(_) | MethodError::GatewayOffline { .. } => 404,
            MethodError::Timeout { .. } => 504,
            MethodError::Invalid(_) => 400,
            MethodError::Busy(_) => 429,
            MethodError::Downstream(status, _) => *status,
        }
    }

    /// The answer a local caller gets on `$holdfast/methods/res/{status}/`.
    pub fn as_result(&self) -> MethodResult {
        MethodResult {
            status: i32::from(self.status()),
            payload: serde_json::json!({ "error": self.to_string() }),
        }
    }
}

/// Who may answer a call.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answerer {
    /// The identity called, connected here (it answers on `$iothub/methods/res`).
    Device(String),
    /// The child gateway it is behind (it answers on the link).
    Child(String),
}

/// A call waiting for its answer.
struct Waiting {
    answerer: Answerer,
    tx: oneshot::Sender<Result<MethodResult, MethodError>>,
}

/// The method calls of this node.
pub(crate) struct Methods {
    registry: Arc<Registry>,
    clients: Port,
    links: Arc<Links>,
    events: IothubMetrics,
    next_call: AtomicU64,
    /// Calls waiting for an answer, by call id (a device's `$rid` is it in hex).
    calls: Mutex<HashMap<u64, Waiting>>,
}

impl Methods {
    /// Calls reaching devices through `clients` and child gateways through `links`.
    pub(crate) fn new(registry: Arc<Registry>, clients: Port, links: Arc<Links>, events: IothubMetrics) -> Methods {
        Methods {
            registry,
            clients,
            links,
            events,
            next_call: AtomicU64::new(1),
            calls: Mutex::new(HashMap::new()),
        }
    }

    /// Calls method `name` on `target` (a device or `device/module`) with
    /// a JSON payload: on a client connected here, or through the child
    /// gateway it is behind.
    ///
    /// # Errors
    /// Unknown, not online, or no answer in time.
    pub(crate) async fn invoke(
        &self,
        target: &str,
        name: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<MethodResult, MethodError> {
        if name.is_empty() || name.contains(['/', '+', '#', '?']) {
            return Err(MethodError::Invalid(format!("bad method name {name:?}")));
        }
        if timeout > MAX_METHOD_TIMEOUT {
            return Err(MethodError::Invalid(format!(
                "the timeout may be at most {} s",
                MAX_METHOD_TIMEOUT.as_secs()
            )));
        }
        let waiting = lock(&self.calls).len();
        if waiting >= MAX_WAITING_CALLS {
            self.events.count("method-busy");
            return Err(MethodError::Busy(waiting));
        }
        let answerer = match self.registry.next_hop(target) {
            Hop::Unknown => return Err(MethodError::NotFound(target.to_string())),
            Hop::Here => Answerer::Device(target.to_string()),
            Hop::Child(gw) => Answerer::Child(gw),
        };
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.calls).insert(
            id,
            Waiting {
                answerer: answerer.clone(),
                tx,
            },
        );
        let sent = match &answerer {
            Answerer::Device(device) => {
                let topic = format!("$iothub/methods/POST/{name}/?$rid={id:x}");
                if self.clients.send_to(device, topic, payload.to_string().into_bytes()) {
                    Ok(())
                } else {
                    Err(MethodError::NotOnline(target.to_string()))
                }
            }
            Answerer::Child(gw) => {
                let call = Svc::Method {
                    call: id,
                    target: target.to_string(),
                    name: name.to_string(),
                    payload,
                    timeout_ms: timeout.as_millis() as u64,
                };
                if self.links.send_down(gw, call) {
                    Ok(())
                } else {
                    self.events.count("method-gateway-offline");
                    Err(MethodError::GatewayOffline {
                        target: target.to_string(),
                        gateway: gw.clone(),
                    })
                }
            }
        };
        let answer = match sent {
            Ok(()) => tokio::time::timeout(timeout, rx).await,
            Err(e) => {
                lock(&self.calls).remove(&id);
                return Err(e);
            }
        };
        lock(&self.calls).remove(&id);
        match answer {
            Ok(Ok(r)) => r,
            _ => Err(MethodError::Timeout {
                target: target.to_string(),
                name: name.to_string(),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// A local client called method `name` on `target`
    /// (`$holdfast/methods/POST/…`): the call runs in a task of its own and
    /// the answer goes to that client on `$holdfast/methods/res/{status}/`.
    pub(crate) fn call_for_client(
        self: &Arc<Self>,
        client_id: &str,
        rid: String,
        target: String,
        name: String,
        timeout: Duration,
        payload: &[u8],
    ) {
        self.events.count("method-invoke-local");
        let payload = serde_json::from_slice::<Value>(payload);
        let (methods, client) = (self.clone(), client_id.to_string());
        tokio::spawn(async move {
            let result = match payload {
                Ok(p) => methods.invoke(&target, &name, p, timeout).await,
                Err(e) => Err(MethodError::Invalid(format!("the payload is not JSON: {e}"))),
            };
            let r = result.unwrap_or_else(|e| e.as_result());
            methods.clients.send_to(
                &client,
                format!("$holdfast/methods/res/{}/?$rid={rid}", r.status),
                r.payload.to_string().into_bytes(),
            );
        });
    }

    /// Device `own` (the identity the answering client authenticated as)
    /// answered call `rid` (hex) with `status` and `payload`.
    pub(crate) fn device_answered(&self, own: Option<&str>, rid: &str, status: i32, payload: &[u8]) {
        self.events.count("method-response");
        let payload = serde_json::from_slice(payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
        match (own, u64::from_str_radix(rid, 16)) {
            (Some(own), Ok(call)) => self.answered(
                &Answerer::Device(own.to_string()),
                call,
                Ok(MethodResult { status, payload }),
            ),
            _ => self.events.count("method-response-late"),
        }
    }

    /// Child gateway `child` answered call `call`.
    pub(crate) fn child_answered(&self, child: &str, call: u64, result: Result<MethodResult, MethodError>) {
        self.answered(&Answerer::Child(child.to_string()), call, result);
    }

    /// `by` answered call `call`: passed to the caller if `by` is who was
    /// asked, else ignored and counted.
    fn answered(&self, by: &Answerer, call: u64, result: Result<MethodResult, MethodError>) {
        let mut calls = lock(&self.calls);
        match calls.remove(&call) {
            Some(w) if w.answerer == *by => {
                let _ = w.tx.send(result);
            }
            Some(w) => {
                calls.insert(call, w);
                self.events.count("method-response-foreign");
            }
            None => self.events.count("method-response-late"),
        }
    }
}
