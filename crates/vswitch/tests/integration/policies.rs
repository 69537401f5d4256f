//! One test per policy with crafted frames, adversarial ones included: each asserts the drop,
//! its counter, and that legitimate traffic still passes.

use crate::common;

use common::*;
use etherparse::ArpOperation;
use vireo_vswitch::*;

fn sw_with(ports: Vec<PortConfig>) -> (Switch, Vec<PortId>) {
    let mut cfg = SwitchConfig::private("t");
    cfg.pvlan_domains = vec![PvlanDomain {
        primary: 100,
        isolated: Some(101),
        communities: vec![102, 103],
    }];
    let mut sw = Switch::new(cfg).unwrap();
    let ids = ports.into_iter().map(|p| sw.add_port(p).unwrap()).collect();
    (sw, ids)
}

fn guarded(name: &str) -> PortConfig {
    let mut p = PortConfig::access(name, 1);
    p.macs = vec![MacAddr(mac(1))];
    p.guard.arp_nd_guard = true;
    p.guard.allowed_ipv4 = vec![ip4(1).into()];
    p.guard.allowed_ipv6 = vec![ip6(1).into()];
    p
}

#[test]
fn floods_within_vlan_learns_and_never_hairpins() {
    let (mut sw, p) = sw_with(vec![
        PortConfig::access("a", 10),
        PortConfig::access("b", 10),
        PortConfig::access("c", 10),
        PortConfig::access("d", 20),
    ]);
    assert_eq!(
        send(&mut sw, p[0], &plain(mac(1), BCAST)).0,
        vec![p[1], p[2]]
    );
    assert_eq!(
        send(&mut sw, p[1], &plain(mac(2), mac(1))).0,
        vec![p[0]],
        "learned unicast"
    );
    assert_eq!(
        send(&mut sw, p[0], &plain(mac(1), mac(77))).0,
        vec![p[1], p[2]],
        "unknown unicast floods"
    );
    // A frame to a MAC learned on the ingress port goes nowhere.
    assert_eq!(
        send(&mut sw, p[0], &plain(mac(1), mac(1))).0,
        Vec::<PortId>::new()
    );
    assert_eq!(sw.learned(10, &mac(1), 1), Some(p[0]));
    assert_eq!(sw.learned(20, &mac(1), 1), None);
}

#[test]
fn trunk_and_native_vlans_tag_and_untag() {
    let trunk = PortConfig {
        vlan: VlanConfig::Trunk {
            allowed: vec![10, 20],
            native: Some(30),
        },
        ..PortConfig::access("t", 1)
    };
    let (mut sw, p) = sw_with(vec![
        trunk,
        PortConfig::access("a10", 10),
        PortConfig::access("a30", 30),
    ]);
    let mut d = Delivery::default();
    let mut f = tagged_udp4(mac(1), BCAST, 10);
    sw.process(p[0], &mut f, 1, &mut d);
    assert_eq!(
        d.egress,
        vec![Egress {
            port: p[1],
            tag: TagOp::Untag,
            mirror: false,
            bytes: Bytes::Frame
        }]
    );
    let mut buf = Vec::new();
    let out = render(&f, TagOp::Untag, &mut buf).to_vec();
    assert_eq!(out.len(), f.len() - 4);
    assert_eq!(&out[12..14], &[0x08, 0x00]);

    let mut f = plain(mac(2), BCAST);
    sw.process(p[1], &mut f, 1, &mut d);
    assert_eq!(
        d.egress,
        vec![Egress {
            port: p[0],
            tag: TagOp::Tag(10),
            mirror: false,
            bytes: Bytes::Frame
        }]
    );
    let tagged = render(&f, TagOp::Tag(10), &mut buf).to_vec();
    let s = frame::parse(&tagged).unwrap();
    assert_eq!((s.tags, s.vid, s.ethertype), (1, 10, frame::ETH_P_IPV4));

    assert_eq!(
        send(&mut sw, p[0], &plain(mac(3), BCAST)).0,
        vec![p[2]],
        "untagged on trunk = native 30"
    );
    let mut f = plain(mac(4), BCAST);
    sw.process(p[2], &mut f, 1, &mut d);
    assert_eq!(
        d.egress[0].tag,
        TagOp::Keep,
        "native VLAN leaves the trunk untagged"
    );

    assert_eq!(
        send(&mut sw, p[0], &tagged_udp4(mac(1), BCAST, 40)).1,
        Some(DropReason::VlanNotAllowed)
    );
    assert_eq!(sw.drops(p[0], DropReason::VlanNotAllowed), 1);
}

