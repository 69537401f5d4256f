//! Ingress guards of a port: MAC spoofing, ARP/ND spoofing, DHCP server and router guards.
//! Each is a pure check on the frame summary, precompiled from the port's [`GuardConfig`].

use crate::config::{GuardConfig, MacAddr, PortRole};
use crate::frame::{FrameSummary, Mac, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_UDP, L3};
use crate::meter::DropReason;

const ICMPV6_RA: u8 = 134;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
const ICMPV6_REDIRECT: u8 = 137;
const ICMP_REDIRECT: u8 = 5;
const ICMP_ROUTER_ADV: u8 = 9;
const BOOTREPLY: u8 = 2;
/// DHCPv6 ADVERTISE, REPLY, RECONFIGURE, RELAY-REPL: what only servers and relays send.
const DHCP6_SERVER_TYPES: [u8; 4] = [2, 7, 10, 13];

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
        }
    }

    pub fn is_noop(&self) -> bool {
        !self.enforce_mac && !self.arp_nd && !self.dhcp_guard && !self.router_guard
    }

    /// Runs every enabled guard on a frame entering the switch from this port.
    #[inline]
    pub fn check(&self, s: &FrameSummary) -> Result<(), DropReason> {
        if s.src[0] & 1 == 1 || s.src == [0; 6] {
            return Err(DropReason::InvalidSourceMac);
        }
        if self.enforce_mac && !self.macs.contains(&mac_key(&s.src)) {
            return Err(DropReason::MacSpoof);
        }
        match s.l3 {
            L3::Arp if self.arp_nd => self.check_arp(s),
            L3::Ipv4 => self.check_ipv4(s),
            L3::Ipv6 => self.check_ipv6(s),
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
        if self.dhcp_guard && s.proto == IPPROTO_UDP && s.sport == 67 && s.dhcp4_op == BOOTREPLY {
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
        if self.dhcp_guard
            && s.proto == IPPROTO_UDP
            && (s.sport == 547 || s.dport == 547)
            && DHCP6_SERVER_TYPES.contains(&s.dhcp6_type)
        {
            return Err(DropReason::DhcpGuard);
        }
        Ok(())
    }
}
