//! A host TAP interface as a frame port: the kernel hands us whole Ethernet frames (no packet-info
//! prefix, no virtio-net header) through a non-blocking /dev/net/tun file descriptor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Mutex;

use crate::{FramePort, PortError};

/// Largest frame a TAP can hand us: the kernel caps an interface MTU at 64 KiB, plus the
/// Ethernet header and a VLAN tag.
const TAP_MAX_READ: usize = 65536 + 18;

/// A TAP interface opened with `IFF_TAP | IFF_NO_PI`, non-blocking.
///
/// The interface exists as long as this port (unless it was made persistent beforehand, e.g. by
/// `ip tuntap add`), and has carrier only while the port is open.
#[derive(Debug)]
pub struct TapPort {
    file: File,
    name: String,
    /// Catches the tail of a frame longer than the caller's buffer, so the frame is reported as
    /// [`PortError::TooLong`] instead of failing the read with EFAULT.
    overflow: Mutex<Box<[u8]>>,
}

impl TapPort {
    /// Creates the TAP interface `name` in the calling thread's network namespace, or attaches to
    /// it if it already exists (a persistent TAP). A name containing `%d` lets the kernel pick the
    /// number; [`FramePort::name`] then returns the real name.
    pub fn open(name: &str) -> Result<TapPort, PortError> {
        let ifr_name = encode_ifname(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;

        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = ifr_name;
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the whole call, on an fd
        // we own.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")).into());
        }
        Ok(TapPort {
            file,
            name: decode_ifname(&ifr.ifr_name),
            overflow: Mutex::new(vec![0u8; TAP_MAX_READ].into_boxed_slice()),
        })
    }

    /// Sets the interface administratively up (`ip link set NAME up`), in the calling thread's
    /// network namespace.
    pub fn set_up(&self) -> Result<(), PortError> {
        let name = encode_ifname(&self.name)?;
        // SAFETY: plain socket(2) call; the fd is wrapped in a File right after so it is closed.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a fresh socket we own exclusively.
        let sock = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        ifr.ifr_name = name;
        // SAFETY: SIOCGIFFLAGS fills the flags of one ifreq that outlives the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: the kernel just wrote ifru_flags, the active union member for this request.
        unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads one ifreq that outlives the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }
}

/// Checks an interface name and lays it out as the kernel's NUL-terminated `IFNAMSIZ` array.
fn encode_ifname(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], PortError> {
    let bad = |why: &str| -> PortError {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}: {why}"),
        )
        .into()
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(bad("longer than 15 bytes"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(bad("contains '/', ':', NUL or whitespace"));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (dst, src) in out.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(out)
}

fn decode_ifname(raw: &[libc::c_char; libc::IFNAMSIZ]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl FramePort for TapPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        // SAFETY: writes frame.len() bytes from a live slice to an fd we own.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // The TAP's queue is full (nobody reads the host side fast enough).
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Err(PortError::Full),
                // Interface down or deleted under us: the frame goes nowhere, like a cable pulled.
                Some(libc::EIO) | Some(libc::EBADFD) => Err(PortError::Disconnected),
                _ => Err(e.into()),
            };
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        let mut overflow = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        let iov = [
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
            libc::iovec {
                iov_base: overflow.as_mut_ptr().cast(),
                iov_len: overflow.len(),
            },
        ];
        // SAFETY: both iovecs describe live, exclusively borrowed buffers of the stated lengths.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(e.into()),
            };
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(PortError::TooLong {
                len: n,
                cap: buf.len(),
            });
        }
        Ok(Some(n))
    }

    fn rx_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests;
