//! End to end (issue 13): a DHCP offer sent as hand-built IPv4 fragments from a namespace on a
//! DHCP-guarded port does not reach a UDP:68 socket in another namespace, while the same
//! fragments from a port allowed to serve DHCP are reassembled there (so the receiver would
//! take them), and ordinary fragmented UDP from the guarded port still arrives. Needs root
//! and `ip netns` (a recorded skip otherwise, a failure under CI).

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::common;
use crate::fragbuild;
use common::host::*;
use common::netns::*;

/// Namespace `k` of `lab` with address 10.79.0.`k+1` on a veth; the host end as a switch
/// port. IPv6 is off unless `ipv6` (a receiver of DHCPv6): no IPv6 chatter (ND, MLD) next to
/// the frames under test.
fn veth_vm(lab: &mut Lab, k: usize, ipv6: bool) -> PacketPort {
    let ip = format!("10.79.0.{}", k + 1);
    PacketPort::bind(&lab.veth_ns(k, ipv6, &[&ip])).unwrap()
}

/// Switch `name` running with three namespaces of `lab`: 0 on a DHCP-guarded port (the
/// returned id), 1 the client (IPv6 on if `client_ipv6`), 2 on a port allowed to serve DHCP.
fn dhcp_switch(
    lab: &mut Lab,
    name: &str,
    client_ipv6: bool,
) -> (Arc<Mutex<Switch>>, SwitchRuntime, PortId) {
    let mut sw = Switch::new(SwitchConfig::private(name)).unwrap();
    let guarded = sw.add_port(PortConfig::access("rogue", 1)).unwrap();
    let client = sw.add_port(PortConfig::access("client", 1)).unwrap();
    let mut server = PortConfig::access("server", 1);
    server.guard.dhcp_server_allowed = true;
    let server = sw.add_port(server).unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    rt.attach(guarded, Arc::new(veth_vm(lab, 0, false)));
    rt.attach(client, Arc::new(veth_vm(lab, 1, client_ipv6)));
    rt.attach(server, Arc::new(veth_vm(lab, 2, false)));
    (sw, rt, guarded)
}

/// Runs `f` on a thread that has entered network namespace `ns` (sockets it opens stay there).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread.
        let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// Sends raw Ethernet frames on interface `dev` of namespace `ns` (AF_PACKET), as a guest
/// crafting its own fragments would.
fn send_raw(ns: &str, dev: &str, frames: Vec<Vec<u8>>) {
    let dev = std::ffi::CString::new(dev).unwrap();
    in_ns(ns, move || {
        // SAFETY: plain socket calls on a socket this closure owns; sockaddr_ll is zeroed
        // and filled before use.
        unsafe {
            let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(s >= 0, "{}", std::io::Error::last_os_error());
            let ifindex = libc::if_nametoindex(dev.as_ptr());
            assert!(ifindex != 0, "{dev:?}");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            for f in &frames {
                sll.sll_addr[..6].copy_from_slice(&f[..6]);
                let n = libc::sendto(
                    s,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(n, f.len() as isize, "{}", std::io::Error::last_os_error());
            }
            libc::close(s);
        }
    });
}

/// A UDP socket bound to `port` in namespace `ns`, with a short read timeout.
fn udp_listener(ns: &str, port: u16) -> UdpSocket {
    let s = in_ns(ns, move || UdpSocket::bind(("0.0.0.0", port)).unwrap());
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s
}

/// The datagram the socket receives next (payload and source port), if any within the timeout.
fn receive(s: &UdpSocket) -> Option<(Vec<u8>, u16)> {
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from.port()))
}