#[test]
fn vlan_double_tag_hop_is_dropped_on_access_ports() {
    let (mut sw, p) = sw_with(vec![
        PortConfig::access("a", 10),
        PortConfig::access("b", 10),
        PortConfig::access("v20", 20),
    ]);
    let (to, why) = send(&mut sw, p[0], &double_tagged(mac(1), BCAST, 10, 20));
    assert_eq!((to, why), (vec![], Some(DropReason::DoubleTagged)));
    assert_eq!(sw.drops(p[0], DropReason::DoubleTagged), 1);
    assert_eq!(
        send(&mut sw, p[0], &tagged_udp4(mac(1), BCAST, 20)).1,
        Some(DropReason::VlanNotAllowed)
    );
    assert_eq!(sw.drops(p[0], DropReason::VlanNotAllowed), 1);
    // A priority tag (VID 0) is fine, and so is untagged traffic.
    assert_eq!(
        send(&mut sw, p[0], &tagged_udp4(mac(1), BCAST, 0)).0,
        vec![p[1]]
    );
    assert_eq!(send(&mut sw, p[0], &plain(mac(1), BCAST)).0, vec![p[1]]);
}

fn pvlan(name: &str, secondary: u16, mode: PvlanMode) -> PortConfig {
    PortConfig {
        vlan: VlanConfig::Private {
            primary: 100,
            secondary,
            mode,
        },
        ..PortConfig::access(name, 1)
    }
}

#[test]
fn private_vlan_reachability_including_trunks() {
    let trunk = PortConfig {
        vlan: VlanConfig::Trunk {
            allowed: vec![100, 101, 102, 103],
            native: None,
        },
        ..PortConfig::access("trunk", 1)
    };
    let (mut sw, p) = sw_with(vec![
        pvlan("iso1", 101, PvlanMode::Isolated),
        pvlan("iso2", 101, PvlanMode::Isolated),
        pvlan("ca1", 102, PvlanMode::Community),
        pvlan("ca2", 102, PvlanMode::Community),
        pvlan("cb1", 103, PvlanMode::Community),
        pvlan("prom", 0, PvlanMode::Promiscuous),
        trunk,
    ]);
    let [iso1, iso2, ca1, ca2, cb1, prom, trunk] = p[..] else {
        unreachable!()
    };
    assert_eq!(
        send(&mut sw, iso2, &plain(mac(2), BCAST)).0,
        vec![prom, trunk]
    );
    assert_eq!(
        send(&mut sw, cb1, &plain(mac(5), BCAST)).0,
        vec![prom, trunk]
    );
    // Isolated → isolated, by unicast to a learned MAC: blocked and counted.
    assert_eq!(
        send(&mut sw, iso1, &plain(mac(1), mac(2))),
        (vec![], Some(DropReason::Isolation))
    );
    assert_eq!(sw.drops(iso1, DropReason::Isolation), 1);
    // Community A → community B: blocked.
    assert_eq!(
        send(&mut sw, ca1, &plain(mac(3), mac(5))),
        (vec![], Some(DropReason::Isolation))
    );
    assert_eq!(sw.drops(ca1, DropReason::Isolation), 1);
    // Community A → community A and broadcast within the community.
    assert_eq!(
        send(&mut sw, ca1, &plain(mac(3), BCAST)).0,
        vec![ca2, prom, trunk]
    );
    assert_eq!(send(&mut sw, ca2, &plain(mac(4), mac(3))).0, vec![ca1]);
    // Promiscuous reaches everyone; isolated reaches promiscuous.
    assert_eq!(
        send(&mut sw, prom, &plain(mac(6), BCAST)).0,
        vec![iso1, iso2, ca1, ca2, cb1, trunk]
    );
    assert_eq!(send(&mut sw, iso1, &plain(mac(1), mac(6))).0, vec![prom]);
    assert_eq!(send(&mut sw, prom, &plain(mac(6), mac(1))).0, vec![iso1]);
    // Across the trunk: a frame tagged with the isolated VLAN reaches only promiscuous ports.
    assert_eq!(
        send(&mut sw, trunk, &tagged_udp4(mac(9), BCAST, 101)).0,
        vec![prom]
    );
    assert_eq!(
        send(&mut sw, trunk, &tagged_udp4(mac(9), mac(1), 101)),
        (vec![], Some(DropReason::Isolation))
    );
    assert_eq!(
        send(&mut sw, trunk, &tagged_udp4(mac(9), BCAST, 102)).0,
        vec![ca1, ca2, prom]
    );
    assert_eq!(
        send(&mut sw, trunk, &tagged_udp4(mac(9), BCAST, 100)).0,
        vec![iso1, iso2, ca1, ca2, cb1, prom]
    );
    // A plain access port inside the private VLAN would bypass it: refused.
    assert!(matches!(
        sw.add_port(PortConfig::access("bad", 101)),
        Err(SwitchError::Vlan(_))
    ));
    // And the isolated VLAN id is what an isolated port's traffic carries on the trunk.
    let mut d = Delivery::default();
    sw.process(iso1, &mut plain(mac(1), BCAST), 1, &mut d);
    assert!(d.egress.contains(&Egress {
        port: trunk,
        tag: TagOp::Tag(101),
        mirror: false,
        bytes: Bytes::Frame
    }));
}

