//! The kernel fast path between namespaces: TCP through two AF_PACKET ports gets offloaded to
//! tc (filter visible with packets, meters still count it, no frame delivered twice), a live
//! policy change cuts a running transfer at once and removes the filters, restoring the policy
//! lets traffic flow again, and stopping the runtime leaves nothing behind. Needs root and
//! `ip netns` (and iperf3 for the transfers): a recorded skip otherwise, a failure under CI.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::common;
use common::host::*;
use common::netns::*;

/// Two namespaces `<p>n0` (10.79.0.1 or fd79::1) and `<p>n1` (10.79.0.2 or fd79::2) on
/// veths whose host ends `<p>h0`/`<p>h1` stay in our namespace for the switch. Removed on drop.
struct Pair {
    lab: Lab,
    v6: bool,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        Pair::with(tag, false)
    }
    fn with(tag: &str, v6: bool) -> Pair {
        let mut lab = Lab::new("vf", tag);
        for k in 0..2 {
            let ip = if v6 {
                format!("fd79::{}", k + 1)
            } else {
                format!("10.79.0.{}", k + 1)
            };
            lab.veth_ns(k, v6, &[&ip]);
        }
        Pair { lab, v6 }
    }
    fn peer(&self) -> &'static str {
        if self.v6 {
            "fd79::2"
        } else {
            "10.79.0.2"
        }
    }
    fn ns(&self, k: usize) -> String {
        self.lab.ns(k)
    }
    fn host(&self, k: usize) -> String {
        self.lab.host(k)
    }
    fn ping(&self) -> bool {
        ping(&self.ns(0), 2, 4, &[self.peer()])
    }
    fn server(&self) -> Child {
        iperf_server(&self.ns(1), 5298)
    }
    fn client(&self, extra: &[&str]) -> Command {
        let ns = self.ns(0);
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &ns,
            "timeout",
            "40",
            "iperf3",
            "-c",
            self.peer(),
            "-p",
            "5298",
            "-J",
            "--connect-timeout",
            "3000",
        ]);
        c.args(extra);
        c
    }
    /// Bytes the receiver got in a `-n <mib>M` transfer (0 when the sender did not send it
    /// all). iperf3's sender may finish with data still queued, so the receiver's total is
    /// what certainly crossed the switch.
    fn transfer(&self, mib: u64) -> u64 {
        let bytes = format!("{mib}M");
        let mut server = self.server();
        let out = self
            .client(&["-n", &bytes])
            .output()
            .expect("iperf3 client");
        let _ = server.kill();
        let _ = server.wait();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if v["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0) < mib << 20 {
            return 0;
        }
        v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0)
    }
    /// `tc -s filter show dev <host k> ingress`.
    fn filters(&self, k: usize) -> String {
        output(&[
            "tc",
            "-s",
            "filter",
            "show",
            "dev",
            &self.host(k),
            "ingress",
        ])
    }
}

