//! The kernel fast path of overlay flows end to end: two Vireo "hosts" (switch instances whose
//! uplinks are the two ends of one veth) carry a TCP connection between two VM namespaces over
//! VXLAN. After the first frames, both directions are encapsulated and decapsulated by the
//! tc/eBPF classifiers (filters present on the VM ports and uplinks, their counters rising),
//! the bytes arrive intact, and a tunnel packet for that connection whose outer source is not
//! the PA the policy table holds is not redirected (user space drops it as spoofed), while the
//! same packet from the right PA is. Needs root and `ip netns` (recorded skip otherwise).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_netport::FramePort;
use vireo_vswitch::fastpath::tunnel::Tunnel;
use vireo_vswitch::overlay::encap::{encapsulate, Outer};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::common;
use common::host::*;
use common::netns::*;

const PA_A: &str = "192.168.81.1";
const PA_B: &str = "192.168.81.2";
const PMAC_A: &str = "02:aa:00:00:00:01";
const PMAC_B: &str = "02:bb:00:00:00:01";
const M1: &str = "02:00:00:00:03:01";
const M2: &str = "02:00:00:00:03:02";
const BYTES: usize = 48 << 20;

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn overlay(pa: &str, pmac: &str, peer_ca: &str, peer_mac: &str, peer_pa: &str) -> OverlayConfig {
    serde_json::from_value(serde_json::json!({
        "provider_addresses": [pa],
        "provider_mac": pmac,
        "routing_domains": [{"name": "red", "encap": "vxlan",
            "subnets": [{"vsid": 100, "prefixes": ["10.0.0.0/24"]}]}],
        "policies": [{"routing_domain": "red", "ca": peer_ca, "mac": peer_mac,
            "vsid": 100, "pa": peer_pa}],
    }))
    .unwrap()
}

/// One host: an uplink and a VM port in VSID 100 with `ca`/`m`.
fn host(name: &str, ov: OverlayConfig, ca: &str, m: &str) -> (Switch, PortId, PortId) {
    let mut c = SwitchConfig::private(name);
    c.overlay = Some(ov);
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    let vm = sw
        .add_port(PortConfig {
            overlay: Some(PortOverlay {
                routing_domain: "red".into(),
                vsid: 100,
                mac: mac(m),
                cas: vec![ca.parse().unwrap()],
            }),
            ..PortConfig::access("vm", 1)
        })
        .unwrap();
    (sw, up, vm)
}

/// A VM namespace on veth `k` with `ca`/24, MAC `m` and `mtu` (both veth ends); its host end
/// for the switch. `tso`: the guest sends super-frames with partial checksums and the port
/// takes vnet headers; otherwise it sends complete MTU-sized frames through a plain socket.
fn vm(lab: &mut Lab, k: usize, ca: &str, m: &str, tso: bool, mtu: u32) -> PacketPort {
    let host = lab.veth_ns(k, false, &[]);
    let (ns, g) = (lab.ns(k), lab.guest(k));
    let mtu = mtu.to_string();
    must(&["ip", "link", "set", &host, "mtu", &mtu]);
    must(&[
        "ip", "-n", &ns, "link", "set", &g, "address", m, "mtu", &mtu,
    ]);
    configure(&ns, &g, &[ca]);
    let tx = if tso { "on" } else { "off" };
    must(&["ip", "netns", "exec", &ns, "ethtool", "-K", &g, "tx", tx]);
    if tso {
        PacketPort::bind_offload(&host).unwrap()
    } else {
        PacketPort::bind(&host).unwrap()
    }
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace fd we hold; only this thread moves.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// The byte at `i` of the test stream (not a short period, so a misplaced segment shows).
fn pattern(i: usize) -> u8 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i >> 12) as u8
}

/// `tc -s filter show dev <dev> ingress`.
fn filters(dev: &str) -> String {
    output(&["tc", "-s", "filter", "show", "dev", dev, "ingress"])
}

/// Packets our filters' mirred actions counted on `dev`.
fn redirected(dev: &str) -> u64 {
    filters(dev)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Sent "))
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum()
}

