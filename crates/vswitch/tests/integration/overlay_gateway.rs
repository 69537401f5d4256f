//! The overlay gateway through the pure pipeline: two tenants with identical CAs NAT-ed to
//! one outside address on VLAN 30 (replies back to the right tenant, other peers refused,
//! ICMP echo ids translated, the table bounded), a third tenant forwarded as it is on VLAN
//! 40, ARP for the gateway answered, next hops resolved, the inside never a transit network.

use etherparse::PacketBuilder;
use vireo_vswitch::frame::{parse, Mac};
use vireo_vswitch::*;

const PMAC: Mac = [2, 0xaa, 0, 0, 0, 1];
const VM1: Mac = [2, 0, 0, 0, 1, 1];
const PHYS: Mac = [2, 0x99, 0, 0, 0, 9];
const RED_GW: Mac = [0x02, 0xff, 0, 0, 100, 1];
const BLUE_GW: Mac = [0x02, 0xff, 0, 0, 200, 1];
const GREEN_GW: Mac = [0x02, 0xff, 0, 1, 44, 1];
/// Gateway MACs (default: 02:fe + address).
const NAT_MAC: Mac = [0x02, 0xfe, 198, 51, 100, 1];
const FWD_MAC: Mac = [0x02, 0xfe, 203, 0, 113, 1];
const CA: [u8; 4] = [10, 0, 0, 1];
const PEER: [u8; 4] = [198, 51, 100, 9];
const NAT_IP: [u8; 4] = [198, 51, 100, 1];

fn overlay(max_conns: u32) -> OverlayConfig {
    serde_json::from_value(serde_json::json!({
        "provider_addresses": ["192.168.50.1"],
        "provider_mac": MacAddr(PMAC).to_string(),
        "routing_domains": [
            {"name": "red", "subnets": [{"vsid": 100, "prefixes": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]}]},
            {"name": "blue", "encap": "nvgre", "subnets": [{"vsid": 200, "prefixes": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]}]},
            {"name": "green", "subnets": [{"vsid": 300, "prefixes": ["10.2.0.0/24"], "gateway_ips": ["10.2.0.254"]}]}],
        "policies": [],
        "gateways": [
            {"name": "out", "mode": "nat", "routing_domains": ["red", "blue"], "vlan": 30,
             "address": "198.51.100.1/24", "nat": {"max_connections": max_conns}},
            {"name": "fwd", "mode": "forward", "routing_domains": ["green"], "vlan": 40,
             "address": "203.0.113.1/24", "next_hop": "203.0.113.254"}]
    }))
    .unwrap()
}

struct Host {
    sw: Switch,
    up: PortId,
    red: PortId,
    blue: PortId,
    green: PortId,
}

fn vm_port(name: &str, rd: &str, vsid: u32, ca: &str) -> PortConfig {
    PortConfig {
        overlay: Some(PortOverlay {
            routing_domain: rd.into(),
            vsid,
            mac: MacAddr(VM1),
            cas: vec![ca.parse().unwrap()],
        }),
        ..PortConfig::access(name, 1)
    }
}

fn host(max_conns: u32) -> Host {
    let mut c = SwitchConfig::private("gw");
    c.overlay = Some(overlay(max_conns));
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    let red = sw.add_port(vm_port("red", "red", 100, "10.0.0.1")).unwrap();
    let blue = sw
        .add_port(vm_port("blue", "blue", 200, "10.0.0.1"))
        .unwrap();
    let green = sw
        .add_port(vm_port("green", "green", 300, "10.2.0.5"))
        .unwrap();
    Host {
        sw,
        up,
        red,
        blue,
        green,
    }
}

fn run(
    sw: &mut Switch,
    port: PortId,
    frame: &[u8],
    now: u64,
) -> (Vec<(PortId, Vec<u8>)>, Option<DropReason>) {
    let mut f = frame.to_vec();
    let mut d = Delivery::default();
    sw.process(port, &mut f, now, &mut d);
    let mut buf = Vec::new();
    let out = d
        .egress
        .iter()
        .filter(|e| !e.mirror)
        .map(|e| (e.port, render(&f, e.tag, &mut buf).to_vec()))
        .collect();
    (out, d.dropped)
}

