//! Network virtualization end to end with real Linux peers: a Linux `vxlan` device in a
//! namespace exchanges pings both ways with a VM namespace behind Vireo; two Vireo "hosts"
//! (switch instances whose uplinks are the two ends of one veth, the provider network) carry
//! two tenants with the same customer addresses, `tcpdump` decodes the NVGRE and VXLAN they
//! send, and one tenant routes between its subnets. Needs root, `ip netns`, ping, ethtool and
//! tcpdump: a recorded skip otherwise, a failure under CI. Every namespace and link goes on drop.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::common;
use common::host::*;
use common::netns::*;

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

/// A VM port of the overlay on veth `k` of `lab`: a namespace with `ca`/24, MAC `m`, IPv6 off
/// (no link-local chatter the table does not know) and, optionally, a default gateway.
fn vm(lab: &mut Lab, k: usize, ca: &str, m: &str, gw: Option<&str>) -> PacketPort {
    let host = lab.veth_ns(k, false, &[]);
    let (ns, g) = (lab.ns(k), lab.guest(k));
    must(&["ip", "-n", &ns, "link", "set", &g, "address", m]);
    configure(&ns, &g, &[ca]);
    if let Some(gw) = gw {
        must(&["ip", "-n", &ns, "route", "add", "default", "via", gw]);
    }
    // Checksums complete: the frames leave the kernel through our plain socket.
    must(&["ip", "netns", "exec", &ns, "ethtool", "-K", &g, "tx", "off"]);
    PacketPort::bind(&host).unwrap()
}

fn port(name: &str, rd: &str, vsid: u32, m: &str, ca: &str) -> PortConfig {
    PortConfig {
        overlay: Some(PortOverlay {
            routing_domain: rd.into(),
            vsid,
            mac: mac(m),
            cas: vec![ca.parse().unwrap()],
        }),
        ..PortConfig::access(name, 1)
    }
}

fn uplink() -> PortConfig {
    PortConfig {
        role: PortRole::Uplink,
        ..PortConfig::access("up", 1)
    }
}

fn entry(rd: &str, ca: &str, m: &str, vsid: u32, pa: &str) -> PolicyEntry {
    PolicyEntry {
        routing_domain: rd.into(),
        ca: ca.parse().unwrap(),
        mac: mac(m),
        vsid,
        pa: pa.parse().unwrap(),
    }
}

/// A capture on `dev` in our namespace, stopped (and waited for) on drop.
struct Capture(Child);

