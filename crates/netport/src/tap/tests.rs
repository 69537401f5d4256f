use std::os::unix::io::FromRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

/// Experimental EtherType (IEEE 802 local), so stray kernel traffic (IPv6 RS, MLD) is ignored.
const TEST_ETHERTYPE: u16 = 0x88b5;

#[test]
fn interface_names_are_checked() {
    for bad in ["", "a-name-that-is-too-long", "a/b", "a b", "a:b"] {
        assert!(encode_ifname(bad).is_err(), "{bad:?} accepted");
    }
    let raw = encode_ifname("vtap%d").unwrap();
    assert_eq!(decode_ifname(&raw), "vtap%d");
}

/// A network namespace deleted when dropped, even if the test panics.
struct NetNs(String);

impl NetNs {
    fn create(name: &str) -> Option<NetNs> {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| NetNs(name.to_string()))
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) -> io::Result<()> {
        let f = File::open(format!("/var/run/netns/{}", self.0))?;
        // SAFETY: setns on an fd we hold open; affects only this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn test_frame(src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f.resize(f.len().max(60), 0);
    f
}

/// An AF_PACKET socket bound to one interface, seeing every frame it sends or receives.
fn packet_socket(ifname: &str) -> io::Result<File> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call, wrapped in a File right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            proto as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { File::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: cname is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: addr is a valid sockaddr_ll of the size passed.
    let ret = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Polls `recv` until it yields a test frame or the deadline passes.
fn wait_for_test_frame(
    mut recv: impl FnMut(&mut [u8]) -> Option<usize>,
    deadline: Instant,
) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    while Instant::now() < deadline {
        match recv(&mut buf) {
            Some(n) if n >= 14 && buf[12..14] == TEST_ETHERTYPE.to_be_bytes() => {
                return Some(buf[..n].to_vec())
            }
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    None
}

#[test]
fn tap_exchanges_frames_with_packet_socket_in_netns() {
    use vireo_testkit::{require_all, Need};
    if !require_all(&[Need::Tap, Need::Netns]) {
        return;
    }
    let ns_name = format!("vireo-tap-{}", std::process::id());
    let ns = NetNs::create(&ns_name).expect("cannot create a network namespace");
    // setns affects only the calling thread, so the whole exchange runs on a thread of its own.
    let result = std::thread::spawn(move || -> Result<(), String> {
        ns.enter().map_err(|e| format!("setns: {e}"))?;
        let tap = TapPort::open("vtap%d").map_err(|e| format!("open: {e}"))?;
        assert!(tap.name().starts_with("vtap"), "{}", tap.name());
        tap.set_up().map_err(|e| format!("set_up: {e}"))?;
        let sock = packet_socket(tap.name()).map_err(|e| format!("packet socket: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);

        // TAP -> interface: what the VM sends is received by the host stack.
        let out = test_frame([2, 0, 0, 0, 0, 1], b"from the tap");
        tap.send(&out).map_err(|e| format!("send: {e}"))?;
        let got = wait_for_test_frame(
            |b| {
                // SAFETY: reads into a live buffer of the stated length.
                let n = unsafe { libc::read(sock.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
                (n > 0).then_some(n as usize)
            },
            deadline,
        );
        assert_eq!(got.as_deref(), Some(&out[..]));

        // Interface -> TAP: what the host transmits arrives at the VM's port, rx_fd readable.
        let back = test_frame([2, 0, 0, 0, 0, 2], b"to the tap");
        // SAFETY: writes a live buffer of the stated length.
        let n = unsafe { libc::write(sock.as_raw_fd(), back.as_ptr().cast(), back.len()) };
        assert_eq!(n, back.len() as isize, "{}", io::Error::last_os_error());
        let mut pfd = libc::pollfd {
            fd: tap.rx_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 10_000) }, 1);
        let got = wait_for_test_frame(|b| tap.recv(b).unwrap(), deadline);
        assert_eq!(got.as_deref(), Some(&back[..]));

        // A frame longer than the caller's buffer is consumed and reported, not split.
        let big = test_frame([2, 0, 0, 0, 0, 3], &[7u8; 200]);
        // SAFETY: as above.
        unsafe { libc::write(sock.as_raw_fd(), big.as_ptr().cast(), big.len()) };
        let mut small = [0u8; 64];
        let mut saw_too_long = false;
        while Instant::now() < deadline && !saw_too_long {
            match tap.recv(&mut small) {
                Err(PortError::TooLong { len, cap: 64 }) if len == big.len() => saw_too_long = true,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                _ => {} // Unrelated kernel traffic.
            }
        }
        assert!(saw_too_long);
        Ok(())
    })
    .join();
    match result {
        Ok(r) => r.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Ones' complement sum of big-endian words, folded.
fn csum_fold(data: &[u8], mut acc: u64) -> u16 {
    for c in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// A TCP/IPv4 frame carrying `payload`, its TCP checksum left partial (the pseudo-header sum)
/// as a sender using offload leaves it.
fn tcp4_super_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x09, 0x02, 0, 0, 0, 0, 0x0a, 0x08, 0x00];
    let tot = (20 + 20 + payload.len()) as u16;
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1,
    ];
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    let c = !csum_fold(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&4000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5000u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
    let pseudo = csum_fold(&ip[12..20], 6 + (20 + payload.len()) as u64);
    tcp[16..18].copy_from_slice(&pseudo.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    f
}

fn ip_in(ns: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip -n {ns} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// With vnet headers and TUNSETOFFLOAD: a 4 KiB TCP super-frame (GSO metadata, partial
/// checksum) goes to the kernel as one write and arrives there as one frame, not segmented;
/// the kernel hands us its own TCP with partial checksums (NEEDS_CSUM), which a plain `recv`
/// refuses rather than pass on unfinished.
#[test]
fn offload_tap_writes_super_frames_whole_and_reads_partial_checksums() {
    use vireo_testkit::{require_all, Need};
    if !require_all(&[Need::Tap, Need::Netns]) {
        return;
    }
    let ns_name = format!("vireo-tapo-{}", std::process::id());
    let ns = NetNs::create(&ns_name).expect("cannot create a network namespace");
    let result = std::thread::spawn(move || -> Result<(), String> {
        ns.enter().map_err(|e| format!("setns: {e}"))?;
        let tap = TapPort::open_offload("vtapo%d").map_err(|e| format!("open: {e}"))?;
        let o = tap.offloads();
        assert!(o.csum && o.tso4 && o.tso6, "{o:?}");
        tap.set_up().map_err(|e| format!("set_up: {e}"))?;
        let sock = packet_socket(tap.name()).map_err(|e| format!("packet socket: {e}"))?;
        // PACKET_VNET_HDR: the socket reports each skb's GSO state in front of it.
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one int that outlives the call, on a socket we own.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                263,
                15,
                (&on as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(r, 0, "PACKET_VNET_HDR: {}", io::Error::last_os_error());
        let deadline = Instant::now() + Duration::from_secs(10);

        // One write of a super-frame: the kernel sees one 4,094-byte frame that it still
        // knows to be TCPv4 GSO with a 1448-byte MSS (it segments where the frame goes next).
        let payload: Vec<u8> = (0..4040u32).map(|i| i as u8).collect();
        let f = tcp4_super_frame(&payload);
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = 1; // NEEDS_CSUM
        hdr[1] = 1; // GSO_TCPV4
        hdr[2..4].copy_from_slice(&54u16.to_le_bytes());
        hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
        tap.send_vnet(&hdr, &f)
            .map_err(|e| format!("send_vnet: {e}"))?;
        let mut buf = vec![0u8; 65536];
        let mut seen = None;
        while Instant::now() < deadline && seen.is_none() {
            // SAFETY: reads into a live buffer of the stated length.
            let n = unsafe { libc::read(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let e = &buf[VNET_HDR_LEN..];
            if n > VNET_HDR_LEN as isize + 34 && e[12..14] == [0x08, 0x00] && e[23] == 6 {
                seen = Some(n as usize - VNET_HDR_LEN);
            } else if n <= 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert_eq!(seen, Some(f.len()), "the super-frame did not arrive whole");
        assert_eq!(buf[1], 1, "the kernel lost the GSO type");
        assert_eq!(u16::from_le_bytes([buf[4], buf[5]]), 1448, "gso_size");
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 38], &f[..38]);

        // The kernel's own TCP (a SYN to a static neighbour) comes with NEEDS_CSUM.
        let name = tap.name().to_string();
        let nsn = format!("vireo-tapo-{}", std::process::id());
        ip_in(&nsn, &["addr", "add", "10.77.0.1/24", "dev", &name])?;
        ip_in(
            &nsn,
            &[
                "neigh",
                "add",
                "10.77.0.2",
                "lladdr",
                "02:00:00:00:00:09",
                "dev",
                &name,
            ],
        )?;
        let _conn = std::net::TcpStream::connect_timeout(
            &"10.77.0.2:9".parse().unwrap(),
            Duration::from_millis(1),
        );
        let mut got = None;
        while Instant::now() < deadline && got.is_none() {
            match tap.recv_vnet(&mut hdr, &mut buf) {
                Ok(Some(n)) if n > 34 && buf[12..14] == [0x08, 0x00] && buf[23] == 6 => {
                    got = Some(hdr)
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Ok(Some(_)) => {}
                Err(e) => return Err(format!("recv_vnet: {e}")),
            }
        }
        let h = got.ok_or("no SYN from the kernel")?;
        assert_eq!(h[0] & 1, 1, "kernel TCP without a partial checksum: {h:?}");
        assert_eq!(u16::from_le_bytes([h[6], h[7]]), 34, "csum_start");

        // The same through a plain receive: refused, not handed over unfinished.
        let _conn2 = std::net::TcpStream::connect_timeout(
            &"10.77.0.2:10".parse().unwrap(),
            Duration::from_millis(1),
        );
        let mut refused = false;
        while Instant::now() < deadline && !refused {
            match tap.recv(&mut buf) {
                Err(PortError::Io(_)) => refused = true,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Ok(Some(n)) => assert!(
                    !(n > 34 && buf[12..14] == [0x08, 0x00] && buf[23] == 6),
                    "an unfinished TCP frame passed a plain recv"
                ),
                Err(e) => return Err(format!("recv: {e}")),
            }
        }
        assert!(refused, "the plain recv never saw the SYN");
        Ok(())
    })
    .join();
    match result {
        Ok(r) => r.unwrap(),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn vnet_hdr_size(tap: &TapPort) -> libc::c_int {
    let mut size: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int that outlives the call, on an fd we own.
    let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut size) };
    assert_eq!(r, 0, "TUNGETVNETHDRSZ: {}", io::Error::last_os_error());
    size
}

/// The vnet header size belongs to the interface: a persistent TAP that another VMM left at
/// 12 bytes (QEMU does) is set back to our 10 when we attach, or every frame would be read
/// and written two bytes off.
#[test]
fn attaching_to_a_persistent_tap_resets_its_header_size() {
    use vireo_testkit::{require_all, Need};
    if !require_all(&[Need::Tap, Need::Netns]) {
        return;
    }
    let ns_name = format!("vireo-taphs-{}", std::process::id());
    let ns = NetNs::create(&ns_name).expect("cannot create a network namespace");
    ip_in(
        &ns_name,
        &["tuntap", "add", "mode", "tap", "name", "vtaphs"],
    )
    .unwrap();
    let result = std::thread::spawn(move || {
        ns.enter().unwrap();
        let tap = TapPort::open_offload("vtaphs").unwrap();
        assert_eq!(vnet_hdr_size(&tap), VNET_HDR_LEN as libc::c_int);
        let twelve: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int that outlives the call, on an fd we own.
        let r = unsafe { libc::ioctl(tap.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &twelve) };
        assert_eq!(r, 0);
        drop(tap);
        let tap = TapPort::open_offload("vtaphs").unwrap();
        assert_eq!(vnet_hdr_size(&tap), VNET_HDR_LEN as libc::c_int);
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
