//! The few NETLINK_ROUTE traffic-control messages the fast path needs, encoded and decoded by
//! hand (libc only): create/delete a `clsact` qdisc, add/delete a `cls_bpf` ingress filter
//! running a classic BPF program with a `mirred egress redirect` action, and dump a device's
//! ingress filters with their action counters. (The kernel this targets has no `cls_flower`;
//! `cls_bpf` with a classic program matches the same fields, including the "no VLAN tag"
//! metadata flower would test.)

use std::io;
use std::mem::{size_of, zeroed};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

use super::sockfilter::SockFilter;

const NLMSG_HDRLEN: usize = 16;
const TCMSG_LEN: usize = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_MULTI: u16 = 0x2;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const RTM_NEWQDISC: u16 = 36;
pub const RTM_DELQDISC: u16 = 37;
pub const RTM_NEWTFILTER: u16 = 44;
pub const RTM_DELTFILTER: u16 = 45;
pub const RTM_GETTFILTER: u16 = 46;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_ACT: u16 = 1;
const TCA_BPF_OPS_LEN: u16 = 4;
const TCA_BPF_OPS: u16 = 5;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS_GEN: u16 = 9;
const TCA_CLS_FLAGS_SKIP_HW: u32 = 1;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_ACT_STATS: u16 = 4;
const TCA_STATS_BASIC: u16 = 1;
const TCA_STATS_PKT64: u16 = 8;
const TCA_MIRRED_PARMS: u16 = 2;
const TCA_EGRESS_REDIR: i32 = 1;
const TC_ACT_STOLEN: i32 = 4;

/// `TC_H_CLSACT`: the clsact qdisc's parent id; its handle is `ffff:`.
pub const TC_H_CLSACT: u32 = 0xffff_fff1;
pub const CLSACT_HANDLE: u32 = 0xffff_0000;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: parent of ingress filters.
pub const INGRESS_PARENT: u32 = 0xffff_fff2;
/// The name our filters carry (shown by `tc filter show`).
pub const FILTER_NAME: &str = "vireo-fastpath";

/// Where one filter lives on a device: priority (one per protocol), protocol, handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FilterId {
    pub prio: u16,
    /// EtherType, host order.
    pub protocol: u16,
    /// 0 addresses every filter of the priority (deletion only).
    pub handle: u32,
}

impl FilterId {
    fn info(&self) -> u32 {
        (self.prio as u32) << 16 | self.protocol.to_be() as u32
    }
}

/// `struct tcmsg`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcMsg {
    pub ifindex: i32,
    pub handle: u32,
    pub parent: u32,
    pub info: u32,
}

/// A netlink request under construction: header, `tcmsg`, attributes.
pub struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    pub fn new(ty: u16, flags: u16, tc: TcMsg) -> Msg {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&[0u8; 4]); // family AF_UNSPEC + padding
        buf.extend_from_slice(&tc.ifindex.to_ne_bytes());
        buf.extend_from_slice(&tc.handle.to_ne_bytes());
        buf.extend_from_slice(&tc.parent.to_ne_bytes());
        buf.extend_from_slice(&tc.info.to_ne_bytes());
        Msg { buf }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        self.buf
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v)
    }

    /// Opens a nested attribute; close it with [`Msg::end`].
    pub fn nest(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// The finished message with its length and sequence number.
    pub fn bytes(&self, seq: u32) -> Vec<u8> {
        let mut b = self.buf.clone();
        let len = b.len() as u32;
        b[..4].copy_from_slice(&len.to_ne_bytes());
        b[8..12].copy_from_slice(&seq.to_ne_bytes());
        b
    }

    pub fn msg_type(&self) -> u16 {
        u16::from_ne_bytes([self.buf[4], self.buf[5]])
    }
}

/// Creates a clsact qdisc; fails with EEXIST when the device already has one.
pub fn add_clsact(ifindex: u32) -> Msg {
    let mut m = Msg::new(
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_EXCL,
        TcMsg {
            ifindex: ifindex as i32,
            handle: CLSACT_HANDLE,
            parent: TC_H_CLSACT,
            info: 0,
        },
    );
    m.attr_str(TCA_KIND, "clsact");
    m
}

