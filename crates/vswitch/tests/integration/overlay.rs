//! Network virtualization through the pure pipeline: two switches ("hosts" A and B) whose
//! uplinks are wired by this test, two tenants with the same customer addresses, routing
//! between virtual subnets, ARP/ND from the policy table, MTU answers, a moved VM, and
//! adversarial tunnel packets (spoofed VSIDs, other tenants' frames, malformed headers).

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use vireo_vswitch::frame::{parse, Mac};
use vireo_vswitch::*;

use crate::common;
use common::*;

const PA_A: &str = "192.168.50.1";
const PA_B: &str = "192.168.50.2";
const MAC_A: Mac = [2, 0xaa, 0, 0, 0, 1];
const MAC_B: Mac = [2, 0xbb, 0, 0, 0, 1];
/// Red's VM on A and B (both tenants use the same MACs and CAs).
const VM1: Mac = [2, 0, 0, 0, 1, 1];
const VM2: Mac = [2, 0, 0, 0, 1, 2];
const VM3: Mac = [2, 0, 0, 0, 1, 3];

fn overlay(pa: &str, pmac: Mac) -> OverlayConfig {
    let other = if pa == PA_A { PA_B } else { PA_A };
    let j = format!(
        r#"{{"provider_addresses":["{pa}"],"provider_mac":"{}",
        "routing_domains":[
          {{"name":"red","encap":"vxlan","subnets":[
             {{"vsid":100,"prefixes":["10.0.0.0/24"],"gateway_ips":["10.0.0.254"]}},
             {{"vsid":101,"prefixes":["10.0.1.0/24"],"gateway_ips":["10.0.1.254"]}}]}},
          {{"name":"blue","encap":"nvgre","subnets":[{{"vsid":200,"prefixes":["10.0.0.0/24"]}}]}}],
        "policies":[]}}"#,
        MacAddr(pmac)
    );
    let mut c: OverlayConfig = serde_json::from_str(&j).unwrap();
    // Every CA of the other host.
    let (cas, pa_o): (&[(&str, &str, u32, Mac)], &str) = if pa == PA_A {
        (
            &[
                ("red", "10.0.0.2", 100, VM2),
                ("red", "10.0.1.3", 101, VM3),
                ("blue", "10.0.0.2", 200, VM2),
            ],
            other,
        )
    } else {
        (
            &[
                ("red", "10.0.0.1", 100, VM1),
                ("blue", "10.0.0.1", 200, VM1),
            ],
            other,
        )
    };
    for (rd, ca, vsid, m) in cas {
        c.policies.push(PolicyEntry {
            routing_domain: rd.to_string(),
            ca: ca.parse().unwrap(),
            mac: MacAddr(*m),
            vsid: *vsid,
            pa: pa_o.parse().unwrap(),
        });
    }
    c
}

fn vm_port(name: &str, rd: &str, vsid: u32, m: Mac, ca: &str) -> PortConfig {
    PortConfig {
        overlay: Some(PortOverlay {
            routing_domain: rd.into(),
            vsid,
            mac: MacAddr(m),
            cas: vec![ca.parse().unwrap()],
        }),
        ..PortConfig::access(name, 1)
    }
}

struct Host {
    sw: Switch,
    up: PortId,
    red: PortId,
    blue: PortId,
    red3: Option<PortId>,
}

/// Host A: red VM1 (10.0.0.1), blue VM1 (10.0.0.1). Host B: red VM2, blue VM2 (10.0.0.2)
/// and red VM3 (10.0.1.3, the other subnet).
fn host(a: bool) -> Host {
    let (pa, pm) = if a { (PA_A, MAC_A) } else { (PA_B, MAC_B) };
    let mut c = SwitchConfig::private(if a { "a" } else { "b" });
    c.overlay = Some(overlay(pa, pm));
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    let (m, ca) = if a {
        (VM1, "10.0.0.1")
    } else {
        (VM2, "10.0.0.2")
    };
    let red = sw.add_port(vm_port("red", "red", 100, m, ca)).unwrap();
    let blue = sw.add_port(vm_port("blue", "blue", 200, m, ca)).unwrap();
    let red3 = (!a).then(|| {
        sw.add_port(vm_port("red3", "red", 101, VM3, "10.0.1.3"))
            .unwrap()
    });
    Host {
        sw,
        up,
        red,
        blue,
        red3,
    }
}

