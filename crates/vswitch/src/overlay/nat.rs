//! A NAT gateway's connection table: source NAT with port translation for TCP and UDP, and
//! echo-id translation for ICMP echo. One outside port (or echo id) per connection and
//! protocol, so the reply names exactly one (routing domain, CA, port): two tenants with the
//! same CAs and ports get different outside ports and never each other's replies. Replies
//! must come from the peer the connection went to (address- and port-dependent filtering,
//! RFC 4787). Bounded by `max_connections`; entries expire after their protocol's timeout,
//! lazily when met and in a sweep when the table is full. Pure: time is the caller's `now`
//! (nanoseconds), and it lives under the switch lock with the rest of the overlay.

use std::net::Ipv4Addr;

use rustc_hash::FxHashMap;
use vireo_netconfig::{NatConnection, NatSettings};

use crate::frame::{IPPROTO_ICMP, IPPROTO_TCP};

const NS: u64 = 1_000_000_000;
/// Outside ports tried for a new connection before giving up (`nat_table_full`).
const PROBES: u32 = 64;

/// The inside end of a connection and the peer it talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Inside {
    pub rd: u16,
    pub proto: u8,
    pub ca: Ipv4Addr,
    /// TCP/UDP source port, or the ICMP echo id.
    pub port: u16,
    pub peer: Ipv4Addr,
    /// The peer's port (0 for ICMP).
    pub peer_port: u16,
}

#[derive(Clone, Copy, Debug)]
struct Conn {
    inside: Inside,
    last: u64,
    closing: bool,
}

/// Why a packet could not be translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatError {
    /// No free outside port, or `max_connections` live connections.
    Full,
}

pub struct NatTable {
    cfg: NatSettings,
    by_inside: FxHashMap<Inside, u16>,
    by_outside: FxHashMap<(u8, u16), Conn>,
}