impl Capture {
    fn start(dev: &str, file: &std::path::Path) -> Capture {
        let c = Command::new("tcpdump")
            .args(["-i", dev, "-U", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(700));
        Capture(c)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // SAFETY: signals our own child, which has not been waited for (its pid is ours).
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

fn decode(file: &std::path::Path) -> String {
    let out = Command::new("tcpdump")
        .args(["-nn", "-v", "-r"])
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netns_linux_vxlan_peer_and_vireo_ping_both_ways() {
    if !netns_available("ovx") || !vireo_testkit::require(vireo_testkit::Need::Tcpdump) {
        return;
    }
    let mut lab = Lab::new("ov", "x");
    // Namespace 0: the Linux host, PA 192.168.77.2, a vxlan device VNI 100 towards our PA.
    let up_host = lab.veth_ns(0, false, &["192.168.77.2"]);
    let ns0 = lab.ns(0);
    let vx = format!("{}vx", lab.prefix);
    must(&[
        "ip",
        "-n",
        &ns0,
        "link",
        "add",
        &vx,
        "type",
        "vxlan",
        "id",
        "100",
        "remote",
        "192.168.77.1",
        "local",
        "192.168.77.2",
        "dstport",
        "4789",
        "dev",
        &lab.guest(0),
    ]);
    must(&[
        "ip",
        "-n",
        &ns0,
        "link",
        "set",
        &vx,
        "address",
        "02:00:00:00:01:02",
    ]);
    configure(&ns0, &vx, &["10.0.0.2"]);
    let _ = run(&[
        "ip", "netns", "exec", &ns0, "ethtool", "-K", &vx, "tx", "off",
    ]);
    let _ = run(&[
        "ip",
        "netns",
        "exec",
        &ns0,
        "ethtool",
        "-K",
        &lab.guest(0),
        "tx",
        "off",
    ]);

    let mut c = SwitchConfig::private("ovx");
    c.overlay = Some(
        serde_json::from_value(serde_json::json!({
            "provider_addresses": ["192.168.77.1"],
            "provider_mac": "02:aa:00:00:00:01",
            "routing_domains": [{"name": "red", "encap": "vxlan",
                "subnets": [{"vsid": 100, "prefixes": ["10.0.0.0/24"]}]}],
            "policies": [entry("red", "10.0.0.2", "02:00:00:00:01:02", 100, "192.168.77.2")],
        }))
        .unwrap(),
    );
    let mut sw = Switch::new(c).unwrap();
    let up = sw.add_port(uplink()).unwrap();
    let v1 = sw
        .add_port(port("v1", "red", 100, "02:00:00:00:01:01", "10.0.0.1"))
        .unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    rt.attach(up, Arc::new(PacketPort::bind(&up_host).unwrap()));
    let p1 = vm(&mut lab, 1, "10.0.0.1", "02:00:00:00:01:01", None);
    rt.attach(v1, Arc::new(p1));
    std::thread::sleep(Duration::from_millis(100));

    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("vxlan.pcap");
    {
        let _cap = Capture::start(&up_host, &pcap);
        assert!(
            ping(&lab.ns(1), 3, 10, &["10.0.0.2"]),
            "Vireo VM → Linux vxlan peer must ping"
        );
        assert!(
            ping(&ns0, 3, 10, &["10.0.0.1"]),
            "Linux vxlan peer → Vireo VM must ping"
        );
    }
    let text = decode(&pcap);
    assert!(
        text.contains("VXLAN")
            && text.contains("vni 100")
            && text.contains("10.0.0.1 > 10.0.0.2: ICMP echo request"),
        "tcpdump did not decode our VXLAN:\n{text}"
    );
    let st = vireo_vswitch::runtime::lock(&sw).status(v1).unwrap();
    assert!(st.meters.egress.packets >= 6, "{st:?}");
    rt.stop().unwrap();
}

/// `ip -6 neigh` of namespace `ns` for `addr` on `dev`.
fn neigh6(ns: &str, addr: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-6", "neigh", "show", addr, "dev", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn netns_linux_vxlan_over_ipv6_resolves_and_is_resolved_by_nd() {
    if !netns_available("ov6") {
        return;
    }
    let mut lab = Lab::new("ov", "6");
    // Namespace 0: the Linux host with PA fd77::2 and IPv6 on; nobody has a static neighbour.
    let up_host = lab.veth_ns(0, true, &["fd77::2"]);
    let (ns0, g0) = (lab.ns(0), lab.guest(0));
    let linux_mac = "02:cc:00:00:00:02";
    must(&["ip", "-n", &ns0, "link", "set", &g0, "address", linux_mac]);
    let vx = format!("{}vx", lab.prefix);
    must(&[
        "ip", "-n", &ns0, "link", "add", &vx, "type", "vxlan", "id", "100", "remote", "fd77::1",
        "local", "fd77::2", "dstport", "4789", "dev", &g0,
    ]);
    must(&[
        "ip",
        "-n",
        &ns0,
        "link",
        "set",
        &vx,
        "address",
        "02:00:00:00:01:02",
    ]);
    // No IPv6 inside the tunnel: the tenant is IPv4 here, the provider network IPv6.
    let _ = run(&[
        "ip",
        "netns",
        "exec",
        &ns0,
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{vx}.disable_ipv6=1"),
    ]);
    configure(&ns0, &vx, &["10.0.0.2"]);
    for dev in [&vx, &g0] {
        let _ = run(&[
            "ip", "netns", "exec", &ns0, "ethtool", "-K", dev, "tx", "off",
        ]);
    }

    let mut c = SwitchConfig::private("ov6");
    c.overlay = Some(
        serde_json::from_value(serde_json::json!({
            "provider_addresses": ["fd77::1"],
            "provider_mac": "02:aa:00:00:00:01",
            "routing_domains": [{"name": "red", "encap": "vxlan",
                "subnets": [{"vsid": 100, "prefixes": ["10.0.0.0/24"]}]}],
            "policies": [entry("red", "10.0.0.2", "02:00:00:00:01:02", 100, "fd77::2")],
        }))
        .unwrap(),
    );
    let mut sw = Switch::new(c).unwrap();
    let up = sw.add_port(uplink()).unwrap();
    let v1 = sw
        .add_port(port("v1", "red", 100, "02:00:00:00:01:01", "10.0.0.1"))
        .unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    rt.attach(up, Arc::new(PacketPort::bind(&up_host).unwrap()));
    rt.attach(
        v1,
        Arc::new(vm(&mut lab, 1, "10.0.0.1", "02:00:00:00:01:01", None)),
    );
    std::thread::sleep(Duration::from_millis(100));

    // Our side first: the switch must solicit the Linux host's PA.
    assert!(
        ping(&lab.ns(1), 3, 10, &["10.0.0.2"]),
        "Vireo VM → Linux vxlan peer over IPv6 must ping"
    );
    let fd77_2 = "fd77::2".parse().unwrap();
    assert_eq!(
        vireo_vswitch::runtime::lock(&sw)
            .overlay()
            .unwrap()
            .neighbor(fd77_2),
        Some(mac(linux_mac).0),
        "our PA cache must hold the Linux host's MAC from its advertisement"
    );
    // Then forget us on the Linux side: what it knows of our PA now comes only from
    // soliciting it and our advertisement.
    must(&["ip", "-n", &ns0, "-6", "neigh", "flush", "dev", &g0]);
    assert!(
        !neigh6(&ns0, "fd77::1", &g0).contains("lladdr"),
        "flush left an entry"
    );
    assert!(
        ping(&ns0, 3, 10, &["10.0.0.1"]),
        "Linux vxlan peer → Vireo VM over IPv6 must ping"
    );
    let n = neigh6(&ns0, "fd77::1", &g0);
    assert!(
        n.contains("lladdr 02:aa:00:00:00:01") && !n.contains("FAILED"),
        "Linux did not learn our PA's MAC: {n:?}"
    );
    let c = vireo_vswitch::runtime::lock(&sw)
        .overlay()
        .unwrap()
        .nd_counters();
    assert!(
        c.solicits_sent >= 1
            && c.adverts_received >= 1
            && c.solicits_received >= 1
            && c.adverts_sent >= 1,
        "the NS/NA exchange is not in our counters: {c:?}"
    );
    assert_eq!(c.bad, 0, "{c:?}");
    rt.stop().unwrap();
}

#[test]
fn netns_two_hosts_two_tenants_same_addresses_nvgre_and_routing() {
    if !netns_available("ovt") || !vireo_testkit::require(vireo_testkit::Need::Tcpdump) {
        return;
    }
    let mut lab = Lab::new("ov", "t");
    // The provider network: one veth, one end per host's uplink.
    let (wa, wb) = (format!("{}wa", lab.prefix), format!("{}wb", lab.prefix));
    must(&[
        "ip", "link", "add", &wa, "type", "veth", "peer", "name", &wb,
    ]);
    lab.own_link(wa.clone());
    for w in [&wa, &wb] {
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{w}.disable_ipv6=1"),
        ]);
        must(&["ip", "link", "set", w, "up"]);
    }
    let ov = |pa: &str, pm: &str, policies: Vec<PolicyEntry>| -> OverlayConfig {
        serde_json::from_value(serde_json::json!({
            "provider_addresses": [pa],
            "provider_mac": pm,
            "routing_domains": [
                {"name": "red", "encap": "vxlan", "subnets": [
                    {"vsid": 100, "prefixes": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]},
                    {"vsid": 101, "prefixes": ["10.0.1.0/24"], "gateway_ips": ["10.0.1.254"]}]},
                {"name": "blue", "encap": "nvgre", "subnets": [
                    {"vsid": 200, "prefixes": ["10.0.0.0/24"]}]}],
            "policies": policies,
        }))
        .unwrap()
    };
    let (pa_a, pa_b) = ("192.168.78.1", "192.168.78.2");
    let (m1, m2, m3) = (
        "02:00:00:00:01:01",
        "02:00:00:00:01:02",
        "02:00:00:00:01:03",
    );
    let mut ca = SwitchConfig::private("ova");
    ca.overlay = Some(ov(
        pa_a,
        "02:aa:00:00:00:01",
        vec![
            entry("red", "10.0.0.2", m2, 100, pa_b),
            entry("red", "10.0.1.3", m3, 101, pa_b),
            entry("blue", "10.0.0.2", m2, 200, pa_b),
        ],
    ));
    let mut cb = SwitchConfig::private("ovb");
    cb.overlay = Some(ov(
        pa_b,
        "02:bb:00:00:00:01",
        vec![
            entry("red", "10.0.0.1", m1, 100, pa_a),
            entry("blue", "10.0.0.1", m1, 200, pa_a),
        ],
    ));
    let (mut a, mut b) = (Switch::new(ca).unwrap(), Switch::new(cb).unwrap());
    let a_up = a.add_port(uplink()).unwrap();
    let a_red = a.add_port(port("red", "red", 100, m1, "10.0.0.1")).unwrap();
    let a_blue = a
        .add_port(port("blue", "blue", 200, m1, "10.0.0.1"))
        .unwrap();
    let b_up = b.add_port(uplink()).unwrap();
    let b_red = b.add_port(port("red", "red", 100, m2, "10.0.0.2")).unwrap();
    let b_blue = b
        .add_port(port("blue", "blue", 200, m2, "10.0.0.2"))
        .unwrap();
    let b_red3 = b
        .add_port(port("red3", "red", 101, m3, "10.0.1.3"))
        .unwrap();
    let (a, b) = (Arc::new(Mutex::new(a)), Arc::new(Mutex::new(b)));
    let ra = SwitchRuntime::start(a.clone()).unwrap();
    let rb = SwitchRuntime::start(b.clone()).unwrap();
    ra.attach(a_up, Arc::new(PacketPort::bind(&wa).unwrap()));
    rb.attach(b_up, Arc::new(PacketPort::bind(&wb).unwrap()));
    // Namespaces: 1 A-red, 2 A-blue, 3 B-red, 4 B-blue, 5 B-red3 (other subnet).
    ra.attach(
        a_red,
        Arc::new(vm(&mut lab, 1, "10.0.0.1", m1, Some("10.0.0.254"))),
    );
    ra.attach(a_blue, Arc::new(vm(&mut lab, 2, "10.0.0.1", m1, None)));
    rb.attach(b_red, Arc::new(vm(&mut lab, 3, "10.0.0.2", m2, None)));
    rb.attach(b_blue, Arc::new(vm(&mut lab, 4, "10.0.0.2", m2, None)));
    rb.attach(
        b_red3,
        Arc::new(vm(&mut lab, 5, "10.0.1.3", m3, Some("10.0.1.254"))),
    );
    std::thread::sleep(Duration::from_millis(100));

    let dir = tempfile::tempdir().unwrap();
    let (wire, blue_b) = (dir.path().join("wire.pcap"), dir.path().join("blue.pcap"));
    {
        let _w = Capture::start(&wa, &wire);
        let _b = Capture::start(&lab.host(4), &blue_b);
        assert!(ping(&lab.ns(1), 3, 10, &["10.0.0.2"]), "red A → red B");
        assert!(ping(&lab.ns(2), 3, 10, &["10.0.0.2"]), "blue A → blue B");
        assert!(
            ping(&lab.ns(1), 3, 10, &["10.0.1.3"]),
            "red 10.0.0.1 → red 10.0.1.3, routed"
        );
        // Blue B's capture so far must hold only blue's own pings; then red pings again
        // and nothing more may reach blue.
        std::thread::sleep(Duration::from_millis(300));
    }
    let wire_text = decode(&wire);
    assert!(
        wire_text.contains("GREv0")
            && wire_text.contains("key=0xc8")
            && wire_text.contains("10.0.0.1 > 10.0.0.2: ICMP echo request"),
        "tcpdump did not decode our NVGRE:\n{wire_text}"
    );
    assert!(
        wire_text.contains("vni 100") && wire_text.contains("vni 101"),
        "{wire_text}"
    );
    let blue_text = decode(&blue_b);
    let blue_echoes = blue_text.matches("ICMP echo request").count();
    assert!(
        (3..=6).contains(&blue_echoes),
        "blue B saw {blue_echoes} echoes:\n{blue_text}"
    );
    // Red traffic alone: blue B's port gets nothing.
    let before = vireo_vswitch::runtime::lock(&b)
        .status(b_blue)
        .unwrap()
        .meters
        .egress
        .packets;
    assert!(ping(&lab.ns(1), 3, 10, &["10.0.0.2"]));
    let after = vireo_vswitch::runtime::lock(&b)
        .status(b_blue)
        .unwrap()
        .meters
        .egress
        .packets;
    assert_eq!(before, after, "red traffic reached the blue tenant");
    ra.stop().unwrap();
    rb.stop().unwrap();
}

/// Bytes the iperf3 client (JSON) reports received in each interval.
fn interval_bytes(json: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn netns_vm_moved_between_hosts_keeps_its_tcp_connection() {
    if !netns_available("ovm") || !vireo_testkit::require(vireo_testkit::Need::Iperf3) {
        return;
    }
    let mut lab = Lab::new("ov", "m");
    let (wa, wb) = (format!("{}wa", lab.prefix), format!("{}wb", lab.prefix));
    must(&[
        "ip", "link", "add", &wa, "type", "veth", "peer", "name", &wb,
    ]);
    lab.own_link(wa.clone());
    for w in [&wa, &wb] {
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{w}.disable_ipv6=1"),
        ]);
        must(&["ip", "link", "set", w, "up"]);
    }
    let (pa_a, pa_b) = ("192.168.80.1", "192.168.80.2");
    let (mx, mp) = ("02:00:00:00:02:01", "02:00:00:00:02:02");
    let ov = |pa: &str, pm: &str, policies: Vec<PolicyEntry>| -> OverlayConfig {
        serde_json::from_value(serde_json::json!({
            "provider_addresses": [pa], "provider_mac": pm,
            "routing_domains": [{"name": "red", "subnets": [{"vsid": 300}]}],
            "policies": policies,
        }))
        .unwrap()
    };
    // X (10.0.0.1) starts on A; P (10.0.0.2) is on B.
    let mut ca = SwitchConfig::private("ovma");
    ca.overlay = Some(ov(
        pa_a,
        "02:aa:00:00:00:02",
        vec![entry("red", "10.0.0.2", mp, 300, pa_b)],
    ));
    let mut cb = SwitchConfig::private("ovmb");
    cb.overlay = Some(ov(
        pa_b,
        "02:bb:00:00:00:02",
        vec![entry("red", "10.0.0.1", mx, 300, pa_a)],
    ));
    let (mut a, mut b) = (Switch::new(ca).unwrap(), Switch::new(cb).unwrap());
    let a_up = a.add_port(uplink()).unwrap();
    let b_up = b.add_port(uplink()).unwrap();
    let x_cfg = port("x", "red", 300, mx, "10.0.0.1");
    let x_a = a.add_port(x_cfg.clone()).unwrap();
    let p_b = b.add_port(port("p", "red", 300, mp, "10.0.0.2")).unwrap();
    let (a, b) = (Arc::new(Mutex::new(a)), Arc::new(Mutex::new(b)));
    let ra = SwitchRuntime::start(a.clone()).unwrap();
    let rb = SwitchRuntime::start(b.clone()).unwrap();
    ra.attach(a_up, Arc::new(PacketPort::bind(&wa).unwrap()));
    rb.attach(b_up, Arc::new(PacketPort::bind(&wb).unwrap()));
    ra.attach(x_a, Arc::new(vm(&mut lab, 1, "10.0.0.1", mx, None)));
    rb.attach(p_b, Arc::new(vm(&mut lab, 2, "10.0.0.2", mp, None)));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        ping(&lab.ns(2), 2, 10, &["10.0.0.1"]),
        "P → X before the move"
    );

    // A TCP stream P → X for 6 s; X moves from A to B after 2 s.
    let server = iperf_server(&lab.ns(1), 5301);
    let client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(2),
            "timeout",
            "30",
            "iperf3",
            "-c",
            "10.0.0.1",
            "-p",
            "5301",
            "-J",
            "-t",
            "6",
            "-b",
            "50M",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    {
        // The move: A lets the port go and learns X's new PA; B takes the port (its entry
        // replaces the remote one, same MAC); the VM's interface is the same.
        ra.detach(x_a);
        let mut a = vireo_vswitch::runtime::lock(&a);
        a.remove_port(x_a).unwrap();
        a.set_policy(&entry("red", "10.0.0.1", mx, 300, pa_b))
            .unwrap();
    }
    let x_b = vireo_vswitch::runtime::lock(&b).add_port(x_cfg).unwrap();
    rb.attach(x_b, Arc::new(PacketPort::bind(&lab.host(1)).unwrap()));
    let out = client.wait_with_output().unwrap();
    let mut server = server;
    let _ = server.kill();
    let _ = server.wait();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the TCP stream broke across the move:\n{json}"
    );
    let iv = interval_bytes(&json);
    assert!(iv.len() >= 5, "{json}");
    assert!(
        iv[iv.len() - 2..].iter().all(|b| *b > 0),
        "no data after the move: {iv:?}"
    );
    // After the move the traffic is local to B: X's port there carried it.
    let st = vireo_vswitch::runtime::lock(&b).status(x_b).unwrap();
    assert!(st.meters.egress.packets > 100, "{st:?}");
    ra.stop().unwrap();
    rb.stop().unwrap();
}