/// Frames out of one `process`: (port, bytes as sent), and the drop reason.
fn run(
    sw: &mut Switch,
    port: PortId,
    frame: &[u8],
) -> (Vec<(PortId, Vec<u8>)>, Option<DropReason>) {
    let mut f = frame.to_vec();
    let mut d = Delivery::default();
    sw.process(port, &mut f, 1_000_000, &mut d);
    let mut buf = Vec::new();
    let out = d
        .egress
        .iter()
        .filter(|e| !e.mirror)
        .map(|e| (e.port, render(&f, e.tag, &mut buf).to_vec()))
        .collect();
    (out, d.dropped)
}

fn ping(src: Mac, dst: Mac, sip: [u8; 4], dip: [u8; 4], payload: usize) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .icmpv4_echo_request(7, 1);
    let mut f = Vec::new();
    b.write(&mut f, &vec![0x61; payload]).unwrap();
    f
}

/// Resolves A↔B provider MACs by letting A's ARP request reach B and B's answer reach A.
fn resolve(a: &mut Host, b: &mut Host, first: &[u8]) {
    let (out, dropped) = run(&mut a.sw, a.red, first);
    assert_eq!(dropped, Some(DropReason::OverlayNoNeighbor));
    let [(p, req)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a.up);
    let (out, _) = run(&mut b.sw, b.up, req);
    let [(p, rep)] = &out[..] else {
        panic!("B did not answer ARP for its PA: {out:?}")
    };
    assert_eq!(*p, b.up);
    let (out, _) = run(&mut a.sw, a.up, rep);
    assert!(out.is_empty());
}

const IP1: [u8; 4] = [10, 0, 0, 1];
const IP2: [u8; 4] = [10, 0, 0, 2];

#[test]
fn tenants_with_the_same_addresses_stay_apart() {
    let (mut a, mut b) = (host(true), host(false));
    resolve(&mut a, &mut b, &ping(VM1, VM2, IP1, IP2, 8));
    // Red VM1 → red VM2: VXLAN VNI 100 to B, delivered to B's red port only.
    let (out, _) = run(&mut a.sw, a.red, &ping(VM1, VM2, IP1, IP2, 8));
    let [(p, outer)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a.up);
    let sl = SlicedPacket::from_ethernet(outer).unwrap();
    let Some(TransportSlice::Udp(u)) = sl.transport else {
        panic!("not UDP")
    };
    assert_eq!(u.destination_port(), 4789);
    assert_eq!(&outer[..6], &MAC_B);
    let (out, _) = run(&mut b.sw, b.up, outer);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, b.red);
    assert_eq!(
        &out[0].1[..ping(VM1, VM2, IP1, IP2, 8).len()],
        &ping(VM1, VM2, IP1, IP2, 8)[..]
    );
    // Blue VM1 → blue VM2: NVGRE (IP protocol 47), VSID 200, to B's blue port only.
    let (out, _) = run(&mut a.sw, a.blue, &ping(VM1, VM2, IP1, IP2, 8));
    let [(_, outer)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(outer[23], 47);
    assert_eq!(&outer[38..41], &[0, 0, 200]);
    let (out, _) = run(&mut b.sw, b.up, outer);
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![b.blue]);
    // A blue packet relabelled as red's VNI (spoofed VSID): not what the table says is behind
    // that PA in red — blue's encapsulation differs anyway; rebuild it as VXLAN 100.
    let mut forged = ping(VM1, VM2, IP1, IP2, 8);
    vireo_vswitch::overlay::encap::encapsulate(
        &mut forged,
        Encap::Vxlan,
        200,
        1,
        &vireo_vswitch::overlay::encap::Outer {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src_ip: PA_A.parse().unwrap(),
            dst_ip: PA_B.parse().unwrap(),
        },
    );
    let (out, d) = run(&mut b.sw, b.up, &forged);
    assert!(out.is_empty());
    assert_eq!(
        d,
        Some(DropReason::OverlayMalformed),
        "VXLAN on an NVGRE domain"
    );
    // From an address that is not A's PA: the source is not what the table says.
    let mut forged = ping(VM1, VM2, IP1, IP2, 8);
    vireo_vswitch::overlay::encap::encapsulate(
        &mut forged,
        Encap::Vxlan,
        100,
        1,
        &vireo_vswitch::overlay::encap::Outer {
            src_mac: MAC_A,
            dst_mac: MAC_B,
            src_ip: "192.168.50.99".parse().unwrap(),
            dst_ip: PA_B.parse().unwrap(),
        },
    );
    let (out, d) = run(&mut b.sw, b.up, &forged);
    assert!(out.is_empty());
    assert_eq!(d, Some(DropReason::OverlaySpoof));
    assert!(b.sw.drops(b.up, DropReason::OverlaySpoof) >= 1);
    // A red VM cannot claim another CA, nor reach a CA the table does not have.
    let (out, d) = run(&mut a.sw, a.red, &ping(VM1, VM2, [10, 0, 0, 9], IP2, 8));
    assert!(out.is_empty());
    assert_eq!(d, Some(DropReason::OverlaySpoof));
    let (out, d) = run(&mut a.sw, a.red, &ping(VM1, VM2, IP1, [10, 0, 0, 77], 8));
    assert!(out.is_empty());
    assert_eq!(d, Some(DropReason::OverlayUnknown));
}

