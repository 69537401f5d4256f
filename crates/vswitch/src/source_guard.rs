//! IP source guard: with `GuardConfig::ip_source_guard`, IPv4/IPv6 packets from a port must
//! carry one of the port's allowed addresses (`allowed_ipv4`/`allowed_ipv6`, the list the
//! ARP/ND guard uses) as their source. The switch does not snoop DHCP, so the list is static:
//! a guest that gets its address by DHCP needs it listed (or the guard off).
//!
//! Sources a host legitimately uses before (or besides) its configured addresses:
//! - `0.0.0.0` only for DHCP client messages (UDP 68 → 67: DISCOVER, REQUEST before the lease);
//! - `::` only for ICMPv6 router solicitation, duplicate-address-detection neighbor
//!   solicitation and MLD reports (RFC 4861, 4862, 3590), which is what a host sends while its
//!   addresses are still tentative;
//! - link-local `fe80::/10` always: routers never forward it, every IPv6 host needs one for
//!   ND, RS and DHCPv6, and its generated form (EUI-64 or RFC 7217 stable privacy) is not
//!   known in advance. Claims of link-local addresses in NS/NA stay the ND guard's job.
//!
//! Checked on every fragment (the source address is in every IP header). Frames whose
//! EtherType says IP but whose header could not be read never get here: the pipeline drops
//! them as malformed.

use crate::config::GuardConfig;
use crate::frame::{FrameSummary, IPPROTO_ICMPV6, IPPROTO_UDP, L3};
use crate::meter::DropReason;

const ICMPV6_MLD_REPORT: u8 = 131;
const ICMPV6_RS: u8 = 133;
const ICMPV6_NS: u8 = 135;
const ICMPV6_MLD2_REPORT: u8 = 143;

/// Runs the IP source guard of a port (a no-op when it is off).
#[inline]
pub fn check(g: &GuardConfig, s: &FrameSummary) -> Result<(), DropReason> {
    if !g.ip_source_guard {
        return Ok(());
    }
    let ok = match s.l3 {
        L3::Ipv4 => ipv4_allowed(g, s),
        L3::Ipv6 => ipv6_allowed(g, s),
        L3::Arp | L3::Other => true,
    };
    if ok {
        Ok(())
    } else {
        Err(DropReason::IpSourceGuard)
    }
}

fn ipv4_allowed(g: &GuardConfig, s: &FrameSummary) -> bool {
    let src = s.src_ip as u32;
    if src == 0 {
        return s.proto == IPPROTO_UDP && s.has_l4 && s.sport == 68 && s.dport == 67;
    }
    g.allowed_ipv4.iter().any(|a| u32::from(*a) == src)
}

fn ipv6_allowed(g: &GuardConfig, s: &FrameSummary) -> bool {
    let src = s.src_ip;
    if src == 0 {
        return s.proto == IPPROTO_ICMPV6
            && s.has_l4
            && matches!(
                s.icmp_type,
                ICMPV6_RS | ICMPV6_NS | ICMPV6_MLD_REPORT | ICMPV6_MLD2_REPORT
            );
    }
    if src >> 118 == 0xfe80 >> 6 {
        return true;
    }
    g.allowed_ipv6.iter().any(|a| u128::from(*a) == src)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn guard() -> GuardConfig {
        GuardConfig {
            ip_source_guard: true,
            allowed_ipv4: vec![Ipv4Addr::new(10, 0, 0, 1)],
            allowed_ipv6: vec!["fd00::1".parse().unwrap()],
            ..Default::default()
        }
    }

    fn v4(src: Ipv4Addr, proto: u8, sport: u16, dport: u16) -> FrameSummary {
        FrameSummary {
            l3: L3::Ipv4,
            src_ip: u32::from(src) as u128,
            proto,
            has_l4: true,
            sport,
            dport,
            ..Default::default()
        }
    }

    fn v6(src: &str, proto: u8, icmp_type: u8) -> FrameSummary {
        FrameSummary {
            l3: L3::Ipv6,
            src_ip: u128::from(src.parse::<Ipv6Addr>().unwrap()),
            proto,
            has_l4: true,
            icmp_type,
            ..Default::default()
        }
    }

    #[test]
    fn allowed_sources_pass_and_others_drop() {
        let g = guard();
        let spoof = Err(DropReason::IpSourceGuard);
        assert_eq!(check(&g, &v4(Ipv4Addr::new(10, 0, 0, 1), 6, 1, 2)), Ok(()));
        assert_eq!(check(&g, &v4(Ipv4Addr::new(10, 0, 0, 2), 6, 1, 2)), spoof);
        assert_eq!(check(&g, &v6("fd00::1", 6, 0)), Ok(()));
        assert_eq!(check(&g, &v6("fd00::2", 6, 0)), spoof);
        let off = GuardConfig::default();
        assert_eq!(
            check(&off, &v4(Ipv4Addr::new(10, 0, 0, 2), 6, 1, 2)),
            Ok(())
        );
    }

    #[test]
    fn unspecified_sources_only_for_dhcp_dad_rs_and_mld() {
        let g = guard();
        let spoof = Err(DropReason::IpSourceGuard);
        assert_eq!(check(&g, &v4(Ipv4Addr::UNSPECIFIED, 17, 68, 67)), Ok(()));
        assert_eq!(check(&g, &v4(Ipv4Addr::UNSPECIFIED, 17, 67, 68)), spoof);
        assert_eq!(check(&g, &v4(Ipv4Addr::UNSPECIFIED, 6, 68, 67)), spoof);
        let mut frag = v4(Ipv4Addr::UNSPECIFIED, 17, 0, 0);
        frag.has_l4 = false;
        assert_eq!(check(&g, &frag), spoof, "a later fragment has no ports");
        for t in [133, 135, 131, 143] {
            assert_eq!(check(&g, &v6("::", 58, t)), Ok(()), "ICMPv6 type {t}");
        }
        assert_eq!(check(&g, &v6("::", 58, 128)), spoof, "echo from ::");
        assert_eq!(check(&g, &v6("::", 17, 0)), spoof);
    }

    #[test]
    fn link_local_passes_and_multicast_sources_do_not() {
        let g = guard();
        assert_eq!(check(&g, &v6("fe80::1234", 6, 0)), Ok(()));
        assert_eq!(check(&g, &v6("febf::1", 6, 0)), Ok(()));
        assert_eq!(
            check(&g, &v6("fec0::1", 6, 0)),
            Err(DropReason::IpSourceGuard)
        );
        assert_eq!(
            check(&g, &v6("ff02::1", 6, 0)),
            Err(DropReason::IpSourceGuard)
        );
    }
}