pub fn del_clsact(ifindex: u32) -> Msg {
    let mut m = Msg::new(
        RTM_DELQDISC,
        0,
        TcMsg {
            ifindex: ifindex as i32,
            handle: CLSACT_HANDLE,
            parent: TC_H_CLSACT,
            info: 0,
        },
    );
    m.attr_str(TCA_KIND, "clsact");
    m
}

/// The program of a `cls_bpf` filter.
#[derive(Clone, Copy, Debug)]
pub enum Classifier<'a> {
    /// Classic BPF, passed by value.
    Classic(&'a [SockFilter]),
    /// A loaded eBPF program (the filter takes its own reference; the fd may close after).
    Ebpf(std::os::fd::RawFd),
}

/// `TC_H_ROOT`: the parent of a device's root qdisc.
pub const TC_H_ROOT: u32 = 0xffff_ffff;
/// The handle of the root `tbf` qdisc we put on shaped ports (`7ee1:`), to tell it apart.
pub const TBF_HANDLE: u32 = 0x7ee1_0000;
const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
const TC_LINKLAYER_ETHERNET: u8 = 1;

/// Makes a `tbf` (rate `bytes_per_sec`, bucket `burst` bytes, queue `limit` bytes) the root
/// qdisc of a device, replacing what was there.
pub fn replace_tbf(ifindex: u32, bytes_per_sec: u64, burst: u32, limit: u32) -> Msg {
    let mut m = Msg::new(
        RTM_NEWQDISC,
        NLM_F_CREATE | NLM_F_REPLACE,
        TcMsg {
            ifindex: ifindex as i32,
            handle: TBF_HANDLE,
            parent: TC_H_ROOT,
            info: 0,
        },
    );
    m.attr_str(TCA_KIND, "tbf");
    let opts = m.nest(TCA_OPTIONS);
    // struct tc_tbf_qopt: rate and peakrate (struct tc_ratespec: cell_log, linklayer,
    // overhead, cell_align, mpu, rate), limit, buffer, mtu. The buffer comes from
    // TCA_TBF_BURST, the rate above 4 GB/s from TCA_TBF_RATE64.
    let mut q = vec![0u8; 36];
    q[1] = TC_LINKLAYER_ETHERNET;
    q[8..12].copy_from_slice(&(bytes_per_sec.min(u32::MAX as u64) as u32).to_ne_bytes());
    q[24..28].copy_from_slice(&limit.to_ne_bytes());
    m.attr(TCA_TBF_PARMS, &q);
    if bytes_per_sec >= u32::MAX as u64 {
        m.attr(TCA_TBF_RATE64, &bytes_per_sec.to_ne_bytes());
    }
    m.attr(TCA_TBF_BURST, &burst.to_ne_bytes());
    m.end(opts);
    m
}

/// Deletes our root `tbf` (the device falls back to its default qdisc).
pub fn del_tbf(ifindex: u32) -> Msg {
    Msg::new(
        RTM_DELQDISC,
        0,
        TcMsg {
            ifindex: ifindex as i32,
            handle: TBF_HANDLE,
            parent: TC_H_ROOT,
            info: 0,
        },
    )
}