#[test]
fn spoofed_source_mac_is_dropped_unless_allowed() {
    let mut allowed = guarded("b");
    allowed.macs = vec![MacAddr(mac(2))];
    allowed.guard.mac_spoofing = true;
    let (mut sw, p) = sw_with(vec![guarded("a"), allowed, PortConfig::access("c", 1)]);
    assert_eq!(
        send(&mut sw, p[0], &plain(mac(66), BCAST)),
        (vec![], Some(DropReason::MacSpoof))
    );
    assert_eq!(sw.drops(p[0], DropReason::MacSpoof), 1);
    assert_eq!(
        send(&mut sw, p[0], &plain(mac(1), BCAST)).0,
        vec![p[1], p[2]]
    );
    assert_eq!(
        send(&mut sw, p[1], &plain(mac(66), BCAST)).0,
        vec![p[0], p[2]],
        "spoofing allowed on b"
    );
    assert_eq!(
        send(&mut sw, p[2], &plain([0x01, 0, 0x5e, 0, 0, 1], BCAST)).1,
        Some(DropReason::InvalidSourceMac)
    );
}

#[test]
fn arp_spoof_and_gratuitous_arp_for_a_neighbour_are_dropped() {
    let (mut sw, p) = sw_with(vec![guarded("a"), PortConfig::access("b", 1)]);
    let a = p[0];
    assert_eq!(
        send(
            &mut sw,
            a,
            &arp(ArpOperation::REQUEST, mac(1), ip4(1), ip4(2))
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(
        send(
            &mut sw,
            a,
            &arp(ArpOperation::REQUEST, mac(1), [0; 4], ip4(1))
        )
        .0,
        vec![p[1]],
        "ARP probe"
    );
    assert_eq!(
        send(
            &mut sw,
            a,
            &arp(ArpOperation::REPLY, mac(1), ip4(2), ip4(3))
        )
        .1,
        Some(DropReason::ArpSpoof)
    );
    assert_eq!(
        send(
            &mut sw,
            a,
            &arp(ArpOperation::REQUEST, mac(1), ip4(2), ip4(2))
        )
        .1,
        Some(DropReason::ArpSpoof),
        "gratuitous"
    );
    assert_eq!(
        send(
            &mut sw,
            a,
            &arp(ArpOperation::REPLY, mac(1), ip4(1), ip4(3))
        )
        .0,
        vec![p[1]],
        "own address reply"
    );
    assert_eq!(sw.drops(a, DropReason::ArpSpoof), 2);
    // Unguarded port b may ARP for anything.
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &arp(ArpOperation::REPLY, mac(2), ip4(9), ip4(1))
        )
        .0,
        vec![a]
    );
}

