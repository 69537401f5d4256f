//! The guards that read UDP ports, DHCP message types and ICMP types hold when the message is
//! split into IP fragments (issue 13): a guarded datagram's fragments reach nobody in any
//! order, tiny and overlapping fragments are refused, fragmented neighbor discovery is
//! dropped, and ordinary fragmented traffic still passes.

use crate::fragbuild;

use fragbuild::guest::*;
use fragbuild::*;
use vireo_vswitch::fragment::{FRAGMENT_CAPACITY, FRAGMENT_TIMEOUT_NS};
use vireo_vswitch::*;

/// Port 0: a guest with every guard on (DHCP, router, ARP/ND with its addresses); port 1:
/// another guest; port 2: a trusted uplink; port 3: a guest allowed to be a DHCP server
/// and router (its fragments are not inspected).
fn switch() -> (Switch, [PortId; 4]) {
    let mut sw = Switch::new(SwitchConfig::private("frag")).unwrap();
    let vm = guarded_vm("vm");
    let mut server = PortConfig::access("srv", 1);
    server.guard.dhcp_server_allowed = true;
    server.guard.router_allowed = true;
    let up = PortConfig {
        role: PortRole::Uplink,
        ..PortConfig::access("up", 1)
    };
    let ids = [
        sw.add_port(vm).unwrap(),
        sw.add_port(PortConfig::access("b", 1)).unwrap(),
        sw.add_port(up).unwrap(),
        sw.add_port(server).unwrap(),
    ];
    (sw, ids)
}

/// Sends each frame at `now` ns; returns per frame the ports it reached and the drop reason.
fn run(
    sw: &mut Switch,
    port: PortId,
    frames: &[Vec<u8>],
    now: u64,
) -> Vec<(Vec<PortId>, Option<DropReason>)> {
    let mut d = Delivery::default();
    frames
        .iter()
        .map(|f| {
            let mut f = f.clone();
            sw.process(port, &mut f, now, &mut d);
            (d.ports(), d.dropped)
        })
        .collect()
}

fn reached_nobody(r: &[(Vec<PortId>, Option<DropReason>)]) -> bool {
    r.iter().all(|(p, d)| p.is_empty() && d.is_some())
}

fn offer() -> Vec<u8> {
    udp4(VM, BCAST, VM4, [255; 4], (67, 68), &bootp(2, 2, 300))
}

#[test]
fn fragmented_dhcp_offer_with_its_type_in_a_later_fragment_reaches_nobody() {
    let (mut sw, p) = switch();
    // As in the issue: the first fragment carries only the UDP header (source port 67),
    // then 8 bytes per fragment; the op and option 53 come much later.
    let offer = offer();
    let frags = fragment4(&offer, 7, &every(8, 8, 308));
    assert!(frags.len() > 30);
    let r = run(&mut sw, p[0], &frags, 1);
    assert!(reached_nobody(&r), "{r:?}");
    assert_eq!(
        sw.drops(p[0], DropReason::FragmentGuard),
        frags.len() as u64
    );
    // Larger fragments whose first one shows the op: the DHCP guard drops it as it would
    // the whole message, the rest follow it.
    let frags = fragment4(&offer, 8, &[64, 128, 192, 256]);
    let r = run(&mut sw, p[0], &frags, 2);
    assert!(reached_nobody(&r), "{r:?}");
    assert_eq!(r[0].1, Some(DropReason::DhcpGuard));
    assert!(r[1..]
        .iter()
        .all(|(_, d)| *d == Some(DropReason::FragmentGuard)));
    // A port allowed to serve DHCP is not inspected: every fragment is delivered.
    let offer = udp4(
        [2, 0, 0, 0, 0, 4],
        BCAST,
        VM4,
        [255; 4],
        (67, 68),
        &bootp(2, 2, 300),
    );
    let r = run(&mut sw, p[3], &fragment4(&offer, 7, &every(8, 8, 308)), 3);
    assert!(r.iter().all(|(ports, _)| ports == &[p[0], p[1], p[2]]));
}

