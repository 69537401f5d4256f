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

use crate::common;
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
    lab.tx_checksums_in_software(0);
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

/// Runs `f` on a thread inside network namespace `ns` (sockets it opens stay there).
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this (fresh, scoped) thread only, with a valid namespace fd.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// Internet checksum of `data` (0 when a checksum inside verifies).
fn inet(data: &[u8]) -> u16 {
    let mut a = 0u32;
    for w in data.chunks(2) {
        a += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while a > 0xffff {
        a = (a & 0xffff) + (a >> 16);
    }
    !(a as u16)
}

/// The ICMP errors (IPv4 type 3) in a little-endian Ethernet pcap file, as (type, code,
/// frame), each with every checksum checked: outer IP header, ICMP, quoted IP header, and
/// the quoted UDP checksum when the whole datagram is quoted.
fn icmp_errors(file: &std::path::Path) -> Vec<(u8, u8, Vec<u8>)> {
    let d = std::fs::read(file).unwrap();
    let mut v = Vec::new();
    let mut at = 24;
    while at + 16 <= d.len() {
        let n = u32::from_le_bytes(d[at + 8..at + 12].try_into().unwrap()) as usize;
        let f = &d[at + 16..(at + 16 + n).min(d.len())];
        at += 16 + n;
        if f.len() < 34 + 8 + 28 || f[12..14] != [8, 0] || f[23] != 1 || f[34] != 3 {
            continue;
        }
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        assert_eq!(inet(&f[14..34]), 0, "outer IP header checksum");
        assert_eq!(inet(&f[34..14 + total]), 0, "ICMP checksum");
        let q = &f[42..14 + total];
        assert_eq!(inet(&q[..20]), 0, "quoted IP header checksum");
        let qlen = usize::from(u16::from_be_bytes([q[2], q[3]]));
        if q[9] == 17 && q.len() >= qlen {
            let mut p = q[12..20].to_vec();
            p.extend_from_slice(&[0, 17]);
            p.extend_from_slice(&q[24..26]);
            p.extend_from_slice(&q[20..qlen]);
            assert_eq!(inet(&p), 0, "quoted UDP checksum");
        }
        v.push((f[34], f[35], f.to_vec()));
    }
    v
}

#[test]
fn netns_icmp_errors_from_outside_reach_the_nat_tenant_translated() {
    use std::net::UdpSocket;
    if !netns_available("ogi") || !vireo_testkit::require(vireo_testkit::Need::Tcpdump) {
        return;
    }
    let mut lab = Lab::new("og", "i");
    // Namespace 0: a router on the physical network (198.51.100.9) towards a far host
    // (namespace 4, 192.0.2.2) over a link of MTU 1300.
    let up_host = lab.veth_ns(0, false, &["198.51.100.9"]);
    let phys = lab.ns(0);
    let far = lab.add_ns(4);
    let (ra, rb) = (format!("{}ra", lab.prefix), format!("{}rb", lab.prefix));
    must(&[
        "ip", "-n", &phys, "link", "add", &ra, "type", "veth", "peer", "name", &rb,
    ]);
    must(&["ip", "-n", &phys, "link", "set", &rb, "netns", &far]);
    for (ns, dev, addr) in [(&phys, &ra, "192.0.2.1"), (&far, &rb, "192.0.2.2")] {
        must(&["ip", "-n", ns, "link", "set", dev, "mtu", "1300"]);
        configure(ns, dev, &[addr]);
    }
    must(&[
        "ip",
        "-n",
        &far,
        "route",
        "add",
        "default",
        "via",
        "192.0.2.1",
    ]);
    must(&[
        "ip",
        "netns",
        "exec",
        &phys,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    for dev in [&lab.guest(0), &ra] {
        must(&[
            "ip", "netns", "exec", &phys, "ethtool", "-K", dev, "tx", "off",
        ]);
    }

    let mut c = SwitchConfig::private("ogi");
    c.overlay = Some(
        serde_json::from_value(serde_json::json!({
            "provider_addresses": ["192.168.77.1"],
            "provider_mac": "02:aa:00:00:00:01",
            "routing_domains": [
                {"name": "red", "subnets": [{"vsid": 100, "prefixes": ["10.0.0.0/24"], "gateway_ips": ["10.0.0.254"]}]}],
            "gateways": [
                {"name": "out", "mode": "nat", "routing_domains": ["red"],
                 "address": "198.51.100.1/24", "next_hop": "198.51.100.9"}]
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
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    rt.attach(up, Arc::new(PacketPort::bind(&up_host).unwrap()));
    rt.attach(red, Arc::new(vm(&mut lab, 1, "10.0.0.1", "10.0.0.254")));
    std::thread::sleep(Duration::from_millis(100));
    let red_ns = lab.ns(1);

    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("red.pcap");
    let (refused, mtu) = {
        let _cap = capture(&lab.host(1), &pcap);
        // A UDP datagram to a closed port: the physical host's stack answers port
        // unreachable to the NAT address; the tenant's socket must see it as its own.
        let refused = in_ns(&red_ns, || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect("198.51.100.9:9").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            (0..10).any(|_| {
                let _ = s.send(b"anyone there?");
                matches!(s.recv(&mut [0; 64]), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
            })
        });
        // A DF datagram too big for the far link: the router answers fragmentation needed
        // (MTU 1300); the tenant's kernel must take the path MTU from it.
        let mtu = in_ns(&red_ns, || {
            use std::os::fd::AsRawFd;
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect("192.0.2.2:9").unwrap();
            let on: libc::c_int = libc::IP_PMTUDISC_DO;
            // SAFETY: a valid socket and an int option of the right size.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            for _ in 0..10 {
                let _ = s.send(&[7; 1400]);
                std::thread::sleep(Duration::from_millis(300));
                let mut mtu: libc::c_int = 0;
                let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: as above; `mtu` and `len` outlive the call.
                let r = unsafe {
                    libc::getsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_MTU,
                        (&mut mtu as *mut libc::c_int).cast(),
                        &mut len,
                    )
                };
                if r == 0 && mtu < 1500 {
                    return mtu;
                }
            }
            0
        });
        // tcpdump hands packets over in blocks retired after 1 s: let the last one go.
        std::thread::sleep(Duration::from_millis(1500));
        (refused, mtu)
    };
    assert!(
        refused,
        "the tenant's socket never saw the port unreachable"
    );
    assert_eq!(
        mtu, 1300,
        "the tenant's path MTU did not come from the router's ICMP"
    );
    let errs = icmp_errors(&pcap);
    let quoted_src = |f: &Vec<u8>| f[42 + 12..42 + 16] == [10, 0, 0, 1];
    assert!(
        errs.iter()
            .any(|(t, c, f)| (*t, *c) == (3, 3) && quoted_src(f) && f[30..34] == [10, 0, 0, 1]),
        "no translated port unreachable at the VM: {errs:?}\n{}",
        decode(&pcap)
    );
    assert!(
        errs.iter().any(|(t, c, f)| (*t, *c) == (3, 4)
            && quoted_src(f)
            && f[40..42] == 1300u16.to_be_bytes()),
        "no translated fragmentation needed at the VM: {errs:?}"
    );
    let g = sw.lock().unwrap();
    assert!(g.overlay().unwrap().nat_icmp_errors_translated() >= 2);
    drop(g);
    rt.stop().unwrap();
}

#[test]
fn netns_ipv6_is_forwarded_through_the_gateway_with_next_hops_found_by_nd() {
    if !netns_available("og6") {
        return;
    }
    let mut lab = Lab::new("og", "6");
    // Namespace 0: the physical host, IPv6 on, 2001:db8:30::9/64, routing green's prefix to
    // the gateway's IPv6 address (no static neighbour anywhere).
    let up_host = lab.veth_ns(0, true, &["2001:db8:30::9"]);
    let phys = lab.ns(0);
    lab.tx_checksums_in_software(0);
    must(&[
        "ip",
        "-n",
        &phys,
        "-6",
        "route",
        "add",
        "2001:db8:1::/64",
        "via",
        "2001:db8:30::1",
    ]);

    let mut c = SwitchConfig::private("og6");
    c.overlay = Some(
        serde_json::from_value(serde_json::json!({
            "provider_addresses": ["192.168.77.1"],
            "provider_mac": "02:aa:00:00:00:01",
            "routing_domains": [
                {"name": "green", "subnets": [{"vsid": 300, "prefixes": ["2001:db8:1::/64"],
                    "gateway_ips": ["2001:db8:1::fe"]}]}],
            "gateways": [
                {"name": "fwd", "mode": "forward", "routing_domains": ["green"],
                 "address": "198.51.100.2/24", "address6": "2001:db8:30::1/64"}]
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
    let green = sw
        .add_port(port("green", "green", 300, "2001:db8:1::5"))
        .unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    rt.attach(up, Arc::new(PacketPort::bind(&up_host).unwrap()));
    // Green's VM: IPv6 on (its gateway is found by ND, answered by the distributed router).
    let host = lab.veth_ns(1, true, &[]);
    let (vm_ns, g) = (lab.ns(1), lab.guest(1));
    must(&["ip", "-n", &vm_ns, "link", "set", &g, "address", VM_MAC]);
    configure(&vm_ns, &g, &["2001:db8:1::5"]);
    must(&[
        "ip",
        "-n",
        &vm_ns,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:1::fe",
    ]);
    must(&[
        "ip", "netns", "exec", &vm_ns, "ethtool", "-K", &g, "tx", "off",
    ]);
    rt.attach(green, Arc::new(PacketPort::bind(&host).unwrap()));
    std::thread::sleep(Duration::from_millis(100));

    assert!(
        ping(&vm_ns, 3, 10, &["2001:db8:30::9"]),
        "green → physical over IPv6, forwarded"
    );
    // Forget the gateway there (learned from its solicitation so far): what the physical
    // host knows of it next comes from soliciting it and the gateway's (router) answer.
    must(&[
        "ip",
        "-n",
        &phys,
        "-6",
        "neigh",
        "flush",
        "dev",
        &lab.guest(0),
    ]);
    assert!(
        ping(&phys, 3, 10, &["2001:db8:1::5"]),
        "physical → green's IPv6 CA"
    );
    let out = Command::new("ip")
        .args(["-n", &phys, "-6", "neigh", "show", "2001:db8:30::1"])
        .output()
        .unwrap();
    let n = String::from_utf8_lossy(&out.stdout);
    assert!(
        n.contains("lladdr 02:fe:c6:33:64:02") && n.contains("router"),
        "the physical host did not learn the gateway from its advertisement: {n:?}"
    );
    let g = sw.lock().unwrap();
    let c = g.overlay().unwrap().gateway_nd_counters();
    assert!(
        c.solicits_sent >= 1 && c.adverts_received >= 1 && c.adverts_sent >= 1,
        "{c:?}"
    );
    assert_eq!(c.bad, 0, "{c:?}");
    drop(g);
    rt.stop().unwrap();
}
