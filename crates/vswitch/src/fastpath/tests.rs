//! The offload verdict, one disqualifier per test case, and the invalidation contract.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use etherparse::PacketBuilder;

use super::*;
use crate::config::*;
use crate::ext::ethertype_filter::EtherTypeFilter;
use crate::fastpath::checks::L4Match;
use crate::frame::Mac;
use crate::switch::{Delivery, Switch};

const MA: Mac = [2, 0, 0, 0, 0, 0xa];
const MB: Mac = [2, 0, 0, 0, 0, 0xb];

fn tcp4(src: Mac, dst: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(1000, 80, 1, 65535)
        .write(&mut f, &[0; 20])
        .unwrap();
    f
}

fn tcp6(src: Mac, dst: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(1000, 80, 1, 65535)
        .write(&mut f, &[0; 20])
        .unwrap();
    f
}

fn udp4(src: Mac, dst: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(1000, 80)
        .write(&mut f, &[0; 20])
        .unwrap();
    f
}

/// Two ports a (0) and b (1), configured by `cfg`, with both MACs learned.
fn switch_with(cfg: impl FnOnce(&mut SwitchConfig, &mut PortConfig, &mut PortConfig)) -> Switch {
    let mut sc = SwitchConfig::private("t");
    let (mut a, mut b) = (PortConfig::access("a", 1), PortConfig::access("b", 1));
    cfg(&mut sc, &mut a, &mut b);
    sc.ports = vec![a, b];
    let mut sw = Switch::new(sc).unwrap();
    let mut d = Delivery::default();
    // b speaks first so a's frames are known unicast.
    sw.process(PortId(1), &mut udp4(MB, MA), 1, &mut d);
    sw.process(PortId(0), &mut udp4(MA, MB), 1, &mut d);
    sw
}

fn verdict(sw: &mut Switch, ingress: u16, mut frame: Vec<u8>) -> Result<FlowKey, NotOffloadable> {
    let mut d = Delivery::default();
    sw.process(PortId(ingress), &mut frame, 2, &mut d);
    sw.offload_verdict(PortId(ingress), &frame, &d, 2)
}

#[test]
fn plain_tcp_between_access_ports_is_offloadable() {
    let mut sw = switch_with(|_, _, _| {});
    let k = verdict(&mut sw, 0, tcp4(MA, MB)).unwrap();
    assert_eq!(
        k,
        FlowKey {
            ingress: PortId(0),
            egress: PortId(1),
            vid: 1,
            ethertype: 0x0800,
            src: MA,
            dst: MB,
            tag: None,
            action: TagAction::Keep,
            l4: None,
            shape: None,
            tunnel: None,
        }
    );
    let k6 = verdict(&mut sw, 1, tcp6(MB, MA)).unwrap();
    assert_eq!(
        (k6.ingress, k6.egress, k6.ethertype),
        (PortId(1), PortId(0), 0x86dd)
    );
}