impl NatTable {
    pub fn new(cfg: NatSettings) -> Self {
        NatTable {
            cfg,
            by_inside: FxHashMap::default(),
            by_outside: FxHashMap::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_outside.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_outside.is_empty()
    }

    fn timeout(&self, c: &Conn) -> u64 {
        let s = match c.inside.proto {
            IPPROTO_TCP if c.closing => self.cfg.tcp_transitory_secs,
            IPPROTO_TCP => self.cfg.tcp_established_secs,
            IPPROTO_ICMP => self.cfg.icmp_secs,
            _ => self.cfg.udp_secs,
        };
        u64::from(s) * NS
    }

    fn expired(&self, c: &Conn, now: u64) -> bool {
        now.saturating_sub(c.last) > self.timeout(c)
    }

    fn forget(&mut self, key: (u8, u16)) {
        if let Some(c) = self.by_outside.remove(&key) {
            self.by_inside.remove(&c.inside);
        }
    }

    /// Drops every expired connection; returns how many went.
    pub fn sweep(&mut self, now: u64) -> usize {
        let dead: Vec<(u8, u16)> = self
            .by_outside
            .iter()
            .filter(|(_, c)| self.expired(c, now))
            .map(|(k, _)| *k)
            .collect();
        for k in &dead {
            self.forget(*k);
        }
        dead.len()
    }

    /// The outside port for an outgoing packet, creating the connection if needed. `fin_rst`
    /// marks a TCP connection as closing (its shorter timeout applies from then on).
    pub fn outbound(&mut self, inside: Inside, fin_rst: bool, now: u64) -> Result<u16, NatError> {
        if let Some(&port) = self.by_inside.get(&inside) {
            let key = (inside.proto, port);
            let alive = self
                .by_outside
                .get(&key)
                .is_some_and(|c| !self.expired(c, now));
            if alive {
                let c = self.by_outside.get_mut(&key).expect("checked above");
                c.last = now;
                c.closing |= fin_rst;
                return Ok(port);
            }
            self.forget(key);
        }
        if self.by_outside.len() >= self.cfg.max_connections as usize && self.sweep(now) == 0 {
            return Err(NatError::Full);
        }
        // A start derived from the connection spreads allocations; probing is bounded.
        let span = u32::from(self.cfg.port_max - self.cfg.port_min) + 1;
        let seed = {
            use std::hash::{Hash, Hasher};
            let mut h = rustc_hash::FxHasher::default();
            inside.hash(&mut h);
            h.finish() as u32
        };
        for i in 0..PROBES.min(span) {
            let port = self.cfg.port_min + ((seed.wrapping_add(i)) % span) as u16;
            let key = (inside.proto, port);
            match self.by_outside.get(&key) {
                Some(c) if !self.expired(c, now) => continue,
                Some(_) => self.forget(key),
                None => {}
            }
            self.by_outside.insert(
                key,
                Conn {
                    inside,
                    last: now,
                    closing: fin_rst,
                },
            );
            self.by_inside.insert(inside, port);
            return Ok(port);
        }
        Err(NatError::Full)
    }

    /// The inside end of a reply from `peer:peer_port` to outside port `port`, if a live
    /// connection went there.
    pub fn inbound(
        &mut self,
        proto: u8,
        port: u16,
        peer: Ipv4Addr,
        peer_port: u16,
        fin_rst: bool,
        now: u64,
    ) -> Option<Inside> {
        let key = (proto, port);
        let c = *self.by_outside.get(&key)?;
        if self.expired(&c, now) {
            self.forget(key);
            return None;
        }
        if c.inside.peer != peer || c.inside.peer_port != peer_port {
            return None;
        }
        let e = self.by_outside.get_mut(&key).expect("present");
        e.last = now;
        e.closing |= fin_rst;
        Some(c.inside)
    }

    /// The inside end of live connection (`proto`, outside `port`) to `peer:peer_port`,
    /// without touching it: what an ICMP error quoting one of its packets is about (an
    /// error neither keeps a connection alive nor closes it).
    pub fn find(
        &self,
        proto: u8,
        port: u16,
        peer: Ipv4Addr,
        peer_port: u16,
        now: u64,
    ) -> Option<Inside> {
        let c = self.by_outside.get(&(proto, port))?;
        (!self.expired(c, now) && c.inside.peer == peer && c.inside.peer_port == peer_port)
            .then_some(c.inside)
    }

    /// Live connections, with `name` giving a routing domain's name.
    pub fn connections(&self, now: u64, name: impl Fn(u16) -> String) -> Vec<NatConnection> {
        let mut v: Vec<_> = self
            .by_outside
            .iter()
            .filter(|(_, c)| !self.expired(c, now))
            .map(|((_, port), c)| NatConnection {
                routing_domain: name(c.inside.rd),
                proto: c.inside.proto,
                ca: c.inside.ca,
                port: c.inside.port,
                peer: c.inside.peer,
                peer_port: c.inside.peer_port,
                outside_port: *port,
                idle_secs: now.saturating_sub(c.last) / NS,
            })
            .collect();
        v.sort_by_key(|c| (c.proto, c.outside_port));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::IPPROTO_UDP;

    fn ins(rd: u16, port: u16) -> Inside {
        Inside {
            rd,
            proto: IPPROTO_UDP,
            ca: "10.0.0.2".parse().unwrap(),
            port,
            peer: "198.51.100.9".parse().unwrap(),
            peer_port: 53,
        }
    }

    fn small(max: u32) -> NatTable {
        NatTable::new(NatSettings {
            port_min: 1000,
            port_max: 1003,
            max_connections: max,
            udp_secs: 2,
            ..NatSettings::default()
        })
    }

    #[test]
    fn same_ca_in_two_domains_gets_two_ports_and_replies_go_back_right() {
        let mut t = small(10);
        let a = t.outbound(ins(0, 5000), false, 0).unwrap();
        let b = t.outbound(ins(1, 5000), false, 0).unwrap();
        assert_ne!(a, b);
        assert_eq!(t.outbound(ins(0, 5000), false, 1).unwrap(), a);
        let peer = "198.51.100.9".parse().unwrap();
        assert_eq!(t.inbound(IPPROTO_UDP, a, peer, 53, false, 2).unwrap().rd, 0);
        assert_eq!(t.inbound(IPPROTO_UDP, b, peer, 53, false, 2).unwrap().rd, 1);
        // Another peer, or another port of the peer, gets nothing through.
        assert!(t.inbound(IPPROTO_UDP, a, peer, 54, false, 2).is_none());
        assert!(t
            .inbound(
                IPPROTO_UDP,
                a,
                "198.51.100.8".parse().unwrap(),
                53,
                false,
                2
            )
            .is_none());
        // TCP is another port space.
        assert!(t.inbound(IPPROTO_TCP, a, peer, 53, false, 2).is_none());
    }

    #[test]
    fn bounded_and_expiring() {
        let mut t = small(2);
        t.outbound(ins(0, 1), false, 0).unwrap();
        t.outbound(ins(0, 2), false, 0).unwrap();
        assert_eq!(t.outbound(ins(0, 3), false, NS), Err(NatError::Full));
        // After the UDP timeout the old ones make room.
        let p = t.outbound(ins(0, 3), false, 3 * NS).unwrap();
        assert_eq!(t.len(), 1);
        let peer = "198.51.100.9".parse().unwrap();
        assert!(t.inbound(IPPROTO_UDP, p, peer, 53, false, 6 * NS).is_none());
        assert!(t.is_empty());
        // The port range (4 ports) bounds it too.
        let mut t = small(100);
        for i in 0..4 {
            t.outbound(ins(0, i), false, 0).unwrap();
        }
        assert_eq!(t.outbound(ins(0, 9), false, 0), Err(NatError::Full));
    }
}