/// Bytes our filters' mirred actions counted on `dev`.
fn redirected_bytes(dev: &str) -> u64 {
    filters(dev)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Sent "))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
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

#[test]
fn netns_overlay_tcp_is_encapsulated_and_decapsulated_in_the_kernel() {
    if netns_available("ovf") {
        transfer_through_the_kernel("f", false);
    }
}

/// The same with guest TSO: super-frames are encapsulated whole (a UDP-tunnel GSO skb) and
/// decapsulated whole; the ones user space sees before the kernel takes the connection are
/// segmented first.
#[test]
fn netns_overlay_tcp_super_frames_cross_the_kernel_whole() {
    if netns_available("ovg") {
        transfer_through_the_kernel("g", true);
    }
}

/// Two hosts whose uplinks are the ends of veth `wa`/`wb`, each with a VM namespace (1: A,
/// 10.0.0.1; 2: B, 10.0.0.2) on its VM port, and the customer ARP resolved.
struct TwoHosts {
    lab: Lab,
    wa: String,
    wb: String,
    a: Arc<Mutex<Switch>>,
    b: Arc<Mutex<Switch>>,
    ra: SwitchRuntime,
    rb: SwitchRuntime,
    a_up: PortId,
    a_vm: PortId,
    b_up: PortId,
    b_vm: PortId,
}

fn two_hosts(tag: &str, tso: bool, vm_mtu: u32) -> TwoHosts {
    let mut lab = Lab::new("ov", tag);
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
    let (a, a_up, a_vm) = host(
        "ofa",
        overlay(PA_A, PMAC_A, "10.0.0.2", M2, PA_B),
        "10.0.0.1",
        M1,
    );
    let (b, b_up, b_vm) = host(
        "ofb",
        overlay(PA_B, PMAC_B, "10.0.0.1", M1, PA_A),
        "10.0.0.2",
        M2,
    );
    let (a, b) = (Arc::new(Mutex::new(a)), Arc::new(Mutex::new(b)));
    let ra = SwitchRuntime::start(a.clone()).unwrap();
    let rb = SwitchRuntime::start(b.clone()).unwrap();
    ra.attach_packet(a_up, Arc::new(PacketPort::bind(&wa).unwrap()));
    rb.attach_packet(b_up, Arc::new(PacketPort::bind(&wb).unwrap()));
    let port = vm(&mut lab, 1, "10.0.0.1", M1, tso, vm_mtu);
    ra.attach_packet(a_vm, Arc::new(port));
    let port = vm(&mut lab, 2, "10.0.0.2", M2, tso, vm_mtu);
    rb.attach_packet(b_vm, Arc::new(port));
    std::thread::sleep(Duration::from_millis(100));
    // Resolves the provider neighbours and the customer ARP (user space).
    assert!(ping(&lab.ns(1), 3, 10, &["10.0.0.2"]), "VM A → VM B");
    TwoHosts {
        lab,
        wa,
        wb,
        a,
        b,
        ra,
        rb,
        a_up,
        a_vm,
        b_up,
        b_vm,
    }
}

/// Drops counted for `reason` on `port`.
fn drops(sw: &Arc<Mutex<Switch>>, port: PortId, reason: DropReason) -> u64 {
    lock(sw)
        .status(port)
        .unwrap()
        .meters
        .drops
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

/// B's side of a test stream: reads until EOF (or 20 s of silence: a stalled connection
/// fails the test rather than hanging it) and returns (bytes, bytes not as sent).
fn receive_pattern(listener: TcpListener) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let (mut n, mut bad) = (0usize, 0usize);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => k,
            };
            bad += buf[..k]
                .iter()
                .enumerate()
                .filter(|(i, b)| **b != pattern(n + i))
                .count();
            n += k;
        }
        (n, bad)
    })
}

/// MTU honesty on the fast path: the VMs' MTU is 9000 (ports and guests), the provider's
/// 1500, so the limit of an offloaded connection's frames is 1450 bytes of IP. Once the
/// connection is in the kernel, A's first 9000-byte segments (or super-frames of 8948-byte
/// segments, with TSO) are over it: the classifier hands them to user space, which answers
/// ICMP "fragmentation needed" with MTU 1450 (counted `too_big`); A's TCP lowers its segment
/// size and the stream completes intact, carried on by the kernel.
#[test]
fn netns_overlay_oversized_frames_of_an_offloaded_connection_get_icmp_too_big() {
    if netns_available("ovm") {
        oversized_frames_get_icmp_too_big("m", false);
    }
}

#[test]
fn netns_overlay_oversized_super_frames_of_an_offloaded_connection_get_icmp_too_big() {
    if netns_available("ovt") {
        oversized_frames_get_icmp_too_big("t", true);
    }
}

