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