#[test]
fn nd_spoof_is_dropped() {
    let (mut sw, p) = sw_with(vec![guarded("a"), PortConfig::access("b", 1)]);
    let all_nodes = [0x33, 0x33, 0, 0, 0, 1];
    let mut mc = [0u8; 16];
    mc[0] = 0xff;
    mc[1] = 2;
    mc[15] = 1;
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), all_nodes, ip6(1), mc, 136, ip6(2))
        )
        .1,
        Some(DropReason::NdSpoof)
    );
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), all_nodes, ip6(2), mc, 135, ip6(7))
        )
        .1,
        Some(DropReason::NdSpoof)
    );
    assert_eq!(sw.drops(p[0], DropReason::NdSpoof), 2);
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), all_nodes, ip6(1), mc, 136, ip6(1))
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &icmp6(mac(1), all_nodes, [0; 16], mc, 135, ip6(5))
        )
        .0,
        vec![p[1]],
        "DAD"
    );
}

#[test]
fn rogue_dhcp_servers_are_dropped() {
    let mut server = PortConfig::access("srv", 1);
    server.guard.dhcp_server_allowed = true;
    let uplink = PortConfig {
        role: PortRole::Uplink,
        ..PortConfig::access("up", 1)
    };
    let (mut sw, p) = sw_with(vec![PortConfig::access("vm", 1), server, uplink]);
    for ty in [2u8, 5, 6] {
        assert_eq!(
            send(&mut sw, p[0], &dhcp4(mac(1), 2, ty)).1,
            Some(DropReason::DhcpGuard),
            "type {ty}"
        );
    }
    assert_eq!(
        send(&mut sw, p[0], &dhcp6(mac(1), 2)).1,
        Some(DropReason::DhcpGuard)
    );
    assert_eq!(
        send(&mut sw, p[0], &dhcp6(mac(1), 7)).1,
        Some(DropReason::DhcpGuard)
    );
    assert_eq!(sw.drops(p[0], DropReason::DhcpGuard), 5);
    assert_eq!(
        send(&mut sw, p[0], &dhcp4(mac(1), 1, 1)).0,
        vec![p[1], p[2]],
        "DISCOVER passes"
    );
    assert_eq!(
        send(&mut sw, p[1], &dhcp4(mac(2), 2, 2)).0,
        vec![p[0], p[2]],
        "allowed server"
    );
    assert_eq!(
        send(&mut sw, p[2], &dhcp6(mac(3), 7)).0,
        vec![p[0], p[1]],
        "uplinks are trusted"
    );
}

#[test]
fn rogue_router_advertisements_and_redirects_are_dropped() {
    let mut router = PortConfig::access("rtr", 1);
    router.guard.router_allowed = true;
    let (mut sw, p) = sw_with(vec![PortConfig::access("vm", 1), router]);
    let mut mc = [0u8; 16];
    mc[0] = 0xff;
    mc[1] = 2;
    mc[15] = 1;
    let dst = [0x33, 0x33, 0, 0, 0, 1];
    let ll = {
        let mut a = [0u8; 16];
        a[0] = 0xfe;
        a[1] = 0x80;
        a[15] = 1;
        a
    };
    assert_eq!(
        send(&mut sw, p[0], &icmp6(mac(1), dst, ll, mc, 134, [0; 16])).1,
        Some(DropReason::RouterGuard)
    );
    assert_eq!(
        send(&mut sw, p[0], &icmp6(mac(1), dst, ll, mc, 137, ip6(3))).1,
        Some(DropReason::RouterGuard)
    );
    // An RA hidden behind a fragment header whose first fragment lacks the ICMPv6 header.
    let mut hidden = icmp6(mac(1), dst, ll, mc, 134, [0; 16]);
    hidden.truncate(14 + 40);
    hidden[14 + 6] = 44;
    hidden.extend_from_slice(&[58, 0, 0, 1, 0, 0, 0, 1]);
    assert_eq!(
        send(&mut sw, p[0], &hidden).1,
        Some(DropReason::RouterGuard)
    );
    assert_eq!(sw.drops(p[0], DropReason::RouterGuard), 3);
    assert_eq!(
        send(&mut sw, p[1], &icmp6(mac(2), dst, ll, mc, 134, [0; 16])).0,
        vec![p[0]]
    );
    assert_eq!(
        send(&mut sw, p[0], &icmp6(mac(1), dst, ll, mc, 133, [0; 16])).0,
        vec![p[1]],
        "RS is fine"
    );
}

