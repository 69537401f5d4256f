//! Mirroring on overlay switches (the pure pipeline, two hosts wired by this test): an
//! uplink mirrored `outer` shows the tunnel packets as they are on the provider wire (VXLAN
//! or NVGRE header with the subnet's VSID), one mirrored `inner` the customer frames in
//! them; in both directions. A VM port of a virtual subnet mirrors its customer frames.

use vireo_vswitch::frame::Mac;
use vireo_vswitch::*;

use crate::common;
use common::*;

const PA: [&str; 2] = ["192.168.70.1", "192.168.70.2"];
const PMAC: [Mac; 2] = [[2, 0xaa, 0, 0, 0, 5], [2, 0xbb, 0, 0, 0, 5]];
const VM: [Mac; 2] = [[2, 0, 0, 0, 5, 1], [2, 0, 0, 0, 5, 2]];
const IP: [[u8; 4]; 2] = [[10, 0, 0, 1], [10, 0, 0, 2]];
const VSID: u32 = 0x01_23_45;

struct Host {
    sw: Switch,
    up: PortId,
    vm: PortId,
    mirror: PortId,
}

/// Host `h`: its VM, the other's in the table, the other's provider MAC known, and a mirror
/// destination port; `up_mirror`/`vm_mirror` say which of uplink and VM port are sources.
fn host(h: usize, encap: &str, up_layer: Option<MirrorLayer>, vm_mirror: bool) -> Host {
    let o = 1 - h;
    let j = format!(
        r#"{{"provider_addresses":["{}"],"provider_mac":"{}",
        "provider_neighbors":[{{"ip":"{}","mac":"{}"}}],
        "routing_domains":[{{"name":"red","encap":"{encap}","subnets":[{{"vsid":{VSID},"prefixes":["10.0.0.0/24"]}}]}}],
        "policies":[{{"routing_domain":"red","ca":"10.0.0.{}","mac":"{}","vsid":{VSID},"pa":"{}"}}]}}"#,
        PA[h],
        MacAddr(PMAC[h]),
        PA[o],
        MacAddr(PMAC[o]),
        o + 1,
        MacAddr(VM[o]),
        PA[o]
    );
    let mut c = SwitchConfig::private(&format!("m{h}"));
    c.overlay = Some(serde_json::from_str(&j).unwrap());
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            mirror: up_layer
                .map(|_| MirrorRole::Source(Direction::Both))
                .unwrap_or_default(),
            mirror_overlay: up_layer.unwrap_or_default(),
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    let vm = sw
        .add_port(PortConfig {
            overlay: Some(PortOverlay {
                routing_domain: "red".into(),
                vsid: VSID,
                mac: MacAddr(VM[h]),
                cas: vec![std::net::IpAddr::from(IP[h])],
            }),
            mirror: if vm_mirror {
                MirrorRole::Source(Direction::Both)
            } else {
                MirrorRole::None
            },
            ..PortConfig::access("vm", 1)
        })
        .unwrap();
    let mirror = sw
        .add_port(PortConfig {
            mirror: MirrorRole::Destination,
            ..PortConfig::access("mirror", 1)
        })
        .unwrap();
    Host { sw, up, vm, mirror }
}

/// (normal copies with their ports, mirror copies) of one frame, as bytes.
type Copies = (Vec<(PortId, Vec<u8>)>, Vec<Vec<u8>>);

fn run(sw: &mut Switch, port: PortId, frame: &[u8]) -> Copies {
    let mut f = frame.to_vec();
    let mut d = Delivery::default();
    sw.process(port, &mut f, 1_000_000, &mut d);
    let mut buf = Vec::new();
    let mut normal = Vec::new();
    let mut mirrored = Vec::new();
    for e in &d.egress {
        let bytes = render(d.bytes(&f, e), e.tag, &mut buf).to_vec();
        if e.mirror {
            mirrored.push(bytes);
        } else {
            normal.push((e.port, bytes));
        }
    }
    (normal, mirrored)
}

