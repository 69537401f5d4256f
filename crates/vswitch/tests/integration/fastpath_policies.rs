//! Port policies in the kernel fast path, between namespaces: VLAN push and pop and ACL
//! verdicts per connection. Two switch instances joined by a trunk (a host veth pair `x0`/`x1`
//! carrying VLAN 10): namespace 0 — access port a (VLAN 10) of switch 1 — trunk — switch 2 —
//! access port b (VLAN 10, with ACLs) — namespace 1. So switch 1 pushes the tag (a → trunk),
//! switch 2 pops it (trunk → b), and back. (This kernel has neither VLAN devices nor bridge
//! VLAN filtering, so a namespace cannot speak tagged itself; the trunk between two switches
//! is where the tags are on the wire, and where they are captured.)
//!
//! Checked: TCP flows through these ports are offloaded (tag actions and connection in the
//! key), the kernel's redirect counters carry most of a transfer's frames (they bypassed
//! the switch threads), every TCP frame on the trunk carries tag 10 (capture), ACL rule meters
//! count the kernel's traffic, a denied connection stays denied and is never offloaded, an
//! egress rate limit on b holds for offloaded flows (a `tbf` on b's netdev), and stopping
//! removes everything. Needs root, `ip netns`, iperf3 and tcpdump.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::common;
use common::host::*;
use common::netns::*;

const ALLOWED: u16 = 5298;
const DENIED: u16 = 5299;

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Packets our filters' mirred actions counted on `dev`'s ingress.
fn redirected(dev: &str) -> u64 {
    output(&["tc", "-s", "filter", "show", "dev", dev, "ingress"])
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Sent "))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

fn tcp_rule(name: &str, priority: u16, direction: Direction, action: AclAction) -> AclRule {
    AclRule {
        name: name.into(),
        priority,
        direction,
        action,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: None,
        protocol: Some(6),
        local_ports: None,
        remote_ports: None,
        stateful: false,
    }
}

/// Bytes the receiver got of an `mib` MiB transfer to `port` (0 if it did not complete).
fn transfer(lab: &Lab, port: u16, mib: u64) -> u64 {
    transfer_rate(lab, port, mib).0
}

/// Bytes received and the receiver's bits per second.
fn transfer_rate(lab: &Lab, port: u16, mib: u64) -> (u64, f64) {
    let mut server = iperf_server(&lab.ns(1), port);
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns(0), "timeout", "30", "iperf3", "-J"])
        .args(["-c", "10.78.0.2", "-p", &port.to_string(), "-n"])
        .arg(format!("{mib}M"))
        .args(["--connect-timeout", "3000"])
        .output()
        .expect("iperf3 client");
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if v["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0) < mib << 20 {
        return (0, 0.0);
    }
    let r = &v["end"]["sum_received"];
    (
        r["bytes"].as_u64().unwrap_or(0),
        r["bits_per_second"].as_f64().unwrap_or(0.0),
    )
}

fn start(ports: &[(PortConfig, &str)]) -> (SwitchRuntime, Vec<PortId>) {
    let mut sw = Switch::new(SwitchConfig::private("fpp")).unwrap();
    let ids: Vec<PortId> = ports
        .iter()
        .map(|(c, _)| sw.add_port(c.clone()).unwrap())
        .collect();
    let rt = SwitchRuntime::start(std::sync::Arc::new(std::sync::Mutex::new(sw))).unwrap();
    for ((_, dev), id) in ports.iter().zip(&ids) {
        let p = PacketPort::bind_offload(dev).unwrap();
        rt.attach_packet(*id, std::sync::Arc::new(p));
    }
    std::thread::sleep(Duration::from_millis(100));
    (rt, ids)
}

fn meters(rt: &SwitchRuntime, id: PortId) -> vireo_vswitch::meter::MeterSnapshot {
    lock(rt.switch()).status(id).unwrap().meters
}