#[test]
fn dhcp_replies_from_any_source_port_are_dropped() {
    // Unfragmented, but the same hole: the guard only looked at BOOTREPLYs from port 67,
    // while a client takes any datagram to port 68 (and a relay forwards replies it gets
    // on port 67).
    let (mut sw, p) = switch();
    for ports in [(4000, 68), (68, 67), (68, 68)] {
        let f = udp4(VM, BCAST, VM4, [255; 4], ports, &bootp(2, 5, 300));
        assert_eq!(
            run(&mut sw, p[0], &[f], 1)[0].1,
            Some(DropReason::DhcpGuard),
            "{ports:?}"
        );
    }
    let reply = udp6(
        VM,
        ALL_NODES_MAC,
        vm6(),
        all_nodes(),
        (4000, 546),
        &[7, 0, 0, 1],
    );
    assert_eq!(
        run(&mut sw, p[0], &[reply], 1)[0].1,
        Some(DropReason::DhcpGuard)
    );
    // Client messages still pass.
    let discover = udp4(VM, BCAST, [0; 4], [255; 4], (68, 67), &bootp(1, 1, 300));
    assert_eq!(
        run(&mut sw, p[0], &[discover], 1)[0].0,
        vec![p[1], p[2], p[3]]
    );
}

#[test]
fn fragmented_dhcpv6_reply_reaches_nobody_also_behind_a_hop_by_hop_header() {
    let (mut sw, p) = switch();
    let mut payload = vec![0u8; 200];
    payload[0] = 7; // REPLY
    let reply = udp6(VM, ALL_NODES_MAC, vm6(), all_nodes(), (547, 546), &payload);
    for (id, hbh) in [(1, false), (2, true)] {
        // First fragment: the UDP header only.
        let frags = fragment6(&reply, id, &every(8, 8, 208), hbh);
        let r = run(&mut sw, p[0], &frags, 1);
        assert!(reached_nobody(&r), "{r:?}");
        assert!(r.iter().all(|(_, d)| *d == Some(DropReason::FragmentGuard)));
    }
    // Type visible in the first fragment, UDP behind a destination-options header in the
    // fragmentable part (the fragment header then names 60, not UDP).
    let frags = fragment6(&with_dstopts(&reply), 3, &[64, 128], false);
    let r = run(&mut sw, p[0], &frags, 1);
    assert!(reached_nobody(&r), "{r:?}");
    assert_eq!(r[0].1, Some(DropReason::DhcpGuard));
}

#[test]
fn fragmented_router_advertisements_and_redirects_reach_nobody() {
    let (mut sw, p) = switch();
    let body = vec![0u8; 200];
    let ra = icmp6(VM, ALL_NODES_MAC, vm6(), all_nodes(), 134, &body);
    let redirect = icmp6(VM, ALL_NODES_MAC, vm6(), all_nodes(), 137, &body);
    for (i, m) in [ra, redirect].iter().enumerate() {
        // The type is in the first fragment; the rest used to pass on their own.
        let frags = fragment6(m, 10 + i as u32, &[56, 112, 168], i == 1);
        let r = run(&mut sw, p[0], &frags, 1);
        assert!(reached_nobody(&r), "{r:?}");
        assert_eq!(r[0].1, Some(DropReason::RouterGuard));
    }
    // ICMPv4 redirect and router advertisement.
    for (i, ty) in [5u8, 9].into_iter().enumerate() {
        let m = icmp4(VM, BCAST, VM4, PEER4, ty, &body);
        let r = run(&mut sw, p[0], &fragment4(&m, 20 + i as u16, &[64, 128]), 1);
        assert!(reached_nobody(&r), "{r:?}");
    }
    // A router port's fragmented RA reaches everyone.
    let ra = icmp6(
        [2, 0, 0, 0, 0, 4],
        ALL_NODES_MAC,
        vm6(),
        all_nodes(),
        134,
        &body,
    );
    let r = run(&mut sw, p[3], &fragment6(&ra, 1, &[56, 112], false), 1);
    assert!(r.iter().all(|(ports, _)| ports == &[p[0], p[1], p[2]]));
}

#[test]
fn fragmented_neighbor_discovery_is_dropped_even_when_it_claims_an_allowed_address() {
    let (mut sw, p) = switch();
    // NA and NS for the port's own address: legitimate unfragmented, never as fragments
    // (RFC 6980), atomic fragments included.
    let mut body = vm6().to_vec();
    body.extend_from_slice(&[0u8; 64]);
    for ty in [135u8, 136] {
        let m = icmp6(VM, ALL_NODES_MAC, vm6(), all_nodes(), ty, &body);
        assert_eq!(
            run(&mut sw, p[0], std::slice::from_ref(&m), 1)[0].0,
            vec![p[1], p[2], p[3]]
        );
        let frags = fragment6(&m, u32::from(ty), &[32, 64], false);
        let r = run(&mut sw, p[0], &frags, 1);
        assert!(reached_nobody(&r), "{r:?}");
        assert!(r.iter().all(|(_, d)| *d == Some(DropReason::FragmentGuard)));
        let atomic = fragment6(&m, 99, &[], false);
        assert_eq!(atomic.len(), 1);
        assert_eq!(
            run(&mut sw, p[0], &atomic, 1)[0].1,
            Some(DropReason::FragmentGuard)
        );
    }
}

