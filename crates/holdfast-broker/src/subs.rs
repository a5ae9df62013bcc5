//! The subscription index: a trie over topic levels with `+` and `#`
//! branches, plain and shared (`$share/group/…`) subscribers at each node.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use holdfast_mqtt::{QoS, SubOptions};

use super::session::Session;

/// One subscription as stored in the index.
#[derive(Clone)]
pub struct Sub {
    /// The subscriber.
    pub session: Arc<Session>,
    /// Its options.
    pub options: SubOptions,
    /// MQTT 5 subscription identifier.
    pub id: Option<u32>,
}

#[derive(Default)]
struct Group {
    members: Vec<(Arc<str>, Sub)>,
    next: AtomicUsize,
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    /// Subscribers whose filter ends here with `#` (matching this level and below).
    hash: HashMap<Arc<str>, Sub>,
    hash_shared: HashMap<Box<str>, Group>,
    /// Subscribers whose filter ends exactly here.
    exact: HashMap<Arc<str>, Sub>,
    exact_shared: HashMap<Box<str>, Group>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.hash_shared.is_empty()
            && self.exact.is_empty()
            && self.exact_shared.is_empty()
    }
}

/// A delivery the index found: one per session, merged over all the
/// session's matching subscriptions.
pub struct Match {
    /// The subscriber.
    pub session: Arc<Session>,
    /// Highest granted QoS of the matching subscriptions.
    pub qos: QoS,
    /// Whether any matching subscription keeps the retain flag.
    pub retain_as_published: bool,
    /// Identifiers of the matching subscriptions.
    pub ids: Vec<u32>,
}

/// The index.
#[derive(Default)]
pub struct SubTree {
    root: Node,
    count: usize,
}

impl SubTree {
    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces `client`'s subscription to `filter` (already
    /// validated; `group` is the shared-subscription group). Returns true if
    /// it replaced one.
    pub fn insert(&mut self, client: &Arc<str>, group: Option<&str>, filter: &str, sub: Sub) -> bool {
        let (node, hash) = Self::walk_mut(&mut self.root, filter);
        let replaced = match group {
            None => {
                let map = if hash { &mut node.hash } else { &mut node.exact };
                map.insert(client.clone(), sub).is_some()
            }
            Some(g) => {
                let groups = if hash {
                    &mut node.hash_shared
                } else {
                    &mut node.exact_shared
                };
                let group = groups.entry(g.into()).or_default();
                match group.members.iter_mut().find(|(c, _)| c == client) {
                    Some(m) => {
                        m.1 = sub;
                        true
                    }
                    None => {
                        group.members.push((client.clone(), sub));
                        false
                    }
                }
            }
        };
        if !replaced {
            self.count += 1;
        }
        replaced
    }

