//! An AF_PACKET raw socket bound to one host interface as a [`FramePort`]: the way an external
//! switch attaches to a NIC (or a veth) without a bridge. VLAN tags the kernel stripped into
//! metadata (RX VLAN offload) are put back, so trunks work over offloading NICs.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::collections::VecDeque;
use std::sync::Mutex;

use vireo_netport::{FramePort, PortError};

use super::offload::{resolve, VnetHdr, VNET_HDR_LEN};

const SOL_PACKET: libc::c_int = 263;
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_AUXDATA: libc::c_int = 8;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_MR_PROMISC: u16 = 1;
const TP_STATUS_VLAN_VALID: u32 = 0x10;
const TP_STATUS_VLAN_TPID_VALID: u32 = 0x40;
const ETH_P_ALL: u16 = 0x0003;

/// `struct tpacket_auxdata` from <linux/if_packet.h>.
#[repr(C)]
#[derive(Clone, Copy)]
struct AuxData {
    tp_status: u32,
    tp_len: u32,
    tp_snaplen: u32,
    tp_mac: u16,
    tp_net: u16,
    tp_vlan_tci: u16,
    tp_vlan_tpid: u16,
}

/// `struct packet_mreq`.
#[repr(C)]
struct PacketMreq {
    mr_ifindex: libc::c_int,
    mr_type: u16,
    mr_alen: u16,
    mr_address: [u8; 8],
}

