//! Interface ports of a `vireo-switch` process: two network namespaces on veth pairs whose
//! host ends the process binds by name. Pings cross the switch process, its meters count them,
//! and a VLAN change through `SetPort` cuts them while it runs (and restoring it heals them).
//! Needs root, `ip netns` and ping: a recorded skip otherwise, a failure under CI.

use crate::common;

use std::time::Duration;

use common::host::Lab;
use common::*;
use vireo_api::switch::SwitchOp;
use vireo_testkit::{require_all, Need};
use vireo_vswitch::{AclAction, AclRule, Direction, PortConfig, SwitchConfig};

/// ICMP from the port to 10.91.0.2.
fn acl(name: &str, action: AclAction) -> AclRule {
    AclRule {
        name: name.into(),
        priority: 1,
        direction: Direction::Ingress,
        action,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: Some("10.91.0.2/32".parse().unwrap()),
        protocol: Some(1),
        local_ports: None,
        remote_ports: None,
        stateful: false,
    }
}

#[test]
fn netns_frames_cross_the_switch_process_and_a_vlan_change_cuts_them_live() {
    if !require_all(&[Need::Root, Need::Netns, Need::Ping]) {
        return;
    }
    let mut lab = Lab::new("a");
    let h0 = lab.veth_ns(0, "10.91.0.1");
    let h1 = lab.veth_ns(1, "10.91.0.2");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // One port in the launch file, the other added over the socket.
    write_launch(dir, SwitchConfig::private("sw"), vec![iface(&h0, 10)]);
    let s = Switchd::start(dir);
    let mut c = s.client();
    c.ok(SwitchOp::AddPort {
        port: iface(&h1, 10),
    });
    assert!(
        lab.ping(0, "10.91.0.2", 3, 10),
        "no ping across the switch process; log:\n{}",
        s.log()
    );

    // Meters: a counted ping, ARP already resolved. Echo requests go in at h0 and out at h1,
    // replies the other way; allow a few ARP frames on top. An ACL meter rule on h0 counts
    // exactly the ICMP sent to ns1.
    c.ok(SwitchOp::SetPort {
        config: PortConfig {
            acls: vec![acl("icmp-to-ns1", AclAction::Meter)],
            ..PortConfig::access(&h0, 10)
        },
    });
    c.ok(SwitchOp::ResetMeters);
    assert!(lab.ping(0, "10.91.0.2", 5, 10));
    let (p0, p1) = (s.port(&h0), s.port(&h1));
    for (what, n) in [
        ("h0 in", p0.meters.packets_in),
        ("h1 out", p1.meters.packets_out),
        ("h1 in", p1.meters.packets_in),
        ("h0 out", p0.meters.packets_out),
    ] {
        assert!(
            (5..=9).contains(&n),
            "{what}: {n} frames for 5 echoes: {p0:?} {p1:?}"
        );
    }
    // 98-byte echo frames (56 bytes of data).
    assert!(p0.meters.bytes_in >= 5 * 98, "{p0:?}");
    assert!(p0.connected && p1.connected);
    assert!(p0.meters.drops.is_empty(), "{p0:?}");
    assert_eq!(p1.learned_macs.len(), 1, "{p1:?}");
    assert_eq!(p0.meters.acl["icmp-to-ns1"].packets, 5, "{p0:?}");
    assert_eq!(p0.meters.acl["icmp-to-ns1"].bytes, 5 * 98, "{p0:?}");

    // A deny rule instead: the echoes drop, counted by reason.
    c.ok(SwitchOp::SetPort {
        config: PortConfig {
            acls: vec![acl("no-icmp", AclAction::Deny)],
            ..PortConfig::access(&h0, 10)
        },
    });
    assert!(!lab.ping_once(0, "10.91.0.2", 2), "denied ping passed");
    let p0 = s.port(&h0);
    assert!(
        p0.meters.drops.get("acl_deny").is_some_and(|n| *n >= 1),
        "{p0:?}"
    );
    assert!(p0.meters.acl["no-icmp"].packets >= 1, "{p0:?}");
    c.ok(SwitchOp::SetPort {
        config: PortConfig::access(&h0, 10),
    });

    // h1 to VLAN 20 while the switch runs: nothing reaches it any more.
    c.ok(SwitchOp::SetPort {
        config: PortConfig::access(&h1, 20),
    });
    let out_before = s.port(&h1).meters.packets_out;
    assert!(!lab.ping_once(0, "10.91.0.2", 2), "ping crossed VLANs");
    assert!(!lab.ping_once(1, "10.91.0.1", 2), "ping crossed VLANs");
    let p1 = s.port(&h1);
    assert_eq!(
        p1.meters.packets_out, out_before,
        "frames reached VLAN 20: {p1:?}"
    );
    assert!(
        p1.meters.packets_in > 0,
        "ns1's own frames still enter: {p1:?}"
    );
    assert_eq!(p1.config, PortConfig::access(&h1, 20));

    // Back to VLAN 10: it heals.
    c.ok(SwitchOp::SetPort {
        config: PortConfig::access(&h1, 10),
    });
    assert!(
        lab.ping(0, "10.91.0.2", 3, 10),
        "no ping after restoring the VLAN"
    );

    // Removing the port lets go of the interface: nothing crosses, and it can be added again.
    c.ok(SwitchOp::RemovePort { name: h1.clone() });
    assert!(!lab.ping_once(0, "10.91.0.2", 2));
    c.ok(SwitchOp::AddPort {
        port: iface(&h1, 10),
    });
    assert!(
        lab.ping(0, "10.91.0.2", 3, 10),
        "no ping after re-adding the port"
    );
    // The same interface twice is refused.
    let mut again = iface(&h1, 10);
    again.config.name = "twice".into();
    let e = c.error(SwitchOp::AddPort { port: again });
    assert!(e.contains("already attached"), "{e}");

    c.ok(SwitchOp::Shutdown);
    let mut s = s;
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    assert!(
        !lab.ping_once(0, "10.91.0.2", 1),
        "frames cross a stopped switch"
    );
}