/// Packets our filter's mirred action counted (`Sent N bytes M pkt`), summed.
fn redirected_packets(tc: &str) -> u64 {
    tc.lines()
        .filter_map(|l| l.trim().strip_prefix("Sent "))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

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

fn start(pair: &Pair, fast_path: bool) -> (SwitchRuntime, PortId, PortId) {
    let mut cfg = SwitchConfig::private("fp");
    cfg.fast_path = fast_path;
    let mut sw = Switch::new(cfg).unwrap();
    let a = sw.add_port(PortConfig::access("a", 1)).unwrap();
    let b = sw.add_port(PortConfig::access("b", 1)).unwrap();
    let rt = start_offloaded(&pair.lab, sw, &[(a, 0), (b, 1)]);
    (rt, a, b)
}

fn egress_bytes(rt: &SwitchRuntime, id: PortId) -> u64 {
    lock(rt.switch()).status(id).unwrap().meters.egress.bytes
}

#[test]
fn netns_fast_path_offloads_tcp_and_policy_changes_cut_it() {
    if !netns_available("a") || !vireo_testkit::require(vireo_testkit::Need::Iperf3) {
        return;
    }
    let pair = Pair::new("a");
    let (rt, a, b) = start(&pair, true);
    assert!(pair.ping(), "ping through the switch (user-space path)");
    assert!(rt.offloaded_flows().is_empty(), "ICMP is never offloaded");

    // First transfer: the flows get offloaded while it runs.
    let got = pair.transfer(16);
    assert!(got > 0, "TCP transfer completed");
    wait_for("both directions offloaded", 10, || {
        rt.offloaded_flows().len() == 2
    });
    let tc = pair.filters(0);
    assert!(
        tc.contains("pref 49152 bpf") && tc.contains("mirred"),
        "{tc}"
    );
    assert!(
        redirected_packets(&tc) > 0,
        "kernel redirected frames:\n{tc}"
    );

    // Second transfer, entirely on installed flows: the meters count it (through the
    // revalidation poll) once, not twice (the switch's socket does not forward copies).
    // Let the revalidation poll (every 500 ms) account the first transfer completely.
    std::thread::sleep(Duration::from_millis(1200));
    let before = egress_bytes(&rt, b);
    let back_before = egress_bytes(&rt, a);
    let pkts_before = redirected_packets(&pair.filters(0));
    let sent = pair.transfer(32);
    assert!(sent > 0, "second transfer completed");
    wait_for("meters to catch up", 10, || {
        egress_bytes(&rt, b) - before >= sent
    });
    std::thread::sleep(Duration::from_millis(1200));
    let counted = egress_bytes(&rt, b) - before;
    assert!(
        counted < (32 << 20) + (32 << 20) / 5 + (1 << 20),
        "b's egress meter counted {counted} bytes for 32 MiB written, {sent} received: \
         frames went twice"
    );
    assert!(redirected_packets(&pair.filters(0)) > pkts_before);
    // Redirected frames leaving b are not seen by b's socket (PACKET_IGNORE_OUTGOING): else
    // the switch would send the data back to a, and a's egress would carry it too.
    let back = egress_bytes(&rt, a) - back_before;
    assert!(
        back < sent / 4,
        "a received {back} bytes (ACKs only expected)"
    );
    let st = lock(rt.switch()).status(a).unwrap();
    assert!(
        st.meters.ingress.bytes >= sent,
        "a's ingress meter {:?}",
        st.meters
    );

    // A running transfer is cut by a VLAN change the moment set_port_config returns.
    let mut server = pair.server();
    let mut client = pair
        .client(&["-t", "6"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 client");
    wait_for("running transfer offloaded", 10, || {
        rt.offloaded_flows().len() == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    {
        let mut sw = lock(rt.switch());
        let mut cfg = sw.status(a).unwrap().config;
        cfg.vlan = VlanConfig::Access { vid: 2 };
        sw.set_port_config(a, cfg).unwrap();
    }
    assert!(rt.offloaded_flows().is_empty());
    let tc = pair.filters(0) + &pair.filters(1);
    assert!(!tc.contains("pref 49152"), "filters removed at once:\n{tc}");
    std::thread::sleep(Duration::from_millis(300));
    let m1 = egress_bytes(&rt, b);
    std::thread::sleep(Duration::from_millis(1500));
    let m2 = egress_bytes(&rt, b);
    assert_eq!(m2, m1, "nothing reaches b once a is in another VLAN");
    assert!(rt.offloaded_flows().is_empty(), "no flow re-offloaded");
    let _ = client.kill();
    let _ = client.wait();
    let _ = server.kill();
    let _ = server.wait();
    assert!(!pair.ping(), "VLANs apart");

    // Same VLAN again: traffic flows and is offloaded again.
    {
        let mut sw = lock(rt.switch());
        let mut cfg = sw.status(a).unwrap().config;
        cfg.vlan = VlanConfig::Access { vid: 1 };
        sw.set_port_config(a, cfg).unwrap();
    }
    assert!(pair.ping());
    assert!(pair.transfer(8) > 0);
    wait_for("offloaded again", 10, || rt.offloaded_flows().len() == 2);

    // A deny ACL on b's egress stops it too.
    {
        let mut sw = lock(rt.switch());
        let mut cfg = sw.status(b).unwrap().config;
        cfg.acls = vec![AclRule {
            name: "no-tcp".into(),
            priority: 1,
            direction: Direction::Egress,
            action: AclAction::Deny,
            local_mac: None,
            remote_mac: None,
            local_ip: None,
            remote_ip: None,
            protocol: Some(6),
            local_ports: None,
            remote_ports: None,
            stateful: false,
        }];
        sw.set_port_config(b, cfg).unwrap();
    }
    assert!(rt.offloaded_flows().is_empty());
    assert_eq!(pair.transfer(1), 0, "TCP denied");
    assert!(pair.ping(), "ICMP still allowed");

    rt.stop().unwrap();
    for k in 0..2 {
        assert!(!pair.filters(k).contains("pref 49152"));
        let q = output(&["tc", "qdisc", "show", "dev", &pair.host(k)]);
        assert!(
            !q.contains("clsact"),
            "the clsact qdisc we created is gone: {q}"
        );
    }
}

#[test]
fn netns_fast_path_offloads_tcp_over_ipv6() {
    if !netns_available("d") || !vireo_testkit::require(vireo_testkit::Need::Iperf3) {
        return;
    }
    let pair = Pair::with("d", true);
    let (rt, _, b) = start(&pair, true);
    assert!(
        pair.ping(),
        "ping6 through the switch (ND stays in user space)"
    );
    assert!(pair.transfer(16) > 0, "TCP over IPv6 completed");
    wait_for("both directions offloaded", 10, || {
        let f = rt.offloaded_flows();
        f.len() == 2 && f.iter().all(|k| k.ethertype == 0x86dd)
    });
    let tc = pair.filters(0);
    assert!(tc.contains("protocol ipv6 pref 49153 bpf"), "{tc}");
    std::thread::sleep(Duration::from_millis(1200));
    let before = egress_bytes(&rt, b);
    let sent = pair.transfer(16);
    assert!(sent > 0);
    assert!(
        redirected_packets(&pair.filters(0)) > 0,
        "{}",
        pair.filters(0)
    );
    wait_for("meters to count the IPv6 transfer", 10, || {
        egress_bytes(&rt, b) - before >= sent
    });
    rt.stop().unwrap();
    assert!(!pair.filters(0).contains("pref 49153"));
}

/// A port bound inside another namespace: its ifindex names another device (or nothing) where
/// the fast path's netlink socket lives, so it must never be programmed.
#[test]
fn netns_port_bound_in_another_namespace_is_never_offloaded() {
    if !netns_available("c") {
        return;
    }
    let ns = format!("vf{}c", std::process::id());
    must(&["ip", "netns", "add", &ns]);
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            run(&["ip", "netns", "del", &self.0]);
        }
    }
    let _cleanup = Cleanup(ns.clone());
    must(&[
        "ip", "-n", &ns, "link", "add", "x0", "type", "veth", "peer", "name", "x1",
    ]);
    must(&["ip", "-n", &ns, "link", "set", "x0", "up"]);
    let path = format!("/var/run/netns/{ns}");
    let port = std::thread::spawn(move || {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        // SAFETY: setns on a namespace fd we own; only this short-lived thread moves.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        PacketPort::bind("x0").unwrap()
    })
    .join()
    .unwrap();
    let sw = Switch::new(SwitchConfig::private("ns")).unwrap();
    let mut engine = fastpath::Engine::new(sw.generation_counter());
    assert!(engine.register(PortId(0), Arc::new(port)).is_err());
}

#[test]
fn netns_fast_path_off_keeps_frames_in_user_space() {
    if !netns_available("b") || !vireo_testkit::require(vireo_testkit::Need::Iperf3) {
        return;
    }
    let pair = Pair::new("b");
    let (rt, _, b) = start(&pair, false);
    assert!(pair.ping());
    let before = egress_bytes(&rt, b);
    let sent = pair.transfer(8);
    assert!(sent > 0);
    wait_for("meters to count the transfer", 10, || {
        egress_bytes(&rt, b) - before >= sent
    });
    assert!(rt.offloaded_flows().is_empty());
    assert!(!pair.filters(0).contains("pref 49152"));
    rt.stop().unwrap();
}