#[derive(Debug)]
pub struct PacketPort {
    fd: OwnedFd,
    name: String,
    /// Frames carry a virtio-net header (PACKET_VNET_HDR): TCP arrives as super-frames.
    vnet: bool,
    /// Segments of a super-frame already cut for a caller of the plain `FramePort::recv`.
    pending: Mutex<VecDeque<Vec<u8>>>,
    /// The bound interface and the network namespace it lives in (inode of the bind-time
    /// thread's netns; 0 when unknown): the kernel fast path programs exactly this netdev.
    ifindex: u32,
    netns: u64,
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: &T) -> io::Result<()> {
    // SAFETY: passes a pointer to a live value of the option's size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (val as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl PacketPort {
    /// Binds to interface `ifname` (which must exist) and puts it in promiscuous mode for as
    /// long as the port lives.
    pub fn bind(ifname: &str) -> io::Result<PacketPort> {
        Self::open(ifname, false)
    }

    /// Like [`PacketPort::bind`], with segmentation/checksum offload: use
    /// [`PacketPort::recv_offload`] and [`PacketPort::send_offload`] to move 64 KiB TCP
    /// super-frames (the plain `FramePort` methods still work, segmenting in software).
    pub fn bind_offload(ifname: &str) -> io::Result<PacketPort> {
        Self::open(ifname, true)
    }

    pub fn offload(&self) -> bool {
        self.vnet
    }

    /// Index of the bound interface.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Network namespace (inode) the bound interface lives in; 0 when unknown.
    pub fn netns(&self) -> u64 {
        self.netns
    }

    fn open(ifname: &str, vnet: bool) -> io::Result<PacketPort> {
        let cname = std::ffi::CString::new(ifname)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("interface {ifname}: {e}")));
        }
        // SAFETY: plain socket(2); the result is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                ETH_P_ALL.to_be() as libc::c_int,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data.
        let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: binds with a valid sockaddr_ll of the stated size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // Our own transmissions must not come back as receptions (that would loop frames).
        setsockopt(fd.as_raw_fd(), SOL_PACKET, PACKET_IGNORE_OUTGOING, &1i32)?;
        setsockopt(fd.as_raw_fd(), SOL_PACKET, PACKET_AUXDATA, &1i32)?;
        if vnet {
            setsockopt(fd.as_raw_fd(), SOL_PACKET, PACKET_VNET_HDR, &1i32)?;
        }
        let mreq = PacketMreq {
            mr_ifindex: ifindex as i32,
            mr_type: PACKET_MR_PROMISC,
            mr_alen: 0,
            mr_address: [0; 8],
        };
        setsockopt(fd.as_raw_fd(), SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mreq)?;
        // Deep socket buffers absorb bursts between the switch thread's turns.
        let _ = setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &(4i32 << 20),
        );
        let _ = setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            &(4i32 << 20),
        );
        Ok(PacketPort {
            fd,
            name: ifname.to_string(),
            vnet,
            pending: Mutex::new(VecDeque::new()),
            ifindex,
            netns: crate::fastpath::current_netns(),
        })
    }

    /// Sends a frame with its offload header (the header is dropped when not in offload mode).
    pub fn send_offload(&self, hdr: &VnetHdr, frame: &[u8]) -> Result<(), PortError> {
        let h = hdr.to_bytes();
        let iov = [
            libc::iovec {
                iov_base: h.as_ptr() as *mut libc::c_void,
                iov_len: if self.vnet { VNET_HDR_LEN } else { 0 },
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: msghdr is plain old data; it points at the two iovecs above, which describe
        // live buffers the kernel only reads.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 2;
        // SAFETY: sends the buffers described by msg on a socket we own.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Err(PortError::Full),
                Some(libc::ENETDOWN) | Some(libc::ENXIO) | Some(libc::ENODEV) => {
                    Err(PortError::Disconnected)
                }
                _ => Err(e.into()),
            };
        }
        Ok(())
    }

    /// Receives one frame and its offload header (zero when not in offload mode).
    pub fn recv_offload(
        &self,
        hdr: &mut VnetHdr,
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        let mut slot = RxSlot::new();
        // SAFETY: msghdr is plain old data; `aim` points it at `slot` and `buf`, which outlive
        // the recvmsg call.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        slot.aim(&mut msg, buf, self.vnet);
        // SAFETY: receives into the iovecs and control buffer described by msg.
        let n = unsafe {
            libc::recvmsg(
                self.fd.as_raw_fd(),
                &mut msg,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return recv_error();
        }
        slot.finish(&msg, n as usize, hdr, buf, self.vnet).map(Some)
    }

    /// Receives up to `bufs.len()` frames with one recvmmsg(2): returns how many slots were
    /// filled; a slot whose frame did not fit its buffer (consumed and dropped) gets length 0.
    pub fn recv_batch(
        &self,
        hdrs: &mut [VnetHdr],
        bufs: &mut [Vec<u8>],
        lens: &mut [usize],
    ) -> Result<usize, PortError> {
        let n = bufs.len().min(hdrs.len()).min(lens.len()).min(MAX_BATCH);
        let mut slots = [RxSlot::new(); MAX_BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is a valid empty value.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..n {
            slots[i].aim(&mut msgs[i].msg_hdr, &mut bufs[i], self.vnet);
        }
        // SAFETY: the first n headers point at `slots` and `bufs`, alive and unmoved until the
        // call returns (the arrays are not touched in between).
        let got = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return recv_error().map(|_| 0);
        }
        let got = got as usize;
        for i in 0..got {
            let m = &msgs[i];
            // A frame too long for its buffer was consumed: its slot reads as empty.
            lens[i] = slots[i]
                .finish(
                    &m.msg_hdr,
                    m.msg_len as usize,
                    &mut hdrs[i],
                    &mut bufs[i],
                    self.vnet,
                )
                .unwrap_or(0);
        }
        Ok(got)
    }
}

impl PacketPort {
    /// Attaches (or atomically replaces) a classic BPF socket filter: frames for which it
    /// returns 0 never reach this socket.
    pub fn set_filter(&self, prog: &[crate::fastpath::sockfilter::SockFilter]) -> io::Result<()> {
        // SockFilter has the layout of struct sock_filter; the kernel copies `len`
        // instructions during the call, while `prog` is alive.
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &fprog,
        )
    }

    /// Removes the socket filter, if any.
    pub fn clear_filter(&self) -> io::Result<()> {
        match setsockopt(
            self.fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_FILTER,
            &0i32,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }
}

/// Frames per recvmmsg(2) call at most.
pub const MAX_BATCH: usize = 64;