/// An internal switch: the process makes the host TAP itself and reports it as the implied
/// `host` port, which can be reconfigured but not removed or bound a second time; the host
/// pings a namespace through it; on shutdown the TAP goes away with the process.
#[test]
fn netns_internal_switch_host_port_is_implied_and_goes_with_the_process() {
    if !require_all(&[Need::Root, Need::Netns, Need::Tap, Need::Ping]) {
        return;
    }
    let mut lab = Lab::new("b");
    let h0 = lab.veth_ns(0, "10.92.0.2");
    let tap = format!("{}t", lab.prefix);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_launch(
        dir,
        SwitchConfig {
            kind: vireo_vswitch::SwitchKind::Internal {
                host_interface: tap.clone(),
            },
            ..SwitchConfig::private("int")
        },
        vec![iface(&h0, 1)],
    );
    let s = Switchd::start(dir);
    let host = s.port("host");
    assert_eq!(host.attach, None);
    assert!(host.connected);
    assert_eq!(host.config.role, vireo_vswitch::PortRole::Host);
    common::host::must(&["ip", "addr", "add", "10.92.0.1/24", "dev", &tap]);
    common::host::must(&["ip", "link", "set", &tap, "up"]);
    assert!(
        lab.ping(0, "10.92.0.1", 3, 10),
        "namespace -> host TAP; log:\n{}",
        s.log()
    );

    let mut c = s.client();
    let e = c.error(SwitchOp::RemovePort {
        name: "host".into(),
    });
    assert!(e.contains("cannot be removed"), "{e}");
    let e = c.error(SwitchOp::AddPort {
        port: iface(&tap, 1),
    });
    assert!(e.contains("already attached"), "{e}");
    c.ok(SwitchOp::SetPort {
        config: PortConfig {
            role: vireo_vswitch::PortRole::Host,
            ..PortConfig::access("host", 7)
        },
    });
    assert!(
        !lab.ping_once(0, "10.92.0.1", 2),
        "host port moved to VLAN 7"
    );

    c.ok(SwitchOp::Shutdown);
    let mut s = s;
    assert_eq!(
        s.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(0)
    );
    assert!(
        !common::host::run(&["ip", "link", "show", &tap]),
        "the host TAP outlived the switch"
    );
}