/// An ingress `cls_bpf` filter running `prog` (non-zero = match; -1 = match, default class)
/// whose action redirects matching frames to the egress of device `redirect_to`.
pub fn add_redirect_filter(
    ifindex: u32,
    id: FilterId,
    prog: Classifier<'_>,
    redirect_to: u32,
) -> Msg {
    let mut m = Msg::new(
        RTM_NEWTFILTER,
        NLM_F_CREATE | NLM_F_EXCL,
        TcMsg {
            ifindex: ifindex as i32,
            handle: id.handle,
            parent: INGRESS_PARENT,
            info: id.info(),
        },
    );
    m.attr_str(TCA_KIND, "bpf");
    let opts = m.nest(TCA_OPTIONS);
    match prog {
        Classifier::Classic(prog) => {
            m.attr(TCA_BPF_OPS_LEN, &(prog.len() as u16).to_ne_bytes());
            let ops: Vec<u8> = prog.iter().flat_map(|i| i.to_bytes()).collect();
            m.attr(TCA_BPF_OPS, &ops);
        }
        Classifier::Ebpf(fd) => {
            m.attr(TCA_BPF_FD, &fd.to_ne_bytes());
        }
    }
    m.attr_str(TCA_BPF_NAME, FILTER_NAME);
    m.attr(TCA_BPF_FLAGS_GEN, &TCA_CLS_FLAGS_SKIP_HW.to_ne_bytes());
    let acts = m.nest(TCA_BPF_ACT);
    let first = m.nest(1);
    m.attr_str(TCA_ACT_KIND, "mirred");
    let aopts = m.nest(TCA_ACT_OPTIONS);
    // struct tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex.
    let mut parms = Vec::with_capacity(28);
    for v in [0i32, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR] {
        parms.extend_from_slice(&v.to_ne_bytes());
    }
    parms.extend_from_slice(&redirect_to.to_ne_bytes());
    m.attr(TCA_MIRRED_PARMS, &parms);
    m.end(aopts);
    m.end(first);
    m.end(acts);
    m.end(opts);
    m
}

/// Deletes one filter (or, with handle 0, every filter of that priority).
pub fn del_filter(ifindex: u32, id: FilterId) -> Msg {
    let mut m = Msg::new(
        RTM_DELTFILTER,
        0,
        TcMsg {
            ifindex: ifindex as i32,
            handle: id.handle,
            parent: INGRESS_PARENT,
            info: id.info(),
        },
    );
    if id.handle != 0 {
        m.attr_str(TCA_KIND, "bpf");
    }
    m
}

/// Lists a device's ingress filters.
pub fn dump_filters(ifindex: u32) -> Msg {
    Msg::new(
        RTM_GETTFILTER,
        NLM_F_DUMP,
        TcMsg {
            ifindex: ifindex as i32,
            handle: 0,
            parent: INGRESS_PARENT,
            info: 0,
        },
    )
}

/// Walks netlink attributes: (type without flags, payload). Stops at the first malformed one.
pub fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((ty, payload))
    })
}

fn find(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

/// One filter of a dump with its action's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterStats {
    pub id: Option<FilterId>,
    pub ifindex: i32,
    /// Frames the redirect action handled (a GSO super-frame counts its segments).
    pub packets: u64,
    /// Their bytes from the network header on (tc ingress does not count the Ethernet header).
    pub bytes: u64,
    /// Whether it is a `cls_bpf` filter (the only kind we install).
    pub ours: bool,
}