#[test]
fn arp_and_nd_are_answered_from_the_table_and_broadcasts_stay_home() {
    let (mut a, _) = (host(true), ());
    let req = arp(etherparse::ArpOperation::REQUEST, VM1, IP1, IP2);
    let (out, _) = run(&mut a.sw, a.red, &req);
    let [(p, rep)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a.red);
    let s = parse(rep).unwrap();
    let ai = s.arp.unwrap();
    assert_eq!((ai.op, ai.sender_mac, ai.sender_ip), (2, VM2, IP2));
    assert_eq!(s.dst, VM1);
    // The gateway answers with its MAC; 10.0.1.3 (another subnet) is not answered.
    let (out, _) = run(
        &mut a.sw,
        a.red,
        &arp(etherparse::ArpOperation::REQUEST, VM1, IP1, [10, 0, 0, 254]),
    );
    assert_eq!(
        parse(&out[0].1).unwrap().arp.unwrap().sender_mac,
        [2, 0xff, 0, 0, 100, 1]
    );
    let (out, d) = run(
        &mut a.sw,
        a.red,
        &arp(etherparse::ArpOperation::REQUEST, VM1, IP1, [10, 0, 1, 3]),
    );
    assert!(out.is_empty());
    assert_eq!(d, Some(DropReason::OverlayUnknown));
    // A broadcast of another kind never reaches the uplink or the other tenant.
    let (out, _) = run(
        &mut a.sw,
        a.red,
        &udp4(VM1, BCAST, IP1, [10, 0, 0, 255], 1, 2, &[0; 8]),
    );
    assert!(
        out.iter().all(|(p, _)| *p != a.up && *p != a.blue),
        "{out:?}"
    );
}