fn udp(
    src: Mac,
    dst: Mac,
    vlan: Option<u16>,
    sip: [u8; 4],
    dip: [u8; 4],
    sp: u16,
    dp: u16,
) -> Vec<u8> {
    let mut f = Vec::new();
    match vlan {
        Some(v) => PacketBuilder::ethernet2(src, dst)
            .single_vlan(v.try_into().unwrap())
            .ipv4(sip, dip, 64)
            .udp(sp, dp)
            .write(&mut f, b"query")
            .unwrap(),
        None => PacketBuilder::ethernet2(src, dst)
            .ipv4(sip, dip, 64)
            .udp(sp, dp)
            .write(&mut f, b"query")
            .unwrap(),
    }
    f
}

fn echo(
    src: Mac,
    dst: Mac,
    vlan: Option<u16>,
    sip: [u8; 4],
    dip: [u8; 4],
    id: u16,
    reply: bool,
) -> Vec<u8> {
    let mut f = Vec::new();
    let b = |v: Option<u16>| {
        let e = PacketBuilder::ethernet2(src, dst);
        match v {
            Some(v) => e.single_vlan(v.try_into().unwrap()).ipv4(sip, dip, 64),
            None => e.ipv4(sip, dip, 64),
        }
    };
    if reply {
        b(vlan)
            .icmpv4_echo_reply(id, 1)
            .write(&mut f, b"ping")
            .unwrap();
    } else {
        b(vlan)
            .icmpv4_echo_request(id, 1)
            .write(&mut f, b"ping")
            .unwrap();
    }
    f
}

fn arp(src: Mac, vlan: u16, op: u16, sip: [u8; 4], tip: [u8; 4], dst: Mac) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x81, 0, (vlan >> 8) as u8, vlan as u8, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, op as u8]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&sip);
    f.extend_from_slice(&if op == 1 { [0; 6] } else { dst });
    f.extend_from_slice(&tip);
    f
}

/// Internet checksum over `data` plus `acc` is all-ones when the checksum inside is right.
fn sums_ok(acc: u32, data: &[u8]) -> bool {
    let mut a = acc;
    for w in data.chunks(2) {
        a += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while a > 0xffff {
        a = (a & 0xffff) + (a >> 16);
    }
    a == 0xffff
}

/// IPv4 header and UDP/ICMP checksums of an (untagged or tagged) frame are right.
fn checksums_ok(f: &[u8]) -> bool {
    let s = parse(f).unwrap();
    let ip = if s.tags == 1 { 18 } else { 14 };
    let ihl = usize::from(f[ip] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[ip + 2], f[ip + 3]]));
    let l4 = &f[ip + ihl..ip + total];
    let pseudo = |proto: u32| {
        let mut a = 0u32;
        for w in f[ip + 12..ip + 20].chunks(2) {
            a += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        a + proto + l4.len() as u32
    };
    sums_ok(0, &f[ip..ip + ihl])
        && match f[ip + 9] {
            17 => sums_ok(pseudo(17), l4),
            6 => sums_ok(pseudo(6), l4),
            _ => sums_ok(0, l4),
        }
}