fn oversized_frames_get_icmp_too_big(tag: &str, tso: bool) {
    let h = two_hosts(tag, tso, 9000);
    let (ns1, h1) = (h.lab.ns(1), h.lab.host(1));
    let listener = in_ns(&h.lab.ns(2), || TcpListener::bind("10.0.0.2:5302").unwrap());
    let server = receive_pattern(listener);
    let mut client = in_ns(&ns1, || {
        TcpStream::connect_timeout(&"10.0.0.2:5302".parse().unwrap(), Duration::from_secs(5))
            .unwrap()
    });
    client.set_nodelay(true).unwrap();
    // A stalled connection fails the test rather than hanging it.
    client
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Small writes until A's encap classifier carries the connection.
    let mut sent = 0usize;
    wait_for("the connection's encap flow in the kernel", 20, || {
        let small: Vec<u8> = (sent..sent + 100).map(pattern).collect();
        client.write_all(&small).unwrap();
        sent += small.len();
        redirected(&h1) > 0
    });
    let route = || output(&["ip", "-n", &ns1, "route", "get", "10.0.0.2"]);
    assert!(!route().contains("mtu 1450"), "{}", route());
    let too_big0 = drops(&h.a, h.a_vm, DropReason::TooBig);
    let kernel0 = redirected(&h1);

    let big: Vec<u8> = (sent..sent + BYTES / 4).map(pattern).collect();
    if let Err(e) = client.write_all(&big) {
        panic!(
            "the stream stalled ({e}): too_big {} -> {}, route {}, A's filters:\n{}",
            too_big0,
            drops(&h.a, h.a_vm, DropReason::TooBig),
            route(),
            filters(&h1)
        );
    }
    sent += big.len();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let (n, bad) = server.join().unwrap();
    assert_eq!((n, bad), (sent, 0), "the stream completes intact");

    let too_big = drops(&h.a, h.a_vm, DropReason::TooBig) - too_big0;
    assert!(too_big > 0, "no too_big counted on A's VM port");
    assert!(
        route().contains("mtu 1450"),
        "A learned no path MTU from an ICMP fragmentation-needed: {}",
        route()
    );
    // After the ICMP the connection went on through the kernel.
    assert!(
        redirected_bytes(&h1) > (BYTES / 4) as u64 * 8 / 10 && redirected(&h1) > kernel0,
        "{}",
        filters(&h1)
    );
    assert!(
        h.ra.offloaded_flows()
            .iter()
            .any(|k| k.ingress == h.a_vm && matches!(k.tunnel, Some(Tunnel::Encap { .. }))),
        "{:?}",
        h.ra.offloaded_flows()
    );
    let _ = (&h.b, h.b_up, h.b_vm, &h.wa, &h.wb, h.a_up);
    h.ra.stop().unwrap();
    h.rb.stop().unwrap();
}