/// Maps a failed receive to the port's result: nothing waiting is `Ok(None)`.
fn recv_error() -> Result<Option<usize>, PortError> {
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(None),
        Some(libc::ENETDOWN) => Err(PortError::Disconnected),
        _ => Err(e.into()),
    }
}

/// Per-frame receive state besides the frame buffer: the virtio-net header and the control
/// messages (VLAN auxdata), plus the iovecs pointing at them.
#[derive(Clone, Copy)]
struct RxSlot {
    vnet_hdr: [u8; VNET_HDR_LEN],
    iov: [libc::iovec; 2],
    cmsg: [u64; 16],
}

impl RxSlot {
    fn new() -> Self {
        RxSlot {
            vnet_hdr: [0; VNET_HDR_LEN],
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
            cmsg: [0; 16],
        }
    }

    /// Points `msg` at this slot and `buf`; neither may move until the receive returns.
    fn aim(&mut self, msg: &mut libc::msghdr, buf: &mut [u8], vnet: bool) {
        self.iov = [
            libc::iovec {
                iov_base: self.vnet_hdr.as_mut_ptr().cast(),
                iov_len: if vnet { VNET_HDR_LEN } else { 0 },
            },
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
        ];
        msg.msg_iov = self.iov.as_mut_ptr();
        msg.msg_iovlen = 2;
        msg.msg_control = self.cmsg.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 16]>();
    }

    /// Decodes a received frame of `n` bytes (header included): its offload header, and the
    /// VLAN tag the kernel moved to metadata put back into the frame.
    fn finish(
        &self,
        msg: &libc::msghdr,
        n: usize,
        hdr: &mut VnetHdr,
        buf: &mut [u8],
        vnet: bool,
    ) -> Result<usize, PortError> {
        let hl = if vnet { VNET_HDR_LEN } else { 0 };
        let mut len = n.saturating_sub(hl);
        *hdr = if vnet {
            VnetHdr::from_bytes(&self.vnet_hdr)
        } else {
            VnetHdr::default()
        };
        let mut vlan = None;
        // SAFETY: walks the control messages the kernel wrote into this slot's cmsg buffer
        // (msg points at it), per CMSG_* rules.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(msg);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                    let aux: AuxData = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if aux.tp_status & TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if aux.tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        vlan = Some((tpid, aux.tp_vlan_tci));
                    }
                }
                c = libc::CMSG_NXTHDR(msg, c);
            }
        }
        let extra = if vlan.is_some() { 4 } else { 0 };
        if len + extra > buf.len() {
            return Err(PortError::TooLong {
                len: len + extra,
                cap: buf.len(),
            });
        }
        if let Some((tpid, tci)) = vlan {
            if len >= 12 {
                // The kernel took the tag out of the frame (RX VLAN offload); put it back.
                buf.copy_within(12..len, 16);
                buf[12..14].copy_from_slice(&tpid.to_be_bytes());
                buf[14..16].copy_from_slice(&tci.to_be_bytes());
                len += 4;
                *hdr = hdr.shifted(4);
            }
        }
        Ok(len)
    }
}

impl FramePort for PacketPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.send_offload(&VnetHdr::default(), frame)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.is_empty() {
            let mut hdr = VnetHdr::default();
            let Some(n) = self.recv_offload(&mut hdr, buf)? else {
                return Ok(None);
            };
            if !hdr.needs_work() {
                return Ok(Some(n));
            }
            // A caller without offload support: finish or segment the super-frame here.
            let (mut a, mut b) = (Vec::new(), Vec::new());
            resolve(&buf[..n], &hdr, &mut a, &mut b, |f| {
                pending.push_back(f.to_vec())
            });
        }
        let Some(f) = pending.pop_front() else {
            return Ok(None);
        };
        if f.len() > buf.len() {
            return Err(PortError::TooLong {
                len: f.len(),
                cap: buf.len(),
            });
        }
        buf[..f.len()].copy_from_slice(&f);
        Ok(Some(f.len()))
    }

    fn rx_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }
}
