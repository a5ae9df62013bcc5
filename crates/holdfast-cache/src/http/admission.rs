//! Which connections the cache's listener takes (docs/cache.md,
//! "Connection limits"): at most `max_connections` in all, at most
//! `max_connections_per_ip` from one client address (an IPv6 client by its
//! /64), and the last `reserved_connections_percent` of the slots only for
//! clients that hold none yet. One client opening slow connections can fill
//! its own share, not the listener; many clients filling the shared part
//! still leave room for a newcomer, as with nginx's `limit_conn` and
//! Envoy's per-client limits and overload reservations.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Why a connection was not taken; each is counted as its own
/// `holdfast_cache_events_total` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Full,
    /// The client already holds `max_connections_per_ip`.
    PerClient,
    /// Only reserved slots are left, and the client already holds one.
    Reserved,
}

impl Refusal {
    /// The event counted for it.
    pub fn event(self) -> &'static str {
        match self {
            Refusal::Full => "connection-refused",
            Refusal::PerClient => "connection-refused-per-ip",
            Refusal::Reserved => "connection-refused-reserved",
        }
    }
}

/// The key a client's connections are counted under: its address, an
/// IPv4-mapped IPv6 address as IPv4, another IPv6 address by its /64 (a
/// host picks addresses in its /64 at will).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// The listener's connection slots.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    per_client: usize,
    /// Slots at and beyond which only clients holding none are taken.
    shared: usize,
    counts: Arc<Mutex<Counts>>,
}

impl Admission {
    /// `max` slots in all, `per_client` per client, `reserved_percent` of
    /// `max` (rounded down) kept for clients that hold none.
    pub fn new(max: usize, per_client: usize, reserved_percent: u8) -> Admission {
        let reserved = max * usize::from(reserved_percent.min(100)) / 100;
        Admission {
            max,
            per_client,
            shared: max - reserved,
            counts: Arc::default(),
        }
    }

    /// Takes a slot for a connection from `ip`, or says why not. The slot is
    /// given back when the [`Slot`] is dropped.
    ///
    /// # Errors
    /// [`Refusal`]: the connection is to be closed at once.
    pub fn admit(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        let key = client_key(ip);
        let mut c = holdfast_model::lock(&self.counts);
        let mine = c.per_client.get(&key).copied().unwrap_or(0);
        if c.total >= self.max {
            return Err(Refusal::Full);
        }
        if mine >= self.per_client {
            return Err(Refusal::PerClient);
        }
        if c.total >= self.shared && mine > 0 {
            return Err(Refusal::Reserved);
        }
        c.total += 1;
        *c.per_client.entry(key).or_insert(0) += 1;
        Ok(Slot {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Connections held now, in all and by `ip`'s client.
    pub fn held(&self, ip: IpAddr) -> (usize, usize) {
        let c = holdfast_model::lock(&self.counts);
        (c.total, c.per_client.get(&client_key(ip)).copied().unwrap_or(0))
    }
}

/// One taken slot.
#[derive(Debug)]
pub struct Slot {
    key: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = holdfast_model::lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.per_client.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Issue 28, item 5: one client holding slow connections filled the
    /// only limit there was, the global one.
    #[test]
    fn one_client_cannot_take_every_slot() {
        let a = Admission::new(16, 4, 25);
        let attacker = ip("10.0.0.1");
        let held: Vec<Slot> = (0..4).map(|_| a.admit(attacker).unwrap()).collect();
        assert_eq!(a.admit(attacker).unwrap_err(), Refusal::PerClient);
        assert_eq!(a.held(attacker), (4, 4));
        assert!(a.admit(ip("10.0.0.2")).is_ok(), "another client is served");
        drop(held);
        assert_eq!(a.held(attacker), (0, 0), "slots are given back");
        assert!(a.admit(attacker).is_ok());
    }

    #[test]
    fn the_reserve_is_for_clients_that_hold_nothing() {
        // 10 slots, 3 reserved: 7 shared.
        let a = Admission::new(10, 4, 30);
        let mut held = Vec::new();
        for i in 0..7 {
            // Attackers from several addresses fill the shared slots.
            let who = ip(&format!("10.0.1.{}", i / 2));
            held.push(a.admit(who).unwrap());
        }
        // A client already holding one gets no reserved slot…
        assert_eq!(a.admit(ip("10.0.1.0")).unwrap_err(), Refusal::Reserved);
        // …newcomers do, one each, until every slot is taken.
        for i in 0..3 {
            let who = ip(&format!("10.0.2.{i}"));
            held.push(a.admit(who).unwrap());
            let second = if i < 2 { Refusal::Reserved } else { Refusal::Full };
            assert_eq!(a.admit(who).unwrap_err(), second);
        }
        assert_eq!(a.admit(ip("10.0.3.1")).unwrap_err(), Refusal::Full);
        held.truncate(0);
        assert_eq!(a.held(ip("10.0.3.1")), (0, 0));
    }

    #[test]
    fn no_reserve_and_full_reserve() {
        let a = Admission::new(3, 3, 0);
        let who = ip("10.0.0.1");
        let held: Vec<Slot> = (0..3).map(|_| a.admit(who).unwrap()).collect();
        assert_eq!(a.admit(who).unwrap_err(), Refusal::Full);
        drop(held);
        // Everything reserved: one connection per client.
        let a = Admission::new(3, 3, 100);
        let _one = a.admit(who).unwrap();
        assert_eq!(a.admit(who).unwrap_err(), Refusal::Reserved);
        assert!(a.admit(ip("10.0.0.2")).is_ok());
    }

    #[test]
    fn clients_are_counted_by_address_and_ipv6_by_its_64() {
        assert_eq!(client_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        let a = Admission::new(100, 2, 0);
        let _x = a.admit(ip("2001:db8:1:2::1")).unwrap();
        let _y = a.admit(ip("2001:db8:1:2::2")).unwrap();
        assert_eq!(a.admit(ip("2001:db8:1:2::3")).unwrap_err(), Refusal::PerClient);
        assert!(a.admit(ip("2001:db8:1:3::1")).is_ok());
        let _z = a.admit(ip("10.0.0.1")).unwrap();
        let _w = a.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).unwrap_err(), Refusal::PerClient);
    }
}
