//! Ingress guards of a port: MAC spoofing, ARP/ND spoofing, DHCP server and router guards.
//! Each is a check on the frame summary, precompiled from the port's [`GuardConfig`]; the
//! only state is the fragment table, which carries a first fragment's verdict to the rest of
//! its datagram (see [`PortGuard::check_fragment`]).

use crate::config::{GuardConfig, MacAddr, PortRole};
use crate::fragment::{DatagramKey, FragmentTable, Verdict};
use crate::frame::{
    is_ipv6_extension, Fragment, FrameSummary, Mac, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, L3,
};
use crate::meter::DropReason;

const ICMPV6_RS: u8 = 133;
const ICMPV6_RA: u8 = 134;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
const ICMPV6_REDIRECT: u8 = 137;
const ICMP_REDIRECT: u8 = 5;
const ICMP_ROUTER_ADV: u8 = 9;
const BOOTREPLY: u8 = 2;
/// DHCPv6 ADVERTISE, REPLY, RECONFIGURE, RELAY-REPL: what only servers and relays send.
const DHCP6_SERVER_TYPES: [u8; 4] = [2, 7, 10, 13];
/// Bytes of the upper-layer header a guard may judge (UDP ports and the DHCP op/type byte,
/// ICMP type and code): a later fragment may not overlap them.
const GUARDED_L4_BYTES: u16 = 16;

