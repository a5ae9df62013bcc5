//! The IoT Hub device MQTT dialect: its topics and property bags.
//!
//! Devices built with the IoT Hub device SDKs publish telemetry on
//! `devices/{device}/messages/events/{property-bag}` (modules on
//! `devices/{device}/modules/{module}/messages/events/{property-bag}`, with
//! the output name in the `$.on` property) and receive cloud-to-device
//! messages on `devices/{device}/messages/devicebound/{property-bag}` and
//! module inputs on `devices/{device}/modules/{module}/inputs/{input}/{property-bag}`.
//! Holdfast also accepts `devices/{device}/modules/{module}/outputs/{output}`
//! for a module output.
//!
//! A property bag is URL-encoded `name=value` pairs joined by `&`. The system
//! properties use the names in [`system`]; every other name is an
//! application property. The gateway parses the bag of every message it
//! receives on a dialect topic into user properties, so a router reads them
//! with `msg.property("$.ct")` or `msg.property("temperature")`.
//!
//! ```
//! use holdfast_sdk::iothub::{self, Topic};
//! let t = iothub::parse("devices/pump-7/messages/events/%24.ct=application%2Fjson&level=high");
//! assert_eq!(t, Some(Topic::Telemetry { device: "pump-7", module: None, bag: "%24.ct=application%2Fjson&level=high" }));
//! let bag = iothub::parse_bag("%24.ct=application%2Fjson&level=high").unwrap();
//! assert_eq!(bag, vec![("$.ct".into(), "application/json".into()), ("level".into(), "high".into())]);
//! assert_eq!(iothub::encode_bag(&bag), "%24.ct=application%2Fjson&level=high");
//! ```

/// Names of the system properties in a property bag.
pub mod system {
    /// Content type (`$contentType` in a route condition).
    pub const CONTENT_TYPE: &str = "$.ct";
    /// Content encoding (`$contentEncoding`).
    pub const CONTENT_ENCODING: &str = "$.ce";
    /// Message id (`$messageId`).
    pub const MESSAGE_ID: &str = "$.mid";
    /// Correlation id (`$correlationId`).
    pub const CORRELATION_ID: &str = "$.cid";
    /// User id (`$userId`).
    pub const USER_ID: &str = "$.uid";
    /// Absolute expiry time (`$expiryTimeUtc`).
    pub const EXPIRY: &str = "$.exp";
    /// The output a module sent the message on (`$outputName`).
    pub const OUTPUT: &str = "$.on";
    /// The input a module receives the message on.
    pub const INPUT: &str = "$.to";
    /// The device that sent the message (`$connectionDeviceId`), set by the gateway.
    pub const CONNECTION_DEVICE: &str = "$.cdid";
    /// The module that sent the message (`$connectionModuleId`), set by the gateway.
    pub const CONNECTION_MODULE: &str = "$.cmid";
}

/// A topic of the dialect. `bag` is the raw (still URL-encoded) property bag,
/// empty when the topic has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// Device-to-cloud telemetry of a device or a module.
    Telemetry {
        /// The device id.
        device: &'a str,
        /// The module id, for a module's telemetry.
        module: Option<&'a str>,
        /// The property bag.
        bag: &'a str,
    },
    /// A module output in Holdfast's explicit form.
    Output {
        /// The device id.
        device: &'a str,
        /// The module id.
        module: &'a str,
        /// The output name.
        output: &'a str,
        /// The property bag.
        bag: &'a str,
    },
    /// A cloud-to-device message for a device.
    DeviceBound {
        /// The device id.
        device: &'a str,
        /// The property bag.
        bag: &'a str,
    },
    /// A message for a module input.
    Input {
        /// The device id.
        device: &'a str,
        /// The module id.
        module: &'a str,
        /// The input name.
        input: &'a str,
        /// The property bag.
        bag: &'a str,
    },
}

impl<'a> Topic<'a> {
    /// The device id.
    pub fn device(&self) -> &'a str {
        match *self {
            Topic::Telemetry { device, .. }
            | Topic::Output { device, .. }
            | Topic::DeviceBound { device, .. }
            | Topic::Input { device, .. } => device,
        }
    }

    /// The module id, if the topic is a module's.
    pub fn module(&self) -> Option<&'a str> {
        match *self {
            Topic::Telemetry { module, .. } => module,
            Topic::Output { module, .. } | Topic::Input { module, .. } => Some(module),
            Topic::DeviceBound { .. } => None,
        }
    }

    /// The raw property bag.
    pub fn bag(&self) -> &'a str {
        match *self {
            Topic::Telemetry { bag, .. }
            | Topic::Output { bag, .. }
            | Topic::DeviceBound { bag, .. }
            | Topic::Input { bag, .. } => bag,
        }
    }

    /// True for messages a device or module sends (telemetry, outputs).
    pub fn is_outbound(&self) -> bool {
        matches!(self, Topic::Telemetry { .. } | Topic::Output { .. })
    }
}

/// Splits `rest` into one level and what follows it (the bag), accepting a
/// missing or empty bag.
fn level_and_bag(rest: &str) -> Option<(&str, &str)> {
    let (level, bag) = rest.split_once('/').unwrap_or((rest, ""));
    (!level.is_empty()).then_some((level, bag))
}

/// What follows a fixed suffix: nothing, `/`, or `/{bag}`.
fn bag_after<'t>(rest: &'t str, word: &str) -> Option<&'t str> {
    let tail = rest.strip_prefix(word)?;
    if tail.is_empty() {
        Some("")
    } else {
        tail.strip_prefix('/')
    }
}