/// The VSID in a tunnel packet's VXLAN or NVGRE header (outer IPv4).
fn vsid_on_wire(f: &[u8], encap: &str) -> u32 {
    assert_eq!(&f[12..14], &[0x08, 0x00], "outer IPv4");
    match encap {
        "vxlan" => {
            assert_eq!(f[23], 17, "UDP");
            assert_eq!(u16::from_be_bytes([f[36], f[37]]), 4789, "VXLAN port");
            assert_eq!(f[42] & 0x08, 0x08, "VXLAN I flag");
            u32::from_be_bytes([0, f[46], f[47], f[48]])
        }
        _ => {
            assert_eq!(f[23], 47, "GRE");
            assert_eq!(u16::from_be_bytes([f[36], f[37]]), 0x6558, "NVGRE protocol");
            u32::from_be_bytes([0, f[38], f[39], f[40]])
        }
    }
}

fn customer() -> Vec<u8> {
    udp4(VM[0], VM[1], IP[0], IP[1], 4000, 4001, b"mirror me")
}

#[test]
fn an_uplink_mirrors_the_tunnel_packets_or_the_customer_frames_in_them() {
    for encap in ["vxlan", "nvgre"] {
        for layer in [MirrorLayer::Outer, MirrorLayer::Inner] {
            let what = format!("{encap} {layer:?}");
            let mut a = host(0, encap, Some(layer), false);
            let mut b = host(1, encap, Some(layer), false);
            // A encapsulates (egress mirror of its uplink)...
            let sent = customer();
            let (normal, mirrored) = run(&mut a.sw, a.vm, &sent);
            let [(to, tunnel)] = &normal[..] else {
                panic!("{what}: {normal:?}")
            };
            assert_eq!(*to, a.up, "{what}");
            assert_eq!(vsid_on_wire(tunnel, encap), VSID, "{what}");
            let [copy] = &mirrored[..] else {
                panic!("{what}: {} mirror copies", mirrored.len())
            };
            match layer {
                MirrorLayer::Outer => assert_eq!(copy, tunnel, "{what}: A's copy"),
                MirrorLayer::Inner => assert_eq!(&copy[..sent.len()], &sent[..], "{what}"),
            }
            // ...B decapsulates (ingress mirror of its uplink).
            let (normal, mirrored) = run(&mut b.sw, b.up, tunnel);
            let [(to, delivered)] = &normal[..] else {
                panic!("{what}: {normal:?}")
            };
            assert_eq!(*to, b.vm, "{what}");
            let [copy] = &mirrored[..] else {
                panic!("{what}: {} mirror copies", mirrored.len())
            };
            match layer {
                MirrorLayer::Outer => {
                    assert_eq!(copy, tunnel, "{what}: B's copy");
                    assert_eq!(vsid_on_wire(copy, encap), VSID, "{what}");
                }
                MirrorLayer::Inner => assert_eq!(copy, delivered, "{what}: B's copy"),
            }
            // The mirror port's meter counts what it was sent.
            let m = b.sw.status(b.mirror).unwrap().meters.egress;
            assert_eq!((m.packets, m.bytes), (1, copy.len() as u64), "{what}");
        }
    }
}

#[test]
fn provider_only_frames_have_nothing_to_show_on_an_inner_mirror() {
    let mut b = host(1, "vxlan", Some(MirrorLayer::Inner), false);
    // ARP from A for B's PA: answered, but no customer frame to mirror.
    let mut req = arp(
        etherparse::ArpOperation::REQUEST,
        PMAC[0],
        [192, 168, 70, 1],
        [192, 168, 70, 2],
    );
    req[0..6].copy_from_slice(&[0xff; 6]);
    let (normal, mirrored) = run(&mut b.sw, b.up, &req);
    assert_eq!(normal.len(), 1, "the ARP is answered");
    assert!(mirrored.is_empty(), "{} copies", mirrored.len());
    // Outer shows it (and the answer) as on the wire.
    let mut b = host(1, "vxlan", Some(MirrorLayer::Outer), false);
    let (_, mirrored) = run(&mut b.sw, b.up, &req);
    assert_eq!(mirrored.len(), 2);
    assert_eq!(&mirrored[0][..req.len()], &req[..], "as received (padded)");
}

#[test]
fn a_vm_port_of_a_virtual_subnet_mirrors_its_customer_frames() {
    let mut a = host(0, "vxlan", None, true);
    let sent = customer();
    let (normal, mirrored) = run(&mut a.sw, a.vm, &sent);
    assert_eq!(normal.len(), 1);
    let [copy] = &mirrored[..] else {
        panic!("{} mirror copies", mirrored.len())
    };
    // Not the tunnel packet the frame became.
    assert_eq!(&copy[..sent.len()], &sent[..]);
}
