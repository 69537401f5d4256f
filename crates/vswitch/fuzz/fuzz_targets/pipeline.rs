//! Arbitrary bytes through the frame parser and the full pipeline (every policy enabled):
//! nothing may panic. The first input byte picks the ingress port; the rest are frames
//! separated by their own length bytes, so one input can exercise learning and state.
//!
//! The same input then drives a fragment script from the guarded port: a message (DHCP
//! offer/reply, RA/redirect, or ordinary client and echo traffic) cut into IPv4/IPv6
//! fragments the input chooses (offsets, lengths, more-fragments flag, datagram id, a
//! hop-by-hop header), in any order. No fragment of a guarded message may be delivered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vireo_vswitch::*;

fn switch() -> Switch {
    let mut sc = SwitchConfig::private("fuzz");
    sc.pvlan_domains = vec![PvlanDomain { primary: 100, isolated: Some(101), communities: vec![102] }];
    let mut sw = Switch::new(sc).unwrap();
    let mut a = PortConfig {
        vlan: VlanConfig::Private { primary: 100, secondary: 102, mode: PvlanMode::Community },
        ..PortConfig::access("a", 1)
    };
    a.macs = vec![MacAddr([2, 0, 0, 0, 0, 1])];
    a.guard.arp_nd_guard = true;
    a.guard.allowed_ipv4 = vec![[10, 0, 0, 1].into()];
    a.storm_limit_pps = Some(10);
    a.mac_limit = Some(2);
    a.qos.max_ingress = Some(RateLimit { bits_per_sec: 1_000_000, burst_bytes: 3000 });
    a.mirror = MirrorRole::Source(Direction::Both);
    a.acls = vec![AclRule {
        name: "s".into(),
        priority: 1,
        direction: Direction::Both,
        action: AclAction::Allow,
        local_mac: None,
        remote_mac: None,
        local_ip: Some("10.0.0.0/8".parse().unwrap()),
        remote_ip: None,
        protocol: Some(6),
        local_ports: None,
        remote_ports: Some(PortRange { first: 1, last: 1000 }),
        stateful: true,
    }];
    sw.add_port(a).unwrap();
    sw.add_port(PortConfig {
        vlan: VlanConfig::Private { primary: 100, secondary: 0, mode: PvlanMode::Promiscuous },
        ..PortConfig::access("p", 1)
    })
    .unwrap();
    sw.add_port(PortConfig { vlan: VlanConfig::Trunk { allowed: vec![1, 100, 101, 102], native: Some(1) }, ..PortConfig::access("t", 1) })
        .unwrap();
    sw.add_port(PortConfig { mirror: MirrorRole::Destination, ..PortConfig::access("m", 2) }).unwrap();
    sw
}

const A_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// The upper-layer message the script fragments: (IP protocol, bytes, guarded?).
fn message(sel: u8, v6: bool) -> (u8, Vec<u8>, bool) {
    let udp = |sp: u16, dp: u16, first: u8| {
        let mut m = Vec::new();
        m.extend_from_slice(&sp.to_be_bytes());
        m.extend_from_slice(&dp.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0, first]);
        m
    };
    let icmp = |ty: u8| vec![ty, 0, 0, 0, 0, 0, 0, 0];
    let (proto, mut m, guarded) = match ((sel >> 1) % 4, v6) {
        (0, false) => (17, udp(67, 68, 2), true),
        (0, true) => (17, udp(547, 546, 7), true),
        (1, false) => (17, udp(68, 67, 1), false),
        (1, true) => (17, udp(546, 547, 1), false),
        (2, false) => (1, icmp(if sel & 0x10 != 0 { 9 } else { 5 }), true),
        (2, true) => (58, icmp(if sel & 0x10 != 0 { 137 } else { 134 }), true),
        (_, false) => (1, icmp(8), false),
        (_, true) => (58, icmp(128), false),
    };
    m.resize(64 + usize::from(sel >> 5) * 64, 0);
    (proto, m, guarded)
}