/// Lets the gateway resolve the physical host: the first packet becomes an ARP request on
/// `vlan` for `who`, the host's reply is absorbed.
fn resolve(
    h: &mut Host,
    port: PortId,
    first: &[u8],
    vlan: u16,
    gw_ip: [u8; 4],
    gw_mac: Mac,
    who: [u8; 4],
) {
    let (out, dropped) = run(&mut h.sw, port, first, 1);
    assert_eq!(dropped, Some(DropReason::OverlayNoNeighbor));
    let [(p, req)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, h.up);
    assert_eq!((&req[..6], &req[6..12]), (&[0xff; 6][..], &gw_mac[..]));
    let s = parse(req).unwrap();
    let a = s.arp.unwrap();
    assert_eq!(
        (s.tags, s.vid, a.op, a.sender_ip, a.target_ip),
        (1, vlan, 1, gw_ip, who)
    );
    let (out, _) = run(&mut h.sw, h.up, &arp(PHYS, vlan, 2, who, gw_ip, gw_mac), 1);
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn two_tenants_with_the_same_ca_nat_through_one_address_and_get_their_own_replies() {
    let mut h = host(100);
    let (red, blue, up) = (h.red, h.blue, h.up);
    let q = udp(VM1, RED_GW, None, CA, PEER, 5000, 53);
    resolve(&mut h, red, &q, 30, NAT_IP, NAT_MAC, PEER);

    let mut outside = Vec::new();
    for port in [red, blue] {
        let gw = if port == red { RED_GW } else { BLUE_GW };
        let (out, dropped) = run(&mut h.sw, port, &udp(VM1, gw, None, CA, PEER, 5000, 53), 2);
        assert_eq!(dropped, None);
        let [(p, f)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(*p, up);
        let s = parse(f).unwrap();
        assert_eq!((s.tags, s.vid), (1, 30), "leaves on the gateway's VLAN");
        assert_eq!(&f[..6], &PHYS);
        assert_eq!(&f[6..12], &NAT_MAC);
        assert_eq!(
            s.src_ip,
            u32::from_be_bytes(NAT_IP) as u128,
            "source NAT-ed"
        );
        assert_eq!((s.dst_ip, s.dport), (u32::from_be_bytes(PEER) as u128, 53));
        assert_eq!(f[18 + 8], 63, "TTL decremented");
        assert!(checksums_ok(f), "checksums after NAT");
        outside.push(s.sport);
    }
    assert_ne!(outside[0], outside[1], "one outside port per connection");

    // Replies: each to its own tenant, translated back.
    for (i, (port, gw)) in [(red, RED_GW), (blue, BLUE_GW)].into_iter().enumerate() {
        let r = udp(PHYS, NAT_MAC, Some(30), PEER, NAT_IP, 53, outside[i]);
        let (out, dropped) = run(&mut h.sw, up, &r, 3);
        assert_eq!(dropped, None);
        let [(p, f)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(*p, port, "reply {i} reached the wrong tenant");
        let s = parse(f).unwrap();
        assert_eq!(s.tags, 0);
        assert_eq!((&f[..6], &f[6..12]), (&VM1[..], &gw[..]));
        assert_eq!((s.dst_ip, s.dport), (u32::from_be_bytes(CA) as u128, 5000));
        assert_eq!(f[14 + 8], 63);
        assert!(checksums_ok(f));
    }
    // From another peer, or another port of the peer: nothing gets in.
    let r = udp(
        PHYS,
        NAT_MAC,
        Some(30),
        [198, 51, 100, 8],
        NAT_IP,
        53,
        outside[0],
    );
    assert_eq!(
        run(&mut h.sw, up, &r, 3),
        (vec![], Some(DropReason::NatNoMapping))
    );
    let r = udp(PHYS, NAT_MAC, Some(30), PEER, NAT_IP, 54, outside[0]);
    assert_eq!(
        run(&mut h.sw, up, &r, 3),
        (vec![], Some(DropReason::NatNoMapping))
    );

    // ICMP echo: the id is translated and the reply comes back to the right tenant.
    let (out, _) = run(
        &mut h.sw,
        blue,
        &echo(VM1, BLUE_GW, None, CA, PEER, 77, false),
        4,
    );
    let [(_, f)] = &out[..] else {
        panic!("{out:?}")
    };
    let s = parse(f).unwrap();
    assert!(checksums_ok(f));
    let id = s.sport;
    let (out, _) = run(
        &mut h.sw,
        up,
        &echo(PHYS, NAT_MAC, Some(30), PEER, NAT_IP, id, true),
        5,
    );
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, blue);
    assert_eq!(parse(f).unwrap().sport, 77);
    assert!(checksums_ok(f));

    // ARP for the gateway's address on its VLAN is answered (tagged); on another VLAN not.
    let (out, _) = run(&mut h.sw, up, &arp(PHYS, 30, 1, PEER, NAT_IP, [0xff; 6]), 6);
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, up);
    let s = parse(f).unwrap();
    assert_eq!((s.tags, s.vid, s.arp.unwrap().op), (1, 30, 2));
    assert_eq!(s.arp.unwrap().sender_mac, NAT_MAC);
    let (out, _) = run(&mut h.sw, up, &arp(PHYS, 31, 1, PEER, NAT_IP, [0xff; 6]), 6);
    assert!(
        out.iter().all(|(p, _)| *p != up),
        "answered on VLAN 31: {out:?}"
    );

    // A destination inside the domain's own prefix never leaves through the gateway.
    let q = udp(VM1, RED_GW, None, CA, [10, 0, 0, 77], 5000, 53);
    assert_eq!(
        run(&mut h.sw, red, &q, 7),
        (vec![], Some(DropReason::OverlayUnknown))
    );
    let counted = h.sw.drops(up, DropReason::NatNoMapping);
    assert_eq!(counted, 2);
}

#[test]
fn the_nat_table_is_bounded_and_expires() {
    let mut h = host(2);
    let red = h.red;
    resolve(
        &mut h,
        red,
        &udp(VM1, RED_GW, None, CA, PEER, 1, 53),
        30,
        NAT_IP,
        NAT_MAC,
        PEER,
    );
    for sp in [1, 2] {
        let (_, d) = run(&mut h.sw, red, &udp(VM1, RED_GW, None, CA, PEER, sp, 53), 2);
        assert_eq!(d, None);
    }
    let (out, d) = run(&mut h.sw, red, &udp(VM1, RED_GW, None, CA, PEER, 3, 53), 3);
    assert_eq!((out.len(), d), (0, Some(DropReason::NatTableFull)));
    // UDP's default timeout is 300 s: after it, room again.
    let later = 302 * 1_000_000_000;
    let (out, d) = run(
        &mut h.sw,
        red,
        &udp(VM1, RED_GW, None, CA, PEER, 3, 53),
        later,
    );
    assert_eq!((out.len(), d), (1, None));
}

#[test]
fn a_forward_gateway_routes_cas_as_they_are_via_its_next_hop() {
    let mut h = host(10);
    let (green, up) = (h.green, h.up);
    let far = [192, 0, 2, 50];
    let q = udp(VM1, GREEN_GW, None, [10, 2, 0, 5], far, 4000, 80);
    // Off-link: resolved through the next hop 203.0.113.254.
    resolve(
        &mut h,
        green,
        &q,
        40,
        [203, 0, 113, 1],
        FWD_MAC,
        [203, 0, 113, 254],
    );
    let (out, _) = run(&mut h.sw, green, &q, 2);
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, up);
    let s = parse(f).unwrap();
    assert_eq!((s.tags, s.vid, s.sport), (1, 40, 4000));
    assert_eq!(
        s.src_ip,
        u32::from_be_bytes([10, 2, 0, 5]) as u128,
        "not NAT-ed"
    );
    assert!(checksums_ok(f));
    // Inbound to the CA: delivered to green's port from its subnet's gateway MAC.
    let r = udp(PHYS, FWD_MAC, Some(40), far, [10, 2, 0, 5], 80, 4000);
    let (out, _) = run(&mut h.sw, up, &r, 3);
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, green);
    assert_eq!(&f[6..12], &GREEN_GW);
    assert!(checksums_ok(f));
    // A CA the table does not know, or the other tenants' (NAT-only) CA: dropped.
    let r = udp(PHYS, FWD_MAC, Some(40), far, [10, 2, 0, 6], 80, 4000);
    assert_eq!(
        run(&mut h.sw, up, &r, 3),
        (vec![], Some(DropReason::OverlayUnknown))
    );
    let r = udp(PHYS, FWD_MAC, Some(40), far, CA, 80, 4000);
    assert_eq!(
        run(&mut h.sw, up, &r, 3),
        (vec![], Some(DropReason::OverlayUnknown))
    );
    // The frame on the NAT VLAN to the forward gateway's MAC is not the forward gateway's.
    let r = udp(PHYS, FWD_MAC, Some(30), far, [10, 2, 0, 5], 80, 4000);
    let (out, _) = run(&mut h.sw, up, &r, 3);
    assert!(out.iter().all(|(p, _)| *p != green), "{out:?}");
}

