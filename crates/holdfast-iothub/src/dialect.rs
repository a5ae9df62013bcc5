//! The dialect's topics, without state: property bags of what devices
//! publish become user properties ([`annotate`]) and come back on what is
//! delivered to them ([`with_bag`]); the requests the hub answers
//! ([`Request`]) are told from the topics it routes.

use std::time::Duration;

use holdfast_broker::session::Msg;
use holdfast_mqtt::Properties;
use holdfast_sdk::iothub::{self, Topic, system};

use crate::methods::DEFAULT_METHOD_TIMEOUT;

/// Parses the property bag of a telemetry or output message into user
/// properties; the content type also becomes the MQTT 5 content type, and
/// `$.cdid`/`$.cmid` name the sender.
///
/// # Errors
/// A malformed bag.
pub fn annotate(msg: &mut Msg) -> Result<(), iothub::BagError> {
    let Some(t) = iothub::parse(&msg.topic).filter(Topic::is_outbound) else {
        return Ok(());
    };
    let mut pairs = iothub::parse_bag(t.bag())?;
    if let Topic::Output { output, .. } = t
        && !pairs.iter().any(|(k, _)| k == system::OUTPUT)
    {
        pairs.push((system::OUTPUT.into(), output.to_string()));
    }
    pairs.push((system::CONNECTION_DEVICE.into(), t.device().to_string()));
    if let Some(m) = t.module() {
        pairs.push((system::CONNECTION_MODULE.into(), m.to_string()));
    }
    let props = &mut msg.properties;
    if props.content_type.is_none()
        && let Some((_, ct)) = pairs.iter().find(|(k, _)| k == system::CONTENT_TYPE)
    {
        props.content_type = Some(ct.clone());
    }
    props.user_properties.extend(pairs);
    Ok(())
}

/// True for a topic the hub answers instead of routing (`$iothub/…`,
/// `$holdfast/methods/…`).
pub fn is_request(topic: &str) -> bool {
    topic.starts_with("$iothub/") || topic.starts_with("$holdfast/methods/")
}

/// True for a cloud-to-device or module-input topic.
pub fn is_inbound(topic: &str) -> bool {
    iothub::parse(topic).is_some_and(|t| !t.is_outbound())
}

/// The topic a message is delivered on when the router sends it to a
/// module input or a device's cloud-to-device topic without a property
/// bag: the bag is added from the message's properties, so IoT Hub SDK
/// clients see them.
pub fn with_bag(topic: String, props: &Properties) -> String {
    let bare = match iothub::parse(&topic) {
        Some(t @ (Topic::Input { .. } | Topic::DeviceBound { .. })) => t.bag().is_empty(),
        _ => false,
    };
    if !bare {
        return topic;
    }
    let mut pairs = props.user_properties.clone();
    if let Some(ct) = &props.content_type
        && !pairs.iter().any(|(k, _)| k == system::CONTENT_TYPE)
    {
        pairs.push((system::CONTENT_TYPE.into(), ct.clone()));
    }
    let mut out = topic;
    if !out.ends_with('/') {
        out.push('/');
    }
    out.push_str(&iothub::encode_bag(&pairs));
    out
}