/// Decodes one RTM_NEWTFILTER message body (after the netlink header).
pub fn parse_filter(body: &[u8]) -> Option<FilterStats> {
    if body.len() < TCMSG_LEN {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    let (ifindex, handle, info) = (word(4) as i32, word(8), word(16));
    let mut st = FilterStats {
        ifindex,
        id: Some(FilterId {
            prio: (info >> 16) as u16,
            protocol: u16::from_be(info as u16),
            handle,
        }),
        ..Default::default()
    };
    let rest = &body[TCMSG_LEN..];
    let kind = find(rest, TCA_KIND).unwrap_or_default();
    let opts = find(rest, TCA_OPTIONS).unwrap_or_default();
    // The kernel dumps no name for classic programs: ours are told apart by priority and
    // handle, which the caller matches.
    st.ours = kind == b"bpf\0";
    if let Some(acts) = find(opts, TCA_BPF_ACT) {
        for (_, act) in attrs(acts) {
            let Some(stats) = find(act, TCA_ACT_STATS) else {
                continue;
            };
            if let Some(basic) = find(stats, TCA_STATS_BASIC).filter(|b| b.len() >= 12) {
                st.bytes += u64::from_ne_bytes(basic[..8].try_into().ok()?);
                let mut pkts = u32::from_ne_bytes(basic[8..12].try_into().ok()?) as u64;
                if let Some(p64) = find(stats, TCA_STATS_PKT64).filter(|p| p.len() >= 8) {
                    pkts = u64::from_ne_bytes(p64[..8].try_into().ok()?);
                }
                st.packets += pkts;
            }
        }
    }
    Some(st)
}

/// A NETLINK_ROUTE socket in the calling thread's network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain old data; zero = kernel assigns our port id.
        let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: binds with a valid sockaddr_nl of the stated size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // Every wait on the kernel is bounded.
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: passes a live timeval of the option's size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink {
            fd,
            seq: 1,
            buf: vec![0u8; 65536],
        })
    }

    fn send(&mut self, m: &Msg, extra_flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut b = m.bytes(self.seq);
        let flags = u16::from_ne_bytes([b[6], b[7]]) | extra_flags;
        b[6..8].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: sends a live buffer of the stated length (to the kernel: no address needed
        // on a bound netlink socket).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives one datagram and calls `f(type, flags, body)` for each of its messages that
    /// answers `seq`; `f` returns `Some` to finish.
    fn recv_until<T>(
        &mut self,
        seq: u32,
        mut f: impl FnMut(u16, u16, &[u8]) -> Option<io::Result<T>>,
    ) -> io::Result<T> {
        // Bounded: each recv waits at most SO_RCVTIMEO, and a reply has a bounded size.
        for _ in 0..100_000 {
            // SAFETY: receives into our own buffer of the stated length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut b = &self.buf[..n as usize];
            while b.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len < NLMSG_HDRLEN || len > b.len() {
                    break;
                }
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                let flags = u16::from_ne_bytes([b[6], b[7]]);
                let mseq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
                if mseq == seq {
                    if let Some(r) = f(ty, flags, &b[NLMSG_HDRLEN..len]) {
                        return r;
                    }
                }
                b = &b[len.next_multiple_of(4).min(b.len())..];
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "netlink reply never completed",
        ))
    }

    /// Sends a request and waits for the kernel's acknowledgement.
    pub fn request(&mut self, m: &Msg) -> io::Result<()> {
        let seq = self.send(m, NLM_F_ACK)?;
        self.recv_until(seq, |ty, _, body| {
            (ty == NLMSG_ERROR).then(|| {
                let code = body
                    .get(..4)
                    .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(-libc::EPROTO);
                if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                }
            })
        })
    }

    /// Sends a dump request; returns the body of every message of the answer.
    pub fn dump(&mut self, m: &Msg) -> io::Result<Vec<Vec<u8>>> {
        let seq = self.send(m, 0)?;
        let mut out = Vec::new();
        self.recv_until(seq, |ty, flags, body| match ty {
            NLMSG_DONE => Some(Ok(())),
            NLMSG_ERROR => {
                let code = body
                    .get(..4)
                    .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(-libc::EPROTO);
                Some(if code == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                })
            }
            _ => {
                out.push(body.to_vec());
                (flags & NLM_F_MULTI == 0).then_some(Ok(()))
            }
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fastpath::sockfilter::{classifier, FlowMatch};

    fn body(m: &Msg) -> Vec<u8> {
        m.bytes(7)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn header_carries_length_type_flags_and_seq() {
        let m = add_clsact(5);
        let b = m.bytes(7);
        assert_eq!(
            u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), RTM_NEWQDISC);
        assert_eq!(
            u16::from_ne_bytes([b[6], b[7]]),
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        let body = &b[NLMSG_HDRLEN..];
        assert_eq!(i32::from_ne_bytes(body[4..8].try_into().unwrap()), 5);
        assert_eq!(
            u32::from_ne_bytes(body[8..12].try_into().unwrap()),
            CLSACT_HANDLE
        );
        assert_eq!(
            u32::from_ne_bytes(body[12..16].try_into().unwrap()),
            TC_H_CLSACT
        );
        assert_eq!(find(&body[TCMSG_LEN..], TCA_KIND), Some(&b"clsact\0"[..]));
    }

    #[test]
    fn redirect_filter_encodes_program_and_mirred_action() {
        let flow = FlowMatch {
            ethertype: 0x0800,
            src: [2, 0, 0, 0, 0, 1],
            dst: [2, 0, 0, 0, 0, 2],
            tag: None,
            l4: None,
        };
        let prog = classifier(&flow);
        let id = FilterId {
            prio: 0xc000,
            protocol: 0x0800,
            handle: 42,
        };
        let m = add_redirect_filter(3, id, Classifier::Classic(&prog), 9);
        let b = body(&m);
        // tcm_info: priority high, protocol in network order low.
        assert_eq!(&b[16..20], &((0xc000u32 << 16) | 0x0008u32).to_ne_bytes());
        let rest = &b[TCMSG_LEN..];
        assert_eq!(find(rest, TCA_KIND), Some(&b"bpf\0"[..]));
        let opts = find(rest, TCA_OPTIONS).unwrap();
        let n = u16::from_ne_bytes(find(opts, TCA_BPF_OPS_LEN).unwrap().try_into().unwrap());
        assert_eq!(n as usize, prog.len());
        let ops = find(opts, TCA_BPF_OPS).unwrap();
        assert_eq!(ops.len(), prog.len() * 8);
        assert_eq!(&ops[..8], &prog[0].to_bytes());
        let acts = find(opts, TCA_BPF_ACT).unwrap();
        let (order, act) = attrs(acts).next().unwrap();
        assert_eq!(order, 1);
        assert_eq!(find(act, TCA_ACT_KIND), Some(&b"mirred\0"[..]));
        let parms = find(find(act, TCA_ACT_OPTIONS).unwrap(), TCA_MIRRED_PARMS).unwrap();
        assert_eq!(parms.len(), 28);
        assert_eq!(
            i32::from_ne_bytes(parms[8..12].try_into().unwrap()),
            TC_ACT_STOLEN
        );
        assert_eq!(
            i32::from_ne_bytes(parms[20..24].try_into().unwrap()),
            TCA_EGRESS_REDIR
        );
        assert_eq!(u32::from_ne_bytes(parms[24..28].try_into().unwrap()), 9);
        // What the kernel would answer a dump with decodes back to the same filter.
        let st = parse_filter(&b).unwrap();
        assert_eq!(st.id, Some(id));
        assert_eq!(st.ifindex, 3);
        assert!(st.ours);
        assert_eq!((st.packets, st.bytes), (0, 0));
    }

    #[test]
    fn dump_answer_with_stats_decodes() {
        let id = FilterId {
            prio: 0xc001,
            protocol: 0x86dd,
            handle: 7,
        };
        let mut m = Msg::new(
            RTM_NEWTFILTER,
            0,
            TcMsg {
                ifindex: 4,
                handle: 7,
                parent: INGRESS_PARENT,
                info: id.info(),
            },
        );
        m.attr_str(TCA_KIND, "bpf");
        let o = m.nest(TCA_OPTIONS);
        let acts = m.nest(TCA_BPF_ACT);
        let a = m.nest(1);
        m.attr_str(TCA_ACT_KIND, "mirred");
        let s = m.nest(TCA_ACT_STATS);
        let mut basic = 123_456u64.to_ne_bytes().to_vec();
        basic.extend_from_slice(&89u32.to_ne_bytes());
        basic.extend_from_slice(&[0; 4]);
        m.attr(TCA_STATS_BASIC, &basic);
        m.attr(TCA_STATS_PKT64, &(5_000_000_000u64).to_ne_bytes());
        m.end(s);
        m.end(a);
        m.end(acts);
        m.end(o);
        let st = parse_filter(&body(&m)).unwrap();
        assert_eq!(st.id, Some(id));
        assert_eq!(st.bytes, 123_456);
        assert_eq!(st.packets, 5_000_000_000, "64-bit packet count wins");
        assert!(st.ours);
        // Someone else's filter and garbage.
        let mut other = Msg::new(RTM_NEWTFILTER, 0, TcMsg::default());
        other.attr_str(TCA_KIND, "u32");
        assert!(!parse_filter(&body(&other)).unwrap().ours);
        assert!(parse_filter(&[1, 2, 3]).is_none());
        assert_eq!(attrs(&[0xff, 0xff, 1, 0, 9]).count(), 0);
    }
}
