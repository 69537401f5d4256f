//! A VM that moved, seen by a host nobody told (the pure pipeline; three switches whose
//! uplinks are wired by this test): VM X moves from host A to host B while host C still
//! has X at A. C's first packet goes to A, A relays it to B (once: marked) and redirects C;
//! C's next packets go to B directly. Forged redirects change nothing, a relayed packet is
//! never relayed again, and the relay ends after its expiry. Both encapsulations.

use vireo_vswitch::frame::{parse, Mac};
use vireo_vswitch::overlay::redirect::{self, Redirect};
use vireo_vswitch::overlay::relay::RelayCounters;
use vireo_vswitch::*;

use crate::common;
use common::*;

const PA: [&str; 4] = [
    "192.168.60.1",
    "192.168.60.2",
    "192.168.60.3",
    "192.168.60.4",
];
const PMAC: [Mac; 4] = [
    [2, 0xaa, 0, 0, 0, 1],
    [2, 0xbb, 0, 0, 0, 1],
    [2, 0xcc, 0, 0, 0, 1],
    [2, 0xdd, 0, 0, 0, 1],
];
/// The VM that moves, and the VM on C that keeps talking to it.
const X: Mac = [2, 0, 0, 0, 0, 7];
const P: Mac = [2, 0, 0, 0, 0, 3];
const IP_X: [u8; 4] = [10, 0, 0, 7];
const IP_P: [u8; 4] = [10, 0, 0, 3];
const VSID: u32 = 100;
const SEC: u64 = 1_000_000_000;
const EXPIRY_SECS: u64 = 60;

fn entry(ca: [u8; 4], mac: Mac, pa: usize) -> PolicyEntry {
    PolicyEntry {
        routing_domain: "red".into(),
        ca: std::net::IpAddr::from(ca),
        mac: MacAddr(mac),
        vsid: VSID,
        pa: PA[pa].parse().unwrap(),
    }
}

/// Host `h` (0 = A, 1 = B, 2 = C): every other host's provider MAC configured, so nothing
/// waits for ARP.
fn host(h: usize, encap: &str, policies: Vec<PolicyEntry>) -> (Switch, PortId) {
    let neighbors: Vec<String> = (0..4)
        .filter(|i| *i != h)
        .map(|i| format!(r#"{{"ip":"{}","mac":"{}"}}"#, PA[i], MacAddr(PMAC[i])))
        .collect();
    let j = format!(
        r#"{{"provider_addresses":["{}"],"provider_mac":"{}","provider_neighbors":[{}],
        "relay_expiry_secs":{EXPIRY_SECS},
        "routing_domains":[{{"name":"red","encap":"{encap}","subnets":[
            {{"vsid":{VSID},"prefixes":["10.0.0.0/24"]}},{{"vsid":101,"prefixes":["10.0.1.0/24"]}}]}}]}}"#,
        PA[h],
        MacAddr(PMAC[h]),
        neighbors.join(",")
    );
    let mut o: OverlayConfig = serde_json::from_str(&j).unwrap();
    o.policies = policies;
    let mut c = SwitchConfig::private(&format!("h{h}"));
    c.overlay = Some(o);
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    (sw, up)
}

fn vm_port(mac: Mac, ca: [u8; 4]) -> PortConfig {
    PortConfig {
        overlay: Some(PortOverlay {
            routing_domain: "red".into(),
            vsid: VSID,
            mac: MacAddr(mac),
            cas: vec![std::net::IpAddr::from(ca)],
        }),
        ..PortConfig::access("vm", 1)
    }
}

/// Frames out of one `process` at `now`: (port, bytes), and the drop reason.
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

fn ping() -> Vec<u8> {
    udp4(P, X, IP_P, IP_X, 5000, 7, b"stale")
}

/// The outer IPv4 destination of a tunnel packet.
fn outer_dst(f: &[u8]) -> [u8; 4] {
    f[30..34].try_into().unwrap()
}

fn pa_bytes(h: usize) -> [u8; 4] {
    match PA[h].parse::<std::net::IpAddr>().unwrap() {
        std::net::IpAddr::V4(a) => a.octets(),
        _ => unreachable!(),
    }
}

struct World {
    a: (Switch, PortId),
    b: (Switch, PortId),
    c: (Switch, PortId),
    p: PortId,
    bx: PortId,
}

/// X ran on A and now runs on B; A was told (it points X at B), C was not.
fn moved(encap: &str) -> World {
    let mut a = host(0, encap, vec![entry(IP_P, P, 2)]);
    let ax = a.0.add_port(vm_port(X, IP_X)).unwrap();
    // B had talked to X while it ran on A: that entry is where B learns X's previous host.
    let mut b = host(1, encap, vec![entry(IP_P, P, 2), entry(IP_X, X, 0)]);
    let mut c = host(2, encap, vec![entry(IP_X, X, 0)]);
    let p = c.0.add_port(vm_port(P, IP_P)).unwrap();
    // Traffic before the move gives A's switch a clock.
    let (out, _) = run(&mut c.0, p, &ping(), SEC);
    assert_eq!(outer_dst(&out[0].1), pa_bytes(0));
    let (out, d) = run(&mut a.0, a.1, &out[0].1, SEC);
    assert_eq!((out[0].0, d), (ax, None), "before the move X is on A");
    // The move: X's port on B, gone from A, A's entry at B.
    let bx = b.0.add_port(vm_port(X, IP_X)).unwrap();
    a.0.remove_port(ax).unwrap();
    a.0.set_policy(&entry(IP_X, X, 1)).unwrap();
    World { a, b, c, p, bx }
}

