//! The gateway role (issue 11, item 5; `docs/netvirt.md`, "Gateway"): this host routes
//! between routing domains and a physical network on its uplink (untagged or one VLAN).
//!
//! Outbound, a VM's packet to its subnet's gateway MAC whose destination is no CA of its
//! domain (and outside the domain's subnet prefixes) leaves through the domain's gateway:
//! TTL decremented, source NAT-ed for a `nat` gateway, Ethernet rewritten from the
//! gateway's MAC to the next hop's (ARP-resolved on that VLAN), tagged. Inbound, frames to
//! the gateway's MAC on its VLAN come back: a `forward` gateway routes to the domain's CA
//! from the policy table; a `nat` gateway finds the connection (and so the routing domain)
//! from the outside port, rewrites the destination back, and delivers like any routed
//! packet — to a local port or through the tunnel to the VM's host. ARP for the gateway's
//! address is answered on its VLAN. IPv4 only.
//!
//! State (the NAT tables, the physical neighbours) belongs to [`super::Overlay`] and changes
//! under the switch lock like the rest of it.

use std::net::{IpAddr, Ipv4Addr};

use rustc_hash::FxHashMap;
use vireo_netconfig::{GatewayConfig, GatewayMode, GatewayStatus, IpPrefix, MacAddr};

use super::nat::{Inside, NatError, NatTable};
use super::nat_icmp;
use super::wire::{fold, u128_to_ip};
use super::{decrement_ttl, reply, Overlay, Target, Verdict};
use crate::frame::{parse, FrameSummary, Mac, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, L3};
use crate::meter::DropReason;

/// Physical neighbours remembered at most over all gateways.
const NEIGHBOR_LIMIT: usize = 4096;

pub(super) struct Gateway {
    pub(super) cfg: GatewayConfig,
    pub(super) mac: Mac,
    addr: Ipv4Addr,
    /// Its IPv6 address (forward gateways that route IPv6: `gateway6.rs`).
    pub(super) addr6: Option<std::net::Ipv6Addr>,
    nat: Option<NatTable>,
}

#[derive(Default)]
pub(super) struct Gateways {
    pub(super) list: Vec<Gateway>,
    /// Routing domain index → its gateway.
    pub(super) by_rd: FxHashMap<u16, usize>,
    /// (VLAN, address) → MAC on the physical side.
    neighbors: FxHashMap<(Option<u16>, Ipv4Addr), Mac>,
    /// ICMP errors from outside translated back to a NAT-ed tenant (`nat_icmp.rs`).
    icmp_errors_translated: u64,
    /// (VLAN, IPv6 address) → MAC on the physical side, learned by neighbour discovery.
    pub(super) neighbors6: FxHashMap<(Option<u16>, std::net::Ipv6Addr), Mac>,
    /// Solicitations in flight and confirmations of `neighbors6`.
    pub(super) nd6: super::nd::NdState,
}

impl Gateways {
    /// Compiles validated gateways; `rd` maps a domain name to its index.
    pub(super) fn new(cfgs: &[GatewayConfig], rd: impl Fn(&str) -> Option<u16>) -> Self {
        let mut g = Gateways::default();
        for c in cfgs {
            let i = g.list.len();
            for d in &c.routing_domains {
                if let Some(r) = rd(d) {
                    g.by_rd.insert(r, i);
                }
            }
            g.list.push(Gateway {
                mac: c.gateway_mac().0,
                addr: c.ipv4(),
                addr6: c.ipv6(),
                nat: (c.mode == GatewayMode::Nat).then(|| NatTable::new(c.nat.clone())),
                cfg: c.clone(),
            });
        }
        g
    }

    fn learn(&mut self, vlan: Option<u16>, ip: Ipv4Addr, mac: Mac) {
        if mac[0] & 1 == 1
            || mac == [0; 6]
            || (self.neighbors.len() >= NEIGHBOR_LIMIT && !self.neighbors.contains_key(&(vlan, ip)))
        {
            return;
        }
        self.neighbors.insert((vlan, ip), mac);
    }
}