/// Host A runs red's VM; host G (another PA) runs red's NAT gateway: A tunnels outside
/// traffic to G, G NATs it out and tunnels the replies back; A accepts routed packets with
/// outside sources only from G.
#[test]
fn a_vm_on_another_host_goes_out_through_the_gateway_host() {
    const PMAC_G: Mac = [2, 0xaa, 0, 0, 0, 7];
    let cfg = |pa: &str, pmac: Mac, other: (&str, Mac), gw: bool| -> OverlayConfig {
        let mut j = serde_json::json!({
            "provider_addresses": [pa],
            "provider_mac": MacAddr(pmac).to_string(),
            "provider_neighbors": [{"ip": other.0, "mac": MacAddr(other.1).to_string()}],
            "routing_domains": [{"name": "red", "subnets": [{"vsid": 100,
                "prefixes": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]}]}],
            "policies": [],
        });
        if gw {
            j["gateways"] = serde_json::json!([{"name": "out", "mode": "nat",
                "routing_domains": ["red"], "address": "198.51.100.1/24"}]);
            j["policies"] = serde_json::json!([{"routing_domain": "red", "ca": "10.0.0.1",
                "mac": MacAddr(VM1).to_string(), "vsid": 100, "pa": "192.168.50.1"}]);
        } else {
            j["routing_domains"][0]["gateway_pa"] = "192.168.50.7".into();
        }
        serde_json::from_value(j).unwrap()
    };
    let up = || PortConfig {
        role: PortRole::Uplink,
        ..PortConfig::access("up", 1)
    };
    let mut c = SwitchConfig::private("a");
    c.overlay = Some(cfg("192.168.50.1", PMAC, ("192.168.50.7", PMAC_G), false));
    let mut a = Switch::new(c).unwrap();
    let a_up = a.add_port(up()).unwrap();
    let a_red = a.add_port(vm_port("red", "red", 100, "10.0.0.1")).unwrap();
    let mut c = SwitchConfig::private("g");
    c.overlay = Some(cfg("192.168.50.7", PMAC_G, ("192.168.50.1", PMAC), true));
    let mut g = Switch::new(c).unwrap();
    let g_up = g.add_port(up()).unwrap();

    // A → tunnel to G.
    let q = udp(VM1, RED_GW, None, CA, PEER, 5000, 53);
    let (out, _) = run(&mut a, a_red, &q, 1);
    let [(p, tunnelled)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((*p, &tunnelled[..6]), (a_up, &PMAC_G[..]));
    // G: first the ARP for the physical peer (untagged), then NAT out.
    let (out, d) = run(&mut g, g_up, tunnelled, 1);
    assert_eq!(d, Some(DropReason::OverlayNoNeighbor), "{out:?}");
    let mut reply = arp(PHYS, 1, 2, PEER, NAT_IP, NAT_MAC);
    reply.drain(12..16);
    assert!(run(&mut g, g_up, &reply, 1).0.is_empty());
    let (out, _) = run(&mut a, a_red, &q, 2);
    let (out, d) = run(&mut g, g_up, &out[0].1, 2);
    assert_eq!(d, None);
    let [(_, f)] = &out[..] else {
        panic!("{out:?}")
    };
    let s = parse(f).unwrap();
    assert_eq!((s.tags, s.src_ip), (0, u32::from_be_bytes(NAT_IP) as u128));
    assert!(checksums_ok(f));
    // The reply: G tunnels it back to A, A delivers it to the VM.
    let r = udp(PHYS, NAT_MAC, None, PEER, NAT_IP, 53, s.sport);
    let (out, _) = run(&mut g, g_up, &r, 3);
    let [(p, back)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((*p, &back[..6]), (g_up, &PMAC[..]));
    let (out, d) = run(&mut a, a_up, back, 3);
    assert_eq!(d, None);
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a_red);
    let s = parse(f).unwrap();
    assert_eq!(
        (s.src_ip, s.dst_ip, s.dport),
        (
            u32::from_be_bytes(PEER) as u128,
            u32::from_be_bytes(CA) as u128,
            5000
        )
    );
    assert_eq!(&f[6..12], &RED_GW);
    // The same packet from another PA is a spoof at A.
    let mut forged = back.clone();
    forged[26..30].copy_from_slice(&[192, 168, 50, 9]);
    let c = vireo_vswitch::overlay::wire::ipv4_header_checksum(&forged[14..34]);
    forged[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        run(&mut a, a_up, &forged, 3),
        (vec![], Some(DropReason::OverlaySpoof))
    );
}

