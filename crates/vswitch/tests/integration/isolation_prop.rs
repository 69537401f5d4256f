//! Property tests: (1) for random port configurations and random frames, no frame ever reaches
//! a port the VLAN/PVLAN rules forbid, checked against an independent oracle; (2) arbitrary
//! bytes through the parser and the full pipeline never panic.

use crate::common;

use proptest::prelude::*;
use vireo_vswitch::*;

const PRIMARY: u16 = 100;
const ISOLATED: u16 = 101;
const COMMUNITIES: [u16; 2] = [102, 103];
const PLAIN: [u16; 3] = [1, 2, 3];
const ALL: [u16; 7] = [1, 2, 3, 100, 101, 102, 103];

fn port_cfg() -> impl Strategy<Value = VlanConfig> {
    prop_oneof![
        prop::sample::select(PLAIN.to_vec()).prop_map(|vid| VlanConfig::Access { vid }),
        (
            prop::sample::subsequence(ALL.to_vec(), 0..=7),
            prop::option::of(prop::sample::select(PLAIN.to_vec()))
        )
            .prop_map(|(allowed, native)| VlanConfig::Trunk { allowed, native }),
        Just(VlanConfig::Private {
            primary: PRIMARY,
            secondary: ISOLATED,
            mode: PvlanMode::Isolated
        }),
        prop::sample::select(COMMUNITIES.to_vec()).prop_map(|c| VlanConfig::Private {
            primary: PRIMARY,
            secondary: c,
            mode: PvlanMode::Community
        }),
        Just(VlanConfig::Private {
            primary: PRIMARY,
            secondary: 0,
            mode: PvlanMode::Promiscuous
        }),
    ]
}

/// The VLAN a frame entering a port belongs to, per the rules as written in the issue.
fn oracle_ingress(cfg: &VlanConfig, tag: Option<u16>, double: bool) -> Option<u16> {
    let untagged = tag.is_none_or(|t| t == 0);
    match cfg {
        VlanConfig::Access { vid } => (!double && untagged).then_some(*vid),
        VlanConfig::Private {
            secondary, mode, ..
        } => (!double && untagged).then_some(match mode {
            PvlanMode::Promiscuous => PRIMARY,
            _ => *secondary,
        }),
        VlanConfig::Trunk { allowed, native } => match tag {
            None | Some(0) => *native,
            Some(t) => allowed.contains(&t).then_some(t),
        },
    }
}

/// May a frame of internal VLAN `v` leave through a port configured `cfg`?
fn oracle_may_receive(cfg: &VlanConfig, v: u16) -> bool {
    match cfg {
        VlanConfig::Access { vid } => *vid == v,
        VlanConfig::Trunk { allowed, native } => allowed.contains(&v) || *native == Some(v),
        // isolated ↔ promiscuous only; community ↔ same community and promiscuous.
        VlanConfig::Private {
            mode: PvlanMode::Isolated,
            ..
        } => v == PRIMARY,
        VlanConfig::Private {
            mode: PvlanMode::Community,
            secondary,
            ..
        } => v == PRIMARY || v == *secondary,
        VlanConfig::Private {
            mode: PvlanMode::Promiscuous,
            ..
        } => v == PRIMARY || v == ISOLATED || COMMUNITIES.contains(&v),
    }
}

#[derive(Debug, Clone)]
struct TestFrame {
    port: usize,
    src: u8,
    dst: Option<u8>,
    tag: Option<u16>,
    double: bool,
}

fn test_frame(nports: usize) -> impl Strategy<Value = TestFrame> {
    (
        0..nports,
        1u8..8,
        prop::option::of(1u8..8),
        prop::option::of(prop::sample::select(vec![
            0u16, 1, 2, 3, 4, 100, 101, 102, 103,
        ])),
        any::<bool>(),
    )
        .prop_map(|(port, src, dst, tag, double)| TestFrame {
            port,
            src,
            dst,
            tag,
            double,
        })
}

