//! Issue 13: bounded learning under a MAC flood, strict frame sizes (MTU, runts) and the IP
//! source guard, through the whole pipeline.

use crate::common;

use common::*;
use vireo_vswitch::*;

fn sw_with(cfg: SwitchConfig, ports: Vec<PortConfig>) -> (Switch, Vec<PortId>) {
    let mut sw = Switch::new(cfg).unwrap();
    let ids = ports.into_iter().map(|p| sw.add_port(p).unwrap()).collect();
    (sw, ids)
}

/// A random-looking unicast, locally administered MAC per index (what a flood tool sends).
fn flood_mac(i: u32) -> [u8; 6] {
    let x = i.wrapping_mul(0x9e37_79b9);
    let b = x.to_be_bytes();
    [0x02, 0x5a, b[0], b[1], b[2], b[3]]
}

/// A UDP/IPv4 frame of exactly `len` bytes (untagged).
fn sized(src: [u8; 6], dst: [u8; 6], len: usize) -> Vec<u8> {
    let f = udp4(src, dst, ip4(1), ip4(2), 1000, 2000, &vec![0; len - 42]);
    assert_eq!(f.len(), len);
    f
}

#[test]
fn a_20000_mac_flood_from_one_port_stays_within_capacity_and_spares_the_others() {
    let (mut sw, p) = sw_with(
        SwitchConfig::private("t"),
        vec![
            PortConfig::access("attacker", 1),
            PortConfig::access("b", 1),
            PortConfig::access("c", 1),
        ],
    );
    send(&mut sw, p[1], &plain(mac(2), BCAST));
    send(&mut sw, p[2], &plain(mac(3), BCAST));
    let mut refused = 0;
    for i in 0..20_000 {
        if send_at(&mut sw, p[0], &plain(flood_mac(i), mac(2)), 2).1 == Some(DropReason::MacLimit) {
            refused += 1;
        }
    }
    assert!(
        sw.mac_table_len() <= DEFAULT_MAC_TABLE_LIMIT,
        "table grew to {}",
        sw.mac_table_len()
    );
    assert_eq!(
        sw.status(p[0]).unwrap().learned_macs,
        DEFAULT_PORT_MAC_LIMIT
    );
    assert_eq!(refused + DEFAULT_PORT_MAC_LIMIT as u64, 20_000);
    assert_eq!(sw.drops(p[0], DropReason::MacLimit), refused);
    // The other ports' stations are still known: unicast between them, no flood to the
    // attacker.
    assert_eq!(sw.learned(1, &mac(2), 3), Some(p[1]));
    assert_eq!(sw.learned(1, &mac(3), 3), Some(p[2]));
    assert_eq!(
        send_at(&mut sw, p[1], &plain(mac(2), mac(3)), 3).0,
        vec![p[2]]
    );
    assert_eq!(
        send_at(&mut sw, p[2], &plain(mac(3), mac(2)), 3).0,
        vec![p[1]]
    );
    // And a new station behind a well-behaved port is still learned.
    send_at(&mut sw, p[1], &plain(mac(4), BCAST), 3);
    assert_eq!(sw.learned(1, &mac(4), 3), Some(p[1]));
}

#[test]
fn an_uplink_flood_fills_the_table_but_vm_ports_keep_and_gain_entries() {
    let mut cfg = SwitchConfig::private("t");
    cfg.mac_table_limit = 2048;
    let uplink = PortConfig {
        role: PortRole::Uplink,
        ..PortConfig::access("uplink", 1)
    };
    let (mut sw, p) = sw_with(
        cfg,
        vec![
            uplink,
            PortConfig::access("b", 1),
            PortConfig::access("c", 1),
        ],
    );
    send(&mut sw, p[1], &plain(mac(2), BCAST));
    for i in 0..20_000 {
        send_at(&mut sw, p[0], &plain(flood_mac(i), BCAST), 2);
    }
    assert_eq!(sw.mac_table_len(), 2048, "full, not beyond");
    assert!(sw.drops(p[0], DropReason::MacLimit) >= 20_000 - 2048);
    assert_eq!(sw.learned(1, &mac(2), 3), Some(p[1]), "not evicted");
    // A VM that speaks up now still gets room: the flooder's oldest entry makes way.
    assert_eq!(
        send_at(&mut sw, p[2], &plain(mac(3), mac(2)), 3),
        (vec![p[1]], None)
    );
    assert_eq!(sw.learned(1, &mac(3), 3), Some(p[2]));
    assert_eq!(sw.mac_table_len(), 2048);
    assert_eq!(
        send_at(&mut sw, p[1], &plain(mac(2), mac(3)), 3).0,
        vec![p[2]]
    );
}

