//! A host TAP interface as a frame port: the kernel hands us whole Ethernet frames (no packet-info
//! prefix) through a non-blocking /dev/net/tun file descriptor.
//!
//! Offload ([`TapPort::open_offload`]): with `IFF_VNET_HDR` every frame in either direction
//! carries a 10-byte virtio-net header, and `TUNSETOFFLOAD` (CSUM, TSO4, TSO6) lets the kernel
//! hand us TCP super-frames with partial checksums. The kernel takes any such frame we write
//! (it segments or checksums it itself where the frame goes next), so a 64 KiB super-frame from
//! a VM reaches the host stack as one write instead of ~45.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Mutex;

use crate::{FramePort, Offloads, PortError, MAX_SUPER_FRAME, VNET_HDR_LEN};

/// Largest frame a TAP can hand us: the kernel caps an interface MTU at 64 KiB, plus the
/// Ethernet header and a VLAN tag.
const TAP_MAX_READ: usize = MAX_SUPER_FRAME;

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
    /// Opened with `IFF_VNET_HDR` and offloads on: every frame carries a virtio-net header.
    vnet: bool,
}

/// What we let the kernel hand us (TUNSETOFFLOAD): partial checksums and TCP super-frames over
/// IPv4 and IPv6; no UFO/USO and no ECN (the switch segments TCP only).
const TAP_OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

impl TapPort {
    /// Creates the TAP interface `name` in the calling thread's network namespace, or attaches to
    /// it if it already exists (a persistent TAP). A name containing `%d` lets the kernel pick the
    /// number; [`FramePort::name`] then returns the real name.
    pub fn open(name: &str) -> Result<TapPort, PortError> {
        Self::open_with(name, false)
    }

    /// [`TapPort::open`] with virtio-net headers and checksum/TSO offloads
    /// ([`FramePort::offloads`] all on; module docs). The header flag is per open file, so this
    /// also attaches to a persistent TAP made without `vnet_hdr`.
    pub fn open_offload(name: &str) -> Result<TapPort, PortError> {
        Self::open_with(name, true)
    }

    fn open_with(name: &str, vnet: bool) -> Result<TapPort, PortError> {
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
        let vnet_flag = if vnet { libc::IFF_VNET_HDR } else { 0 };
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | vnet_flag) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the whole call, on an fd
        // we own.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("TUNSETIFF {name}: {e}")).into());
        }
        if vnet {
            // The header size belongs to the interface, not to this file: a persistent TAP
            // that QEMU or vhost-net used last may still be set to 12 bytes, which would shift
            // every frame we read and write by two.
            let size = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int that outlives the call, on an fd we own.
            if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
                let e = io::Error::last_os_error();
                return Err(
                    io::Error::new(e.kind(), format!("TUNSETVNETHDRSZ {name}: {e}")).into(),
                );
            }
            set_offload(&file, name, TAP_OFFLOADS)?;
        }
        Ok(TapPort {
            file,
            name: decode_ifname(&ifr.ifr_name),
            overflow: Mutex::new(vec![0u8; TAP_MAX_READ].into_boxed_slice()),
            vnet,
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

/// What the kernel may hand us on `file` (TUNSETOFFLOAD): it finishes checksums and segments
/// what is not in `flags` before we read it.
fn set_offload(file: &File, name: &str, flags: libc::c_uint) -> Result<(), PortError> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value on an fd we own.
    let ret = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            flags as libc::c_ulong,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("TUNSETOFFLOAD {name}: {e}")).into());
    }
    Ok(())
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

impl TapPort {
    /// Writes `hdr` (when the TAP has vnet headers) and `frame` as one frame.
    fn write_frame(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), PortError> {
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        let iov = if self.vnet { &iov[..] } else { &iov[1..] };
        // SAFETY: the iovecs describe live slices of the stated lengths, only read by writev.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
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

    /// Reads one frame into `buf` (and its header into `hdr` when the TAP has vnet headers).
    fn read_frame(
        &self,
        hdr: &mut [u8; VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        *hdr = [0; VNET_HDR_LEN];
        let mut overflow = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        let iov = [
            libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
            libc::iovec {
                iov_base: overflow.as_mut_ptr().cast(),
                iov_len: overflow.len(),
            },
        ];
        let iov = if self.vnet { &iov[..] } else { &iov[1..] };
        // SAFETY: the iovecs describe live, exclusively borrowed buffers of the stated lengths.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(e.into()),
            };
        }
        let n = (n as usize).saturating_sub(if self.vnet { VNET_HDR_LEN } else { 0 });
        if n > buf.len() {
            return Err(PortError::TooLong {
                len: n,
                cap: buf.len(),
            });
        }
        Ok(Some(n))
    }
}

impl FramePort for TapPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.write_frame(&[0; VNET_HDR_LEN], frame)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        let got = self.read_frame(&mut hdr, buf)?;
        // flags NEEDS_CSUM, or a GSO type: the frame is not finished and this caller cannot
        // carry the header (the switch reads offload TAPs with `recv_vnet`).
        if got.is_some() && (hdr[0] & 1 != 0 || hdr[1] != 0) {
            return Err(io::Error::other(format!(
                "TAP {}: an offloaded frame (partial checksum or TSO) on a plain receive",
                self.name
            ))
            .into());
        }
        Ok(got)
    }

    fn offloads(&self) -> Offloads {
        Offloads {
            csum: self.vnet,
            tso4: self.vnet,
            tso6: self.vnet,
        }
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), PortError> {
        self.write_frame(hdr, frame)
    }

    /// TSO needs CSUM on a TAP (the kernel refuses TSO flags without it), so a receiver that
    /// takes TSO but not partial checksums gets neither.
    fn set_recv_offloads(&self, wanted: Offloads) -> Result<(), PortError> {
        if !self.vnet {
            return Ok(());
        }
        let mut flags = 0;
        if wanted.csum {
            flags |= libc::TUN_F_CSUM;
            if wanted.tso4 {
                flags |= libc::TUN_F_TSO4;
            }
            if wanted.tso6 {
                flags |= libc::TUN_F_TSO6;
            }
        }
        set_offload(&self.file, &self.name, flags)
    }

    fn recv_vnet(
        &self,
        hdr: &mut [u8; VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        self.read_frame(hdr, buf)
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