#[test]
fn each_disqualifier_refuses() {
    use NotOffloadable as N;
    let mut sw = switch_with(|sc, _, _| sc.fast_path = false);
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::Disabled));

    let mut sw = switch_with(|_, _, _| {});
    sw.register_extension(Box::new(EtherTypeFilter::new("f", &["a"], &[0x88cc])))
        .unwrap();
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::Extensions));

    let mut sw = switch_with(|_, _, _| {});
    assert_eq!(verdict(&mut sw, 0, udp4(MA, MB)), Err(N::NotTcp));
    let mut arp = tcp4(MA, MB);
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert!(verdict(&mut sw, 0, arp).is_err());
    let mut icmp6 = tcp6(MA, MB);
    icmp6[20] = 58;
    assert_eq!(verdict(&mut sw, 0, icmp6), Err(N::NotTcp));
    let mut bcast = tcp4(MA, [0xff; 6]);
    assert_eq!(
        verdict(&mut sw, 0, std::mem::take(&mut bcast)),
        Err(N::NotUnicast)
    );
    // Unknown destination: flooded (here to one port) — never a flow.
    assert_eq!(
        verdict(&mut sw, 0, tcp4(MA, [2, 0, 0, 0, 0, 0xc])),
        Err(N::NotLearned)
    );

    // Two tags, or a priority tag (VID 0): left to user space.
    let mut sw = switch_with(|_, a, _| {
        a.vlan = VlanConfig::Trunk {
            allowed: vec![1],
            native: Some(1),
        }
    });
    for tags in [
        &[0x81, 0x00, 0x00, 0x00][..],
        &[0x81, 0, 0, 1, 0x81, 0, 0, 1][..],
    ] {
        let mut f = tcp4(MA, MB);
        f.splice(12..12, tags.iter().copied());
        let mut d = Delivery::default();
        sw.process(PortId(0), &mut f, 3, &mut d);
        assert!(
            matches!(
                sw.offload_verdict(PortId(0), &f, &d, 3),
                Err(N::Tagged | N::NotOneDestination | N::NotLearned)
            ),
            "{tags:?}"
        );
    }
    let mut sw = switch_with(|_, a, _| a.mirror = MirrorRole::Source(Direction::Both));
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::Mirror));
    let mut sw = switch_with(|_, _, b| b.mirror = MirrorRole::Source(Direction::Egress));
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::Mirror));

    let rate = RateLimit {
        bits_per_sec: 1 << 40,
        burst_bytes: 1 << 30,
    };
    // The sender's ingress policer stays in user space.
    let mut sw = switch_with(|_, a, _| a.qos.max_ingress = Some(rate));
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::Qos));
    let mut sw = switch_with(|_, a, b| {
        b.role = PortRole::Uplink;
        a.qos.min_weight = 3;
    });
    assert_eq!(
        verdict(&mut sw, 0, tcp4(MA, MB)),
        Err(N::Qos),
        "uplink weights"
    );

    let allow = |direction| AclRule {
        name: "r".into(),
        priority: 1,
        direction,
        action: AclAction::Allow,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: None,
        protocol: Some(6),
        local_ports: None,
        remote_ports: None,
        stateful: false,
    };
    // A frame an ACL decides without seeing ports (a later fragment): not a connection.
    let mut sw = switch_with(|_, a, _| a.acls = vec![allow(Direction::Ingress)]);
    let mut frag = tcp4(MA, MB);
    frag[20..22].copy_from_slice(&0x0004u16.to_be_bytes()); // offset 32 bytes, last fragment
    assert_eq!(verdict(&mut sw, 0, frag), Err(N::Acl));
    // Rules that never see a→b traffic do not matter.
    let mut sw = switch_with(|_, a, b| {
        a.acls = vec![allow(Direction::Egress)];
        b.acls = vec![allow(Direction::Ingress)];
    });
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)).unwrap().l4, None);

    // IP source guard on the sender: every frame's source address must be checked.
    let mut sw = switch_with(|_, a, _| {
        a.guard.ip_source_guard = true;
        a.guard.allowed_ipv4 = vec![[10, 0, 0, 1].into()];
    });
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::SourceGuard));
    // On the receiver it does not matter (it guards what b sends).
    let mut sw = switch_with(|_, _, b| {
        b.guard.ip_source_guard = true;
        b.guard.allowed_ipv4 = vec![[10, 0, 0, 1].into()];
    });
    assert!(verdict(&mut sw, 0, tcp4(MA, MB)).is_ok());
    // A configured MTU on either side: the kernel match has no length.
    let mut sw = switch_with(|_, a, _| a.mtu = Some(1500));
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::Mtu));
    let mut sw = switch_with(|_, _, b| b.mtu = Some(1500));
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::Mtu));

    // A dropped frame (spoofed source) is no flow.
    let mut sw = switch_with(|_, a, _| a.macs = vec![MacAddr(MA)]);
    assert_eq!(
        verdict(&mut sw, 0, tcp4([2, 0, 0, 0, 0, 0x5], MB)),
        Err(N::NotOneDestination)
    );
    // Different VLANs: blocked.
    let mut sw = switch_with(|_, _, b| b.vlan = VlanConfig::Access { vid: 2 });
    assert!(verdict(&mut sw, 0, tcp4(MA, MB)).is_err());
}