#[test]
fn learning_limits_are_configurable_and_default_when_absent_from_json() {
    let cfg: SwitchConfig =
        serde_json::from_str(r#"{"name":"s","kind":{"type":"private"}}"#).unwrap();
    assert_eq!(
        (cfg.mac_table_limit, cfg.port_mac_limit),
        (DEFAULT_MAC_TABLE_LIMIT, DEFAULT_PORT_MAC_LIMIT)
    );
    let mut cfg = SwitchConfig::private("t");
    cfg.port_mac_limit = 3;
    let mut own = PortConfig::access("own", 1);
    own.mac_limit = Some(5);
    let (mut sw, p) = sw_with(cfg, vec![PortConfig::access("a", 1), own]);
    for i in 0..10 {
        send(&mut sw, p[0], &plain(flood_mac(i), BCAST));
        send(&mut sw, p[1], &plain(flood_mac(100 + i), BCAST));
    }
    assert_eq!(sw.status(p[0]).unwrap().learned_macs, 3, "switch default");
    assert_eq!(sw.status(p[1]).unwrap().learned_macs, 5, "port override");
}

#[test]
fn frames_longer_than_the_port_mtu_drop_as_oversize() {
    let mut small = PortConfig::access("small", 1);
    small.mtu = Some(1500);
    let mut trunk = PortConfig::access("trunk", 1);
    trunk.vlan = VlanConfig::Trunk {
        allowed: vec![1],
        native: None,
    };
    trunk.mtu = Some(1500);
    let (mut sw, p) = sw_with(
        SwitchConfig::private("t"),
        vec![PortConfig::access("a", 1), small, trunk],
    );
    // The default: MAX_FRAME (9,216) with one tag, so 9,212 untagged.
    for len in [9230, 9614, 9213] {
        assert_eq!(
            send(&mut sw, p[0], &sized(mac(1), BCAST, len)),
            (vec![], Some(DropReason::Oversize)),
            "{len} bytes"
        );
    }
    assert_eq!(sw.drops(p[0], DropReason::Oversize), 3);
    // A jumbo frame passes on the default port, but not into the 1500-byte ports.
    let (got, _) = send(&mut sw, p[0], &sized(mac(1), BCAST, 9212));
    assert_eq!(got, Vec::<PortId>::new());
    assert_eq!(
        sw.drops(p[1], DropReason::Oversize),
        1,
        "at the egress port"
    );
    assert_eq!(sw.drops(p[2], DropReason::Oversize), 1);
    send(&mut sw, p[1], &plain(mac(2), BCAST));
    assert_eq!(
        send(&mut sw, p[0], &sized(mac(1), mac(2), 2000)),
        (vec![], Some(DropReason::Oversize)),
        "known unicast too big for its destination"
    );
    // MTU 1500: 1,514 bytes untagged, 1,518 with a tag.
    assert_eq!(
        send(&mut sw, p[1], &sized(mac(2), mac(1), 1514)).0,
        vec![p[0]]
    );
    assert_eq!(
        send(&mut sw, p[1], &sized(mac(2), mac(1), 1515)).1,
        Some(DropReason::Oversize)
    );
    let mut tagged = sized([2, 0, 0, 0, 0, 9], mac(1), 1514);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x01]);
    assert_eq!(send(&mut sw, p[2], &tagged).0, vec![p[0]]);
    tagged.push(0);
    assert_eq!(send(&mut sw, p[2], &tagged).1, Some(DropReason::Oversize));
}

#[test]
fn a_super_frame_is_judged_by_its_segments() {
    let mut small = PortConfig::access("small", 1);
    small.mtu = Some(1500);
    let (mut sw, p) = sw_with(
        SwitchConfig::private("t"),
        vec![PortConfig::access("a", 1), small],
    );
    let big = tcp4(mac(1), BCAST, ip4(1), ip4(2), 1, 2);
    let mut f = big.clone();
    f.resize(20_000, 0);
    let mut d = Delivery::default();
    sw.process_sized(p[0], &mut f.clone(), 1514, 1, &mut d);
    assert_eq!(d.ports(), vec![p[1]], "segments of 1,514 bytes fit");
    sw.process_sized(p[0], &mut f, 1600, 1, &mut d);
    assert!(d.ports().is_empty());
    assert_eq!(sw.drops(p[1], DropReason::Oversize), 1);
}

