//! IPv6 through a `forward` gateway (`address6`; `docs/netvirt.md`, "Gateway"): a routing
//! domain's IPv6 CAs are routed to the physical network on the gateway's VLAN as they are,
//! and back. The IPv6 counterpart of the forward half of `gateway.rs`, with neighbour
//! discovery (`nd.rs`) where IPv4 has ARP: the gateway answers solicitations for its
//! `address6` (as a router) and solicits its next hops from it.
//!
//! State (`Gateways::neighbors6`, `Gateways::nd6`) belongs to [`super::Overlay`] and changes
//! under the switch lock like the rest of it.

use std::net::{IpAddr, Ipv6Addr};

use super::gateway::{bounce, push_tag, strip_tag};
use super::nd::{self, Resolve};
use super::wire::u128_to_ip;
use super::{reply, Overlay, Target, Verdict};
use crate::frame::{parse, FrameSummary, Mac, IPPROTO_ICMPV6};
use crate::meter::DropReason;

/// Physical IPv6 neighbours remembered at most over all gateways.
const NEIGHBOR_LIMIT: usize = 4096;

fn link_local(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

impl Overlay {
    /// Whether routing domain `rd` has a gateway here that routes IPv6.
    pub(super) fn has_gateway6(&self, rd: u16) -> bool {
        self.gateways
            .by_rd
            .get(&rd)
            .is_some_and(|&gi| self.gateways.list[gi].addr6.is_some())
    }

    /// What neighbour discovery of the IPv6 gateways did so far.
    pub fn gateway_nd_counters(&self) -> nd::NdCounters {
        self.gateways.nd6.counters
    }

    fn learn6(&mut self, vlan: Option<u16>, ip: Ipv6Addr, mac: Mac) {
        let g = &mut self.gateways;
        if mac[0] & 1 == 1
            || mac == [0; 6]
            || (g.neighbors6.len() >= NEIGHBOR_LIMIT && !g.neighbors6.contains_key(&(vlan, ip)))
        {
            return;
        }
        g.neighbors6.insert((vlan, ip), mac);
        g.nd6.confirm(ip, self.clock);
    }

    /// A routed IPv6 packet from domain `rd`'s subnet `vsid` (untagged customer frame) to an
    /// address outside the domain: out through the domain's gateway, as it is.
    pub(super) fn gateway_out6(
        &mut self,
        rd: u16,
        vsid: u32,
        s: &FrameSummary,
        frame: &mut Vec<u8>,
    ) -> Verdict {
        let (Some(&gi), Some(subnet)) = (self.gateways.by_rd.get(&rd), self.subnets.get(&vsid))
        else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let (sub_mac, sub_ip) = (
            subnet.gw_mac,
            subnet.gw_ips.iter().find(|a| a.is_ipv6()).copied(),
        );
        let (IpAddr::V6(src), IpAddr::V6(dst)) =
            (u128_to_ip(s.src_ip, true), u128_to_ip(s.dst_ip, true))
        else {
            unreachable!("u128_to_ip(_, true) is IPv6")
        };
        // Link-local addresses never leave their link (RFC 4291 §2.5.6).
        if link_local(src) || link_local(dst) {
            return Verdict::Drop(DropReason::OverlayUnknown);
        }
        let g = &self.gateways.list[gi];
        let Some(me) = g.addr6 else {
            return Verdict::Drop(DropReason::OverlayUnknown);
        };
        let next = if g.cfg.on_link6(dst) {
            dst
        } else {
            match g.cfg.next_hop6 {
                Some(IpAddr::V6(h)) => h,
                _ => return Verdict::Drop(DropReason::OverlayUnknown),
            }
        };
        let (gmac, vlan) = (g.mac, g.cfg.vlan);
        if let Some(bounced) = bounce(frame, self.cfg.provider_mtu, sub_mac, sub_ip, true) {
            return bounced;
        }
        let clock = self.clock;
        let gws = &mut self.gateways;
        if gws.nd6.expire(next, clock) {
            gws.neighbors6.remove(&(vlan, next));
        }
        if let Some(m) = gws.neighbors6.get(&(vlan, next)) {
            frame[0..6].copy_from_slice(m);
            frame[6..12].copy_from_slice(&gmac);
            push_tag(frame, vlan);
            return Verdict::Send {
                to: Target::Uplink,
                counted: None,
            };
        }
        match gws.nd6.need(next, clock) {
            Resolve::Solicit => {
                nd::solicit(frame, gmac, me, next);
                push_tag(frame, vlan);
                gws.nd6.counters.solicits_sent += 1;
                Verdict::Send {
                    to: Target::Uplink,
                    counted: Some(DropReason::OverlayNoNeighbor),
                }
            }
            Resolve::Wait => {
                gws.nd6.counters.pending_drops += 1;
                Verdict::Drop(DropReason::OverlayNoNeighbor)
            }
        }
    }

    /// An IPv6 frame from the uplink on VLAN `vlan`: neighbour discovery with an IPv6
    /// gateway there, or a packet to its MAC for its routing domain. `None` when no gateway
    /// is concerned.
    pub(super) fn gateway_in6(
        &mut self,
        s: &FrameSummary,
        frame: &mut Vec<u8>,
        vlan: Option<u16>,
    ) -> Option<Verdict> {
        let (gi, me) = self
            .gateways
            .list
            .iter()
            .enumerate()
            .find_map(|(i, g)| g.addr6.filter(|_| g.cfg.vlan == vlan).map(|a| (i, a)))?;
        let g = &self.gateways.list[gi];
        let gmac = g.mac;
        if s.proto == IPPROTO_ICMPV6
            && matches!(s.icmp_type, nd::NEIGHBOR_SOLICIT | nd::NEIGHBOR_ADVERT)
        {
            return self.gateway_nd(s, frame, vlan, gmac, me);
        }
        if s.dst != gmac {
            return None;
        }
        if vlan.is_some() {
            strip_tag(frame);
        }
        let Ok(s) = parse(frame) else {
            return Some(Verdict::Drop(DropReason::Malformed));
        };
        let rd = self
            .rd_index(&self.gateways.list[gi].cfg.routing_domains[0])
            .unwrap_or_default();
        let dst = u128_to_ip(s.dst_ip, true);
        Some(self.gateway_deliver(rd, dst, frame))
    }

    /// NS for the gateway's address (answered as a router, the asker learned) or NA for a
    /// next hop it solicited.
    fn gateway_nd(
        &mut self,
        s: &FrameSummary,
        frame: &mut Vec<u8>,
        vlan: Option<u16>,
        gmac: Mac,
        me: Ipv6Addr,
    ) -> Option<Verdict> {
        let target = Ipv6Addr::from(s.nd_target);
        let nd6 = &self.gateways.nd6;
        let ours = s.icmp_type == nd::NEIGHBOR_SOLICIT && target == me;
        let asked =
            s.icmp_type == nd::NEIGHBOR_ADVERT && (nd6.is_pending(target) || nd6.is_known(target));
        if !ours && !asked {
            return None;
        }
        if vlan.is_some() {
            strip_tag(frame);
        }
        let m = match nd::parse(frame) {
            Ok(m) => m,
            Err(_) => {
                self.gateways.nd6.counters.bad += 1;
                return Some(Verdict::Drop(DropReason::Malformed));
            }
        };
        if m.kind == nd::NEIGHBOR_ADVERT {
            let Some(mac) = m.lladdr else {
                self.gateways.nd6.counters.bad += 1;
                return Some(Verdict::Drop(DropReason::Malformed));
            };
            self.learn6(vlan, m.target, mac);
            self.gateways.nd6.counters.adverts_received += 1;
            return Some(Verdict::Consumed);
        }
        if m.src.is_unspecified() {
            return Some(Verdict::Consumed);
        }
        self.gateways.nd6.counters.solicits_received += 1;
        if let Some(mac) = m.lladdr {
            self.learn6(vlan, m.src, mac);
        }
        reply::neighbor_advert(frame, s.src, m.src, me, gmac, true);
        push_tag(frame, vlan);
        self.gateways.nd6.counters.adverts_sent += 1;
        Some(Verdict::Send {
            to: Target::Back,
            counted: None,
        })
    }
}