#[test]
fn gateways_are_added_replaced_and_removed_on_a_running_switch() {
    let mut h = host(10);
    let red = h.red;
    // Removing "out" leaves red and blue with no way out.
    h.sw.remove_gateway("out").unwrap();
    let q = udp(VM1, RED_GW, None, CA, PEER, 5000, 53);
    assert_eq!(
        run(&mut h.sw, red, &q, 1).1,
        Some(DropReason::OverlayUnknown)
    );
    let e = h.sw.remove_gateway("out").unwrap_err().to_string();
    assert!(e.contains("no gateway \"out\""), "{e}");
    // A gateway for a domain another one serves is refused, naming it.
    let mut g: GatewayConfig = serde_json::from_value(serde_json::json!({"name": "n2",
        "mode": "nat", "routing_domains": ["red", "green"], "address": "192.0.2.1/24"}))
    .unwrap();
    let e = h.sw.set_gateway(g.clone()).unwrap_err().to_string();
    assert!(e.contains("\"green\"") && e.contains("two gateways"), "{e}");
    g.routing_domains = vec!["red".into()];
    // Off-link and no next hop: unreachable.
    h.sw.set_gateway(g.clone()).unwrap();
    assert_eq!(
        run(&mut h.sw, red, &q, 2).1,
        Some(DropReason::OverlayUnknown)
    );
    g.next_hop = Some("192.0.2.254".parse().unwrap());
    h.sw.set_gateway(g).unwrap();
    let (out, d) = run(&mut h.sw, red, &q, 2);
    assert_eq!(d, Some(DropReason::OverlayNoNeighbor));
    let s = parse(&out[0].1).unwrap();
    let a = s.arp.unwrap();
    assert_eq!(
        (s.tags, a.sender_ip, a.target_ip),
        (0, [192, 0, 2, 1], [192, 0, 2, 254])
    );
    let st = h.sw.overlay().unwrap().gateways();
    assert_eq!(
        st.iter()
            .map(|g| g.config.name.as_str())
            .collect::<Vec<_>>(),
        ["fwd", "n2"]
    );
    assert_eq!(h.sw.config().overlay.unwrap().gateways.len(), 2);
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut a = 0u32;
    for w in data.chunks(2) {
        a += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while a > 0xffff {
        a = (a & 0xffff) + (a >> 16);
    }
    !(a as u16)
}

/// An ICMP error (`kind`, `code`, bytes 4..8 `rest`) from `from` to the NAT address on VLAN
/// 30, quoting `quote` (an IP packet as it left).
fn icmp_error(from: [u8; 4], kind: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(quote);
    let c = inet_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&from);
    ip.extend_from_slice(&NAT_IP);
    let c = inet_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = NAT_MAC.to_vec();
    f.extend_from_slice(&PHYS);
    f.extend_from_slice(&[0x81, 0, 0, 30, 0x08, 0]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn icmp_errors_from_outside_reach_only_their_tenant_translated() {
    let mut h = host(100);
    let (red, blue, up) = (h.red, h.blue, h.up);
    resolve(
        &mut h,
        red,
        &udp(VM1, RED_GW, None, CA, PEER, 5000, 53),
        30,
        NAT_IP,
        NAT_MAC,
        PEER,
    );
    // Red and blue, same CA and port, each a connection to PEER:53; what left is quoted.
    let mut left = Vec::new();
    for (port, gw) in [(red, RED_GW), (blue, BLUE_GW)] {
        let (out, _) = run(&mut h.sw, port, &udp(VM1, gw, None, CA, PEER, 5000, 53), 2);
        let [(_, f)] = &out[..] else {
            panic!("{out:?}")
        };
        left.push(f[18..].to_vec());
    }
    let before = h.sw.overlay().unwrap().nat_icmp_errors_translated();
    // Port unreachable from the peer itself, fragmentation needed from a router on the way.
    for (i, port) in [red, blue].into_iter().enumerate() {
        for (from, kind, code, rest) in [
            (PEER, 3, 3, [0; 4]),
            ([198, 51, 100, 254], 3, 4, [0, 0, 0x05, 0x00]),
        ] {
            let e = icmp_error(from, kind, code, rest, &left[i]);
            let (out, dropped) = run(&mut h.sw, up, &e, 3);
            assert_eq!(dropped, None);
            let [(p, f)] = &out[..] else {
                panic!("{out:?}")
            };
            assert_eq!(*p, port, "error {i} reached the wrong tenant");
            let s = parse(f).unwrap();
            assert_eq!((s.icmp_type, s.icmp_code), (kind, code));
            assert_eq!(
                s.dst_ip,
                u32::from_be_bytes(CA) as u128,
                "outer destination"
            );
            assert_eq!(s.src_ip, u32::from_be_bytes(from) as u128);
            assert_eq!(&f[38..42], &rest, "the MTU is the link's, unchanged");
            assert!(checksums_ok(f), "outer IP and ICMP checksums");
            // The quote: the packet as the tenant sent it (TTL aside), checksums right.
            let q = &f[42..];
            assert_eq!(&q[12..16], &CA, "quoted source");
            assert_eq!(&q[20..22], &5000u16.to_be_bytes(), "quoted source port");
            assert_eq!(inet_checksum(&q[..20]), 0, "quoted IP header");
            let mut pseudo = q[12..20].to_vec();
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&q[24..26]);
            pseudo.extend_from_slice(&q[20..]);
            assert_eq!(inet_checksum(&pseudo), 0, "quoted UDP checksum");
        }
    }
    assert_eq!(
        h.sw.overlay().unwrap().nat_icmp_errors_translated() - before,
        4
    );
    // Quoting a connection to another peer, or with a broken checksum: nobody gets it.
    let mut other = left[0].clone();
    other[19] = 8; // destination 198.51.100.8
    let e = icmp_error(PEER, 3, 3, [0; 4], &other);
    assert_eq!(
        run(&mut h.sw, up, &e, 3),
        (vec![], Some(DropReason::NatNoMapping))
    );
    let mut e = icmp_error(PEER, 3, 3, [0; 4], &left[0]);
    let n = e.len();
    e[n - 1] ^= 0x40;
    assert_eq!(
        run(&mut h.sw, up, &e, 3),
        (vec![], Some(DropReason::NatNoMapping))
    );
}

fn udp6(src: Mac, dst: Mac, vlan: Option<u16>, sip: &str, dip: &str) -> Vec<u8> {
    let (s6, d6): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (sip.parse().unwrap(), dip.parse().unwrap());
    let mut f = Vec::new();
    let e = PacketBuilder::ethernet2(src, dst);
    match vlan {
        Some(v) => e
            .single_vlan(v.try_into().unwrap())
            .ipv6(s6.octets(), d6.octets(), 64)
            .udp(5000, 53)
            .write(&mut f, b"query")
            .unwrap(),
        None => e
            .ipv6(s6.octets(), d6.octets(), 64)
            .udp(5000, 53)
            .write(&mut f, b"query")
            .unwrap(),
    }
    f
}

fn tag(f: &mut Vec<u8>, vlan: u16) {
    f.splice(12..12, [0x81, 0, (vlan >> 8) as u8, vlan as u8]);
}

#[test]
fn a_forward_gateway_routes_ipv6_cas_with_next_hops_resolved_by_nd() {
    let mut o = overlay(100);
    o.gateways[1].address6 = Some("2001:db8:40::1/64".parse().unwrap());
    o.gateways[1].next_hop6 = Some("fe80::1".parse().unwrap());
    let mut c = SwitchConfig::private("gw6");
    c.overlay = Some(o);
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    let green = sw
        .add_port(vm_port("green", "green", 300, "2001:db8:1::5"))
        .unwrap();
    let out_pkt = udp6(VM1, GREEN_GW, None, "2001:db8:1::5", "2001:db8:99::9");
    // The next hop (link-local router) is unknown: solicited on VLAN 40 from address6.
    let (out, dropped) = run(&mut sw, green, &out_pkt, 1);
    assert_eq!(dropped, Some(DropReason::OverlayNoNeighbor));
    let [(p, ns)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, up);
    let s = parse(ns).unwrap();
    assert_eq!((s.tags, s.vid, s.icmp_type), (1, 40, 135));
    assert_eq!(&ns[..6], &[0x33, 0x33, 0xff, 0, 0, 1]);
    assert_eq!(
        s.nd_target,
        u128::from("fe80::1".parse::<std::net::Ipv6Addr>().unwrap())
    );
    assert_eq!(&ns[6..12], &FWD_MAC);

    // The router's advertisement (on VLAN 40) resolves it.
    let mut na = Vec::new();
    vireo_vswitch::overlay::reply::neighbor_advert(
        &mut na,
        FWD_MAC,
        "2001:db8:40::1".parse().unwrap(),
        "fe80::1".parse().unwrap(),
        PHYS,
        true,
    );
    // A copy with hop limit 254 is refused and counted.
    let mut bad = na.clone();
    bad[21] = 254;
    tag(&mut bad, 40);
    assert_eq!(
        run(&mut sw, up, &bad, 1),
        (vec![], Some(DropReason::Malformed))
    );
    tag(&mut na, 40);
    assert_eq!(run(&mut sw, up, &na, 1), (vec![], None));

    let (out, dropped) = run(&mut sw, green, &out_pkt, 2);
    assert_eq!(dropped, None);
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, up);
    let s = parse(f).unwrap();
    assert_eq!((s.tags, s.vid), (1, 40));
    assert_eq!((&f[..6], &f[6..12]), (&PHYS[..], &FWD_MAC[..]));
    assert_eq!(f[18 + 7], 63, "hop limit decremented");
    assert_eq!(&f[18 + 8..18 + 24], &out_pkt[22..38], "source CA as it is");

    // In: to a CA of green from the physical network, routed to the VM.
    let back = udp6(PHYS, FWD_MAC, Some(40), "2001:db8:99::9", "2001:db8:1::5");
    let (out, dropped) = run(&mut sw, up, &back, 3);
    assert_eq!(dropped, None);
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, green);
    assert_eq!((&f[..6], &f[6..12]), (&VM1[..], &GREEN_GW[..]));
    assert_eq!((parse(f).unwrap().tags, f[14 + 7]), (0, 63));
    // Not to addresses that are no CA, and link-local never crosses the router.
    let stray = udp6(PHYS, FWD_MAC, Some(40), "2001:db8:99::9", "2001:db8:1::77");
    assert_eq!(
        run(&mut sw, up, &stray, 3),
        (vec![], Some(DropReason::OverlayUnknown))
    );
    let ll = udp6(VM1, GREEN_GW, None, "2001:db8:1::5", "fe80::9");
    assert_eq!(run(&mut sw, green, &ll, 3).0, vec![]);

    // A solicitation for the gateway's address is answered, as a router, on its VLAN.
    let mut ask = Vec::new();
    vireo_vswitch::overlay::nd::solicit(
        &mut ask,
        PHYS,
        "2001:db8:40::9".parse().unwrap(),
        "2001:db8:40::1".parse().unwrap(),
    );
    tag(&mut ask, 40);
    let (out, _) = run(&mut sw, up, &ask, 4);
    let [(p, f)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, up);
    let s = parse(f).unwrap();
    assert_eq!((s.tags, s.vid, s.icmp_type), (1, 40, 136));
    assert_eq!((&f[..6], &f[6..12]), (&PHYS[..], &FWD_MAC[..]));
    assert_eq!(f[18 + 44] & 0xe0, 0xe0, "router, solicited, override");
    let c = sw.overlay().unwrap().gateway_nd_counters();
    assert_eq!(
        (
            c.solicits_sent,
            c.adverts_received,
            c.solicits_received,
            c.adverts_sent,
            c.bad
        ),
        (1, 1, 1, 1, 1)
    );
}