#[derive(Default)]
struct CountingHook {
    purges: AtomicUsize,
    soon: AtomicUsize,
    give: Mutex<Vec<FlowUse>>,
}

impl OffloadHook for CountingHook {
    fn purge(&self) -> Vec<FlowUse> {
        self.purges.fetch_add(1, Ordering::SeqCst);
        std::mem::take(&mut *self.give.lock().unwrap())
    }
    fn purge_soon(&self) {
        self.soon.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn changes_purge_synchronously_and_fold_final_counters_into_meters() {
    let mut sw = switch_with(|_, _, _| {});
    let hook = Arc::new(CountingHook::default());
    sw.set_offload_hook(Some(hook.clone()));
    let key = verdict(&mut sw, 0, tcp4(MA, MB)).unwrap();
    let g0 = sw.generation();
    let before = sw.status(PortId(1)).unwrap().meters.egress;
    hook.give.lock().unwrap().push(FlowUse {
        key,
        packets: 10,
        bytes: 15_000,
    });
    let mut cfg = sw.status(PortId(0)).unwrap().config;
    cfg.vlan = VlanConfig::Access { vid: 2 };
    sw.set_port_config(PortId(0), cfg).unwrap();
    assert_eq!(hook.purges.load(Ordering::SeqCst), 1);
    assert!(sw.generation() > g0);
    let after = sw.status(PortId(1)).unwrap().meters.egress;
    assert_eq!(after.packets - before.packets, 10);
    assert_eq!(after.bytes - before.bytes, 15_000);
    assert!(sw.status(PortId(0)).unwrap().meters.ingress.bytes >= 15_000);

    let n = hook.purges.load(Ordering::SeqCst);
    sw.register_extension(Box::new(EtherTypeFilter::new("f", &["a"], &[0x88cc])))
        .unwrap();
    sw.unregister_extension("f").unwrap();
    sw.reset_meters();
    let id = sw.add_port(PortConfig::access("c", 1)).unwrap();
    sw.remove_port(id).unwrap();
    assert_eq!(hook.purges.load(Ordering::SeqCst), n + 5);
    assert_eq!(
        sw.status(PortId(1)).unwrap().meters.egress.bytes,
        0,
        "reset"
    );

    // A station moving is seen on the data path: purge soon, not now.
    let mut sw = switch_with(|_, _, _| {});
    let hook = Arc::new(CountingHook::default());
    sw.set_offload_hook(Some(hook.clone()));
    let n = 0;
    let g = sw.generation();
    let mut d = Delivery::default();
    sw.process(PortId(1), &mut udp4(MA, MB), 5, &mut d);
    assert!(sw.generation() > g);
    assert_eq!(hook.soon.load(Ordering::SeqCst), 1);
    assert_eq!(hook.purges.load(Ordering::SeqCst), n);
}

#[test]
fn kernel_traffic_refreshes_the_source_mac_only_where_it_lives() {
    let mut sc = SwitchConfig::private("t");
    sc.mac_aging_secs = 10;
    sc.ports = vec![PortConfig::access("a", 1), PortConfig::access("b", 1)];
    let mut sw = Switch::new(sc).unwrap();
    let mut d = Delivery::default();
    sw.process(PortId(0), &mut udp4(MA, MB), 0, &mut d);
    let key = FlowKey {
        ingress: PortId(0),
        egress: PortId(1),
        vid: 1,
        ethertype: 0x0800,
        src: MA,
        dst: MB,
        tag: None,
        action: TagAction::Keep,
        l4: None,
        shape: None,
        tunnel: None,
    };
    let at = 9_000_000_000;
    sw.account_offloaded(
        &FlowUse {
            key,
            packets: 1,
            bytes: 60,
        },
        Some(at),
    );
    assert_eq!(sw.learned(1, &MA, 15_000_000_000), Some(PortId(0)));
    assert_eq!(sw.status(PortId(0)).unwrap().meters.ingress.packets, 2);
    // One flooded copy of the learning frame plus the kernel's.
    assert_eq!(sw.status(PortId(1)).unwrap().meters.egress.packets, 2);
}

fn trunk(allowed: Vec<u16>) -> VlanConfig {
    VlanConfig::Trunk {
        allowed,
        native: None,
    }
}

fn tagged(mut f: Vec<u8>, vid: u16) -> Vec<u8> {
    f.splice(12..12, [0x81, 0x00, (vid >> 8) as u8, vid as u8]);
    f
}

#[test]
fn vlan_pop_push_and_keep_are_offloaded_with_the_tag_in_the_match() {
    // Trunk in, access out: the kernel matches the tag and pops it.
    let mut sw = switch_with(|_, a, _| a.vlan = trunk(vec![1]));
    let k = verdict(&mut sw, 0, tagged(tcp4(MA, MB), 1)).unwrap();
    assert_eq!((k.tag, k.action, k.vid), (Some(1), TagAction::Pop, 1));
    // The same frame untagged on the trunk belongs to no VLAN there.
    assert!(verdict(&mut sw, 0, tcp4(MA, MB)).is_err());
    // Access in, trunk out: pushed.
    let k = verdict(&mut sw, 1, tcp4(MB, MA)).unwrap();
    assert_eq!((k.tag, k.action), (None, TagAction::Push(1)));
    // Trunk to trunk in the same VLAN: the tag stays and is matched.
    let mut sw = switch_with(|_, a, b| {
        a.vlan = trunk(vec![1, 7]);
        b.vlan = trunk(vec![1, 7]);
    });
    let mut d = Delivery::default();
    sw.process(PortId(1), &mut tagged(udp4(MB, MA), 7), 1, &mut d);
    sw.process(PortId(0), &mut tagged(udp4(MA, MB), 7), 1, &mut d);
    let k = verdict(&mut sw, 0, tagged(tcp4(MA, MB), 7)).unwrap();
    assert_eq!((k.tag, k.action, k.vid), (Some(7), TagAction::Keep, 7));
    // A VLAN the sender is not in: dropped, never a flow.
    assert!(verdict(&mut sw, 0, tagged(tcp4(MA, MB), 9)).is_err());
}

fn acl(direction: Direction, action: AclAction, stateful: bool) -> AclRule {
    AclRule {
        name: "r".into(),
        priority: 1,
        direction,
        action,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: None,
        protocol: Some(6),
        local_ports: None,
        remote_ports: None,
        stateful,
    }
}

#[test]
fn acl_allowed_flows_are_offloaded_as_one_connection_and_denied_ones_never() {
    use NotOffloadable as N;
    for (a_rules, b_rules) in [
        (
            vec![acl(Direction::Ingress, AclAction::Allow, false)],
            vec![],
        ),
        (vec![], vec![acl(Direction::Both, AclAction::Allow, true)]),
    ] {
        let mut sw = switch_with(|_, a, b| {
            a.acls = a_rules.clone();
            b.acls = b_rules.clone();
        });
        let k = verdict(&mut sw, 0, tcp4(MA, MB)).unwrap();
        assert_eq!(
            k.l4,
            Some(L4Match {
                src_ip: u32::from_be_bytes([10, 0, 0, 1]) as u128,
                dst_ip: u32::from_be_bytes([10, 0, 0, 2]) as u128,
                sport: 1000,
                dport: 80
            })
        );
    }
    let mut sw =
        switch_with(|_, a, _| a.acls = vec![acl(Direction::Ingress, AclAction::Allow, false)]);
    let k6 = verdict(&mut sw, 1, tcp6(MB, MA));
    assert_eq!(
        k6.unwrap().l4,
        None,
        "b has no ACL; a's ingress rules do not see b→a"
    );
    let mut sw =
        switch_with(|_, _, b| b.acls = vec![acl(Direction::Egress, AclAction::Allow, false)]);
    let l4 = verdict(&mut sw, 0, tcp6(MA, MB)).unwrap().l4.unwrap();
    assert_eq!(
        (l4.src_ip, l4.dst_ip),
        (
            u128::from_be_bytes([0xfd; 16]),
            u128::from_be_bytes([0xfe; 16])
        )
    );
    // Denied: dropped in user space, so never a kernel flow.
    let mut sw =
        switch_with(|_, a, _| a.acls = vec![acl(Direction::Ingress, AclAction::Deny, false)]);
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)), Err(N::NotOneDestination));
}