/// Parses a dialect topic; `None` for any other topic.
pub fn parse(topic: &str) -> Option<Topic<'_>> {
    let rest = topic.strip_prefix("devices/")?;
    let (device, rest) = rest.split_once('/')?;
    if device.is_empty() {
        return None;
    }
    if let Some(bag) = bag_after(rest, "messages/events") {
        return Some(Topic::Telemetry {
            device,
            module: None,
            bag,
        });
    }
    if let Some(bag) = bag_after(rest, "messages/devicebound") {
        return Some(Topic::DeviceBound { device, bag });
    }
    let (module, rest) = rest.strip_prefix("modules/")?.split_once('/')?;
    if module.is_empty() {
        return None;
    }
    if let Some(bag) = bag_after(rest, "messages/events") {
        return Some(Topic::Telemetry {
            device,
            module: Some(module),
            bag,
        });
    }
    if let Some(rest) = rest.strip_prefix("outputs/") {
        let (output, bag) = level_and_bag(rest)?;
        return Some(Topic::Output {
            device,
            module,
            output,
            bag,
        });
    }
    if let Some(rest) = rest.strip_prefix("inputs/") {
        let (input, bag) = level_and_bag(rest)?;
        return Some(Topic::Input {
            device,
            module,
            input,
            bag,
        });
    }
    None
}

/// A property bag that is not valid URL encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BagError {
    /// Byte offset in the bag.
    pub at: usize,
    /// What is wrong.
    pub reason: &'static str,
}

impl std::fmt::Display for BagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "property bag, byte {}: {}", self.at, self.reason)
    }
}

impl std::error::Error for BagError {}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes (and `+` as a space, as some SDKs send it).
fn decode(s: &str, offset: usize) -> Result<String, BagError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex_digit),
                    b.get(i + 2).copied().and_then(hex_digit),
                ) else {
                    return Err(BagError {
                        at: offset + i,
                        reason: "`%` is not followed by two hex digits",
                    });
                };
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| BagError {
        at: offset,
        reason: "decoded text is not UTF-8",
    })
}

/// Parses a URL-encoded property bag into `(name, value)` pairs, in order.
/// A name without `=` has an empty value; empty pairs are skipped.
///
/// # Errors
/// A bad `%` escape, text that is not UTF-8, or an empty name.
pub fn parse_bag(bag: &str) -> Result<Vec<(String, String)>, BagError> {
    let mut out = Vec::new();
    let mut offset = 0;
    for pair in bag.split('&') {
        if !pair.is_empty() {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k.is_empty() {
                return Err(BagError {
                    at: offset,
                    reason: "a property has an empty name",
                });
            }
            out.push((decode(k, offset)?, decode(v, offset + k.len() + 1)?));
        }
        offset += pair.len() + 1;
    }
    Ok(out)
}

/// Characters left as they are when encoding (RFC 3986 unreserved).
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn encode_into(out: &mut String, s: &str) {
    for &b in s.as_bytes() {
        if unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
}

/// Encodes `(name, value)` pairs as a property bag.
pub fn encode_bag(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v);
    }
    out
}

/// The query parameters of a `$iothub/...` topic: what follows `?`, as
/// pairs (`$rid`, `$version`).
pub fn query(topic: &str) -> Vec<(String, String)> {
    topic
        .split_once('?')
        .and_then(|(_, q)| parse_bag(q).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_of_the_dialect_parse() {
        let cases = [
            (
                "devices/d1/messages/events/",
                Some(Topic::Telemetry {
                    device: "d1",
                    module: None,
                    bag: "",
                }),
            ),
            (
                "devices/d1/messages/events",
                Some(Topic::Telemetry {
                    device: "d1",
                    module: None,
                    bag: "",
                }),
            ),
            (
                "devices/d1/modules/m/messages/events/%24.on=out1",
                Some(Topic::Telemetry {
                    device: "d1",
                    module: Some("m"),
                    bag: "%24.on=out1",
                }),
            ),
            (
                "devices/d1/modules/m/outputs/o1/a=b",
                Some(Topic::Output {
                    device: "d1",
                    module: "m",
                    output: "o1",
                    bag: "a=b",
                }),
            ),
            (
                "devices/d1/modules/m/inputs/i1",
                Some(Topic::Input {
                    device: "d1",
                    module: "m",
                    input: "i1",
                    bag: "",
                }),
            ),
            (
                "devices/d1/messages/devicebound/x=1",
                Some(Topic::DeviceBound {
                    device: "d1",
                    bag: "x=1",
                }),
            ),
            ("devices/d1/messages/eventsx", None),
            ("devices//messages/events/", None),
            ("devices/d1/modules//outputs/o", None),
            ("devices/d1/modules/m/outputs/", None),
            ("plant/1/temp", None),
        ];
        for (topic, want) in cases {
            assert_eq!(parse(topic), want, "{topic}");
        }
    }

    #[test]
    fn bags_round_trip_and_bad_escapes_are_errors() {
        let pairs = vec![
            ("$.mid".to_string(), "id 1/2".to_string()),
            ("ünï".to_string(), "a&b=c".to_string()),
            ("empty".to_string(), String::new()),
        ];
        assert_eq!(parse_bag(&encode_bag(&pairs)).unwrap(), pairs);
        assert_eq!(
            parse_bag("a&&b=1").unwrap(),
            vec![("a".into(), String::new()), ("b".into(), "1".into())]
        );
        assert_eq!(parse_bag("a=1+2").unwrap(), vec![("a".into(), "1 2".into())]);
        assert_eq!(parse_bag("x=%4").unwrap_err().at, 2);
        assert_eq!(parse_bag("=v").unwrap_err().reason, "a property has an empty name");
        assert!(parse_bag("a=%FF").is_err());
        assert_eq!(
            query("$iothub/twin/res/200/?$rid=7&$version=3"),
            vec![("$rid".into(), "7".into()), ("$version".into(), "3".into())]
        );
    }
}