fn x_on_c(w: &World) -> PolicyEntry {
    let ca = std::net::IpAddr::from(IP_X);
    w.c.0
        .overlay()
        .unwrap()
        .policies()
        .into_iter()
        .find(|(e, _)| e.ca == ca)
        .unwrap()
        .0
}

#[test]
fn a_stale_sender_is_relayed_once_then_redirected_to_the_new_host() {
    for encap in ["vxlan", "nvgre"] {
        let mut w = moved(encap);
        let t = 2 * SEC;
        // C's first packet after the move still goes to A...
        let (out, _) = run(&mut w.c.0, w.p, &ping(), t);
        assert_eq!(outer_dst(&out[0].1), pa_bytes(0), "{encap}");
        // ...which relays it to B (marked: B must never relay it on) and redirects C.
        let (out, d) = run(&mut w.a.0, w.a.1, &out[0].1, t);
        assert_eq!(d, None, "{encap}");
        let [(to, relayed)] = &out[..] else {
            panic!("{encap}: {out:?}")
        };
        assert_eq!((*to, outer_dst(relayed)), (w.a.1, pa_bytes(1)), "{encap}");
        let (up, redirects) = w.a.0.take_overlay_frames().expect("a redirect for C");
        assert_eq!((up, redirects.len()), (w.a.1, 1), "{encap}");
        assert_eq!(outer_dst(&redirects[0]), pa_bytes(2), "{encap}");
        assert_eq!(
            w.a.0.relay_counters(),
            RelayCounters {
                relayed: 1,
                redirects_sent: 1,
                ..Default::default()
            },
            "{encap}"
        );
        // B delivers the relayed packet to X: C's VM lost nothing.
        let (out, d) = run(&mut w.b.0, w.b.1, relayed, t);
        assert_eq!((out.len(), d), (1, None), "{encap}: {out:?}");
        assert_eq!(out[0].0, w.bx, "{encap}");
        assert_eq!(parse(&out[0].1).unwrap().src, P, "{encap}");
        // C takes the redirect: X is at B now.
        let (out, d) = run(&mut w.c.0, w.c.1, &redirects[0], t);
        assert_eq!((out.len(), d), (0, None), "{encap}");
        assert_eq!(x_on_c(&w).pa, PA[1].parse::<std::net::IpAddr>().unwrap());
        assert_eq!(w.c.0.relay_counters().redirects_accepted, 1, "{encap}");
        // C's later packets go to B directly, and B takes them (C is where P is).
        for i in 0..3 {
            let (out, _) = run(&mut w.c.0, w.p, &ping(), t + i);
            assert_eq!(outer_dst(&out[0].1), pa_bytes(1), "{encap}");
            let (out, d) = run(&mut w.b.0, w.b.1, &out[0].1, t + i);
            assert_eq!((out[0].0, d), (w.bx, None), "{encap}");
        }
        assert_eq!(w.a.0.relay_counters().relayed, 1, "{encap}: A relayed more");
    }
}

/// A redirect's tunnel packet as `from` would send it to C in `vsid`.
fn forged(w: &World, from: usize, vsid: u32, r: &Redirect, encap: Encap) -> Vec<u8> {
    // The gateway MAC the overlay uses for subnets without one configured.
    let gw = [
        2,
        0xff,
        (vsid >> 16) as u8,
        (vsid >> 8) as u8,
        vsid as u8,
        1,
    ];
    let mut f = redirect::build(gw, r);
    vireo_vswitch::overlay::encap::encapsulate(
        &mut f,
        encap,
        vsid,
        0,
        &vireo_vswitch::overlay::encap::Outer {
            src_mac: PMAC[from],
            dst_mac: PMAC[2],
            src_ip: PA[from].parse().unwrap(),
            dst_ip: PA[2].parse().unwrap(),
        },
    );
    let _ = w;
    f
}