#[test]
fn routing_between_virtual_subnets_happens_on_the_sending_host() {
    let (mut a, mut b) = (host(true), host(false));
    let gw = [2, 0xff, 0, 0, 100, 1];
    let first = ping(VM1, gw, IP1, [10, 0, 1, 3], 8);
    resolve(&mut a, &mut b, &first);
    let (out, _) = run(&mut a.sw, a.red, &first);
    let [(p, outer)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a.up);
    // VNI 101: the destination subnet's, so B delivers without any router of its own.
    assert_eq!(&outer[46..49], &[0, 0, 101]);
    let (out, _) = run(&mut b.sw, b.up, outer);
    let [(p, inner)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(Some(*p), b.red3);
    let s = parse(inner).unwrap();
    assert_eq!((s.dst, s.src), (VM3, [2, 0xff, 0, 0, 101, 1]));
    assert_eq!(inner[22], 63, "TTL decremented");
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&inner[14..]).unwrap();
    assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
    // TTL 1 does not leave: the VM gets "time exceeded" from its gateway, 10.0.0.254.
    let mut f = first.clone();
    f[22] = 1;
    let (out, d) = run(&mut a.sw, a.red, &f);
    assert_eq!(d, Some(DropReason::TtlExceeded));
    let [(p, icmp)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a.red);
    let s = parse(icmp).unwrap();
    assert_eq!((s.icmp_type, s.icmp_code, s.dst, s.src), (11, 0, VM1, gw));
    assert_eq!(&icmp[26..30], &[10, 0, 0, 254]);
}

#[test]
fn oversized_packets_get_an_icmp_answer_not_silence() {
    let (mut a, mut b) = (host(true), host(false));
    resolve(&mut a, &mut b, &ping(VM1, VM2, IP1, IP2, 8));
    // 1450 bytes of inner IP fit VXLAN over a 1500 provider MTU; 1451 do not.
    let fits = ping(VM1, VM2, IP1, IP2, 1450 - 28);
    let (out, _) = run(&mut a.sw, a.red, &fits);
    assert_eq!(out[0].0, a.up);
    assert_eq!(out[0].1.len() - 14, 1500);
    let big = ping(VM1, VM2, IP1, IP2, 1451 - 28);
    let (out, d) = run(&mut a.sw, a.red, &big);
    assert_eq!(d, Some(DropReason::TooBig));
    let [(p, icmp)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a.red);
    let s = parse(icmp).unwrap();
    assert_eq!((s.icmp_type, s.icmp_code, s.dst), (3, 4, VM1));
    assert_eq!(u16::from_be_bytes([icmp[40], icmp[41]]), 1450);
    assert_eq!(a.sw.drops(a.red, DropReason::TooBig), 1);
}

#[test]
fn a_moved_vm_is_reached_at_its_new_host_and_stale_senders_are_forwarded() {
    let (mut a, mut b) = (host(true), host(false));
    resolve(&mut a, &mut b, &ping(VM1, VM2, IP1, IP2, 8));
    // Red VM2 moves from B to a third host C (PA .3): B loses the port and learns the new PA.
    let c_pa = "192.168.50.3";
    b.sw.remove_port(b.red).unwrap();
    let moved = PolicyEntry {
        routing_domain: "red".into(),
        ca: "10.0.0.2".parse().unwrap(),
        mac: MacAddr(VM2),
        vsid: 100,
        pa: c_pa.parse().unwrap(),
    };
    b.sw.set_policy(&moved).unwrap();
    // A still sends to B (stale): B forwards (its ARP for C goes out first).
    let (out, _) = run(&mut a.sw, a.red, &ping(VM1, VM2, IP1, IP2, 8));
    let (out, d) = run(&mut b.sw, b.up, &out[0].1);
    assert_eq!(d, Some(DropReason::OverlayNoNeighbor));
    assert_eq!(
        parse(&out[0].1).unwrap().arp.unwrap().target_ip,
        [192, 168, 50, 3]
    );
    // A is told (the API pushes the new entry): its next frame goes to C directly.
    a.sw.set_policy(&moved).unwrap();
    let (out, _) = run(&mut a.sw, a.red, &ping(VM1, VM2, IP1, IP2, 8));
    assert_eq!(
        parse(&out[0].1).unwrap().arp.unwrap().target_ip,
        [192, 168, 50, 3]
    );
    // A conflicting entry (another MAC for that CA) is refused and changes nothing.
    let mut bad = moved.clone();
    bad.mac = MacAddr([2, 9, 9, 9, 9, 9]);
    assert!(a.sw.set_policy(&bad).is_err());
    // The local VM's CA cannot be taken over by a policy entry.
    let mut own = moved.clone();
    own.ca = "10.0.0.1".parse().unwrap();
    own.mac = MacAddr(VM1);
    let e = a.sw.set_policy(&own).unwrap_err().to_string();
    assert!(e.contains("remove the port"), "{e}");
}