fn build(f: &TestFrame) -> Vec<u8> {
    let dst = f.dst.map_or(common::BCAST, common::mac);
    let src = common::mac(f.src);
    match (f.tag, f.double) {
        (Some(t), true) => common::double_tagged(src, dst, t, 7),
        (Some(t), false) => common::tagged_udp4(src, dst, t),
        (None, _) => common::plain(src, dst),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_frame_reaches_a_forbidden_port(
        cfgs in prop::collection::vec(port_cfg(), 2..8),
        frames in prop::collection::vec(test_frame(8), 1..60),
    ) {
        let mut sc = SwitchConfig::private("p");
        sc.pvlan_domains = vec![PvlanDomain { primary: PRIMARY, isolated: Some(ISOLATED), communities: COMMUNITIES.to_vec() }];
        let mut sw = Switch::new(sc).unwrap();
        let ids: Vec<PortId> = cfgs
            .iter()
            .enumerate()
            .map(|(i, v)| sw.add_port(PortConfig { vlan: v.clone(), ..PortConfig::access(&format!("p{i}"), 1) }).unwrap())
            .collect();
        let mut d = Delivery::default();
        for f in frames.iter().filter(|f| f.port < cfgs.len()) {
            let mut bytes = build(f);
            let orig = bytes.clone();
            sw.process(ids[f.port], &mut bytes, 1, &mut d);
            let expect_vid = oracle_ingress(&cfgs[f.port], f.tag, f.double && f.tag.is_some());
            match expect_vid {
                None => prop_assert!(d.egress.is_empty(), "frame {f:?} should be dropped at ingress, went to {:?}", d.egress),
                Some(v) => {
                    for e in &d.egress {
                        let q = ids.iter().position(|id| *id == e.port).unwrap();
                        prop_assert_ne!(q, f.port, "hairpin");
                        prop_assert!(oracle_may_receive(&cfgs[q], v), "VLAN {} reached forbidden port {} ({:?}) from {:?}", v, q, cfgs[q], cfgs[f.port]);
                        // What leaves carries the right tag for the port.
                        let mut buf = Vec::new();
                        let out = render(&orig, e.tag, &mut buf);
                        let s = frame::parse(out).unwrap();
                        let untagged_expected = !matches!(&cfgs[q], VlanConfig::Trunk { native, .. } if *native != Some(v));
                        // The switch's own (outer) tag is removed or set; an inner QinQ tag that a
                        // trunk carried in stays payload.
                        let orig_tags = frame::parse(&orig).unwrap().tags;
                        if untagged_expected {
                            prop_assert_eq!(s.tags, orig_tags.saturating_sub(1));
                        } else {
                            prop_assert_eq!((s.tags.max(1), s.vid), (orig_tags.max(1), v));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic_parser_or_pipeline(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..40)) {
        let mut sw = all_policies_switch();
        let ids = sw.ports().to_vec();
        let mut d = Delivery::default();
        for (i, f) in frames.into_iter().enumerate() {
            let _ = frame::parse(&f);
            let mut f = f;
            sw.process(ids[i % ids.len()], &mut f, i as u64 * 1000, &mut d);
            let mut buf = Vec::new();
            for e in d.egress.clone() {
                let _ = render(&f, e.tag, &mut buf);
            }
        }
    }
}

fn all_policies_switch() -> Switch {
    let mut sc = SwitchConfig::private("fuzz");
    sc.pvlan_domains = vec![PvlanDomain {
        primary: PRIMARY,
        isolated: Some(ISOLATED),
        communities: COMMUNITIES.to_vec(),
    }];
    let mut sw = Switch::new(sc).unwrap();
    let mut a = PortConfig {
        vlan: VlanConfig::Private {
            primary: PRIMARY,
            secondary: ISOLATED,
            mode: PvlanMode::Isolated,
        },
        ..PortConfig::access("a", 1)
    };
    a.macs = vec![MacAddr(common::mac(1))];
    a.guard.arp_nd_guard = true;
    a.storm_limit_pps = Some(100);
    a.mac_limit = Some(4);
    a.qos.max_ingress = Some(RateLimit {
        bits_per_sec: 1_000_000,
        burst_bytes: 5000,
    });
    a.mirror = MirrorRole::Source(Direction::Both);
    a.acls = vec![AclRule {
        name: "r".into(),
        priority: 1,
        direction: Direction::Both,
        action: AclAction::Allow,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: Some("10.0.0.0/8".parse().unwrap()),
        protocol: Some(6),
        local_ports: None,
        remote_ports: Some(PortRange {
            first: 1,
            last: 100,
        }),
        stateful: true,
    }];
    sw.add_port(a).unwrap();
    sw.add_port(PortConfig {
        vlan: VlanConfig::Private {
            primary: PRIMARY,
            secondary: 0,
            mode: PvlanMode::Promiscuous,
        },
        ..PortConfig::access("b", 1)
    })
    .unwrap();
    sw.add_port(PortConfig {
        vlan: VlanConfig::Trunk {
            allowed: ALL.to_vec(),
            native: Some(1),
        },
        ..PortConfig::access("t", 1)
    })
    .unwrap();
    sw.add_port(PortConfig {
        mirror: MirrorRole::Destination,
        ..PortConfig::access("m", 2)
    })
    .unwrap();
    sw
}
