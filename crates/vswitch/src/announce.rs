//! Announcing a port whose VM just arrived (live migration's last step, `SwitchOp::Announce`):
//! the frames that make learning tables elsewhere (other switches, the physical network
//! behind the uplink) move the VM's MACs to this switch at once, as QEMU's announce does.
//! Pure: [`announce_frames`] builds them; the runtime injects them as if the port had sent
//! them (`SwitchRuntime::inject`), so the port's VLAN, guards and ACLs apply and the local
//! table learns the MACs too.
//!
//! A port in a virtual subnet announces differently ([`overlay_frames`]): the overlay never
//! floods, so it tells each peer VM of its subnet directly, and the tunnel carries that to
//! the peer's host from this host's provider address (docs/netvirt.md, "A VM that moves").

use std::net::{IpAddr, Ipv4Addr};

use vireo_netconfig::PortOverlay;

use crate::config::{PortConfig, VlanConfig};
use crate::frame::Mac;

/// EtherType of RARP, which QEMU's announce sends (a frame nobody answers, seen by every
/// learning bridge).
pub const ETH_P_RARP: u16 = 0x8035;
pub const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const BROADCAST: Mac = [0xff; 6];
/// Ethernet minimum (without FCS): announce frames are padded to it.
const MIN_FRAME: usize = 60;