#[inline]
fn mac_key(m: &Mac) -> u64 {
    u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

#[derive(Clone, Debug, Default)]
pub struct PortGuard {
    /// The port's MACs packed into integers: compared on every frame.
    macs: Vec<u64>,
    enforce_mac: bool,
    arp_nd: bool,
    ipv4: Vec<u32>,
    ipv6: Vec<u128>,
    dhcp_guard: bool,
    router_guard: bool,
    /// Verdicts on datagrams this port sends in fragments (only those a guard inspects).
    frags: FragmentTable,
}

impl PortGuard {
    pub fn compile(role: PortRole, macs: &[MacAddr], g: &GuardConfig) -> Self {
        let guest = role == PortRole::Vm;
        PortGuard {
            macs: macs.iter().map(|m| mac_key(&m.0)).collect(),
            enforce_mac: !g.mac_spoofing && !macs.is_empty(),
            arp_nd: g.arp_nd_guard,
            ipv4: g.allowed_ipv4.iter().map(|a| u32::from(*a)).collect(),
            ipv6: g.allowed_ipv6.iter().map(|a| u128::from(*a)).collect(),
            dhcp_guard: guest && !g.dhcp_server_allowed,
            router_guard: guest && !g.router_allowed,
            frags: FragmentTable::default(),
        }
    }

    pub fn is_noop(&self) -> bool {
        !self.enforce_mac && !self.arp_nd && !self.dhcp_guard && !self.router_guard
    }

    /// Runs every enabled guard on a frame entering the switch from this port at `now` (ns).
    #[inline]
    pub fn check(&mut self, s: &FrameSummary, now: u64) -> Result<(), DropReason> {
        if s.src[0] & 1 == 1 || s.src == [0; 6] {
            return Err(DropReason::InvalidSourceMac);
        }
        if self.enforce_mac && !self.macs.contains(&mac_key(&s.src)) {
            return Err(DropReason::MacSpoof);
        }
        let verdict = match s.l3 {
            L3::Arp if self.arp_nd => self.check_arp(s),
            L3::Ipv4 => self.check_ipv4(s),
            L3::Ipv6 => self.check_ipv6(s),
            _ => Ok(()),
        };
        match s.frag {
            Some(f) => self.check_fragment(s, &f, verdict, now),
            None => verdict,
        }
    }

    /// Whether a guard of this port inspects the upper layer of datagrams of this family and
    /// fragment protocol. An IPv6 extension header there hides the protocol: any guard.
    fn guards_fragments(&self, l3: L3, proto: u8) -> bool {
        match (l3, proto) {
            (_, IPPROTO_UDP) => self.dhcp_guard,
            (L3::Ipv4, IPPROTO_ICMP) => self.router_guard,
            (L3::Ipv6, IPPROTO_ICMPV6) => self.router_guard || self.arp_nd,
            (L3::Ipv6, p) if is_ipv6_extension(p) => {
                self.router_guard || self.arp_nd || self.dhcp_guard
            }
            _ => false,
        }
    }

    /// Fragments of datagrams a guard inspects. The first fragment must show every field the
    /// guard judges by (else it is a tiny-fragment evasion, RFC 1858), and its verdict — the
    /// plain guard's `verdict`, or a fragment rule below — is remembered for the datagram.
    /// Later fragments pass only when their datagram's first fragment was seen and allowed,
    /// and they do not overlap its guarded headers. Drops the unfragmented packet would not
    /// have had count as `FragmentGuard`.
    fn check_fragment(
        &mut self,
        s: &FrameSummary,
        f: &Fragment,
        verdict: Result<(), DropReason>,
        now: u64,
    ) -> Result<(), DropReason> {
        let guarded = self.guards_fragments(s.l3, f.proto);
        // RFC 6980: neighbor discovery is never fragmented, atomic fragments included.
        let nd = s.l3 == L3::Ipv6
            && s.has_l4
            && s.proto == IPPROTO_ICMPV6
            && (ICMPV6_RS..=ICMPV6_REDIRECT).contains(&s.icmp_type)
            && (self.router_guard || self.arp_nd);
        let verdict = match verdict {
            Ok(()) if nd => Err(DropReason::FragmentGuard),
            v => v,
        };
        if !guarded || !f.is_split() {
            return verdict;
        }
        let key = DatagramKey::new(s, f);
        if f.offset == 0 {
            let verdict = verdict.and_then(|()| self.first_fragment(s));
            let headers = f.l4_start.saturating_add(GUARDED_L4_BYTES);
            let recorded = match verdict {
                Ok(()) => Verdict::Allowed { headers },
                Err(_) => Verdict::Blocked,
            };
            return match (verdict, self.frags.record(key, recorded, now)) {
                (Err(r), _) => Err(r),
                (Ok(()), Verdict::Blocked) => Err(DropReason::FragmentGuard),
                (Ok(()), Verdict::Allowed { .. }) => Ok(()),
            };
        }
        verdict?;
        match self.frags.get(&key, now) {
            Some(Verdict::Allowed { headers }) if u32::from(f.offset) * 8 >= u32::from(headers) => {
                Ok(())
            }
            Some(Verdict::Allowed { .. }) => {
                // Rewrites the ports or type the first fragment was judged by.
                self.frags.record(key, Verdict::Blocked, now);
                Err(DropReason::FragmentGuard)
            }
            Some(Verdict::Blocked) | None => Err(DropReason::FragmentGuard),
        }
    }

    /// Fragment rules for a first fragment the plain guards let through: the fields they
    /// judge must be in it, and DHCP datagrams from a server port or to a client port are
    /// refused whatever their op (a later fragment could change what the guard saw).
    fn first_fragment(&self, s: &FrameSummary) -> Result<(), DropReason> {
        const TINY: Result<(), DropReason> = Err(DropReason::FragmentGuard);
        match s.proto {
            _ if s.l4_hidden => TINY,
            IPPROTO_UDP if self.dhcp_guard => {
                if !s.has_l4 {
                    return TINY;
                }
                let (sp, dp) = (s.sport, s.dport);
                let v4 = s.l3 == L3::Ipv4;
                if (v4 && (sp == 67 || dp == 68)) || (!v4 && (sp == 547 || dp == 546)) {
                    return Err(DropReason::FragmentGuard);
                }
                if (v4 && dp == 67 && s.dhcp4_op == 0) || (!v4 && dp == 547 && s.dhcp6_type == 0) {
                    return TINY;
                }
                Ok(())
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 if !s.has_l4 => TINY,
            _ => Ok(()),
        }
    }

    fn check_arp(&self, s: &FrameSummary) -> Result<(), DropReason> {
        let Some(a) = s.arp else {
            return Err(DropReason::ArpSpoof);
        };
        // Not Ethernet/IPv4 ARP (we could not read addresses): nothing a guest needs.
        if a.sender_ip == [0; 4] && a.target_ip == [0; 4] && a.sender_mac == [0; 6] {
            return Err(DropReason::ArpSpoof);
        }
        if self.enforce_mac && !self.macs.contains(&mac_key(&a.sender_mac)) {
            return Err(DropReason::ArpSpoof);
        }
        let sender = u32::from_be_bytes(a.sender_ip);
        // 0.0.0.0 is an ARP probe (address conflict detection): it claims nothing.
        if sender != 0 && !self.ipv4.contains(&sender) {
            return Err(DropReason::ArpSpoof);
        }
        Ok(())
    }

    fn check_ipv4(&self, s: &FrameSummary) -> Result<(), DropReason> {
        // The parser reads the op for UDP from port 67 or to 67/68: a BOOTREPLY there is a
        // server's (or a relay's) message, whatever the source port.
        if self.dhcp_guard && s.proto == IPPROTO_UDP && s.dhcp4_op == BOOTREPLY {
            return Err(DropReason::DhcpGuard);
        }
        if self.router_guard
            && s.proto == IPPROTO_ICMP
            && matches!(s.icmp_type, ICMP_REDIRECT | ICMP_ROUTER_ADV)
        {
            return Err(DropReason::RouterGuard);
        }
        Ok(())
    }

    fn check_ipv6(&self, s: &FrameSummary) -> Result<(), DropReason> {
        if s.l4_hidden && (self.router_guard || self.arp_nd || self.dhcp_guard) {
            // An upper-layer header pushed out of reach by extension headers or fragmentation
            // is how RA guard is evaded (RFC 7113); a guarded guest does not need it.
            return Err(if self.router_guard {
                DropReason::RouterGuard
            } else {
                DropReason::NdSpoof
            });
        }
        if s.proto == IPPROTO_ICMPV6 && s.has_l4 {
            match s.icmp_type {
                ICMPV6_RA | ICMPV6_REDIRECT if self.router_guard => {
                    return Err(DropReason::RouterGuard)
                }
                ICMPV6_NA if self.arp_nd && !self.ipv6.contains(&s.nd_target) => {
                    return Err(DropReason::NdSpoof)
                }
                ICMPV6_NS if self.arp_nd && s.src_ip != 0 && !self.ipv6.contains(&s.src_ip) => {
                    return Err(DropReason::NdSpoof)
                }
                _ => {}
            }
        }
        // Read for UDP from 547 or to 546/547, like the DHCPv4 op.
        if self.dhcp_guard && s.proto == IPPROTO_UDP && DHCP6_SERVER_TYPES.contains(&s.dhcp6_type) {
            return Err(DropReason::DhcpGuard);
        }
        Ok(())
    }
}