/// One fragment frame of `m` (bytes `start..end`, clipped), from port a's MAC and address.
fn fragment(v6: bool, proto: u8, m: &[u8], start: usize, end: usize, more: bool, id: u8, hbh: bool) -> Vec<u8> {
    let data = m.get(start.min(m.len())..end.min(m.len())).unwrap_or(&[]);
    let mut f = vec![2, 0, 0, 0, 0, 2];
    f.extend_from_slice(&A_MAC);
    let off = (start / 8) as u16;
    if !v6 {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, id]);
        f.extend_from_slice(&(off | if more { 0x2000 } else { 0 }).to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    } else {
        let ext = if hbh { 16 } else { 8 };
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext + data.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[if hbh { 0 } else { 44 }, 64]);
        f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        if hbh {
            f.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]);
        }
        f.extend_from_slice(&[proto, 0]);
        f.extend_from_slice(&(off << 3 | u16::from(more)).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, id]);
    }
    f.extend_from_slice(data);
    f
}

/// Fragment script: first byte picks family and message, then 3 bytes per fragment:
/// start (8-byte units), length (8-byte units, 0 = empty), flags (bit 0 more fragments,
/// bits 1-2 datagram id, bit 3 hop-by-hop header before the fragment header).
fn fragment_script(data: &[u8]) {
    let Some((&sel, ops)) = data.split_first() else { return };
    let v6 = sel & 1 != 0;
    let (proto, m, guarded) = message(sel, v6);
    let mut sw = switch();
    let a = sw.port_id("a").unwrap();
    let mut d = Delivery::default();
    for (i, op) in ops.chunks_exact(3).enumerate() {
        let start = usize::from(op[0]) * 8;
        let end = start + usize::from(op[1]) * 8;
        let more = op[2] & 1 != 0;
        let mut f = fragment(v6, proto, &m, start, end, more, (op[2] >> 1) & 3, op[2] & 8 != 0);
        sw.process(a, &mut f, i as u64 * 1_000_000, &mut d);
        // A whole packet cut to a few bytes is not the guarded message (no DHCP op, no ICMP
        // header): only fragments, and whole packets that carry the guarded fields, count.
        let carries_message = more || start > 0 || end.min(m.len()) >= 16;
        assert!(
            !(guarded && carries_message) || d.ports().is_empty(),
            "a fragment of a guarded message (sel {sel:#x}) was delivered: op {i} {op:?}"
        );
    }
}