fn transfer_through_the_kernel(tag: &str, tso: bool) {
    let TwoHosts {
        lab,
        wa,
        wb,
        a,
        b,
        ra,
        rb,
        a_up,
        a_vm,
        b_up,
        b_vm,
    } = two_hosts(tag, tso, 1450);

    let listener = in_ns(&lab.ns(2), || TcpListener::bind("10.0.0.2:5301").unwrap());
    let server = receive_pattern(listener);
    let client = in_ns(&lab.ns(1), || {
        TcpStream::connect_timeout(&"10.0.0.2:5301".parse().unwrap(), Duration::from_secs(5))
            .unwrap()
    });
    let sender = std::thread::spawn(move || {
        let mut c = client;
        let chunk: Vec<u8> = (0..BYTES).map(pattern).collect();
        c.write_all(&chunk).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
    });
    // While the transfer runs, all four classifiers carry traffic.
    let (h1, h2) = (lab.host(1), lab.host(2));
    wait_for("all four overlay flows in the kernel", 20, || {
        [&h1, &h2, &wa, &wb].iter().all(|d| redirected(d) > 0)
    });
    sender.join().unwrap();
    let (n, bad) = server.join().unwrap();
    assert_eq!((n, bad), (BYTES, 0), "the bytes arrive intact");

    let kinds = |rt: &SwitchRuntime, vm: PortId, up: PortId| {
        let f = rt.offloaded_flows();
        let enc = f.iter().any(|k| {
            k.ingress == vm && k.egress == up && matches!(k.tunnel, Some(Tunnel::Encap { .. }))
        });
        let dec = f.iter().any(|k| {
            k.ingress == up && k.egress == vm && matches!(k.tunnel, Some(Tunnel::Decap { .. }))
        });
        (enc, dec)
    };
    assert_eq!(
        kinds(&ra, a_vm, a_up),
        (true, true),
        "{:?}",
        ra.offloaded_flows()
    );
    assert_eq!(
        kinds(&rb, b_vm, b_up),
        (true, true),
        "{:?}",
        rb.offloaded_flows()
    );
    // Most of the data went through the kernel (tc counts the bytes of frames as they
    // arrived: the customer IP packets at A's VM port, the outer ones at B's uplink).
    let (enc, dec) = (redirected_bytes(&h1), redirected_bytes(&wb));
    assert!(
        enc > BYTES as u64 * 9 / 10,
        "A's encap filter carried {enc} bytes:\n{}",
        filters(&h1)
    );
    assert!(
        dec > enc,
        "B's decap filter carried {dec} bytes:\n{}",
        filters(&wb)
    );
    if !tso {
        assert!(redirected(&h1) > 20_000, "{}", filters(&h1));
    }
    // The kernel's counts reach the ports' meters.
    let meters = || {
        (
            lock(&b).status(b_vm).unwrap().meters.egress,
            lock(&a).status(a_vm).unwrap().meters.ingress,
        )
    };
    // 48 MiB is ~36,000 segments; a super-frame tc counted as none is estimated from its
    // bytes (one packet per full-sized frame they fill, ~33,500), and its bytes as the
    // super-frame's (headers once): within a few percent.
    let counted = |(b_out, a_in): (Counter, Counter)| {
        b_out.packets > 30_000
            && b_out.bytes > BYTES as u64 * 9 / 10
            && a_in.bytes > BYTES as u64 * 9 / 10
    };
    let end = Instant::now() + Duration::from_secs(5);
    while !counted(meters()) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        counted(meters()),
        "B's VM egress, A's VM ingress: {:?}",
        meters()
    );

    // A tunnel packet of that connection from a PA the policy table does not hold for the
    // inner source is left to user space (dropped there as spoofed); from the right PA the
    // kernel takes it.
    let flow = rb
        .offloaded_flows()
        .into_iter()
        .find(|k| k.ingress == b_up)
        .unwrap();
    let l4 = flow.l4.unwrap();
    let inner = {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[..6].copy_from_slice(&flow.dst);
        f[6..12].copy_from_slice(&flow.src);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&40u16.to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&(l4.src_ip as u32).to_be_bytes());
        f[30..34].copy_from_slice(&(l4.dst_ip as u32).to_be_bytes());
        let c = vireo_vswitch::overlay::wire::ipv4_header_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34..36].copy_from_slice(&l4.sport.to_be_bytes());
        f[36..38].copy_from_slice(&l4.dport.to_be_bytes());
        f[46] = 0x50;
        f[47] = 0x10; // ACK
        f
    };
    let tunnel = |src_pa: &str| {
        let mut f = inner.clone();
        let o = Outer {
            src_mac: mac(PMAC_A).0,
            dst_mac: mac(PMAC_B).0,
            src_ip: src_pa.parse().unwrap(),
            dst_ip: PA_B.parse().unwrap(),
        };
        encapsulate(&mut f, vireo_netconfig::Encap::Vxlan, 100, 7, &o);
        f
    };
    let spoofs = |sw: &Arc<Mutex<Switch>>| drops(sw, b_up, DropReason::OverlaySpoof);
    let injector = PacketPort::bind(&wa).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (kernel0, spoof0) = (redirected(&wb), spoofs(&b));
    for _ in 0..5 {
        injector.send(&tunnel("192.168.81.9")).unwrap();
    }
    wait_for("user space to drop the spoofed packets", 5, || {
        spoofs(&b) >= spoof0 + 5
    });
    assert_eq!(
        redirected(&wb),
        kernel0,
        "a spoofed outer source was redirected"
    );
    for _ in 0..5 {
        injector.send(&tunnel(PA_A)).unwrap();
    }
    wait_for("the kernel to take the genuine packets", 5, || {
        redirected(&wb) >= kernel0 + 5
    });
    assert_eq!(spoofs(&b), spoof0 + 5);

    // A policy change removes the overlay flows before it returns (they hold PAs and MACs
    // from the table).
    let moved = PolicyEntry {
        routing_domain: "red".into(),
        ca: "10.0.0.2".parse().unwrap(),
        mac: mac(M2),
        vsid: 100,
        pa: "192.168.81.7".parse().unwrap(),
    };
    lock(&a).set_policy(&moved).unwrap();
    assert_eq!(ra.offloaded_flows(), vec![]);
    assert!(!filters(&h1).contains("vireo"), "{}", filters(&h1));

    ra.stop().unwrap();
    rb.stop().unwrap();
    for d in [&h1, &h2, &wa, &wb] {
        assert!(
            !filters(d).contains("vireo"),
            "filters left on {d}:\n{}",
            filters(d)
        );
    }
}