#[test]
fn netns_vlan_push_pop_and_acl_verdicts_run_in_the_kernel() {
    use vireo_testkit::{require_all, Need};
    if !netns_available("p") || !require_all(&[Need::Iperf3, Need::Tcpdump]) {
        return;
    }
    let mut lab = Lab::new("vp", "p");
    lab.veth_ns(0, false, &["10.78.0.1"]);
    lab.veth_ns(1, false, &["10.78.0.2"]);
    let (x0, x1) = (format!("{}x0", lab.prefix), format!("{}x1", lab.prefix));
    must(&[
        "ip", "link", "add", &x0, "type", "veth", "peer", "name", &x1,
    ]);
    lab.own_link(x0.clone());
    for x in [&x0, &x1] {
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{x}.disable_ipv6=1"),
        ]);
        must(&["ip", "link", "set", x, "up"]);
    }
    let trunk = || {
        let mut t = PortConfig::access("t", 1);
        t.vlan = VlanConfig::Trunk {
            allowed: vec![10],
            native: None,
        };
        t
    };
    let (h0, h1) = (lab.host(0), lab.host(1));
    let (rt1, p1) = start(&[(PortConfig::access("a", 10), &h0), (trunk(), &x0)]);
    let mut b = PortConfig::access("b", 10);
    b.acls = vec![
        {
            let mut r = tcp_rule("deny-5299", 1, Direction::Egress, AclAction::Deny);
            r.local_ports = Some(PortRange {
                first: DENIED,
                last: DENIED,
            });
            r
        },
        tcp_rule("allow-tcp", 5, Direction::Both, AclAction::Allow),
    ];
    let (rt2, p2) = start(&[(b, &h1), (trunk(), &x1)]);
    let (a, b) = (p1[0], p2[0]);

    assert!(
        ping(&lab.ns(0), 2, 4, &["10.78.0.2"]),
        "ping across the trunk (user space)"
    );
    let first = transfer(&lab, ALLOWED, 8);
    assert!(first > 0, "first transfer");
    let offloaded = |rt: &SwitchRuntime| rt.offloaded_flows();
    wait_for("switch 1 pushes (a → trunk) in the kernel", 10, || {
        offloaded(&rt1)
            .iter()
            .any(|k| k.ingress == a && k.action == fastpath::TagAction::Push(10))
    });
    wait_for("switch 2 pops (trunk → b) in the kernel", 10, || {
        offloaded(&rt2)
            .iter()
            .any(|k| k.egress == b && k.action == fastpath::TagAction::Pop && k.l4.is_some())
    });
    assert!(
        offloaded(&rt2).iter().all(|k| k.l4.is_some()),
        "flows through b's ACLs are single connections: {:?}",
        offloaded(&rt2)
    );
    assert!(
        offloaded(&rt1).iter().all(|k| k.l4.is_none()),
        "no ACL on switch 1"
    );

    // A transfer with a capture on the trunk: every TCP frame there is tagged 10, and the
    // kernel, not the switch threads, forwarded nearly all of them.
    std::thread::sleep(Duration::from_millis(1200));
    let (in_a, out_b) = (
        meters(&rt1, a).ingress.packets,
        meters(&rt2, b).egress.packets,
    );
    let (k0, kx1) = (redirected(&h0), redirected(&x1));
    let acl_before = meters(&rt2, b).acl[1].1;
    let cap = Command::new("timeout")
        .args([
            "15", "tcpdump", "-i", &x0, "-e", "-nn", "-l", "-c", "400", "tcp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(800));
    let sent = transfer(&lab, ALLOWED, 32);
    assert!(sent > 0, "second transfer");
    let cap = cap.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&cap.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("IPv4")).collect();
    assert!(
        lines.len() >= 50,
        "captured {} frames:\n{text}",
        lines.len()
    );
    let untagged: Vec<&&str> = lines.iter().filter(|l| !l.contains("vlan 10")).collect();
    assert!(
        untagged.is_empty(),
        "untagged TCP on the trunk: {untagged:?}"
    );
    wait_for("meters to catch up", 10, || {
        meters(&rt2, b).egress.bytes >= sent
    });
    std::thread::sleep(Duration::from_millis(1200));
    let user_and_kernel = meters(&rt1, a).ingress.packets - in_a;
    let kernel = redirected(&h0) - k0;
    assert!(
        kernel * 10 >= user_and_kernel * 9,
        "switch 1: the kernel pushed {kernel} of {user_and_kernel} frames from a"
    );
    let user_and_kernel = meters(&rt2, b).egress.packets - out_b;
    let kernel = redirected(&x1) - kx1;
    assert!(
        kernel * 10 >= user_and_kernel * 9,
        "switch 2: the kernel popped {kernel} of {user_and_kernel} frames to b"
    );
    let acl_after = meters(&rt2, b).acl[1].1;
    assert!(
        acl_after.packets - acl_before.packets >= kernel,
        "b's allow rule counted the kernel's frames: {acl_before:?} → {acl_after:?}"
    );

    // The denied connection: dropped by switch 2 every time, never a kernel flow.
    assert_eq!(transfer(&lab, DENIED, 1), 0, "port {DENIED} denied");
    assert!(
        !offloaded(&rt2)
            .iter()
            .any(|k| k.l4.is_some_and(|l| l.dport == DENIED || l.sport == DENIED)),
        "{:?}",
        offloaded(&rt2)
    );
    assert!(meters(&rt2, b).acl[0].1.packets > 0, "deny rule hit");
    assert!(
        transfer(&lab, ALLOWED, 1) > 0,
        "the allowed port still works"
    );

    rt1.stop().unwrap();
    rt2.stop().unwrap();
    for dev in [&h0, &x0, &x1, &h1] {
        let q = output(&["tc", "qdisc", "show", "dev", dev]);
        assert!(!q.contains("clsact") && !q.contains("tbf"), "{dev}: {q}");
    }
}