#[test]
fn later_fragments_before_their_first_are_dropped_on_guarded_ports() {
    let (mut sw, p) = switch();
    // A guarded offer sent backwards: nothing gets through.
    let mut frags = fragment4(&offer(), 1, &every(8, 8, 308));
    frags.reverse();
    assert!(reached_nobody(&run(&mut sw, p[0], &frags, 1)));
    // Ordinary UDP: a later fragment whose first was not seen is dropped; once the first
    // passed, the rest of the datagram passes.
    let dgram = udp4(VM, BCAST, VM4, PEER4, (5000, 6000), &[0x55; 400]);
    let frags = fragment4(&dgram, 2, &[200, 400]);
    let r = run(&mut sw, p[0], &[frags[1].clone()], 1);
    assert_eq!(r[0].1, Some(DropReason::FragmentGuard));
    let r = run(&mut sw, p[0], &[frags[0].clone(), frags[2].clone()], 1);
    assert!(
        r.iter().all(|(ports, _)| ports == &[p[1], p[2], p[3]]),
        "{r:?}"
    );
}

#[test]
fn ordinary_fragments_pass() {
    let (mut sw, p) = switch();
    let dgram = udp4(VM, BCAST, VM4, PEER4, (5000, 6000), &[0x55; 1000]);
    let ping = icmp4(VM, BCAST, VM4, PEER4, 8, &[0x55; 1000]);
    let ping6 = icmp6(VM, ALL_NODES_MAC, vm6(), all_nodes(), 128, &[0x55; 1000]);
    let udp6_ = udp6(
        VM,
        ALL_NODES_MAC,
        vm6(),
        all_nodes(),
        (5000, 6000),
        &[0x55; 1000],
    );
    let tcp = {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(VM, BCAST)
            .ipv4(VM4, PEER4, 64)
            .tcp(1, 2, 3, 4)
            .write(&mut f, &[0x55; 1000])
            .unwrap();
        f
    };
    // From the guarded port, in order.
    let mut all = Vec::new();
    all.extend(fragment4(&dgram, 1, &[504, 1000]));
    all.extend(fragment4(&ping, 2, &[504]));
    all.extend(fragment6(&ping6, 3, &[504], false));
    all.extend(fragment6(&udp6_, 4, &[504], true));
    all.extend(fragment6(&with_dstopts(&udp6_), 5, &[504], false));
    let r = run(&mut sw, p[0], &all, 1);
    assert!(
        r.iter().all(|(ports, _)| ports == &[p[1], p[2], p[3]]),
        "{r:?}"
    );
    // TCP is not inspected by any guard: its fragments pass in any order.
    let mut frags = fragment4(&tcp, 6, &[504]);
    frags.reverse();
    let r = run(&mut sw, p[0], &frags, 1);
    assert!(
        r.iter().all(|(ports, _)| ports == &[p[1], p[2], p[3]]),
        "{r:?}"
    );
    // Between unguarded ports (uplink to the server guest), in any order.
    let up = udp4(
        [2, 0, 0, 0, 0, 9],
        BCAST,
        PEER4,
        VM4,
        (5000, 6000),
        &[0x55; 1000],
    );
    let mut frags = fragment4(&up, 7, &[504]);
    frags.reverse();
    let r = run(&mut sw, p[2], &frags, 1);
    assert!(
        r.iter().all(|(ports, _)| ports == &[p[0], p[1], p[3]]),
        "{r:?}"
    );
    assert_eq!(sw.drops(p[0], DropReason::FragmentGuard), 0);
}