    fn walk_mut<'a>(mut node: &'a mut Node, filter: &str) -> (&'a mut Node, bool) {
        for level in filter.split('/') {
            match level {
                "#" => return (node, true),
                "+" => node = node.plus.get_or_insert_with(Default::default),
                l => node = node.children.entry(l.into()).or_default(),
            }
        }
        (node, false)
    }

    /// Removes `client`'s subscription to `filter`; true if it existed.
    pub fn remove(&mut self, client: &str, group: Option<&str>, filter: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, client, group);
        if removed {
            self.count -= 1;
        }
        removed
    }

    fn remove_at(node: &mut Node, levels: &[&str], client: &str, group: Option<&str>) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            return Self::remove_here(node, false, client, group);
        };
        match *first {
            "#" => Self::remove_here(node, true, client, group),
            "+" => {
                let Some(child) = node.plus.as_deref_mut() else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, client, group);
                if child.is_empty() {
                    node.plus = None;
                }
                removed
            }
            l => {
                let Some(child) = node.children.get_mut(l) else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, client, group);
                if child.is_empty() {
                    node.children.remove(l);
                }
                removed
            }
        }
    }

    fn remove_here(node: &mut Node, hash: bool, client: &str, group: Option<&str>) -> bool {
        match group {
            None => {
                let map = if hash { &mut node.hash } else { &mut node.exact };
                map.remove(client).is_some()
            }
            Some(g) => {
                let groups = if hash {
                    &mut node.hash_shared
                } else {
                    &mut node.exact_shared
                };
                let Some(grp) = groups.get_mut(g) else {
                    return false;
                };
                let before = grp.members.len();
                grp.members.retain(|(c, _)| &**c != client);
                let removed = grp.members.len() != before;
                if grp.members.is_empty() {
                    groups.remove(g);
                }
                removed
            }
        }
    }

    /// Every session subscribed to `topic`, one entry per session. Shared
    /// groups pick one member each, round-robin, preferring connected ones.
    /// `publisher` is skipped for its no-local subscriptions.
    pub fn matches(&self, topic: &str, publisher: Option<&str>) -> Vec<Match> {
        let mut out: Vec<Match> = Vec::new();
        let dollar = topic.starts_with('$');
        let levels: Vec<&str> = topic.split('/').collect();
        Self::collect(&self.root, &levels, 0, dollar, publisher, &mut out);
        out
    }

    fn collect(
        node: &Node,
        levels: &[&str],
        depth: usize,
        dollar: bool,
        publisher: Option<&str>,
        out: &mut Vec<Match>,
    ) {
        // Wildcards at the first level do not match `$` topics.
        let wild = !(dollar && depth == 0);
        if wild {
            for (client, sub) in &node.hash {
                add(out, client, sub, publisher);
            }
            for group in node.hash_shared.values() {
                pick(out, group, publisher);
            }
        }
        match levels.split_first() {
            None => {
                for (client, sub) in &node.exact {
                    add(out, client, sub, publisher);
                }
                for group in node.exact_shared.values() {
                    pick(out, group, publisher);
                }
            }
            Some((first, rest)) => {
                if let Some(child) = node.children.get(*first) {
                    Self::collect(child, rest, depth + 1, dollar, publisher, out);
                }
                if wild && let Some(child) = node.plus.as_deref() {
                    Self::collect(child, rest, depth + 1, dollar, publisher, out);
                }
            }
        }
    }
}

fn add(out: &mut Vec<Match>, client: &Arc<str>, sub: &Sub, publisher: Option<&str>) {
    if sub.options.no_local && publisher == Some(&**client) {
        return;
    }
    if let Some(m) = out.iter_mut().find(|m| Arc::ptr_eq(&m.session, &sub.session)) {
        m.qos = m.qos.max(sub.options.qos);
        m.retain_as_published |= sub.options.retain_as_published;
        m.ids.extend(sub.id);
        return;
    }
    out.push(Match {
        session: sub.session.clone(),
        qos: sub.options.qos,
        retain_as_published: sub.options.retain_as_published,
        ids: sub.id.into_iter().collect(),
    });
}

fn pick(out: &mut Vec<Match>, group: &Group, publisher: Option<&str>) {
    let n = group.members.len();
    if n == 0 {
        return;
    }
    // Round-robin over members, preferring one that is connected.
    let start = group.next.load(Ordering::Relaxed) % n;
    let order = (0..n).map(|i| (start + i) % n);
    let chosen = order
        .clone()
        .find(|&i| group.members[i].1.session.is_connected())
        .unwrap_or(start);
    group.next.store(chosen + 1, Ordering::Relaxed);
    let (client, sub) = &group.members[chosen];
    add(out, client, sub, publisher);
}

/// The index as the broker shares it: subscriptions added and removed by
/// full filter (`$share/group/filter` included), looked up by topic.
#[derive(Default)]
pub(crate) struct Subscriptions {
    tree: std::sync::RwLock<SubTree>,
}

impl Subscriptions {
    /// Adds `session`'s subscription to `filter` (already validated).
    pub(crate) fn add(&self, session: &Arc<Session>, filter: &str, options: SubOptions, id: Option<u32>) {
        let (group, inner) = split_shared(filter);
        let sub = Sub {
            session: session.clone(),
            options,
            id,
        };
        self.write().insert(&session.client_id, group, inner, sub);
    }