#[test]
fn netns_fragmented_dhcp_offer_from_a_guarded_port_reaches_no_client() {
    if !netns_available("f") {
        return;
    }
    let mut lab = Lab::new("vf", "");
    let (sw, rt, guarded) = dhcp_switch(&mut lab, "e2e-frag", false);
    let dhcp = udp_listener(&lab.ns(1), 68);
    let other = udp_listener(&lab.ns(1), 5000);

    // An OFFER to 255.255.255.255:68 from port 67, cut so that the first fragment carries only
    // the UDP header and the op and message type come in later 8-byte fragments.
    let offer_from = |mac: [u8; 6], ip: [u8; 4], id: u16| {
        let offer = fragbuild::udp4(
            mac,
            [0xff; 6],
            ip,
            [255; 4],
            (67, 68),
            &fragbuild::bootp(2, 2, 300),
        );
        fragbuild::fragment4(&offer, id, &fragbuild::every(8, 8, 308))
    };
    let frags = offer_from([2, 0, 0, 0, 0, 0x11], [10, 79, 0, 1], 0x4242);
    let n = frags.len() as u64;
    send_raw(&lab.ns(0), &lab.guest(0), frags);
    if let Some((payload, sport)) = receive(&dhcp) {
        panic!(
            "the rogue offer arrived: {} bytes, op {}, from port {sport}",
            payload.len(),
            payload[0]
        );
    }
    assert_eq!(lock(&sw).drops(guarded, DropReason::FragmentGuard), n);

    // The same fragments from a port allowed to serve DHCP are reassembled by the client's
    // stack: the socket would have taken the rogue offer too.
    let frags = offer_from([2, 0, 0, 0, 0, 0x13], [10, 79, 0, 3], 0x4343);
    send_raw(&lab.ns(2), &lab.guest(2), frags);
    let (payload, sport) = receive(&dhcp).expect("the allowed server's offer arrives");
    assert_eq!((payload.len(), payload[0], sport), (300, 2, 67));

    // Ordinary fragmented UDP from the guarded port still arrives.
    let dgram = fragbuild::udp4(
        [2, 0, 0, 0, 0, 0x11],
        [0xff; 6],
        [10, 79, 0, 1],
        [255; 4],
        (4000, 5000),
        &[0x5a; 1200],
    );
    send_raw(
        &lab.ns(0),
        &lab.guest(0),
        fragbuild::fragment4(&dgram, 0x4444, &[400, 800]),
    );
    let (payload, _) = receive(&other).expect("ordinary fragments arrive");
    assert_eq!(payload, vec![0x5a; 1200]);
    rt.stop().unwrap();
}

#[test]
fn netns_fragmented_dhcpv6_reply_from_a_guarded_port_reaches_no_client() {
    if !netns_available("6") {
        return;
    }
    let mut lab = Lab::new("vf", "6");
    let (sw, rt, guarded) = dhcp_switch(&mut lab, "e2e-frag6", true);
    let dhcp = udp_listener6(&lab.ns(1), 546);

    // A REPLY to all nodes (ff02::1), port 547 → 546, the first fragment the UDP header only.
    let reply_from = |mac: [u8; 6], last: u8, id: u32| {
        let mut src = [0u8; 16];
        src[0] = 0xfd;
        src[15] = last;
        let mut dst = [0u8; 16];
        dst[0] = 0xff;
        dst[1] = 2;
        dst[15] = 1;
        let mut payload = vec![0u8; 200];
        payload[0] = 7;
        let m = fragbuild::udp6(
            mac,
            [0x33, 0x33, 0, 0, 0, 1],
            src,
            dst,
            (547, 546),
            &payload,
        );
        fragbuild::fragment6(&m, id, &fragbuild::every(8, 8, 208), false)
    };
    let frags = reply_from([2, 0, 0, 0, 0, 0x21], 1, 0x6161);
    let n = frags.len() as u64;
    send_raw(&lab.ns(0), &lab.guest(0), frags);
    if let Some((payload, sport)) = receive(&dhcp) {
        panic!(
            "the rogue reply arrived: {} bytes, type {}, from port {sport}",
            payload.len(),
            payload[0]
        );
    }
    assert_eq!(lock(&sw).drops(guarded, DropReason::FragmentGuard), n);

    // From a port allowed to serve DHCP, the client's stack reassembles the same fragments.
    send_raw(
        &lab.ns(2),
        &lab.guest(2),
        reply_from([2, 0, 0, 0, 0, 0x23], 3, 0x6262),
    );
    let (payload, sport) = receive(&dhcp).expect("the allowed server's reply arrives");
    assert_eq!((payload.len(), payload[0], sport), (200, 7, 547));
    rt.stop().unwrap();
}

/// A UDP socket bound to `[::]:port` in namespace `ns`, with a short read timeout.
fn udp_listener6(ns: &str, port: u16) -> UdpSocket {
    let s = in_ns(ns, move || UdpSocket::bind(("::", port)).unwrap());
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s
}
