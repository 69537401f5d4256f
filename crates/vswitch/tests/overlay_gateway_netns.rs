//! The overlay gateway with real Linux stacks: a namespace on the uplink is the "physical
//! network" host (198.51.100.9/24); red and blue are two tenants whose VMs (namespaces) both
//! have CA 10.0.0.1 and reach it through one NAT gateway address (198.51.100.1) — pings at
//! the same time and a TCP transfer (iperf3) through NAT, `tcpdump` on the physical side sees
//! only the NAT address, blue's VM sees nothing of red's replies; green's VM is forwarded as
//! it is (the physical host routes 10.2.0.0/24 via the forward gateway 198.51.100.2) and is
//! reached from the physical side. Needs root, `ip netns`, ping, ethtool, tcpdump, iperf3: a
//! recorded skip otherwise, a failure under CI. Every namespace, link and child goes on drop.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

mod common;
use common::host::*;
use common::netns::*;

const VM_MAC: &str = "02:00:00:00:01:01";

/// A tenant VM: namespace `k` with `ca`/24 behind gateway `gw`, IPv6 off, checksums
/// complete (the frames leave the kernel through our plain socket).
fn vm(lab: &mut Lab, k: usize, ca: &str, gw: &str) -> PacketPort {
    let host = lab.veth_ns(k, false, &[]);
    let (ns, g) = (lab.ns(k), lab.guest(k));
    must(&["ip", "-n", &ns, "link", "set", &g, "address", VM_MAC]);
    configure(&ns, &g, &[ca]);
    must(&["ip", "-n", &ns, "route", "add", "default", "via", gw]);
    must(&["ip", "netns", "exec", &ns, "ethtool", "-K", &g, "tx", "off"]);
    PacketPort::bind(&host).unwrap()
}

fn port(name: &str, rd: &str, vsid: u32, ca: &str) -> PortConfig {
    PortConfig {
        overlay: Some(PortOverlay {
            routing_domain: rd.into(),
            vsid,
            mac: VM_MAC.parse().unwrap(),
            cas: vec![ca.parse().unwrap()],
        }),
        ..PortConfig::access(name, 1)
    }
}

/// A child process killed and reaped on drop (a capture or an iperf3 server).
struct Kid(Child, i32);

impl Drop for Kid {
    fn drop(&mut self) {
        // SAFETY: signals our own child, not yet waited for (its pid is still ours).
        unsafe { libc::kill(self.0.id() as i32, self.1) };
        let _ = self.0.wait();
    }
}