fn rule(name: &str, prio: u16, dir: Direction, action: AclAction) -> AclRule {
    AclRule {
        name: name.into(),
        priority: prio,
        direction: dir,
        action,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: None,
        protocol: None,
        local_ports: None,
        remote_ports: None,
        stateful: false,
    }
}

#[test]
fn acls_allow_deny_meter_by_address_prefix_mac_and_direction() {
    let mut a = PortConfig::access("a", 1);
    a.acls = vec![
        AclRule {
            remote_ip: Some("10.0.0.0/24".parse().unwrap()),
            ..rule("deny-net", 20, Direction::Ingress, AclAction::Deny)
        },
        AclRule {
            remote_ip: Some("10.0.0.5".parse().unwrap()),
            ..rule("allow-5", 10, Direction::Ingress, AclAction::Allow)
        },
        AclRule {
            remote_ip: Some("10.0.0.0/8".parse().unwrap()),
            ..rule("meter", 1, Direction::Both, AclAction::Meter)
        },
        AclRule {
            remote_mac: Some(MacAddr(mac(7))),
            ..rule("deny-mac", 5, Direction::Egress, AclAction::Deny)
        },
    ];
    let (mut sw, p) = sw_with(vec![a, PortConfig::access("b", 1)]);
    let to = |d: u8| udp4(mac(1), BCAST, [10, 1, 0, 1], ip4(d), 1, 2, &[0; 20]);
    assert_eq!(
        send(&mut sw, p[0], &to(9)),
        (vec![], Some(DropReason::AclDeny))
    );
    assert_eq!(send(&mut sw, p[0], &to(5)).0, vec![p[1]]);
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &udp4(mac(1), BCAST, [10, 1, 0, 1], [192, 168, 0, 1], 1, 2, &[])
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(sw.drops(p[0], DropReason::AclDeny), 1);
    // Egress rule by MAC: from mac 7 to a is denied, from mac 8 allowed; the sender is b.
    assert_eq!(
        send(&mut sw, p[1], &plain(mac(7), mac(1))),
        (vec![], Some(DropReason::AclDeny))
    );
    assert_eq!(
        sw.drops(p[0], DropReason::AclDeny),
        2,
        "egress drops count on the egress port"
    );
    assert_eq!(send(&mut sw, p[1], &plain(mac(8), mac(1))).0, vec![p[0]]);
    let st = sw.status(p[0]).unwrap();
    let m: std::collections::HashMap<_, _> = st.meters.acl.into_iter().collect();
    // Meter: to(9), to(5) ingress (192.168 no), plus the two egress frames from 10.0.0.1.
    assert_eq!(m["meter"].packets, 4);
    assert_eq!(m["deny-net"].packets, 1);
    assert_eq!(m["allow-5"].packets, 1);
    assert_eq!(m["deny-mac"].packets, 1);
    // Repeats hit the verdict cache: counts keep coming.
    send(&mut sw, p[0], &to(9));
    assert_eq!(sw.status(p[0]).unwrap().meters.acl[0].1.packets, 2);
}

#[test]
fn extended_acls_on_protocol_and_ports_with_priorities() {
    let mut a = PortConfig::access("a", 1);
    a.acls = vec![
        AclRule {
            protocol: Some(6),
            local_ports: Some(PortRange {
                first: 22,
                last: 22,
            }),
            ..rule("no-ssh", 10, Direction::Egress, AclAction::Deny)
        },
        AclRule {
            protocol: Some(6),
            local_ports: Some(PortRange {
                first: 1,
                last: 1023,
            }),
            ..rule("web-ok", 20, Direction::Egress, AclAction::Allow)
        },
        AclRule {
            protocol: Some(6),
            ..rule("no-tcp", 30, Direction::Egress, AclAction::Deny)
        },
    ];
    let (mut sw, p) = sw_with(vec![a, PortConfig::access("b", 1)]);
    send(&mut sw, p[0], &plain(mac(1), BCAST));
    let to_a = |dport| tcp4(mac(2), mac(1), ip4(2), ip4(1), 40000, dport);
    assert_eq!(send(&mut sw, p[1], &to_a(22)).1, Some(DropReason::AclDeny));
    assert_eq!(send(&mut sw, p[1], &to_a(80)).0, vec![p[0]]);
    assert_eq!(
        send(&mut sw, p[1], &to_a(8080)).1,
        Some(DropReason::AclDeny)
    );
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &udp4(mac(2), mac(1), ip4(2), ip4(1), 5, 22, &[])
        )
        .0,
        vec![p[0]],
        "UDP unaffected"
    );
    assert_eq!(sw.drops(p[0], DropReason::AclDeny), 2);
}