#[test]
fn runts_are_padded_and_header_only_or_truncated_ip_frames_are_malformed() {
    let (mut sw, p) = sw_with(
        SwitchConfig::private("t"),
        vec![PortConfig::access("a", 1), PortConfig::access("b", 1)],
    );
    let mut header_only = plain(mac(1), BCAST);
    header_only.truncate(14);
    assert_eq!(
        send(&mut sw, p[0], &header_only),
        (vec![], Some(DropReason::Malformed))
    );
    let mut cut_ip = plain(mac(1), BCAST);
    cut_ip.truncate(14 + 12);
    assert_eq!(
        send(&mut sw, p[0], &cut_ip),
        (vec![], Some(DropReason::Malformed))
    );
    assert_eq!(sw.drops(p[0], DropReason::Malformed), 2);
    // A 42-byte ARP request (what a Linux veth or TAP sends) is delivered, padded to 60.
    let a = arp(etherparse::ArpOperation::REQUEST, mac(1), ip4(1), ip4(2));
    assert_eq!(a.len(), 42);
    let mut f = a.clone();
    let mut d = Delivery::default();
    sw.process(p[0], &mut f, 1, &mut d);
    assert_eq!(d.ports(), vec![p[1]]);
    assert_eq!(f.len(), 60);
    assert_eq!(&f[..42], &a[..]);
    assert!(f[42..].iter().all(|b| *b == 0));
}

fn source_guarded(name: &str) -> PortConfig {
    let mut p = PortConfig::access(name, 1);
    p.guard.ip_source_guard = true;
    p.guard.allowed_ipv4 = vec![ip4(1).into()];
    p.guard.allowed_ipv6 = vec![ip6(1).into()];
    // Only the source guard under test: no DHCP/router guard (nor their fragment rules).
    p.guard.dhcp_server_allowed = true;
    p.guard.router_allowed = true;
    p
}

#[test]
fn ip_source_guard_drops_spoofed_sources_and_passes_the_port_s_own() {
    let (mut sw, p) = sw_with(
        SwitchConfig::private("t"),
        vec![source_guarded("g"), PortConfig::access("b", 1)],
    );
    let spoof = (vec![], Some(DropReason::IpSourceGuard));
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &udp4(mac(1), BCAST, ip4(1), ip4(2), 1, 2, &[0; 18])
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &udp4(mac(1), BCAST, ip4(9), ip4(2), 1, 2, &[0; 18])
        ),
        spoof
    );
    assert_eq!(
        send(&mut sw, p[0], &tcp4(mac(1), BCAST, ip4(9), ip4(2), 1, 2)),
        spoof
    );
    // A later fragment carries the source too.
    let mut frag = udp4(mac(1), BCAST, ip4(9), ip4(2), 1, 2, &[0; 18]);
    frag[20] = 0x00;
    frag[21] = 0x10;
    assert_eq!(send(&mut sw, p[0], &frag), spoof);
    // IPv6: own address, link-local and DAD pass; others drop.
    let mut ll = [0u8; 16];
    ll[0] = 0xfe;
    ll[1] = 0x80;
    ll[15] = 7;
    let mut other = ip6(9);
    other[14] = 1;
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), BCAST, ip6(1), ip6(2), 128, [0; 16])
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), BCAST, ll, ip6(2), 128, [0; 16])
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), BCAST, [0; 16], ip6(2), 135, ip6(1))
        )
        .0,
        vec![p[1]],
        "duplicate address detection from ::"
    );
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), BCAST, other, ip6(2), 128, [0; 16])
        ),
        spoof
    );
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), BCAST, [0; 16], ip6(2), 128, [0; 16])
        ),
        spoof,
        "echo from ::"
    );
    // DHCP DISCOVER from 0.0.0.0 passes; other traffic from 0.0.0.0 does not.
    let mut discover = dhcp4(mac(1), 1, 1);
    discover[26..30].copy_from_slice(&[0; 4]);
    assert_eq!(send(&mut sw, p[0], &discover).0, vec![p[1]]);
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &udp4(mac(1), BCAST, [0; 4], ip4(2), 1, 2, &[0; 18])
        ),
        spoof
    );
    // ARP is the ARP guard's business.
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &arp(etherparse::ArpOperation::REQUEST, mac(1), ip4(9), ip4(2))
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(sw.drops(p[0], DropReason::IpSourceGuard), 6);
    // The unguarded port may send anything.
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &udp4(mac(2), BCAST, ip4(9), ip4(2), 1, 2, &[0; 18])
        )
        .0,
        vec![p[0]]
    );
}
