//! What the cache learned about keys from answers it did not store: keys
//! found uncacheable (passed through for a while without trying again),
//! the `Vary` field names responses under a plugin key carried, and object
//! lengths. Each map is bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast_model::lock;

use crate::{Meta, VARY_SEP, rfc9111};

/// How long an object found uncacheable (no validator, too large) is passed
/// through without trying to cache it again.
const UNCACHEABLE_FOR: Duration = Duration::from_secs(60);
/// How long a key seen without a strong validator is fetched whole.
const WHOLE_FOR: Duration = Duration::from_secs(3600);
/// Most keys remembered per map at once.
const MAX_LEARNED: usize = 4096;

/// What was learned (see the module docs).
pub(crate) struct Learned {
    /// Objects found uncacheable, until when.
    uncacheable: Mutex<HashMap<String, Instant>>,
    /// The `Vary` field names last seen per plugin key (RFC 9111 §4.1).
    vary_specs: Mutex<HashMap<String, Vec<String>>>,
    /// Object lengths learned from answers that were not stored.
    lengths: Mutex<HashMap<String, u64>>,
    /// Keys whose responses carry no strong validator: fetched whole (from
    /// byte 0 to the end, in one response) to be stored.
    whole: Mutex<HashMap<String, Instant>>,
}

impl Learned {
    /// Starts with the `Vary` names of the stored responses.
    pub(crate) fn new(vary_specs: HashMap<String, Vec<String>>) -> Learned {
        Learned {
            uncacheable: Mutex::new(HashMap::new()),
            vary_specs: Mutex::new(vary_specs),
            lengths: Mutex::new(HashMap::new()),
            whole: Mutex::new(HashMap::new()),
        }
    }

    /// True while `key` is passed through as uncacheable.
    pub(crate) fn uncacheable(&self, key: &str) -> bool {
        lock(&self.uncacheable).get(key).is_some_and(|t| Instant::now() < *t)
    }

    /// Passes `key` through for a while.
    pub(crate) fn mark_uncacheable(&self, key: &str) {
        let mut m = lock(&self.uncacheable);
        if m.len() >= MAX_LEARNED {
            let now = Instant::now();
            m.retain(|_, t| now < *t);
            if m.len() >= MAX_LEARNED {
                m.clear();
            }
        }
        m.insert(key.to_string(), Instant::now() + UNCACHEABLE_FOR);
    }

    /// True when responses for `key` were seen without a strong validator
    /// lately: a fill for it asks for the whole object.
    pub(crate) fn whole(&self, key: &str) -> bool {
        lock(&self.whole).get(key).is_some_and(|t| Instant::now() < *t)
    }

    /// Remembers that `key` answered without a strong validator (for an hour,
    /// renewed by every such answer).
    pub(crate) fn learn_whole(&self, key: &str) {
        let mut m = lock(&self.whole);
        if m.len() >= MAX_LEARNED {
            let now = Instant::now();
            m.retain(|_, t| now < *t);
            if m.len() >= MAX_LEARNED {
                m.clear();
            }
        }
        m.insert(key.to_string(), Instant::now() + WHOLE_FOR);
    }

    /// The length of the object under `key`, when known without storage.
    pub(crate) fn length_hint(&self, key: &str) -> Option<u64> {
        lock(&self.lengths).get(key).copied()
    }

    /// Remembers an object's length learned from an answer not stored.
    pub(crate) fn learn_length(&self, key: &str, len: u64) {
        let mut l = lock(&self.lengths);
        if l.len() >= MAX_LEARNED {
            l.clear();
        }
        l.insert(key.to_string(), len);
    }

    /// Records the `Vary` names a response for `primary` carried.
    pub(crate) fn learn_vary(&self, primary: &str, names: &[String]) {
        let mut specs = lock(&self.vary_specs);
        if specs.get(primary).is_none_or(|n| n != names) {
            if specs.len() >= MAX_LEARNED {
                specs.clear();
            }
            specs.insert(primary.to_string(), names.to_vec());
        }
    }

    /// The storage key for a request under the plugin's key `primary`,
    /// whose upstream fields are `sent`: `primary` unless responses for it
    /// vary and the one stored there (`stored`) was selected by other
    /// values; then a key naming the values (RFC 9111 §4.1: one stored
    /// response per combination of the selecting fields).
    pub(crate) fn variant_key(
        &self,
        primary: &str,
        sent: &hyper::HeaderMap,
        stored: impl FnOnce(&str) -> Option<Arc<Meta>>,
    ) -> String {
        let Some(names) = lock(&self.vary_specs).get(primary).cloned() else {
            return primary.to_string();
        };
        let stored_matches = stored(primary).is_none_or(|m| m.selected_for(sent));
        if stored_matches {
            return primary.to_string();
        }
        let mut key = format!("{primary}{VARY_SEP}");
        for (n, v) in names.iter().zip(rfc9111::selecting_values(&names, sent)) {
            key.push_str(n);
            match v {
                Some(v) => {
                    key.push('=');
                    key.push_str(&v);
                }
                None => key.push('!'),
            }
            key.push(';');
        }
        key
    }
}