#[test]
fn stateful_acl_allows_replies_to_flows_opened_from_the_port() {
    let mut a = PortConfig::access("a", 1);
    a.acls = vec![
        AclRule {
            protocol: Some(6),
            stateful: true,
            ..rule("out-tcp", 10, Direction::Ingress, AclAction::Allow)
        },
        rule("deny-in", 100, Direction::Egress, AclAction::Deny),
    ];
    let (mut sw, p) = sw_with(vec![a, PortConfig::access("b", 1)]);
    send(&mut sw, p[1], &plain(mac(2), BCAST));
    send(&mut sw, p[0], &plain(mac(1), BCAST));
    // Unsolicited inbound: denied.
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &tcp4(mac(2), mac(1), ip4(2), ip4(1), 80, 5555)
        )
        .1,
        Some(DropReason::AclDeny)
    );
    // a opens a connection to b:80, the reply comes back.
    assert_eq!(
        send(
            &mut sw,
            p[0],
            &tcp4(mac(1), mac(2), ip4(1), ip4(2), 5555, 80)
        )
        .0,
        vec![p[1]]
    );
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &tcp4(mac(2), mac(1), ip4(2), ip4(1), 80, 5555)
        )
        .0,
        vec![p[0]]
    );
    // Other ports or peers remain blocked.
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &tcp4(mac(2), mac(1), ip4(2), ip4(1), 81, 5555)
        )
        .1,
        Some(DropReason::AclDeny)
    );
    assert_eq!(
        send(
            &mut sw,
            p[1],
            &tcp4(mac(2), mac(1), ip4(3), ip4(1), 80, 5555)
        )
        .1,
        Some(DropReason::AclDeny)
    );
    // Three blocked TCP frames plus b's first broadcast (flooded into the deny-all).
    assert_eq!(sw.drops(p[0], DropReason::AclDeny), 4);
    assert_eq!(sw.status(p[0]).unwrap().tracked_flows, 1);
}

#[test]
fn maximum_bandwidth_polices_each_direction() {
    let mut a = PortConfig::access("a", 1);
    a.qos.max_ingress = Some(RateLimit {
        bits_per_sec: 80_000,
        burst_bytes: 3000,
    }); // 10 kB/s
    let mut b = PortConfig::access("b", 1);
    b.qos.max_egress = Some(RateLimit {
        bits_per_sec: 80_000,
        burst_bytes: 3000,
    });
    let (mut sw, p) = sw_with(vec![a, b, PortConfig::access("c", 1)]);
    let f = udp4(mac(1), BCAST, ip4(1), ip4(2), 1, 2, &[0; 958]); // 1000 bytes
    let passed = (0..10)
        .filter(|_| send_at(&mut sw, p[0], &f, 1).1.is_none())
        .count();
    assert_eq!(passed, 3, "3000-byte burst");
    assert_eq!(sw.drops(p[0], DropReason::RateLimit), 7);
    assert!(
        send_at(&mut sw, p[0], &f, 100_000_001).1.is_none(),
        "refilled after 0.1 s"
    );
    // Egress limit on b: c's flood still reaches a after b's bucket runs dry.
    let g = udp4(mac(3), BCAST, ip4(3), ip4(2), 1, 2, &[0; 958]);
    let before = sw.drops(p[1], DropReason::RateLimit);
    let to_b = (0..10)
        .filter(|_| send_at(&mut sw, p[2], &g, 10_000_000_000).0.contains(&p[1]))
        .count();
    assert_eq!(to_b, 3);
    assert_eq!(sw.drops(p[1], DropReason::RateLimit) - before, 7);
    assert_eq!(send_at(&mut sw, p[2], &g, 10_000_000_000).0, vec![p[0]]);
}

