//! IoT Hub SAS tokens and usernames, as the device SDKs make them.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The hub name in SAS usernames and resources.
pub const HUB: &str = "hub.example";

pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The resource a SAS token for `id` (a device, or `{device}/{module}`) names.
fn resource(id: &str) -> String {
    match id.split_once('/') {
        Some((d, m)) => format!("{HUB}/devices/{d}/modules/{m}"),
        None => format!("{HUB}/devices/{id}"),
    }
}

/// An IoT Hub SAS token for `id` signed with `key` (base64), valid until `expiry`.
pub fn sas(id: &str, key: &str, expiry: u64) -> String {
    let sr = url_encode(&resource(id));
    let key = base64::engine::general_purpose::STANDARD.decode(key).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{sr}\n{expiry}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    format!("SharedAccessSignature sr={sr}&sig={}&se={expiry}", url_encode(&sig))
}

pub fn in_an_hour() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

/// The MQTT username the SDKs send for `id` (a device, or `{device}/{module}`).
pub fn username(id: &str) -> String {
    format!("{HUB}/{id}/?api-version=2021-04-12")
}