#[test]
fn malformed_and_truncated_tunnel_packets_are_dropped_and_counted() {
    let (mut a, mut b) = (host(true), host(false));
    resolve(&mut a, &mut b, &ping(VM1, VM2, IP1, IP2, 8));
    let (out, _) = run(&mut a.sw, a.red, &ping(VM1, VM2, IP1, IP2, 8));
    let good = out[0].1.clone();
    let before =
        b.sw.status(b.up)
            .unwrap()
            .meters
            .drops
            .iter()
            .map(|d| d.1)
            .sum::<u64>();
    let mut dropped = 0;
    for n in 34..good.len() {
        let (out, d) = run(&mut b.sw, b.up, &good[..n]);
        assert!(
            out.iter().all(|(p, _)| *p == b.up || d.is_none()),
            "cut at {n}: {out:?}"
        );
        if d.is_some() {
            dropped += 1;
        }
        assert!(
            !out.iter().any(|(p, _)| *p == b.red),
            "cut at {n} delivered"
        );
    }
    assert!(dropped > 0);
    let after =
        b.sw.status(b.up)
            .unwrap()
            .meters
            .drops
            .iter()
            .map(|d| d.1)
            .sum::<u64>();
    assert!(after > before);
    // VXLAN with the I flag cleared.
    let mut f = good.clone();
    f[42] = 0;
    assert_eq!(
        run(&mut b.sw, b.up, &f).1,
        Some(DropReason::OverlayMalformed)
    );
    // A bad IPv4 header checksum.
    let mut f = good.clone();
    f[24] ^= 1;
    assert_eq!(
        run(&mut b.sw, b.up, &f).1,
        Some(DropReason::OverlayMalformed)
    );
    // The good one still works.
    assert_eq!(run(&mut b.sw, b.up, &good).0[0].0, b.red);
}

#[test]
fn bad_configuration_is_refused_with_a_reason() {
    let mut c = SwitchConfig::private("x");
    c.ports.push(vm_port("v", "red", 100, VM1, "10.0.0.1"));
    let e = Switch::new(c).err().unwrap().to_string();
    assert!(e.contains("no overlay configured"), "{e}");
    let mut c = SwitchConfig::private("x");
    c.overlay = Some(overlay(PA_A, MAC_A));
    c.ports.push(vm_port("v", "green", 100, VM1, "10.0.0.1"));
    let e = Switch::new(c).err().unwrap().to_string();
    assert!(e.contains("green"), "{e}");
    // Two ports with one CA in one routing domain.
    let mut c = SwitchConfig::private("x");
    c.overlay = Some(overlay(PA_A, MAC_A));
    c.ports.push(vm_port("v", "red", 100, VM1, "10.0.0.1"));
    c.ports.push(vm_port("w", "red", 100, VM3, "10.0.0.1"));
    let e = Switch::new(c).err().unwrap().to_string();
    assert!(e.contains("10.0.0.1"), "{e}");
    // A port whose CA the table places on another host.
    let mut c = SwitchConfig::private("x");
    c.overlay = Some(overlay(PA_A, MAC_A));
    c.ports.push(vm_port("w", "red", 100, VM3, "10.0.0.2"));
    assert!(Switch::new(c).is_err());
}