fn capture(dev: &str, file: &std::path::Path) -> Kid {
    let c = Command::new("tcpdump")
        .args(["-i", dev, "-U", "-nn", "-w"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(700));
    Kid(c, libc::SIGINT)
}

fn decode(file: &std::path::Path) -> String {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netns_tenants_reach_the_physical_network_through_nat_and_forwarding() {
    use vireo_testkit::{require_all, Need};
    if !netns_available("ogw") || !require_all(&[Need::Tcpdump, Need::Iperf3]) {
        return;
    }
    let mut lab = Lab::new("og", "x");
    // Namespace 0: the physical host, on the uplink's wire.
    let up_host = lab.veth_ns(0, false, &["198.51.100.9"]);
    let phys = lab.ns(0);
    must(&[
        "ip",
        "netns",
        "exec",
        &phys,
        "ethtool",
        "-K",
        &lab.guest(0),
        "tx",
        "off",
    ]);
    must(&[
        "ip",
        "-n",
        &phys,
        "route",
        "add",
        "10.2.0.0/24",
        "via",
        "198.51.100.2",
    ]);
    // Routed at the NAT gateway too, so the probe below really reaches it (and is refused).
    must(&[
        "ip",
        "-n",
        &phys,
        "route",
        "add",
        "10.0.0.0/24",
        "via",
        "198.51.100.1",
    ]);

    let mut c = SwitchConfig::private("ogw");
    c.overlay = Some(
        serde_json::from_value(serde_json::json!({
            "provider_addresses": ["192.168.77.1"],
            "provider_mac": "02:aa:00:00:00:01",
            "routing_domains": [
                {"name": "red", "subnets": [{"vsid": 100, "prefixes": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]}]},
                {"name": "blue", "subnets": [{"vsid": 200, "prefixes": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]}]},
                {"name": "green", "subnets": [{"vsid": 300, "prefixes": ["10.2.0.0/24"], "gateway_ips": ["10.2.0.254"]}]}],
            "gateways": [
                {"name": "out", "mode": "nat", "routing_domains": ["red", "blue"], "address": "198.51.100.1/24"},
                {"name": "fwd", "mode": "forward", "routing_domains": ["green"], "address": "198.51.100.2/24"}]
        }))
        .unwrap(),
    );
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    let red = sw.add_port(port("red", "red", 100, "10.0.0.1")).unwrap();
    let blue = sw.add_port(port("blue", "blue", 200, "10.0.0.1")).unwrap();
    let green = sw
        .add_port(port("green", "green", 300, "10.2.0.5"))
        .unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    rt.attach(up, Arc::new(PacketPort::bind(&up_host).unwrap()));
    rt.attach(red, Arc::new(vm(&mut lab, 1, "10.0.0.1", "10.0.0.254")));
    rt.attach(blue, Arc::new(vm(&mut lab, 2, "10.0.0.1", "10.0.0.254")));
    rt.attach(green, Arc::new(vm(&mut lab, 3, "10.2.0.5", "10.2.0.254")));
    std::thread::sleep(Duration::from_millis(100));
    let (red_ns, blue_ns, green_ns) = (lab.ns(1), lab.ns(2), lab.ns(3));

    let dir = tempfile::tempdir().unwrap();
    let (wire, blue_wire) = (dir.path().join("phys.pcap"), dir.path().join("blue.pcap"));
    {
        let _w = capture(&up_host, &wire);
        let _b = capture(&lab.host(2), &blue_wire);
        // Red alone first: blue's VM must see none of it.
        assert!(
            ping(&red_ns, 3, 10, &["198.51.100.9"]),
            "red → physical through NAT"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let text = decode(&wire);
    assert!(
        text.contains("198.51.100.1 > 198.51.100.9: ICMP echo request")
            && text.contains("198.51.100.9 > 198.51.100.1: ICMP echo reply"),
        "the physical side must see the NAT address:\n{text}"
    );
    assert!(
        !text.contains("10.0.0.1"),
        "a CA leaked to the physical network:\n{text}"
    );
    let blue_text = decode(&blue_wire);
    assert!(
        !blue_text.contains("ICMP"),
        "blue saw red's traffic:\n{blue_text}"
    );

    // Both tenants (same CA, same MAC) at the same time: each gets its own replies.
    let t = {
        let b = blue_ns.clone();
        std::thread::spawn(move || ping(&b, 10, 15, &["198.51.100.9"]))
    };
    assert!(ping(&red_ns, 10, 15, &["198.51.100.9"]), "red, beside blue");
    assert!(t.join().unwrap(), "blue, beside red");

    // TCP through NAT: a 2 s iperf3 transfer from blue to the physical host.
    let _srv = Kid(
        Command::new("ip")
            .args(["netns", "exec", &phys, "iperf3", "-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 server"),
        libc::SIGKILL,
    );
    std::thread::sleep(Duration::from_millis(500));
    let ok = run(&[
        "ip",
        "netns",
        "exec",
        &blue_ns,
        "timeout",
        "20",
        "iperf3",
        "-c",
        "198.51.100.9",
        "-p",
        "5201",
        "-t",
        "2",
    ]);
    assert!(ok, "iperf3 (TCP) through NAT failed");

    // Forwarding: the CA as it is, both ways.
    assert!(
        ping(&green_ns, 3, 10, &["198.51.100.9"]),
        "green → physical, forwarded"
    );
    assert!(ping(&phys, 3, 10, &["10.2.0.5"]), "physical → green's CA");
    // Nothing reaches the NAT tenants from outside unasked.
    assert!(
        !ping(&phys, 1, 2, &["10.0.0.1"]),
        "a NAT tenant was reachable from outside"
    );

    let g = sw.lock().unwrap();
    assert!(
        g.drops(up, DropReason::NatNoMapping) >= 1,
        "the probe was not refused by NAT"
    );
    let st = g.overlay().unwrap().gateways();
    assert_eq!(st.len(), 2);
    assert!(
        st[0].connections.iter().any(|c| c.routing_domain == "red")
            && st[0].connections.iter().any(|c| c.routing_domain == "blue"),
        "{:?}",
        st[0].connections
    );
}
