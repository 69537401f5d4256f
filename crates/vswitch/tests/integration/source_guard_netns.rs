//! The IP source guard between two network namespaces on AF_PACKET ports, with the kernel fast
//! path on and off: the guarded namespace reaches its peer from its allowed addresses (ping
//! over IPv4 and IPv6, TCP) and not from a second, unlisted address on the same interface,
//! even right after a TCP transfer that the fast path would otherwise have offloaded (the
//! kernel match has MACs, not addresses, so the spoofed connection would ride that flow).
//! Needs root, `ip netns`, ping and iperf3: a recorded skip otherwise, a failure under CI.

use std::process::Command;

use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::*;

use crate::common;
use common::host::*;
use common::netns::*;

const GOOD4: &str = "10.93.0.1";
const SPOOF4: &str = "10.93.0.9";
const PEER4: &str = "10.93.0.2";
const GOOD6: &str = "fd93::1";
const SPOOF6: &str = "fd93::9";
const PEER6: &str = "fd93::2";

/// Namespaces `<p>n0` (guarded: GOOD and SPOOF addresses) and `<p>n1` (PEER) on veths whose
/// host ends `<p>h0`/`<p>h1` the switch binds. Removed on drop.
struct Pair {
    lab: Lab,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let mut lab = Lab::new("vsg", tag);
        lab.veth_ns(0, true, &[GOOD4, SPOOF4, GOOD6, SPOOF6]);
        lab.veth_ns(1, true, &[PEER4, PEER6]);
        Pair { lab }
    }
    fn ns(&self, k: usize) -> String {
        self.lab.ns(k)
    }
    /// Pings the peer from namespace 0 with source address `from`.
    fn ping(&self, from: &str, to: &str) -> bool {
        ping(&self.ns(0), 2, 3, &["-I", from, to])
    }
    /// Bytes the receiver got from a 2 MiB iperf3 transfer from `from` (0 when it could not
    /// connect; iperf3's sender may finish with data still queued, so not always all of it).
    fn tcp(&self, from: &str) -> u64 {
        let mut server = iperf_server(&self.ns(1), 5293);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(0),
                "timeout",
                "20",
                "iperf3",
                "-c",
                PEER4,
                "-p",
                "5293",
                "-B",
                from,
                "-n",
                "2M",
                "-J",
                "--connect-timeout",
                "2000",
            ])
            .output()
            .expect("iperf3 client");
        let _ = server.kill();
        let _ = server.wait();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0)
    }
}

fn guarded_switch(pair: &Pair, fast_path: bool) -> (SwitchRuntime, PortId) {
    let mut cfg = SwitchConfig::private("sg");
    cfg.fast_path = fast_path;
    let mut sw = Switch::new(cfg).unwrap();
    let mut a = PortConfig::access("a", 1);
    a.guard.ip_source_guard = true;
    a.guard.allowed_ipv4 = vec![GOOD4.parse().unwrap()];
    a.guard.allowed_ipv6 = vec![GOOD6.parse().unwrap()];
    let a = sw.add_port(a).unwrap();
    let b = sw.add_port(PortConfig::access("b", 1)).unwrap();
    let rt = start_offloaded(&pair.lab, sw, &[(a, 0), (b, 1)]);
    (rt, a)
}

fn check(tag: &str, fast_path: bool) {
    let pair = Pair::new(tag);
    let (rt, a) = guarded_switch(&pair, fast_path);
    assert!(
        pair.ping(GOOD4, PEER4),
        "ping from the allowed IPv4 address"
    );
    assert!(
        pair.ping(GOOD6, PEER6),
        "ping from the allowed IPv6 address"
    );
    assert!(pair.tcp(GOOD4) > 0, "TCP from the allowed address");
    let before = lock(rt.switch()).drops(a, DropReason::IpSourceGuard);
    assert!(
        !pair.ping(SPOOF4, PEER4),
        "ping from an unlisted IPv4 address"
    );
    assert!(
        !pair.ping(SPOOF6, PEER6),
        "ping from an unlisted IPv6 address"
    );
    assert_eq!(pair.tcp(SPOOF4), 0, "TCP from an unlisted address");
    let dropped = lock(rt.switch()).drops(a, DropReason::IpSourceGuard) - before;
    assert!(dropped >= 3, "counted: {dropped}");
    assert!(
        rt.offloaded_flows().iter().all(|f| f.ingress != a),
        "nothing from the guarded port is offloaded: {:?}",
        rt.offloaded_flows()
    );
    // Legitimate traffic still flows afterwards.
    assert!(pair.ping(GOOD4, PEER4));
    rt.stop().unwrap();
}

#[test]
fn netns_ip_source_guard_with_fast_path() {
    if !netns_available("s") || !vireo_testkit::require(vireo_testkit::Need::Iperf3) {
        return;
    }
    check("f", true);
}

#[test]
fn netns_ip_source_guard_without_fast_path() {
    if !netns_available("t") || !vireo_testkit::require(vireo_testkit::Need::Iperf3) {
        return;
    }
    check("u", false);
}