#[test]
fn broadcast_storm_limit_in_packets_per_second() {
    let mut a = PortConfig::access("a", 1);
    a.storm_limit_pps = Some(10);
    let (mut sw, p) = sw_with(vec![a, PortConfig::access("b", 1)]);
    send(&mut sw, p[1], &plain(mac(2), mac(9)));
    let passed = (0..25)
        .filter(|_| send(&mut sw, p[0], &plain(mac(1), BCAST)).1.is_none())
        .count();
    assert_eq!(passed, 10);
    assert_eq!(sw.drops(p[0], DropReason::StormLimit), 15);
    assert_eq!(
        send(&mut sw, p[0], &plain(mac(1), mac(2))).0,
        vec![p[1]],
        "unicast is not limited"
    );
    assert!(send_at(&mut sw, p[0], &plain(mac(1), BCAST), 1_000_000_001)
        .1
        .is_none());
}

#[test]
fn mac_flood_is_capped_per_port() {
    let mut a = PortConfig::access("a", 1);
    a.mac_limit = Some(4);
    let (mut sw, p) = sw_with(vec![a, PortConfig::access("b", 1)]);
    let mut dropped = 0;
    for i in 0..50u8 {
        if send(&mut sw, p[0], &plain([2, 9, 9, 9, 0, i], BCAST)).1 == Some(DropReason::MacLimit) {
            dropped += 1;
        }
    }
    assert_eq!(dropped, 46);
    assert_eq!(sw.drops(p[0], DropReason::MacLimit), 46);
    assert_eq!(sw.status(p[0]).unwrap().learned_macs, 4);
    assert_eq!(
        send(&mut sw, p[0], &plain([2, 9, 9, 9, 0, 0], BCAST)).0,
        vec![p[1]],
        "known MAC still passes"
    );
    assert_eq!(
        send(&mut sw, p[1], &plain(mac(2), BCAST)).0,
        vec![p[0]],
        "other ports unaffected"
    );
}

#[test]
fn mirroring_copies_ingress_and_egress_to_the_destination() {
    let mut a = PortConfig::access("a", 1);
    a.mirror = MirrorRole::Source(Direction::Both);
    let mut m = PortConfig::access("mon", 999);
    m.mirror = MirrorRole::Destination;
    let (mut sw, p) = sw_with(vec![a, PortConfig::access("b", 1), m]);
    let mut d = Delivery::default();
    sw.process(p[0], &mut plain(mac(1), BCAST), 1, &mut d);
    assert_eq!(
        d.egress,
        vec![
            Egress {
                port: p[2],
                tag: TagOp::Keep,
                mirror: true,
                bytes: Bytes::Frame
            },
            Egress {
                port: p[1],
                tag: TagOp::Keep,
                mirror: false,
                bytes: Bytes::Frame
            }
        ]
    );
    sw.process(p[1], &mut plain(mac(2), mac(1)), 1, &mut d);
    assert_eq!(
        d.egress,
        vec![
            Egress {
                port: p[0],
                tag: TagOp::Keep,
                mirror: false,
                bytes: Bytes::Frame
            },
            Egress {
                port: p[2],
                tag: TagOp::Keep,
                mirror: true,
                bytes: Bytes::Frame
            }
        ]
    );
    // Frames dropped at a's ingress are not mirrored as accepted traffic.
    let mut cfg = sw.status(p[0]).unwrap().config;
    cfg.mirror = MirrorRole::Source(Direction::Egress);
    sw.set_port_config(p[0], cfg).unwrap();
    sw.process(p[0], &mut plain(mac(1), mac(2)), 1, &mut d);
    assert_eq!(
        d.egress,
        vec![Egress {
            port: p[1],
            tag: TagOp::Keep,
            mirror: false,
            bytes: Bytes::Frame
        }]
    );
    assert_eq!(sw.status(p[2]).unwrap().meters.egress.packets, 2);
}

