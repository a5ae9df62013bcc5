//! Connections that have not finished their WebSocket upgrade yet, counted
//! per listener: at most `max` at once, at most `per_ip` from one client
//! address, and the last quarter of the slots kept for addresses that have
//! none in progress, so one client that opens connections and sends its
//! request head slowly fills its own share and no more (nginx's
//! `limit_conn` per address, Envoy's per-client overload slots).
//!
//! An IPv6 client is counted by its /64: one host usually holds a whole
//! prefix.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::websocket::Refused;

/// The slots of one listener.
#[derive(Debug)]
pub struct Handshakes {
    max: usize,
    per_ip: usize,
    /// Slots only an address with none in progress may take.
    reserved: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// A slot held while one connection upgrades; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Handshakes>,
    client: IpAddr,
}

/// The address a client is counted by: IPv4 as is (an IPv4-mapped IPv6
/// address as its IPv4 address), IPv6 by its /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Handshakes {
    /// At most `max` upgrades in progress, `per_ip` of them from one
    /// client address; a quarter of `max` is kept for addresses with none.
    pub fn new(max: usize, per_ip: usize) -> Arc<Handshakes> {
        let max = max.max(1);
        Arc::new(Handshakes {
            max,
            per_ip: per_ip.max(1),
            reserved: max / 4,
            state: Mutex::default(),
        })
    }

    /// Takes a slot for a connection from `ip`.
    ///
    /// # Errors
    /// [`Refused::PerIp`] when the address has its share (or only the
    /// reserved slots are left and it already has one), [`Refused::Busy`]
    /// when every slot is taken.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let client = client_key(ip);
        let mut st = holdfast_model::lock(&self.state);
        let held = st.by_client.get(&client).copied().unwrap_or(0);
        if held >= self.per_ip {
            return Err(Refused::PerIp);
        }
        if st.total >= self.max {
            return Err(Refused::Busy);
        }
        if held > 0 && st.total >= self.max - self.reserved {
            return Err(Refused::PerIp);
        }
        st.total += 1;
        *st.by_client.entry(client).or_default() += 1;
        Ok(Slot {
            owner: self.clone(),
            client,
        })
    }

    /// Upgrades in progress now.
    pub fn in_progress(&self) -> usize {
        holdfast_model::lock(&self.state).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = holdfast_model::lock(&self.owner.state);
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                st.by_client.remove(&self.client);
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

    #[test]
    fn one_address_gets_its_share_and_new_clients_keep_theirs() {
        let h = Handshakes::new(8, 4);
        let mut held: Vec<Slot> = (0..4).map(|_| h.acquire(ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(h.acquire(ip("10.0.0.1")).unwrap_err(), Refused::PerIp);
        held.extend((0..2).map(|_| h.acquire(ip("10.0.0.2")).unwrap()));
        // Six of eight taken: the last two are for addresses with none.
        assert_eq!(h.acquire(ip("10.0.0.2")).unwrap_err(), Refused::PerIp);
        held.push(h.acquire(ip("10.0.0.3")).unwrap());
        held.push(h.acquire(ip("10.0.0.4")).unwrap());
        assert_eq!(h.acquire(ip("10.0.0.5")).unwrap_err(), Refused::Busy);
        assert_eq!(h.in_progress(), 8);
        // A slot freed is taken again.
        held.remove(0);
        assert_eq!(h.in_progress(), 7);
        held.push(h.acquire(ip("10.0.0.5")).unwrap());
        drop(held);
        assert_eq!(h.in_progress(), 0);
        assert!(holdfast_model::lock(&h.state).by_client.is_empty());
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let h = Handshakes::new(100, 2);
        let _a = h.acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = h.acquire(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert_eq!(h.acquire(ip("2001:db8:1:2::77")).unwrap_err(), Refused::PerIp);
        let _c = h.acquire(ip("2001:db8:1:3::1")).unwrap();
        let _d = h.acquire(ip("::ffff:192.0.2.1")).unwrap();
        let _e = h.acquire(ip("192.0.2.1")).unwrap();
        assert_eq!(h.acquire(ip("192.0.2.1")).unwrap_err(), Refused::PerIp);
    }
}
