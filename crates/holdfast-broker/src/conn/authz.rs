//! One connection's cache of the auth plugin's authorization answers.

use std::collections::HashMap;
use std::sync::Arc;

use holdfast_model::policy::{AuthzDecision, Operation, Policy, Principal};

/// Most authorization decisions cached per connection and operation.
const AUTHZ_CACHE: usize = 1024;

/// Cached answers by topic, forgotten when another auth plugin answers.
#[derive(Default)]
pub(super) struct Authz {
    /// `[publish, subscribe]`.
    answers: [HashMap<String, bool>; 2],
    /// The auth plugin version the answers came from.
    version: Option<Arc<str>>,
}

impl Authz {
    /// Asks `policy` (or the cache of its answers) whether `principal` may
    /// publish (`subscribe` false) or subscribe to `topic`.
    pub(super) fn allowed(&mut self, policy: &dyn Policy, principal: &Principal, subscribe: bool, topic: &str) -> bool {
        let version = policy.auth_version();
        if self.version.as_ref().is_none_or(|v| !Arc::ptr_eq(v, &version)) {
            // A different auth plugin answers now: forget the old answers.
            self.answers.iter_mut().for_each(HashMap::clear);
            self.version = Some(version);
        }
        let cache = &mut self.answers[usize::from(subscribe)];
        if let Some(&allowed) = cache.get(topic) {
            return allowed;
        }
        let op = if subscribe {
            Operation::Subscribe
        } else {
            Operation::Publish
        };
        let answer = policy.authorize(principal, op, topic);
        let allowed = match &answer.decision {
            AuthzDecision::Allow => true,
            AuthzDecision::Deny(why) => {
                tracing::debug!(principal = %principal.id, topic, why = %why, subscribe, "denied by the auth plugin");
                false
            }
        };
        if answer.cacheable {
            if cache.len() >= AUTHZ_CACHE {
                cache.clear();
            }
            cache.insert(topic.to_string(), allowed);
        }
        allowed
    }
}