#[test]
fn kernel_traffic_of_an_acl_flow_counts_its_rules_and_keeps_a_stateful_connection_open() {
    // a: ingress TCP allowed statefully; egress everything denied but replies.
    let mut sw = switch_with(|_, a, _| {
        let mut deny = acl(Direction::Egress, AclAction::Deny, false);
        deny.protocol = None;
        deny.priority = 10;
        a.acls = vec![acl(Direction::Ingress, AclAction::Allow, true), deny];
    });
    let k = verdict(&mut sw, 0, tcp4(MA, MB)).unwrap();
    let ft = 400_000_000_000u64; // the first frame's connection (302 s) has expired by then
    let reply = || {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MB, MA)
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(80, 1000, 1, 65535)
            .write(&mut f, &[0; 20])
            .unwrap();
        f
    };
    let delivered = |sw: &mut Switch, t| {
        let mut d = Delivery::default();
        sw.process(PortId(1), &mut reply(), t, &mut d);
        d.ports() == vec![PortId(0)]
    };
    let before = sw.status(PortId(0)).unwrap().meters.acl[0].1;
    // The kernel carried the connection's frames at 200 s: it stays open past 400 s.
    sw.account_offloaded(
        &FlowUse {
            key: k,
            packets: 7,
            bytes: 700,
        },
        Some(200_000_000_000),
    );
    let after = sw.status(PortId(0)).unwrap().meters.acl[0].1;
    assert_eq!(after.packets - before.packets, 7);
    assert_eq!(after.bytes - before.bytes, 700);
    assert!(delivered(&mut sw, ft), "kept open by the kernel's traffic");
    // Without it, the reply after expiry is denied: the test above can fail.
    let mut sw = switch_with(|_, a, _| {
        let mut deny = acl(Direction::Egress, AclAction::Deny, false);
        deny.protocol = None;
        deny.priority = 10;
        a.acls = vec![acl(Direction::Ingress, AclAction::Allow, true), deny];
    });
    verdict(&mut sw, 0, tcp4(MA, MB)).unwrap();
    assert!(delivered(&mut sw, 100), "open at first");
    assert!(!delivered(&mut sw, ft), "expired");
}

#[test]
fn the_receivers_egress_limit_becomes_a_shaper_and_other_limits_do_not_matter() {
    let rate = RateLimit {
        bits_per_sec: 8_000_000_000,
        burst_bytes: 100,
    };
    let mut sw = switch_with(|_, _, b| b.qos.max_egress = Some(rate));
    let k = verdict(&mut sw, 0, tcp4(MA, MB)).unwrap();
    assert_eq!(
        k.shape,
        Some(Shape {
            bytes_per_sec: 1_000_000_000,
            burst: 1514
        }),
        "a burst below one frame is raised to one, as in user space"
    );
    // b → a: b's egress limit does not apply; a has none.
    assert_eq!(verdict(&mut sw, 1, tcp4(MB, MA)).unwrap().shape, None);
    // Limits that never see a → b frames: a's egress, b's ingress.
    let mut sw = switch_with(|_, a, b| {
        a.qos.max_egress = Some(rate);
        b.qos.max_ingress = Some(rate);
    });
    assert_eq!(verdict(&mut sw, 0, tcp4(MA, MB)).unwrap().shape, None);
}