/// RFC 1624: a checksum after 16-bit-aligned bytes `old` became `new`.
fn adjust(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u32::from(!check);
    for w in old.chunks_exact(2) {
        acc += u32::from(!u16::from_be_bytes([w[0], w[1]]));
    }
    for w in new.chunks_exact(2) {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    fold(acc)
}

fn get16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn put_check(f: &mut [u8], at: usize, old: &[u8], new: &[u8], udp: bool) {
    let c = get16(f, at);
    if udp && c == 0 {
        return; // no UDP checksum: nothing to keep right
    }
    let mut n = adjust(c, old, new);
    if udp && n == 0 {
        n = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&n.to_be_bytes());
}

/// Rewrites the source (`dst == false`) or destination address and port (TCP/UDP port or
/// ICMP echo id) of the untagged IPv4 frame, keeping every checksum right.
fn rewrite(f: &mut [u8], dst: bool, ip: Ipv4Addr, port: u16) {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let proto = f[23];
    let ip_at = if dst { 30 } else { 26 };
    let l4 = 14 + ihl;
    let old_ip: [u8; 4] = f[ip_at..ip_at + 4].try_into().expect("4 bytes");
    let new_ip = ip.octets();
    let (port_at, check_at) = match proto {
        IPPROTO_TCP => (l4 + if dst { 2 } else { 0 }, l4 + 16),
        IPPROTO_UDP => (l4 + if dst { 2 } else { 0 }, l4 + 6),
        _ => (l4 + 4, l4 + 2), // ICMP echo: the id, and ICMP's own checksum
    };
    let old_port = get16(f, port_at).to_be_bytes();
    let new_port = port.to_be_bytes();
    // IP header checksum covers the address.
    put_check(f, 24, &old_ip, &new_ip, false);
    let udp = proto == IPPROTO_UDP;
    if proto == IPPROTO_ICMP {
        put_check(f, check_at, &old_port, &new_port, false);
    } else {
        // TCP/UDP checksums cover the pseudo-header's addresses and the port.
        put_check(f, check_at, &old_ip, &new_ip, udp);
        put_check(f, check_at, &old_port, &new_port, udp);
    }
    f[ip_at..ip_at + 4].copy_from_slice(&new_ip);
    f[port_at..port_at + 2].copy_from_slice(&new_port);
}

pub(super) fn push_tag(frame: &mut Vec<u8>, vlan: Option<u16>) {
    if let Some(v) = vlan {
        let t = [0x81, 0x00, (v >> 8) as u8 & 0x0f, v as u8];
        frame.splice(12..12, t);
    }
}

pub(super) fn strip_tag(frame: &mut Vec<u8>) {
    frame.drain(12..16);
    if frame.len() < crate::switch::ETH_MIN_FRAME {
        frame.resize(crate::switch::ETH_MIN_FRAME, 0);
    }
}

pub(super) fn in_prefix(p: &IpPrefix, ip: IpAddr) -> bool {
    match (p.addr, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let len = u32::from(p.len.min(32));
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & m == u32::from(b) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let len = u32::from(p.len.min(128));
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
    }
}

/// Whether a TCP segment carries FIN or RST (its connection is closing).
fn fin_rst(s: &FrameSummary) -> bool {
    s.proto == IPPROTO_TCP && s.tcp_flags & 0x05 != 0
}

/// What NAT can translate: a whole (unfragmented) TCP/UDP packet or ICMP echo of `kind`.
fn nat_port(s: &FrameSummary, echo: u8) -> Option<(u16, u16)> {
    if !s.has_l4 || s.frag.is_some_and(|f| f.is_split()) {
        return None;
    }
    match s.proto {
        IPPROTO_TCP | IPPROTO_UDP => Some((s.sport, s.dport)),
        IPPROTO_ICMP if s.icmp_type == echo => Some((s.sport, 0)),
        _ => None,
    }
}

/// What stops a routed packet on its way out through a gateway: larger than the provider
/// network's MTU, or its TTL / hop limit running out here (decremented otherwise). The VM
/// gets the ICMP error from its subnet's gateway address (`Send` back, counted), or the
/// packet is dropped when none can be built; `None`: it goes on.
pub(super) fn bounce(
    frame: &mut Vec<u8>,
    provider_mtu: u32,
    sub_mac: Mac,
    sub_ip: Option<IpAddr>,
    v6: bool,
) -> Option<Verdict> {
    let back = |sent: bool, why: DropReason| match sent {
        true => Verdict::Send {
            to: Target::Back,
            counted: Some(why),
        },
        false => Verdict::Drop(why),
    };
    if frame.len() - 14 > provider_mtu as usize {
        let sent = reply::too_big(frame, sub_mac, sub_ip, provider_mtu as u16);
        return Some(back(sent, DropReason::TooBig));
    }
    if !decrement_ttl(frame, v6) {
        let sent = reply::icmp_error(frame, sub_mac, sub_ip, reply::IcmpError::TimeExceeded);
        return Some(back(sent, DropReason::TtlExceeded));
    }
    None
}

impl Overlay {
    /// Whether `ip` lies in one of routing domain `rd`'s subnet prefixes (then it is a CA
    /// that must be in the table, never sent outside).
    pub(super) fn in_domain(&self, rd: u16, ip: IpAddr) -> bool {
        self.cfg.routing_domains[rd as usize]
            .subnets
            .iter()
            .flat_map(|s| &s.prefixes)
            .any(|p| in_prefix(p, ip))
    }

    /// Whether a gateway lives on VLAN `vid` of the uplink.
    pub fn gateway_vlan(&self, vid: u16) -> bool {
        let v = Some(vid & 0x0fff);
        self.gateways.list.iter().any(|g| g.cfg.vlan == v)
    }

    /// The PA of another host whose gateway serves domain `rd`.
    pub(super) fn remote_gateway(&self, rd: u16) -> Option<IpAddr> {
        self.cfg.routing_domains[rd as usize]
            .gateway_pa
            .filter(|pa| !self.is_ours(*pa))
    }

    pub(super) fn has_gateway(&self, rd: u16) -> bool {
        self.gateways.by_rd.contains_key(&rd)
    }

    /// A routed IPv4 packet from domain `rd`'s subnet `vsid` (untagged customer frame) to
    /// an outside address: out through the domain's gateway.
    pub(super) fn gateway_out(
        &mut self,
        rd: u16,
        vsid: u32,
        s: &FrameSummary,
        frame: &mut Vec<u8>,
        now: u64,
    ) -> Verdict {
        let Some(&gi) = self.gateways.by_rd.get(&rd) else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let Some(subnet) = self.subnets.get(&vsid) else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let (sub_mac, sub_ip) = (
            subnet.gw_mac,
            subnet.gw_ips.iter().find(|a| a.is_ipv4()).copied(),
        );
        let IpAddr::V4(dst) = u128_to_ip(s.dst_ip, false) else {
            unreachable!("u128_to_ip(_, false) is IPv4")
        };
        let g = &self.gateways.list[gi];
        let next = if g.cfg.on_link(dst) {
            dst
        } else {
            match g.cfg.next_hop {
                Some(IpAddr::V4(h)) => h,
                _ => return Verdict::Drop(DropReason::OverlayUnknown),
            }
        };
        if let Some(bounced) = bounce(frame, self.cfg.provider_mtu, sub_mac, sub_ip, false) {
            return bounced;
        }
        let (gmac, gaddr, vlan) = (g.mac, g.addr, g.cfg.vlan);
        if let Some(nat) = &mut self.gateways.list[gi].nat {
            let Some((port, peer_port)) = nat_port(s, 8) else {
                return Verdict::Drop(DropReason::NatNoMapping);
            };
            let IpAddr::V4(ca) = u128_to_ip(s.src_ip, false) else {
                unreachable!("IPv4")
            };
            let inside = Inside {
                rd,
                proto: s.proto,
                ca,
                port,
                peer: dst,
                peer_port,
            };
            match nat.outbound(inside, fin_rst(s), now) {
                Ok(outside) => rewrite(frame, false, gaddr, outside),
                Err(NatError::Full) => return Verdict::Drop(DropReason::NatTableFull),
            }
        }
        match self.gateways.neighbors.get(&(vlan, next)) {
            Some(m) => {
                frame[0..6].copy_from_slice(m);
                frame[6..12].copy_from_slice(&gmac);
                push_tag(frame, vlan);
                Verdict::Send {
                    to: Target::Uplink,
                    counted: None,
                }
            }
            None => {
                // The packet becomes the ARP request for its next hop; the sender's
                // retransmission goes through once the reply is in.
                reply::arp(frame, [0xff; 6], gmac, 1, gmac, gaddr, [0; 6], next);
                push_tag(frame, vlan);
                Verdict::Send {
                    to: Target::Uplink,
                    counted: Some(DropReason::OverlayNoNeighbor),
                }
            }
        }
    }

    /// A frame from the uplink on a gateway's VLAN: ARP for its address, or a packet to its
    /// MAC from the physical network. `None` when no gateway is concerned.
    pub(super) fn gateway_in(
        &mut self,
        s: &FrameSummary,
        frame: &mut Vec<u8>,
        now: u64,
    ) -> Option<Verdict> {
        let vlan = match s.tags {
            0 => None,
            1 => Some(s.vid & 0x0fff),
            _ => return None,
        };
        if let (L3::Arp, Some(a)) = (s.l3, s.arp) {
            let target = Ipv4Addr::from(a.target_ip);
            let g = self
                .gateways
                .list
                .iter()
                .find(|g| g.cfg.vlan == vlan && g.addr == target)?;
            let (gmac, sender) = (g.mac, Ipv4Addr::from(a.sender_ip));
            self.gateways.learn(vlan, sender, a.sender_mac);
            if a.op != 1 {
                return Some(Verdict::Consumed);
            }
            reply::arp(frame, s.src, gmac, 2, gmac, target, a.sender_mac, sender);
            push_tag(frame, vlan);
            return Some(Verdict::Send {
                to: Target::Back,
                counted: None,
            });
        }
        if s.l3 == L3::Ipv6 {
            return self.gateway_in6(s, frame, vlan);
        }
        if s.l3 != L3::Ipv4 {
            return None;
        }
        let gi = self
            .gateways
            .list
            .iter()
            .position(|g| g.cfg.vlan == vlan && g.mac == s.dst)?;
        if vlan.is_some() {
            strip_tag(frame);
        }
        let Ok(s) = parse(frame) else {
            return Some(Verdict::Drop(DropReason::Malformed));
        };
        let IpAddr::V4(dst) = u128_to_ip(s.dst_ip, false) else {
            unreachable!("IPv4")
        };
        let IpAddr::V4(src) = u128_to_ip(s.src_ip, false) else {
            unreachable!("IPv4")
        };
        let forward_rd = self
            .rd_index(&self.gateways.list[gi].cfg.routing_domains[0])
            .unwrap_or_default();
        let g = &mut self.gateways.list[gi];
        let (rd, ca) = match &mut g.nat {
            None => (forward_rd, dst),
            Some(nat) => {
                if dst != g.addr {
                    return Some(Verdict::Drop(DropReason::NatNoMapping));
                }
                if s.proto == IPPROTO_ICMP && nat_icmp::ERROR_TYPES.contains(&s.icmp_type) {
                    // An error about one of our connections: it goes to that connection's
                    // tenant only, or nowhere.
                    let inside = nat_icmp::quoted(frame, g.addr)
                        .and_then(|q| nat.find(q.proto, q.outside_port, q.peer, q.peer_port, now));
                    let Some(inside) = inside else {
                        return Some(Verdict::Drop(DropReason::NatNoMapping));
                    };
                    nat_icmp::translate(frame, inside.ca, inside.port);
                    self.gateways.icmp_errors_translated += 1;
                    return Some(self.gateway_deliver(inside.rd, IpAddr::V4(inside.ca), frame));
                }
                // The outside port is the destination port, or the echo reply's id.
                let Some((sport, dport)) = nat_port(&s, 0) else {
                    return Some(Verdict::Drop(DropReason::NatNoMapping));
                };
                let (port, peer_port) = if s.proto == IPPROTO_ICMP {
                    (sport, 0)
                } else {
                    (dport, sport)
                };
                let Some(inside) = nat.inbound(s.proto, port, src, peer_port, fin_rst(&s), now)
                else {
                    return Some(Verdict::Drop(DropReason::NatNoMapping));
                };
                rewrite(frame, true, inside.ca, inside.port);
                (inside.rd, inside.ca)
            }
        };
        Some(self.gateway_deliver(rd, IpAddr::V4(ca), frame))
    }

    /// How many ICMP errors from outside went back to a NAT-ed tenant, translated.
    pub fn nat_icmp_errors_translated(&self) -> u64 {
        self.gateways.icmp_errors_translated
    }

    /// An inbound untagged packet (destination already rewritten for NAT) routed from the
    /// gateway into routing domain `rd` to `ca`.
    pub(super) fn gateway_deliver(&mut self, rd: u16, ca: IpAddr, frame: &mut Vec<u8>) -> Verdict {
        // Only CAs in the table are reachable; the inside is not a transit network.
        let Some(e) = self.resolve(rd, ca) else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        if !decrement_ttl(frame, ca.is_ipv6()) {
            return Verdict::Drop(DropReason::TtlExceeded);
        }
        let Some(to_gw) = self.subnets.get(&e.vsid).map(|sn| sn.gw_mac) else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        frame[0..6].copy_from_slice(&e.mac);
        frame[6..12].copy_from_slice(&to_gw);
        let Ok(s) = parse(frame) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        self.deliver(rd, e, frame, &s, to_gw)
    }

    /// The gateways and their state, for listings (connection ages as of the last frame).
    pub fn gateways(&self) -> Vec<GatewayStatus> {
        let now = self.clock;
        self.gateways
            .list
            .iter()
            .map(|g| GatewayStatus {
                config: g.cfg.clone(),
                mac: MacAddr(g.mac),
                neighbors: self
                    .gateways
                    .neighbors
                    .keys()
                    .filter(|(v, _)| *v == g.cfg.vlan)
                    .count(),
                connections: g.nat.as_ref().map_or_else(Vec::new, |n| {
                    n.connections(now, |rd| self.domains[rd as usize].0.clone())
                }),
            })
            .collect()
    }

    /// Adds a gateway, or replaces the one of that name. A changed gateway starts with an
    /// empty NAT table (its connections end); the others keep theirs.
    pub fn set_gateway(&mut self, g: GatewayConfig) -> Result<(), String> {
        let mut cfg = self.cfg.clone();
        cfg.policies.clear();
        match cfg.gateways.iter_mut().find(|o| o.name == g.name) {
            Some(o) => *o = g,
            None => cfg.gateways.push(g),
        }
        cfg.validate()?;
        self.install_gateways(cfg.gateways);
        Ok(())
    }

    /// Removes a gateway (its NAT connections end).
    pub fn remove_gateway(&mut self, name: &str) -> Result<(), String> {
        let mut gws = self.cfg.gateways.clone();
        let n = gws.len();
        gws.retain(|g| g.name != name);
        if gws.len() == n {
            return Err(format!("no gateway {name:?}"));
        }
        self.install_gateways(gws);
        Ok(())
    }

    /// Compiles `gws` (validated) in place of the current gateways; unchanged gateways keep
    /// their NAT tables, physical neighbours stay.
    fn install_gateways(&mut self, gws: Vec<GatewayConfig>) {
        let mut fresh = Gateways::new(&gws, |n| self.rd_index(n));
        let mut old = std::mem::take(&mut self.gateways);
        for g in &mut fresh.list {
            if let Some(o) = old.list.iter_mut().find(|o| o.cfg == g.cfg) {
                g.nat = o.nat.take();
            }
        }
        fresh.neighbors = old.neighbors;
        fresh.neighbors6 = old.neighbors6;
        fresh.nd6 = old.nd6;
        self.gateways = fresh;
        self.cfg.gateways = gws;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::wire::{ipv4_header_checksum, pseudo, sum};

    /// A UDP/IPv4 frame with correct checksums.
    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let payload = b"hello gateway";
        let ulen = 8 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&((20 + ulen) as u16).to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let c = ipv4_header_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&(ulen as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        let c = fold(sum(pseudo(&src, &dst, 17, ulen), &u));
        u[6..8].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&u);
        f
    }

    #[test]
    fn rewrite_keeps_checksums_valid() {
        let mut f = udp([10, 0, 0, 2], [198, 51, 100, 9], 5000, 53);
        rewrite(&mut f, false, Ipv4Addr::new(198, 51, 100, 1), 20001);
        let expect = udp([198, 51, 100, 1], [198, 51, 100, 9], 20001, 53);
        assert_eq!(f, expect);
        rewrite(&mut f, true, Ipv4Addr::new(10, 9, 8, 7), 7);
        assert_eq!(f, udp([198, 51, 100, 1], [10, 9, 8, 7], 20001, 7));
    }

    #[test]
    fn tags_go_on_and_off() {
        let orig = udp([10, 0, 0, 2], [198, 51, 100, 9], 5000, 53);
        let mut f = orig.clone();
        push_tag(&mut f, Some(30));
        let s = parse(&f).unwrap();
        assert_eq!((s.tags, s.vid, s.sport), (1, 30, 5000));
        strip_tag(&mut f);
        // Padded back to the Ethernet minimum, like every frame the switch sends.
        assert_eq!(&f[..orig.len()], &orig[..]);
        assert_eq!(f.len(), orig.len().max(60));
    }
}