#[test]
fn meters_count_per_direction_and_reset() {
    let (mut sw, p) = sw_with(vec![PortConfig::access("a", 1), PortConfig::access("b", 1)]);
    let f = plain(mac(1), BCAST);
    for _ in 0..3 {
        send(&mut sw, p[0], &f);
    }
    send(&mut sw, p[0], &double_tagged(mac(1), BCAST, 1, 2));
    let a = sw.status(p[0]).unwrap().meters;
    let b = sw.status(p[1]).unwrap().meters;
    assert_eq!(
        a.ingress,
        Counter {
            packets: 4,
            bytes: 3 * f.len() as u64 + f.len() as u64 + 8
        }
    );
    assert_eq!(
        b.egress,
        Counter {
            packets: 3,
            bytes: 3 * f.len() as u64
        }
    );
    assert_eq!(a.drops, vec![(DropReason::DoubleTagged, 1)]);
    sw.reset_meters();
    let a = sw.status(p[0]).unwrap().meters;
    assert_eq!((a.ingress.packets, a.drops.len()), (0, 0));
}

#[test]
fn policy_changes_apply_live_and_show_in_status() {
    let (mut sw, p) = sw_with(vec![PortConfig::access("a", 1), PortConfig::access("b", 1)]);
    assert_eq!(send(&mut sw, p[0], &plain(mac(1), BCAST)).0, vec![p[1]]);
    let mut cfg = sw.status(p[1]).unwrap().config;
    cfg.vlan = VlanConfig::Access { vid: 2 };
    sw.set_port_config(p[1], cfg.clone()).unwrap();
    assert_eq!(sw.status(p[1]).unwrap().config, cfg);
    assert_eq!(
        send(&mut sw, p[0], &plain(mac(1), BCAST)).0,
        Vec::<PortId>::new()
    );
    assert!(matches!(
        sw.set_port_config(p[1], PortConfig::access("b", 5000)),
        Err(SwitchError::Vlan(_))
    ));
    assert_eq!(
        sw.status(p[1]).unwrap().config,
        cfg,
        "a rejected change leaves the port as it was"
    );
    assert!(matches!(
        sw.add_port(PortConfig::access("a", 1)),
        Err(SwitchError::DuplicatePort(_))
    ));
}

#[test]
fn configuration_round_trips_through_json() {
    let mut a = guarded("a");
    a.acls = vec![AclRule {
        remote_ip: Some("fd00::/64".parse().unwrap()),
        ..rule("r", 1, Direction::Both, AclAction::Meter)
    }];
    a.qos.max_egress = Some(RateLimit {
        bits_per_sec: 1_000_000,
        burst_bytes: 10_000,
    });
    a.mirror = MirrorRole::Source(Direction::Ingress);
    let (sw, _) = sw_with(vec![a, pvlan("i", 101, PvlanMode::Isolated)]);
    let cfg = sw.config();
    let json = serde_json::to_string_pretty(&cfg).unwrap();
    assert!(
        json.contains("\"02:00:00:00:00:01\"") && json.contains("fd00::/64"),
        "{json}"
    );
    let back: SwitchConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    Switch::new(back).unwrap();
}

#[test]
fn render_rewrites_the_outer_tag_and_keeps_priority() {
    let mut f = tagged_udp4(mac(1), BCAST, 10);
    f[14] |= 0xa0; // PCP 5
    let mut buf = Vec::new();
    let out = render(&f, TagOp::Tag(20), &mut buf).to_vec();
    let s = frame::parse(&out).unwrap();
    assert_eq!((s.tags, s.vid, s.pcp, out.len()), (1, 20, 5, f.len()));
    assert_eq!(&out[16..], &f[16..], "payload untouched");
    let mut buf2 = Vec::new();
    assert_eq!(render(&f, TagOp::Keep, &mut buf2), &f[..]);
    let plain_out = render(&out, TagOp::Untag, &mut buf2).to_vec();
    assert_eq!(frame::parse(&plain_out).unwrap().tags, 0);
    assert_eq!(
        render(&plain_out, TagOp::Untag, &mut buf),
        &plain_out[..],
        "untagging an untagged frame is a no-op"
    );
}