/// A one-host-each pair over an IPv6 provider network (static provider neighbours, or none:
/// resolved by ND), with a VM that has an IPv6 and an IPv4 CA.
fn v6_host(a: bool, static_neighbor: bool) -> (Switch, PortId, PortId) {
    let (me, peer, pm, peer_mac) = if a {
        ("fd50::1", "fd50::2", MAC_A, MAC_B)
    } else {
        ("fd50::2", "fd50::1", MAC_B, MAC_A)
    };
    let (my_vm, peer_vm, my_ca, peer_ca) = if a {
        (VM1, VM2, ["fd00::1", "10.0.0.1"], ["fd00::2", "10.0.0.2"])
    } else {
        (VM2, VM1, ["fd00::2", "10.0.0.2"], ["fd00::1", "10.0.0.1"])
    };
    let mut o: OverlayConfig = serde_json::from_value(serde_json::json!({
        "provider_addresses": [me], "provider_mac": MacAddr(pm),
        "routing_domains": [{"name": "red", "encap": "nvgre", "subnets": [{"vsid": 100}]}],
    }))
    .unwrap();
    if static_neighbor {
        o.provider_neighbors.push(ProviderNeighbor {
            ip: peer.parse().unwrap(),
            mac: MacAddr(peer_mac),
        });
    }
    for ca in peer_ca {
        o.policies.push(PolicyEntry {
            routing_domain: "red".into(),
            ca: ca.parse().unwrap(),
            mac: MacAddr(peer_vm),
            vsid: 100,
            pa: peer.parse().unwrap(),
        });
    }
    let mut c = SwitchConfig::private("v6");
    c.overlay = Some(o);
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    let mut p = vm_port("vm", "red", 100, my_vm, my_ca[0]);
    p.overlay
        .as_mut()
        .unwrap()
        .cas
        .push(my_ca[1].parse().unwrap());
    let vm = sw.add_port(p).unwrap();
    (sw, up, vm)
}

#[test]
fn ipv6_and_ipv4_customers_over_an_ipv6_provider_network() {
    let ((mut a, a_up, a_vm), (mut b, b_up, b_vm)) = (v6_host(true, true), v6_host(false, true));
    let fd = |n: u8| {
        let mut x = [0u8; 16];
        x[0] = 0xfd;
        x[15] = n;
        x
    };
    // ND for the peer's CA is answered here with its MAC.
    let ns = icmp6(VM1, [0x33, 0x33, 0xff, 0, 0, 2], fd(1), fd(2), 135, fd(2));
    let (out, _) = run(&mut a, a_vm, &ns);
    let [(p, na)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a_vm);
    let s = parse(na).unwrap();
    assert_eq!(
        (s.icmp_type, s.src, s.nd_target),
        (136, VM2, u128::from_be_bytes(fd(2)))
    );
    for (v6, inner) in [
        (true, {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(VM1, VM2)
                .ipv6(fd(1), fd(2), 64)
                .icmpv6_echo_request(1, 1)
                .write(&mut f, &[7; 16])
                .unwrap();
            f
        }),
        (false, ping(VM1, VM2, IP1, IP2, 16)),
    ] {
        let (out, d) = run(&mut a, a_vm, &inner);
        let [(p, outer)] = &out[..] else {
            panic!("v6={v6} {out:?} {d:?}")
        };
        assert_eq!(*p, a_up);
        assert_eq!(
            u16::from_be_bytes([outer[12], outer[13]]),
            0x86dd,
            "IPv6 provider"
        );
        assert_eq!(outer[20], 47, "NVGRE");
        assert_eq!(&outer[..6], &MAC_B);
        let (out, d) = run(&mut b, b_up, outer);
        let [(p, got)] = &out[..] else {
            panic!("v6={v6} {out:?} {d:?}")
        };
        assert_eq!(*p, b_vm);
        assert_eq!(&got[..inner.len()], &inner[..]);
    }
}

/// The kernel fast path's verdict on a frame: what the pipeline did with it, judged.
fn tunnel_verdict(
    sw: &mut Switch,
    port: PortId,
    frame: &[u8],
) -> (
    Vec<u8>,
    Result<vireo_vswitch::fastpath::FlowKey, vireo_vswitch::fastpath::NotOffloadable>,
) {
    let mut f = frame.to_vec();
    let mut d = Delivery::default();
    sw.process(port, &mut f, 1_000_000, &mut d);
    let v = sw.tunnel_offload_verdict(port, frame, &f, &d);
    (f, v)
}