#[test]
fn forged_redirects_change_nothing() {
    let mut w = moved("vxlan");
    let to = |h: usize| Redirect {
        ca: std::net::IpAddr::from(IP_X),
        mac: X,
        pa: PA[h].parse().unwrap(),
    };
    let cases = [
        // A host that is not where C's entry points, pulling X towards itself.
        (
            "from another host",
            forged(&w, 3, VSID, &to(3), Encap::Vxlan),
        ),
        // The right host, but in another virtual subnet.
        ("wrong VSID", forged(&w, 0, 101, &to(1), Encap::Vxlan)),
        // Another MAC for X's CA.
        (
            "wrong MAC",
            forged(
                &w,
                0,
                VSID,
                &Redirect {
                    mac: [2, 0, 0, 0, 0, 9],
                    ..to(1)
                },
                Encap::Vxlan,
            ),
        ),
        // P is C's own VM: nobody redirects it.
        (
            "a local CA",
            forged(
                &w,
                0,
                VSID,
                &Redirect {
                    ca: std::net::IpAddr::from(IP_P),
                    mac: P,
                    pa: PA[1].parse().unwrap(),
                },
                Encap::Vxlan,
            ),
        ),
        // The wrong encapsulation for the routing domain.
        (
            "NVGRE on a VXLAN domain",
            forged(&w, 0, VSID, &to(1), Encap::Nvgre),
        ),
    ];
    for (what, f) in &cases {
        let (out, d) = run(&mut w.c.0, w.c.1, f, 2 * SEC);
        assert!(out.is_empty(), "{what}: {out:?}");
        assert!(
            matches!(
                d,
                Some(DropReason::OverlaySpoof | DropReason::OverlayMalformed)
            ),
            "{what}: {d:?}"
        );
        assert_eq!(
            x_on_c(&w).pa,
            PA[0].parse::<std::net::IpAddr>().unwrap(),
            "{what}"
        );
    }
    assert_eq!(w.c.0.relay_counters().redirects_accepted, 0);
    assert_eq!(w.c.0.relay_counters().redirects_refused, 4);
    // A VM cannot send one either: its frames must carry its own MAC, and the EtherType
    // is not an overlay protocol it may use.
    let mut from_vm = redirect::build(P, &to(1));
    from_vm[0..6].copy_from_slice(&X);
    let (out, _) = run(&mut w.c.0, w.p, &from_vm, 2 * SEC);
    assert!(out.iter().all(|(p, _)| *p != w.c.1), "{out:?}");
}

#[test]
fn a_relayed_packet_is_never_relayed_again() {
    let mut w = moved("vxlan");
    // X moves on from B to a fourth host D; B points X at D. A, which missed that, still
    // points at B.
    let bx = w.bx;
    w.b.0.remove_port(bx).unwrap();
    w.b.0.set_policy(&entry(IP_X, X, 3)).unwrap();
    let (out, _) = run(&mut w.c.0, w.p, &ping(), 2 * SEC);
    let (out, _) = run(&mut w.a.0, w.a.1, &out[0].1, 2 * SEC);
    assert_eq!(outer_dst(&out[0].1), pa_bytes(1));
    // B drops the relayed packet (counted) rather than sending it on to D.
    let (out, d) = run(&mut w.b.0, w.b.1, &out[0].1, 2 * SEC);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(d, Some(DropReason::OverlayUnknown));
    assert_eq!(w.b.0.relay_counters().chain_dropped, 1);
    assert_eq!(w.b.0.relay_counters().relayed, 0);
    assert!(w.b.0.take_overlay_frames().is_none());
}

#[test]
fn a_relayed_packet_from_a_host_x_never_left_is_refused() {
    let mut w = moved("vxlan");
    // D claims to relay for X (it never hosted X): B refuses.
    let mut f = udp4(P, X, IP_P, IP_X, 5000, 7, b"stale");
    vireo_vswitch::overlay::encap::encapsulate(
        &mut f,
        Encap::Vxlan,
        VSID,
        1,
        &vireo_vswitch::overlay::encap::Outer {
            src_mac: PMAC[3],
            dst_mac: PMAC[1],
            src_ip: PA[3].parse().unwrap(),
            dst_ip: PA[1].parse().unwrap(),
        },
    );
    vireo_vswitch::overlay::encap::mark_relayed(&mut f, Encap::Vxlan);
    let (out, d) = run(&mut w.b.0, w.b.1, &f, 2 * SEC);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(d, Some(DropReason::OverlaySpoof));
}

#[test]
fn the_relay_ends_after_its_expiry() {
    let mut w = moved("vxlan");
    let stale = run(&mut w.c.0, w.p, &ping(), 2 * SEC).0[0].1.clone();
    // Within the expiry of the last relay: relayed (each relay keeps it open).
    for t in [2, 2 + EXPIRY_SECS, 2 + 2 * EXPIRY_SECS] {
        let (out, d) = run(&mut w.a.0, w.a.1, &stale, t * SEC);
        assert_eq!((out.len(), d), (1, None), "at {t} s");
    }
    // Idle for longer than the expiry: dropped and counted, nothing sent, no redirect.
    let _ = w.a.0.take_overlay_frames();
    let t = (3 + 3 * EXPIRY_SECS) * SEC;
    let (out, d) = run(&mut w.a.0, w.a.1, &stale, t);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(d, Some(DropReason::OverlayUnknown));
    assert!(w.a.0.take_overlay_frames().is_none());
    let c = w.a.0.relay_counters();
    assert_eq!((c.relayed, c.relay_expired), (3, 1));
}