/// A request a device published on `$iothub/…` or `$holdfast/methods/…`;
/// `rid` is its `$rid` (empty when it names none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// `$iothub/twin/GET/?$rid={rid}`: its twin.
    TwinGet {
        /// Request id.
        rid: String,
    },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`: a reported patch.
    TwinPatchReported {
        /// Request id.
        rid: String,
    },
    /// `$iothub/methods/res/{status}/?$rid={rid}`: a method's answer.
    MethodAnswer {
        /// Request id: the call id in hex.
        rid: String,
        /// The status it answered with (500 when it is not a number).
        status: i32,
    },
    /// `$holdfast/methods/POST/{device}[/{module}]/{name}/?$rid={rid}[&$timeout={s}]`:
    /// a call from a local client.
    MethodCall {
        /// Request id, echoed in the answer.
        rid: String,
        /// Device or `device/module`.
        target: String,
        /// Method name.
        name: String,
        /// How long the caller waits.
        timeout: Duration,
    },
    /// Any other topic under the dialect's prefixes.
    Unknown,
}

impl Request {
    /// The request `topic` names.
    pub(crate) fn parse(topic: &str) -> Request {
        let query = iothub::query(topic);
        let param = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let path = topic.split_once('?').map_or(topic, |(p, _)| p).trim_end_matches('/');
        let rid = param("$rid").unwrap_or("").to_string();
        let levels: Vec<&str> = path.split('/').collect();
        match levels.as_slice() {
            ["$iothub", "twin", "GET"] => Request::TwinGet { rid },
            ["$iothub", "twin", "PATCH", "properties", "reported"] => Request::TwinPatchReported { rid },
            ["$iothub", "methods", "res", status] => Request::MethodAnswer {
                rid,
                status: status.parse::<i32>().unwrap_or(500),
            },
            ["$holdfast", "methods", "POST", target @ .., name] if (1..=2).contains(&target.len()) => {
                Request::MethodCall {
                    rid,
                    target: target.join("/"),
                    name: name.to_string(),
                    timeout: param("$timeout")
                        .and_then(|s| s.parse::<u64>().ok())
                        .map_or(DEFAULT_METHOD_TIMEOUT, Duration::from_secs),
                }
            }
            _ => Request::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use holdfast_mqtt::QoS;

    fn msg(topic: &str) -> Msg {
        Msg {
            topic: topic.into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
            expires_at_ms: None,
            publisher: None,
        }
    }

    #[test]
    fn telemetry_bags_become_properties() {
        let mut m = msg("devices/d/modules/m/messages/events/%24.ct=application%2Fjson&%24.on=out1&temp=31");
        annotate(&mut m).unwrap();
        assert_eq!(m.properties.content_type.as_deref(), Some("application/json"));
        let props = &m.properties.user_properties;
        for (k, v) in [("$.on", "out1"), ("temp", "31"), ("$.cdid", "d"), ("$.cmid", "m")] {
            assert!(props.iter().any(|(a, b)| a == k && b == v), "{k} in {props:?}");
        }
        let mut out = msg("devices/d/modules/m/outputs/o2");
        annotate(&mut out).unwrap();
        assert!(
            out.properties
                .user_properties
                .iter()
                .any(|(a, b)| a == "$.on" && b == "o2")
        );
        let mut plain = msg("plant/1");
        annotate(&mut plain).unwrap();
        assert!(plain.properties.user_properties.is_empty());
        assert!(annotate(&mut msg("devices/d/messages/events/a=%zz")).is_err());
    }

    #[test]
    fn inputs_get_a_bag_from_the_properties() {
        let mut p = Properties::default();
        p.user_properties.push(("temp".into(), "31 C".into()));
        p.content_type = Some("application/json".into());
        assert_eq!(
            with_bag("devices/d/modules/f/inputs/in1".into(), &p),
            "devices/d/modules/f/inputs/in1/temp=31%20C&%24.ct=application%2Fjson"
        );
        assert_eq!(
            with_bag("devices/d/messages/devicebound/x=1".into(), &p),
            "devices/d/messages/devicebound/x=1"
        );
        assert_eq!(with_bag("plant/1".into(), &p), "plant/1");
    }

    #[test]
    fn requests_are_told_from_their_topics() {
        assert_eq!(
            Request::parse("$iothub/twin/GET/?$rid=7"),
            Request::TwinGet { rid: "7".into() }
        );
        assert_eq!(
            Request::parse("$iothub/twin/PATCH/properties/reported/?$rid=8"),
            Request::TwinPatchReported { rid: "8".into() }
        );
        assert_eq!(
            Request::parse("$iothub/methods/res/200/?$rid=1f"),
            Request::MethodAnswer {
                rid: "1f".into(),
                status: 200
            }
        );
        assert_eq!(
            Request::parse("$iothub/methods/res/x/?$rid=1f"),
            Request::MethodAnswer {
                rid: "1f".into(),
                status: 500
            }
        );
        assert_eq!(
            Request::parse("$holdfast/methods/POST/d/m/reboot/?$rid=3&$timeout=5"),
            Request::MethodCall {
                rid: "3".into(),
                target: "d/m".into(),
                name: "reboot".into(),
                timeout: Duration::from_secs(5),
            }
        );
        assert_eq!(
            Request::parse("$holdfast/methods/POST/d/reboot"),
            Request::MethodCall {
                rid: String::new(),
                target: "d".into(),
                name: "reboot".into(),
                timeout: DEFAULT_METHOD_TIMEOUT,
            }
        );
        assert_eq!(Request::parse("$holdfast/methods/POST/a/b/c/d"), Request::Unknown);
        assert_eq!(
            Request::parse("$iothub/twin/PATCH/properties/desired"),
            Request::Unknown
        );
    }
}