#[test]
fn bridged_vxlan_tcp_is_offered_to_the_kernel_and_nothing_else() {
    use vireo_vswitch::fastpath::tunnel::Tunnel;
    use vireo_vswitch::fastpath::NotOffloadable as N;
    let (mut a, mut b) = (host(true), host(false));
    resolve(&mut a, &mut b, &ping(VM1, VM2, IP1, IP2, 8));
    let tcp = tcp4(VM1, VM2, IP1, IP2, 40000, 80);
    let (outer, v) = tunnel_verdict(&mut a.sw, a.red, &tcp);
    let k = v.unwrap();
    assert_eq!((k.ingress, k.egress, k.src, k.dst), (a.red, a.up, VM1, VM2));
    let Some(Tunnel::Encap { header, max_ip_len }) = k.tunnel else {
        panic!("{k:?}")
    };
    assert_eq!(&header[..], &outer[..64], "the header user space sent");
    assert_eq!(max_ip_len, 1450, "provider MTU 1500 − 50");
    let (_, v) = tunnel_verdict(&mut b.sw, b.up, &outer);
    let k = v.unwrap();
    assert_eq!((k.ingress, k.egress), (b.up, b.red));
    assert!(matches!(
        k.tunnel,
        Some(Tunnel::Decap { peer_pa, vni: 100, .. }) if peer_pa == u32::from_be_bytes([192, 168, 50, 1])
    ));
    // The same connection from another PA: user space drops it, nothing to offload.
    let mut spoofed = outer.clone();
    spoofed[29] = 9;
    let c = vireo_vswitch::overlay::wire::ipv4_header_checksum(&spoofed[14..34]);
    spoofed[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(
        tunnel_verdict(&mut b.sw, b.up, &spoofed).1,
        Err(N::NotOneDestination)
    );
    // Not TCP, or NVGRE: user space.
    let (_, v) = tunnel_verdict(&mut a.sw, a.red, &ping(VM1, VM2, IP1, IP2, 8));
    assert_eq!(v, Err(N::NotTcp));
    let (_, v) = tunnel_verdict(&mut a.sw, a.blue, &tcp);
    assert_eq!(v, Err(N::OverlayFlow));
    // A policy change invalidates what was approved.
    let g = a.sw.generation();
    a.sw.set_policy(&PolicyEntry {
        routing_domain: "red".into(),
        ca: "10.0.0.2".parse().unwrap(),
        mac: MacAddr(VM2),
        vsid: 100,
        pa: "192.168.50.7".parse().unwrap(),
    })
    .unwrap();
    assert!(a.sw.generation() > g);
}

/// Rewrites a captured ND frame's ICMPv6 checksum after the test changed a byte.
fn fix_icmp6(f: &mut [u8]) {
    f[56..58].fill(0);
    let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
    let mut acc: u32 = 58 + plen as u32;
    let mut add = |b: &[u8]| {
        for w in b.chunks(2) {
            acc += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    };
    add(&f[22..54]);
    add(&f[54..54 + plen]);
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    f[56..58].copy_from_slice(&(!(acc as u16)).to_be_bytes());
}

#[test]
fn ipv6_provider_neighbors_are_resolved_by_nd_and_bad_nd_is_counted() {
    let ((mut a, a_up, a_vm), (mut b, b_up, b_vm)) = (v6_host(true, false), v6_host(false, false));
    let first = ping(VM1, VM2, IP1, IP2, 16);
    // A does not know B's PA: the frame becomes a solicitation to its solicited-node group.
    let (out, d) = run(&mut a, a_vm, &first);
    assert_eq!(d, Some(DropReason::OverlayNoNeighbor));
    let [(p, ns)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*p, a_up);
    assert_eq!(&ns[..6], &[0x33, 0x33, 0xff, 0, 0, 2]);
    let s = parse(ns).unwrap();
    assert_eq!((s.icmp_type, s.nd_target), (135, 0xfd50_u128 << 112 | 2));
    // While it is in flight, frames are dropped and counted, not each a new solicitation.
    let (out, d) = run(&mut a, a_vm, &first);
    assert!(out.is_empty() && d == Some(DropReason::OverlayNoNeighbor));

    // B answers for its PA, and learns A from the solicitation's link-layer option.
    let (out, _) = run(&mut b, b_up, ns);
    let [(p, na)] = &out[..] else {
        panic!("B did not advertise its PA: {out:?}")
    };
    assert_eq!(*p, b_up);
    assert_eq!((&na[..6], &na[6..12]), (&MAC_A[..], &MAC_B[..]));
    assert_eq!(parse(na).unwrap().icmp_type, 136);
    assert_eq!(
        b.overlay().unwrap().neighbor("fd50::1".parse().unwrap()),
        Some(MAC_A)
    );

    // A bad copy of the advertisement (hop limit 254: it crossed a router) teaches nothing.
    let mut bad = na.clone();
    bad[21] = 254;
    let (out, d) = run(&mut a, a_up, &bad);
    assert!(out.is_empty() && d == Some(DropReason::Malformed));
    assert_eq!(
        a.overlay().unwrap().neighbor("fd50::2".parse().unwrap()),
        None
    );
    // Nor does a valid one about a target A never asked for.
    let mut other = na.clone();
    other[77] = 9; // target fd50::9
    fix_icmp6(&mut other);
    let (out, d) = run(&mut a, a_up, &other);
    assert!(out.is_empty() && d == Some(DropReason::Malformed));
    assert_eq!(
        a.overlay().unwrap().neighbor("fd50::9".parse().unwrap()),
        None
    );

    let (out, _) = run(&mut a, a_up, na);
    assert!(out.is_empty(), "{out:?}");
    let c = a.overlay().unwrap().nd_counters();
    assert_eq!(
        (c.solicits_sent, c.adverts_received, c.pending_drops, c.bad),
        (1, 1, 1, 2)
    );
    let cb = b.overlay().unwrap().nd_counters();
    assert_eq!((cb.solicits_received, cb.adverts_sent, cb.bad), (1, 1, 0));

    // Now the tunnel goes to B's MAC, and B delivers.
    let (out, _) = run(&mut a, a_vm, &first);
    let [(p, outer)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!((*p, &outer[..6]), (a_up, &MAC_B[..]));
    let (out, _) = run(&mut b, b_up, outer);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, b_vm);
}

#[test]
fn a_static_provider_neighbor_wins_over_what_the_wire_says() {
    let ((mut a, a_up, _), (mut b, b_up, b_vm)) = (v6_host(true, true), v6_host(false, false));
    // B has no static entry: it solicits A, and A answers.
    let (out, _) = run(&mut b, b_vm, &ping(VM2, VM1, IP2, IP1, 16));
    let [(_, ns)] = &out[..] else {
        panic!("{out:?}")
    };
    // The same solicitation claiming B's PA is at another MAC: A answers it, but its
    // configured entry for B stays.
    let forger = [2, 0xee, 0, 0, 0, 1];
    let mut forged = ns.clone();
    forged[6..12].copy_from_slice(&forger);
    forged[80..86].copy_from_slice(&forger);
    fix_icmp6(&mut forged);
    let (out, _) = run(&mut a, a_up, &forged);
    assert_eq!(out.len(), 1, "a solicitation for our PA is answered");
    let fd50_2 = "fd50::2".parse().unwrap();
    assert_eq!(a.overlay().unwrap().neighbor(fd50_2), Some(MAC_B));
    let (out, _) = run(&mut a, a_up, ns);
    let [(_, na)] = &out[..] else {
        panic!("{out:?}")
    };
    let (out, _) = run(&mut b, b_up, na);
    assert!(out.is_empty());
    assert_eq!(b.overlay().unwrap().nd_counters().adverts_received, 1);
    assert_eq!(a.overlay().unwrap().nd_counters().solicits_received, 2);
}