#[test]
fn tiny_first_fragments_are_dropped() {
    let (mut sw, p) = switch();
    // A DISCOVER split right after the UDP header: the op the guard reads is not in the
    // first fragment. Split later, it passes.
    let discover = udp4(VM, BCAST, [0; 4], [255; 4], (68, 67), &bootp(1, 1, 300));
    let r = run(&mut sw, p[0], &fragment4(&discover, 1, &[8, 64]), 1);
    assert!(reached_nobody(&r), "{r:?}");
    let r = run(&mut sw, p[0], &fragment4(&discover, 2, &[64]), 1);
    assert!(
        r.iter().all(|(ports, _)| ports == &[p[1], p[2], p[3]]),
        "{r:?}"
    );
    // A first fragment with no data, padded to the Ethernet minimum with bytes that look
    // like an ICMP echo: the padding is not the packet.
    let redirect = icmp4(VM, BCAST, VM4, PEER4, 5, &[0; 64]);
    let mut first = ipv4_piece(&redirect, 3, 0, 0, true);
    first.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    first.resize(60, 0);
    let rest = ipv4_piece(&redirect, 3, 8, 72, false);
    let r = run(&mut sw, p[0], &[first, rest], 1);
    assert!(reached_nobody(&r), "{r:?}");
    assert_eq!(sw.drops(p[0], DropReason::FragmentGuard), 5);
}

#[test]
fn a_later_fragment_rewriting_the_judged_headers_is_dropped() {
    let (mut sw, p) = switch();
    // A DISCOVER's first fragment passes; a fragment at offset 8 would replace its op with
    // BOOTREPLY at a receiver that keeps the later copy of overlapping data.
    let discover = udp4(VM, BCAST, [0; 4], [255; 4], (68, 67), &bootp(1, 1, 300));
    let reply = udp4(VM, BCAST, [0; 4], [255; 4], (68, 67), &bootp(2, 5, 300));
    let first = ipv4_piece(&discover, 1, 0, 64, true);
    let overlap = ipv4_piece(&reply, 1, 8, 128, true);
    let last = ipv4_piece(&discover, 1, 128, 308, false);
    let r = run(&mut sw, p[0], &[first, overlap, last], 1);
    assert_eq!(r[0].0, vec![p[1], p[2], p[3]]);
    assert_eq!(r[1].1, Some(DropReason::FragmentGuard));
    assert_eq!(
        r[2].1,
        Some(DropReason::FragmentGuard),
        "the datagram is now blocked"
    );
    // A second, harmless-looking first fragment does not reopen a blocked datagram.
    let frags = fragment4(&offer(), 2, &[64, 128]);
    let request = udp4(VM, BCAST, VM4, [255; 4], (68, 67), &bootp(1, 3, 300));
    let decoy = ipv4_piece(&request, 2, 0, 64, true);
    let r = run(
        &mut sw,
        p[0],
        &[frags[0].clone(), decoy, frags[1].clone()],
        1,
    );
    assert!(reached_nobody(&r), "{r:?}");
}

#[test]
fn fragment_state_is_bounded_and_ages_out() {
    let (mut sw, p) = switch();
    let dgram = udp4(VM, BCAST, VM4, PEER4, (5000, 6000), &[0x55; 400]);
    let offer_frags = fragment4(&offer(), 0, &[8, 64, 128]);
    // The offer's first fragment is blocked, then a flood of first fragments with distinct
    // ids evicts its entry: its later fragments are still dropped (unseen datagram).
    assert!(reached_nobody(&run(&mut sw, p[0], &offer_frags[..1], 1)));
    let n = 20 * FRAGMENT_CAPACITY as u16;
    for id in 1..=n {
        let f = fragment4(&dgram, id, &[200]);
        assert_eq!(run(&mut sw, p[0], &f[..1], 2)[0].0.len(), 3);
    }
    assert!(reached_nobody(&run(&mut sw, p[0], &offer_frags[1..], 3)));
    // Only the newest datagrams are remembered: the oldest lost their verdict.
    let tail = |id| fragment4(&dgram, id, &[200]).pop().unwrap();
    assert_eq!(run(&mut sw, p[0], &[tail(n)], 4)[0].0.len(), 3);
    assert_eq!(
        run(&mut sw, p[0], &[tail(1)], 4)[0].1,
        Some(DropReason::FragmentGuard)
    );
    // Verdicts expire: a fragment arriving after the timeout is unseen.
    let late = 4 + FRAGMENT_TIMEOUT_NS + 1;
    assert_eq!(
        run(&mut sw, p[0], &[tail(n - 1)], late)[0].1,
        Some(DropReason::FragmentGuard)
    );
}