/// A routed packet that cannot leave through the gateway comes back to the VM as ICMP from
/// its subnet's gateway address: TTL 1 (time exceeded), larger than the provider MTU
/// (fragmentation needed, with the MTU); counted, never silently dropped.
#[test]
fn a_packet_that_cannot_leave_through_the_gateway_bounces_to_the_vm_as_icmp() {
    let mut h = host(10);
    let green = h.green;
    let far = [192, 0, 2, 50];
    let build = |ttl: u8, payload: &[u8]| {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(VM1, GREEN_GW)
            .ipv4([10, 2, 0, 5], far, ttl)
            .udp(4000, 80)
            .write(&mut f, payload)
            .unwrap();
        f
    };
    let cases = [
        (build(1, b"query"), 11, 0, DropReason::TtlExceeded),
        (build(64, &[7u8; 1600]), 3, 4, DropReason::TooBig),
    ];
    for (q, icmp_type, code, why) in cases {
        let (out, dropped) = run(&mut h.sw, green, &q, 2);
        let [(p, f)] = &out[..] else {
            panic!("{why:?}: {out:?}")
        };
        assert_eq!(*p, green, "{why:?}");
        assert_eq!(dropped, Some(why));
        assert_eq!((&f[0..6], &f[6..12]), (&VM1[..], &GREEN_GW[..]), "{why:?}");
        assert_eq!(f[23], 1, "{why:?}: ICMP");
        assert_eq!(
            &f[26..30],
            &[10, 2, 0, 254],
            "{why:?}: from the subnet's gateway"
        );
        assert_eq!(&f[30..34], &[10, 2, 0, 5], "{why:?}: to the VM");
        assert_eq!((f[34], f[35]), (icmp_type, code), "{why:?}");
        assert!(checksums_ok(f), "{why:?}");
        if why == DropReason::TooBig {
            assert_eq!(u16::from_be_bytes([f[40], f[41]]), 1500, "the provider MTU");
        }
    }
}