    /// Removes `client`'s subscription to `filter`; true if it existed.
    pub(crate) fn remove(&self, client: &str, filter: &str) -> bool {
        let (group, inner) = split_shared(filter);
        self.write().remove(client, group, inner)
    }

    /// The sessions a message on `topic` goes to (see [`SubTree::matches`]).
    pub(crate) fn matches(&self, topic: &str, publisher: Option<&str>) -> Vec<Match> {
        self.tree
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .matches(topic, publisher)
    }

    /// Number of subscriptions.
    pub(crate) fn len(&self) -> usize {
        self.tree.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SubTree> {
        self.tree.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Splits `$share/group/filter` into the group and the filter.
fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match holdfast_mqtt::topic::parse_shared(filter) {
        Some(Ok((g, f))) => (Some(g), f),
        _ => (None, filter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_mqtt::Version;

    fn session(id: &str) -> Arc<Session> {
        Arc::new(Session::new(id.into(), 0, Version::V5))
    }

    fn sub(s: &Arc<Session>, qos: QoS, id: Option<u32>) -> Sub {
        Sub {
            session: s.clone(),
            options: SubOptions {
                qos,
                ..SubOptions::default()
            },
            id,
        }
    }

    fn ids(t: &SubTree, topic: &str) -> Vec<String> {
        let mut v: Vec<String> = t
            .matches(topic, None)
            .iter()
            .map(|m| m.session.client_id.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn wildcards_dollar_topics_and_removal() {
        let mut t = SubTree::default();
        let (a, b, c) = (session("a"), session("b"), session("c"));
        t.insert(&a.client_id, None, "x/+/z", sub(&a, QoS::AtMostOnce, None));
        t.insert(&b.client_id, None, "x/#", sub(&b, QoS::AtMostOnce, None));
        t.insert(&c.client_id, None, "#", sub(&c, QoS::AtMostOnce, None));
        t.insert(&c.client_id, None, "$SYS/#", sub(&c, QoS::AtMostOnce, None));
        assert_eq!(ids(&t, "x/y/z"), ["a", "b", "c"]);
        assert_eq!(ids(&t, "x"), ["b", "c"]);
        assert_eq!(ids(&t, "$SYS/load"), ["c"]);
        assert_eq!(t.len(), 4);
        assert!(t.remove("b", None, "x/#"));
        assert!(!t.remove("b", None, "x/#"));
        assert_eq!(ids(&t, "x/y/z"), ["a", "c"]);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn overlapping_subscriptions_merge_per_session() {
        let mut t = SubTree::default();
        let a = session("a");
        t.insert(&a.client_id, None, "x/#", sub(&a, QoS::AtMostOnce, Some(1)));
        t.insert(&a.client_id, None, "x/y", sub(&a, QoS::ExactlyOnce, Some(2)));
        let m = t.matches("x/y", None);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].qos, QoS::ExactlyOnce);
        let mut got = m[0].ids.clone();
        got.sort();
        assert_eq!(got, [1, 2]);
    }

    #[test]
    fn shared_groups_deliver_to_one_member_round_robin() {
        let mut t = SubTree::default();
        let (a, b) = (session("a"), session("b"));
        a.set_connected(true);
        b.set_connected(true);
        t.insert(&a.client_id, Some("g"), "s/#", sub(&a, QoS::AtLeastOnce, None));
        t.insert(&b.client_id, Some("g"), "s/#", sub(&b, QoS::AtLeastOnce, None));
        let picks: Vec<String> = (0..4).map(|_| ids(&t, "s/1").join(",")).collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        // A disconnected member is skipped while another is connected.
        b.set_connected(false);
        assert!((0..4).all(|_| ids(&t, "s/1") == ["a"]));
        assert!(t.remove("a", Some("g"), "s/#"));
        assert_eq!(ids(&t, "s/1"), ["b"]);
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let mut t = SubTree::default();
        let a = session("a");
        let mut s = sub(&a, QoS::AtMostOnce, None);
        s.options.no_local = true;
        t.insert(&a.client_id, None, "n/#", s);
        assert!(t.matches("n/1", Some("a")).is_empty());
        assert_eq!(t.matches("n/1", Some("other")).len(), 1);
    }
}
