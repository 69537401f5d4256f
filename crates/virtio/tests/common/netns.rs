//! Network namespaces and raw sockets for the tests that put a device on a real TAP.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::process::Command;

/// A named network namespace, deleted when dropped (even if the test panics).
pub struct NetNs(pub String);

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

impl NetNs {
    /// Runs `ip -n <ns> <args>` and fails the test if it fails.
    pub fn ip(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("cannot run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Creates namespace `name` and moves the calling thread into it (sockets and TAPs it makes
/// from then on live there).
pub fn enter_new_netns(name: &str) -> Option<NetNs> {
    let ok = Command::new("ip")
        .args(["netns", "add", name])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return None;
    }
    let ns = NetNs(name.to_string());
    let f = File::open(format!("/var/run/netns/{name}")).ok()?;
    // SAFETY: setns on an fd we hold open; affects only the calling thread.
    (unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0).then_some(ns)
}

/// An AF_PACKET socket bound to `ifname`, seeing every frame it sends or receives.
pub fn packet_socket(ifname: &str) -> io::Result<File> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call, wrapped in a File right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { File::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: cname is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    // SAFETY: sockaddr_ll is plain old data.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: addr is a valid sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}