/// A switch with an overlay (VXLAN domain "r", NVGRE domain "b"), an uplink, and a VM port in
/// each domain with the same CA.
fn overlay_switch() -> Switch {
    let mut c = SwitchConfig::private("fuzz-overlay");
    let mut o = OverlayConfig {
        provider_addresses: vec!["192.168.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        provider_mac: MacAddr([2, 0xaa, 0, 0, 0, 1]),
        provider_mtu: 1500,
        provider_neighbors: vec![ProviderNeighbor { ip: "192.168.0.2".parse().unwrap(), mac: MacAddr([2, 0xbb, 0, 0, 0, 1]) }],
        routing_domains: Vec::new(),
        policies: Vec::new(),
        gateways: Vec::new(),
        relay_expiry_secs: None,
    };
    for (name, encap, vsid) in [("r", Encap::Vxlan, 100), ("b", Encap::Nvgre, 200)] {
        o.routing_domains.push(RoutingDomain {
            name: name.into(),
            encap,
            subnets: vec![VirtualSubnet { vsid, prefixes: vec![], gateway_ips: vec!["10.0.0.254".parse().unwrap()], gateway_mac: None }],
            gateway_pa: None,
        });
        o.policies.push(PolicyEntry { routing_domain: name.into(), ca: "10.0.0.2".parse().unwrap(), mac: MacAddr([2, 0, 0, 0, 0, 2]), vsid, pa: "192.168.0.2".parse().unwrap() });
    }
    c.overlay = Some(o);
    let mut sw = Switch::new(c).unwrap();
    sw.add_port(PortConfig { role: PortRole::Uplink, ..PortConfig::access("up", 1) }).unwrap();
    for (name, vsid) in [("r", 100), ("b", 200)] {
        sw.add_port(PortConfig {
            overlay: Some(PortOverlay { routing_domain: name.into(), vsid, mac: MacAddr(A_MAC), cas: vec!["10.0.0.1".parse().unwrap()] }),
            ..PortConfig::access(name, 1)
        })
        .unwrap();
    }
    sw
}

/// The decapsulation path: the input's frames arrive on the uplink raw, and wrapped in valid
/// VXLAN/NVGRE headers from the known peer (so the inner checks are reached), with one byte
/// of the outer headers flipped when the input asks. Nothing may reach the blue port from red's
/// VSID, and nothing may panic.
fn overlay_script(data: &[u8]) {
    use vireo_vswitch::overlay::encap::{decapsulate, encapsulate, Outer};
    let _ = decapsulate(data);
    let mut sw = overlay_switch();
    let (up, blue) = (sw.port_id("up").unwrap(), sw.port_id("b").unwrap());
    let vm_ports = [sw.port_id("r").unwrap(), blue];
    let mut d = Delivery::default();
    let mut rest = data;
    while let Some((&hdr, tail)) = rest.split_first() {
        let len = (hdr as usize % 128).min(tail.len());
        let (f, next) = tail.split_at(len);
        rest = next;
        let mut frame = f.to_vec();
        match hdr >> 6 {
            0 => sw.process(up, &mut frame, 0, &mut d),
            1 => sw.process(vm_ports[usize::from(hdr & 1)], &mut frame, 0, &mut d),
            _ => {
                let (encap, vsid) = if hdr & 1 == 0 { (Encap::Vxlan, 100) } else { (Encap::Nvgre, 200) };
                let v6 = hdr & 2 != 0;
                let o = Outer {
                    src_mac: [2, 0xbb, 0, 0, 0, 1],
                    dst_mac: [2, 0xaa, 0, 0, 0, 1],
                    src_ip: if v6 { "fd00::2".parse().unwrap() } else { "192.168.0.2".parse().unwrap() },
                    dst_ip: if v6 { "fd00::1".parse().unwrap() } else { "192.168.0.1".parse().unwrap() },
                };
                if v6 && hdr & 8 != 0 {
                    // Neighbour discovery for our IPv6 PA instead of a tunnel packet.
                    frame = nd_frame(hdr & 1 == 0, &frame);
                } else {
                    encapsulate(&mut frame, encap, vsid, 0, &o);
                }
                if hdr & 4 != 0 {
                    let at = usize::from(hdr >> 3) % 62;
                    if let Some(b) = frame.get_mut(at) {
                        *b ^= tail.first().copied().unwrap_or(0x55) | 1;
                    }
                }
                sw.process(up, &mut frame, 0, &mut d);
                if encap == Encap::Vxlan {
                    assert!(!d.ports().contains(&blue), "a red VXLAN frame reached the blue tenant");
                }
            }
        }
    }
}

/// A checksummed solicitation for our PA (fd00::1) or advertisement to it from the known IPv6
/// peer, with the target and options from the input, so the checks behind the checksum (hop
/// limit, options, target, what may be learned) are reached.
fn nd_frame(solicit: bool, rest: &[u8]) -> Vec<u8> {
    use std::net::Ipv6Addr;
    use vireo_vswitch::overlay::wire::{fold, pseudo, sum};
    let ours: Ipv6Addr = "fd00::1".parse().unwrap();
    let src = "fd00::2".parse::<Ipv6Addr>().unwrap().octets();
    let (dst_mac, dst) = if solicit {
        ([0x33, 0x33, 0xff, 0, 0, 1], "ff02::1:ff00:1".parse::<Ipv6Addr>().unwrap().octets())
    } else {
        ([2, 0xaa, 0, 0, 0, 1], ours.octets())
    };
    let mut icmp = vec![if solicit { 135 } else { 136 }, 0, 0, 0, 0x60, 0, 0, 0];
    if rest.len() < 16 {
        icmp.extend_from_slice(&ours.octets());
    }
    icmp.extend_from_slice(rest);
    let c = fold(sum(pseudo(&src, &dst, 58, icmp.len()), &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[2, 0xbb, 0, 0, 0, 1, 0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

fuzz_target!(|data: &[u8]| {
    overlay_script(data);
    fragment_script(data);
    let _ = frame::parse(data);
    let mut sw = switch();
    let ports = sw.ports().to_vec();
    let mut d = Delivery::default();
    let mut rest = data;
    let mut now = 0u64;
    while let Some((&hdr, tail)) = rest.split_first() {
        let len = (hdr as usize).min(tail.len());
        let (f, next) = tail.split_at(len);
        let mut frame = f.to_vec();
        sw.process(ports[hdr as usize % ports.len()], &mut frame, now, &mut d);
        let mut buf = Vec::new();
        for e in d.egress.clone() {
            let _ = render(&frame, e.tag, &mut buf);
        }
        now += 1_000_000;
        rest = next;
    }
});