/// The port's MACs to announce: its configured ones, then those the switch learned behind
/// it, without duplicates, in that order.
pub fn port_macs(cfg: &PortConfig, learned: &[Mac]) -> Vec<Mac> {
    let mut out: Vec<Mac> = Vec::new();
    for m in cfg.macs.iter().map(|m| m.0).chain(learned.iter().copied()) {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// A RARP "reverse request" for `mac`, as QEMU's `qemu_announce_self` builds it.
pub fn rarp(mac: Mac) -> Vec<u8> {
    let mut f = eth(BROADCAST, mac, ETH_P_RARP);
    arp_body(
        &mut f,
        3,
        mac,
        Ipv4Addr::UNSPECIFIED,
        mac,
        Ipv4Addr::UNSPECIFIED,
    );
    pad(f)
}

/// A gratuitous ARP request: `mac` claims `ip` (sender and target address both `ip`).
pub fn gratuitous_arp(mac: Mac, ip: Ipv4Addr) -> Vec<u8> {
    let mut f = eth(BROADCAST, mac, ETH_P_ARP);
    arp_body(&mut f, 1, mac, ip, [0; 6], ip);
    pad(f)
}

/// Every frame announcing the port: one RARP per MAC, one gratuitous ARP per IPv4 address of
/// the port (the ARP guard's list) from its first MAC, each in the port's VLAN(s) as the port
/// would send it (untagged on an access or private-VLAN port; on a trunk, untagged for the
/// native VLAN and tagged for each other allowed VLAN). Empty when the port has no MAC.
pub fn announce_frames(cfg: &PortConfig, learned: &[Mac]) -> Vec<Vec<u8>> {
    let macs = port_macs(cfg, learned);
    let Some(&first) = macs.first() else {
        return Vec::new();
    };
    let mut plain: Vec<Vec<u8>> = macs.iter().map(|&m| rarp(m)).collect();
    plain.extend(
        cfg.guard
            .allowed_ipv4
            .iter()
            .map(|&ip| gratuitous_arp(first, ip)),
    );
    match &cfg.vlan {
        VlanConfig::Access { .. } | VlanConfig::Private { .. } => plain,
        VlanConfig::Trunk { allowed, native } => {
            let mut out = Vec::new();
            if native.is_some() {
                out.extend(plain.iter().cloned());
            }
            for &vid in allowed.iter().filter(|&&v| Some(v) != *native) {
                out.extend(plain.iter().map(|f| tagged(f, vid)));
            }
            out
        }
    }
}

/// Peers an overlay port announces itself to at most (one injected batch).
pub const MAX_OVERLAY_PEERS: usize = 256;

/// An overlay port's announcement: for each of its CAs and each peer (CA, MAC) of its
/// virtual subnet of the same family, an unsolicited ARP reply (IPv4: "CA is at MAC") or
/// unsolicited neighbor advertisement (IPv6), unicast to that peer. The overlay routes each
/// like the VM's own traffic — to a local port, or tunnelled to the peer's host — where it
/// passes the source check only if that host's table already names this host for the CA.
pub fn overlay_frames(p: &PortOverlay, peers: &[(IpAddr, Mac)]) -> Vec<Vec<u8>> {
    let mac = p.mac.0;
    let mut out = Vec::new();
    for ca in &p.cas {
        for &(peer, peer_mac) in peers.iter().take(MAX_OVERLAY_PEERS) {
            let mut f = Vec::new();
            match (ca, peer) {
                (IpAddr::V4(me), IpAddr::V4(them)) if *me != them => {
                    crate::overlay::reply::arp(&mut f, peer_mac, mac, 2, mac, *me, peer_mac, them);
                }
                (IpAddr::V6(me), IpAddr::V6(them)) if *me != them => {
                    crate::overlay::reply::unsolicited_advert(&mut f, peer_mac, them, *me, mac);
                }
                _ => continue,
            }
            out.push(f);
        }
    }
    out
}

fn eth(dst: Mac, src: Mac, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(MIN_FRAME + 4);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// ARP/RARP for Ethernet and IPv4: hardware type 1, protocol 0x0800, lengths 6 and 4.
fn arp_body(f: &mut Vec<u8>, op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) {
    f.extend_from_slice(&1u16.to_be_bytes());
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
}

fn pad(mut f: Vec<u8>) -> Vec<u8> {
    if f.len() < MIN_FRAME {
        f.resize(MIN_FRAME, 0);
    }
    f
}

/// `f` with an 802.1Q tag for `vid` after the source MAC.
fn tagged(f: &[u8], vid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len() + 4);
    out.extend_from_slice(&f[..12]);
    out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    out.extend_from_slice(&(vid & 0xfff).to_be_bytes());
    out.extend_from_slice(&f[12..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MacAddr;

    const M1: Mac = [0x52, 0x54, 0, 1, 2, 3];
    const M2: Mac = [0x52, 0x54, 0, 1, 2, 4];

    #[test]
    fn rarp_is_qemus_reverse_request() {
        let f = rarp(M1);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &M1);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &M1, "sender MAC");
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &M1, "target MAC");
        assert_eq!(&f[38..42], &[0; 4]);
        assert!(f[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn gratuitous_arp_claims_the_address() {
        let f = gratuitous_arp(M1, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[28..32], &[10, 0, 0, 7], "sender IP");
        assert_eq!(&f[38..42], &[10, 0, 0, 7], "target IP");
    }

    #[test]
    fn frames_cover_configured_and_learned_macs_once_and_each_address() {
        let mut cfg = PortConfig::access("vm", 10);
        cfg.macs = vec![MacAddr(M1)];
        cfg.guard.allowed_ipv4 = vec![Ipv4Addr::new(10, 0, 0, 7), Ipv4Addr::new(10, 0, 0, 8)];
        let frames = announce_frames(&cfg, &[M2, M1]);
        assert_eq!(frames.len(), 4);
        assert_eq!(frames[0], rarp(M1));
        assert_eq!(frames[1], rarp(M2));
        assert_eq!(frames[2], gratuitous_arp(M1, Ipv4Addr::new(10, 0, 0, 7)));
        // No MAC at all: nothing to announce.
        assert!(announce_frames(&PortConfig::access("x", 1), &[]).is_empty());
    }

    #[test]
    fn an_overlay_port_tells_each_peer_of_its_family_directly() {
        let p = PortOverlay {
            routing_domain: "red".into(),
            vsid: 5001,
            mac: MacAddr(M1),
            cas: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        };
        let peers = [
            ("10.0.0.3".parse().unwrap(), M2),
            ("fd00::3".parse().unwrap(), M2),
        ];
        let frames = overlay_frames(&p, &peers);
        assert_eq!(frames.len(), 2, "one per CA and peer of its family");
        let arp = &frames[0];
        assert_eq!(&arp[0..6], &M2, "unicast to the peer");
        assert_eq!(&arp[6..12], &M1);
        assert_eq!(&arp[12..14], &[0x08, 0x06]);
        assert_eq!(&arp[20..22], &[0, 2], "a reply: CA is at MAC");
        assert_eq!(&arp[22..28], &M1);
        assert_eq!(&arp[28..32], &[10, 0, 0, 5]);
        assert_eq!(&arp[32..38], &M2);
        assert_eq!(&arp[38..42], &[10, 0, 0, 3]);
        let na = &frames[1];
        assert_eq!(&na[12..14], &[0x86, 0xdd]);
        assert_eq!(na[54], 136, "neighbor advertisement");
        assert_eq!(na[58], 0x20, "override, not solicited, not a router");
        // The ICMPv6 checksum over the pseudo-header verifies.
        let (src, dst) = (&na[22..38], &na[38..54]);
        let c = crate::overlay::wire::fold(crate::overlay::wire::sum(
            crate::overlay::wire::pseudo(src, dst, 58, 32),
            &na[54..86],
        ));
        assert_eq!(c, 0, "checksum");
        // No peer of its subnet: nothing to say.
        assert!(overlay_frames(&p, &[]).is_empty());
    }

    #[test]
    fn a_trunk_announces_in_each_vlan() {
        let mut cfg = PortConfig::access("t", 1);
        cfg.vlan = VlanConfig::Trunk {
            allowed: vec![10, 20],
            native: Some(10),
        };
        let frames = announce_frames(&cfg, &[M1]);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], rarp(M1), "native VLAN: untagged");
        assert_eq!(&frames[1][12..16], &[0x81, 0x00, 0, 20]);
        assert_eq!(&frames[1][16..18], &[0x80, 0x35]);
    }
}
