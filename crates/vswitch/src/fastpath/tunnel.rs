//! Kernel fast path of overlay flows: VXLAN over an IPv4 provider network carrying one TCP/IPv4
//! connection. The user-space overlay decides (policy record, provider neighbour, spoofing
//! checks — `Switch::tunnel_offload_verdict`); these eBPF classifiers then do for the rest of
//! the connection what it did for the first frame:
//!
//! - **Encap** (VM port ingress → uplink): the connection's inner checks, then
//!   `bpf_skb_adjust_room(+50, MAC, ENCAP_L3_IPV4 | ENCAP_L4_UDP | ENCAP_L2_ETH | L2(14))`, which
//!   marks a GSO super-frame as a UDP tunnel so the kernel segments it as one; then the 64
//!   bytes in front of the inner IP header (outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet),
//!   copied from the frame user space encapsulated, with the outer lengths and IPv4 checksum
//!   computed from the frame's length. UDP checksum 0, as user space sends it.
//! - **Decap** (uplink ingress → VM port): outer checks (our MAC and PA, the PA the policy
//!   table holds for the inner source, UDP 4789, the VNI, IPv4 without options or fragments)
//!   and the inner connection's checks, then `bpf_skb_adjust_room(-50, MAC, FIXED_GSO)` and
//!   the inner Ethernet header written back over the outer one.
//!
//! Both return -1 ("match") so the filter's `mirred` redirects and counts, as for plain flows.
//! A frame of the connection whose IP packet exceeds the path's limit (non-GSO: its length;
//! GSO: segment size plus headers) is handed back to user space, which answers ICMP "too big"
//! as for any other flow. The socket filter (classic BPF, which cannot read the GSO size) has
//! already hidden it, and taps run before tc, so the classifier re-injects a copy into the
//! device's ingress (`bpf_clone_redirect`) with [`PUNT_MARK`] set; every tunnel check list
//! starts with "mark bit clear", so the socket filter lets the copy through and no classifier
//! takes it. The original goes on unredirected, to a stack that does not want it.

use super::checks::{checks, Check, FlowMatch, Load};
use super::ebpf::{emit_checks, finish, ins, Insn, CALL, LDX_W, LD_ABS_B, MOV64_K, MOV64_X};
use super::ebpf::{EXIT, R0, R1, R2, R3, R6, SKB_IFINDEX, SKB_MARK};
use crate::frame::Mac;

/// Outer Ethernet + IPv4 + UDP + VXLAN.
pub const VXLAN_OVERHEAD: usize = 50;
/// The bytes an encap program writes: the outer headers and the inner Ethernet header.
pub const ENCAP_HEADER: usize = VXLAN_OVERHEAD + 14;
const VXLAN_PORT: u16 = 4789;
/// The `skb->mark` bit of frames a tunnel classifier hands back to user space. A frame that
/// arrives with it set is never offloaded (it reaches user space), so a clash with another
/// user of the bit costs speed, never a frame.
pub const PUNT_MARK: u32 = 0x4000_0000;

/// What the kernel does to an overlay flow's frames besides redirecting them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tunnel {
    /// Prepend `header` (its outer IPv4 total length, checksum and UDP length are rewritten
    /// per frame). `max_ip_len`: the largest inner IP packet (provider MTU − 50, or the VM
    /// port's own MTU when smaller).
    Encap {
        header: [u8; ENCAP_HEADER],
        max_ip_len: u16,
    },
    /// Strip the outer headers of packets from `peer_pa` to `our_pa`/`our_mac` in `vni`.
    /// `max_ip_len`: the VM port's MTU; `provider_mtu`: the outer packets' (for counting).
    Decap {
        our_mac: Mac,
        our_pa: u32,
        peer_pa: u32,
        vni: u32,
        max_ip_len: u16,
        provider_mtu: u16,
    },
}

impl Tunnel {
    /// The largest IP packet (as tc sees it arrive: outer for decap) of one segment.
    pub fn arrived_ip_max(&self) -> u64 {
        match *self {
            Tunnel::Encap { max_ip_len, .. } => max_ip_len as u64,
            Tunnel::Decap {
                max_ip_len,
                provider_mtu,
                ..
            } => (max_ip_len as u64 + VXLAN_OVERHEAD as u64).min(provider_mtu as u64),
        }
    }

    /// Bytes a frame gains (encap) or loses (decap, negative) in the kernel.
    pub fn growth(&self) -> i64 {
        match self {
            Tunnel::Encap { .. } => VXLAN_OVERHEAD as i64,
            Tunnel::Decap { .. } => -(VXLAN_OVERHEAD as i64),
        }
    }
}

fn abs(size: u8, off: u32, value: u32) -> Check {
    Check {
        load: Load::Abs { size, off },
        mask: u32::MAX,
        value,
        at_least: false,
    }
}

/// The checks an overlay flow's frames pass where they enter (the same list feeds the socket
/// filter that hides them from the switch). `inner`: the customer connection (with `l4`).
pub fn tunnel_checks(inner: &FlowMatch, t: &Tunnel) -> Vec<Check> {
    let mut out = vec![Check {
        load: Load::Mark,
        mask: PUNT_MARK,
        value: 0,
        at_least: false,
    }];
    out.extend(connection_checks(inner, t));
    out
}

fn connection_checks(inner: &FlowMatch, t: &Tunnel) -> Vec<Check> {
    let c = checks(inner);
    let Tunnel::Decap {
        our_mac,
        our_pa,
        peer_pa,
        vni,
        ..
    } = *t
    else {
        return c;
    };
    let o = VXLAN_OVERHEAD as u32;
    let mut out: Vec<Check> = Vec::with_capacity(c.len() + 14);
    let word = u32::from_be_bytes([our_mac[0], our_mac[1], our_mac[2], our_mac[3]]);
    let half = u16::from_be_bytes([our_mac[4], our_mac[5]]) as u32;
    // The inner list starts with "no VLAN tag" and its length floor: both hold for the
    // outer frame too once shifted.
    for ic in c
        .iter()
        .take_while(|c| matches!(c.load, Load::VlanPresent | Load::Len))
    {
        let mut ic = *ic;
        if ic.load == Load::Len {
            ic.value += o;
        }
        out.push(ic);
    }
    out.extend([
        abs(2, 12, crate::frame::ETH_P_IPV4 as u32),
        abs(1, 23, 17),
        abs(4, 30, our_pa),
        abs(4, 26, peer_pa),
        abs(2, 36, VXLAN_PORT as u32),
        abs(4, 0, word),
        abs(2, 4, half),
        // No options (fixed offsets below), not a fragment.
        abs(1, 14, 0x45),
        Check {
            load: Load::Abs { size: 2, off: 20 },
            mask: 0x3fff,
            value: 0,
            at_least: false,
        },
        Check {
            load: Load::Abs { size: 1, off: 42 },
            mask: 0x08,
            value: 0x08,
            at_least: false,
        },
        Check {
            load: Load::Abs { size: 4, off: 46 },
            mask: 0xffff_ff00,
            value: vni << 8,
            at_least: false,
        },
    ]);
    for ic in c
        .iter()
        .skip_while(|c| matches!(c.load, Load::VlanPresent | Load::Len))
    {
        let mut ic = *ic;
        if let Load::Abs { size, off } = ic.load {
            ic.load = Load::Abs { size, off: off + o };
        }
        out.push(ic);
    }
    out
}

const ALU64_ADD_K: u8 = 0x07;
const ALU64_ADD_X: u8 = 0x0f;
const ALU64_AND_K: u8 = 0x57;
const ALU64_XOR_K: u8 = 0xa7;
const ALU64_RSH_K: u8 = 0x77;
const ALU_AND_K: u8 = 0x54;
const ALU_OR_K: u8 = 0x44;
const ALU_RSH_K: u8 = 0x74;
/// `BPF_ALU | BPF_END | BPF_TO_BE`: the low `imm` bits in network order.
const TO_BE: u8 = 0xdc;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JGT_K: u8 = 0x25;
const JA: u8 = 0x05;
const LD_IMM64: u8 = 0x18;
const ST_W: u8 = 0x62;
const STX_W: u8 = 0x63;
const STX_H: u8 = 0x6b;
const R4: u8 = 4;
const R5: u8 = 5;
const R7: u8 = 7;
const R10: u8 = 10;

const FN_SKB_STORE_BYTES: i32 = 9;
const FN_CLONE_REDIRECT: i32 = 13;
/// `BPF_F_INGRESS`: the redirected copy is received by the device rather than sent.
const F_INGRESS: i32 = 1;
const FN_SKB_ADJUST_ROOM: i32 = 50;
const ADJ_ROOM_MAC: i32 = 1;
const F_FIXED_GSO: u64 = 1;
const F_ENCAP_L3_IPV4: u64 = 1 << 1;
const F_ENCAP_L4_UDP: u64 = 1 << 4;
const F_ENCAP_L2_ETH: u64 = 1 << 6;
const fn f_encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}
/// `BPF_F_RECOMPUTE_CSUM`: keeps a CHECKSUM_COMPLETE skb's sum right after a store.
const F_RECOMPUTE_CSUM: i32 = 1;
const SKB_GSO_SIZE: i16 = 176;

/// Punts (jumps to [`punt_tail`]) frames whose IP packet — each segment's, for a GSO
/// super-frame — would exceed `max_ip_len`. `outer`: bytes in front of the inner Ethernet
/// header. The inner IPv4 header is 20 bytes (the checks require it).
fn length_limit(p: &mut Vec<Insn>, fails: &mut Vec<usize>, outer: u32, max_ip_len: u16) {
    let tcp_doff = (outer + 14 + 20 + 12) as i32;
    p.push(ins(LDX_W, R0, R6, SKB_GSO_SIZE, 0));
    p.push(ins(JEQ_K, R0, 0, 7, 0));
    p.extend([
        ins(MOV64_X, R7, R0, 0, 0),
        ins(LD_ABS_B, 0, 0, 0, tcp_doff),
        ins(ALU_AND_K, R0, 0, 0, 0xf0),
        ins(ALU_RSH_K, R0, 0, 0, 2),
        ins(ALU64_ADD_X, R7, R0, 0, 0),
    ]);
    fails.push(p.len());
    p.push(ins(JGT_K, R7, 0, 0, max_ip_len as i32 - 20));
    p.push(ins(JA, 0, 0, 2, 0));
    p.push(ins(LDX_W, R0, R6, super::ebpf::SKB_LEN, 0));
    fails.push(p.len());
    p.push(ins(
        JGT_K,
        R0,
        0,
        0,
        (max_ip_len as u32 + 14 + outer) as i32,
    ));
}

/// Appends the tail the jumps in `punts` go to: the frame's mark gets [`PUNT_MARK`], a copy
/// re-enters this device's ingress (where taps, and so the switch's socket, see it again) and
/// the program returns "no match" for the original.
fn punt_tail(p: &mut Vec<Insn>, punts: Vec<usize>) {
    let at = p.len();
    for j in punts {
        p[j].off = (at - j - 1) as i16;
    }
    p.extend([
        ins(LDX_W, R0, R6, SKB_MARK, 0),
        ins(ALU_OR_K, R0, 0, 0, PUNT_MARK as i32),
        ins(STX_W, R6, R0, SKB_MARK, 0),
        ins(MOV64_X, R1, R6, 0, 0),
        ins(LDX_W, R2, R6, SKB_IFINDEX, 0),
        ins(MOV64_K, R3, 0, 0, F_INGRESS),
        ins(CALL, 0, 0, 0, FN_CLONE_REDIRECT),
        ins(MOV64_K, R0, 0, 0, 0),
        ins(EXIT, 0, 0, 0, 0),
    ]);
}

/// Stores `bytes` (a multiple of 4 long) at the top of the stack, `r10 - len`.
fn stack_bytes(p: &mut Vec<Insn>, bytes: &[u8]) {
    let base = -(bytes.len() as i16);
    for (i, w) in bytes.chunks_exact(4).enumerate() {
        let imm = i32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        p.push(ins(ST_W, R10, 0, base + 4 * i as i16, imm));
    }
}

/// `bpf_skb_store_bytes(skb, 0, r10 - stack, len, RECOMPUTE_CSUM)`, failing the program on
/// an error.
fn store_front(p: &mut Vec<Insn>, fails: &mut Vec<usize>, stack: i32, len: i32) {
    p.extend([
        ins(MOV64_X, R1, R6, 0, 0),
        ins(MOV64_K, R2, 0, 0, 0),
        ins(MOV64_X, R3, R10, 0, 0),
        ins(ALU64_ADD_K, R3, 0, 0, -stack),
        ins(MOV64_K, R4, 0, 0, len),
        ins(MOV64_K, R5, 0, 0, F_RECOMPUTE_CSUM),
        ins(CALL, 0, 0, 0, FN_SKB_STORE_BYTES),
    ]);
    fails.push(p.len());
    p.push(ins(JNE_K, R0, 0, 0, 0));
}

fn adjust_room(p: &mut Vec<Insn>, fails: &mut Vec<usize>, diff: i32, flags: u64) {
    p.extend([
        ins(MOV64_X, R1, R6, 0, 0),
        ins(MOV64_K, R2, 0, 0, diff),
        ins(MOV64_K, R3, 0, 0, ADJ_ROOM_MAC),
        ins(LD_IMM64, R4, 0, 0, flags as u32 as i32),
        ins(0, 0, 0, 0, (flags >> 32) as u32 as i32),
        ins(CALL, 0, 0, 0, FN_SKB_ADJUST_ROOM),
    ]);
    fails.push(p.len());
    p.push(ins(JNE_K, R0, 0, 0, 0));
}

/// The ones'-complement sum of an IPv4 header's 16-bit words, its total length and checksum
/// taken as zero, folded to 16 bits.
fn partial_sum(ip: &[u8]) -> u32 {
    let mut acc = 0u32;
    for (i, w) in ip.chunks_exact(2).enumerate() {
        if i != 1 && i != 5 {
            acc += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// `r0 = to_be16(r7 + add)`, stored at stack offset `at`.
fn store_len(p: &mut Vec<Insn>, add: i32, at: i16) {
    p.extend([
        ins(MOV64_X, R0, R7, 0, 0),
        ins(ALU64_ADD_K, R0, 0, 0, add),
        ins(TO_BE, R0, 0, 0, 16),
        ins(STX_H, R10, R0, at, 0),
    ]);
}

/// The classifier of an overlay flow (`checks` from [`tunnel_checks`]).
pub fn tunnel_classifier(checks: &[Check], t: &Tunnel) -> Vec<Insn> {
    let mut p = vec![ins(MOV64_X, R6, R1, 0, 0)];
    let mut fails = emit_checks(&mut p, checks);
    let mut punts = Vec::new();
    match *t {
        Tunnel::Encap { header, max_ip_len } => {
            length_limit(&mut p, &mut punts, 0, max_ip_len);
            let flags = F_ENCAP_L3_IPV4 | F_ENCAP_L4_UDP | F_ENCAP_L2_ETH | f_encap_l2(14);
            adjust_room(&mut p, &mut fails, VXLAN_OVERHEAD as i32, flags);
            let top = -(ENCAP_HEADER as i16);
            stack_bytes(&mut p, &header);
            // r7: the frame's new length, from the outer Ethernet header on.
            p.push(ins(LDX_W, R7, R6, super::ebpf::SKB_LEN, 0));
            store_len(&mut p, -14, top + 16);
            store_len(&mut p, -34, top + 38);
            let base = partial_sum(&header[14..34]) as i32;
            p.extend([
                ins(MOV64_X, R0, R7, 0, 0),
                ins(ALU64_ADD_K, R0, 0, 0, base - 14),
            ]);
            for _ in 0..2 {
                p.extend([
                    ins(MOV64_X, R1, R0, 0, 0),
                    ins(ALU64_RSH_K, R1, 0, 0, 16),
                    ins(ALU64_AND_K, R0, 0, 0, 0xffff),
                    ins(ALU64_ADD_X, R0, R1, 0, 0),
                ]);
            }
            p.extend([
                ins(ALU64_XOR_K, R0, 0, 0, 0xffff),
                ins(TO_BE, R0, 0, 0, 16),
                ins(STX_H, R10, R0, top + 24, 0),
            ]);
            store_front(&mut p, &mut fails, ENCAP_HEADER as i32, ENCAP_HEADER as i32);
        }
        Tunnel::Decap { max_ip_len, .. } => {
            length_limit(&mut p, &mut punts, VXLAN_OVERHEAD as u32, max_ip_len);
            // The inner Ethernet header, read before the outer headers go.
            let mut eth = [0u8; 16];
            let inner = VXLAN_OVERHEAD as u32;
            // Known from the checks (they passed): destination, source, EtherType.
            let dst = checks_mac(checks, inner);
            let src = checks_mac(checks, inner + 6);
            eth[..6].copy_from_slice(&dst);
            eth[6..12].copy_from_slice(&src);
            eth[12..14].copy_from_slice(&crate::frame::ETH_P_IPV4.to_be_bytes());
            adjust_room(&mut p, &mut fails, -(VXLAN_OVERHEAD as i32), F_FIXED_GSO);
            stack_bytes(&mut p, &eth);
            store_front(&mut p, &mut fails, 16, 14);
        }
    }
    let mut p = finish(p, fails);
    punt_tail(&mut p, punts);
    p
}

/// The MAC the checks require at `off` (a 4-byte and a 2-byte check, as `checks` emits).
fn checks_mac(c: &[Check], off: u32) -> Mac {
    let find = |o: u32, size: u8| {
        c.iter()
            .find(|c| c.load == Load::Abs { size, off: o } && c.mask == u32::MAX)
            .map_or(0, |c| c.value)
    };
    let w = find(off, 4).to_be_bytes();
    let h = (find(off + 4, 2) as u16).to_be_bytes();
    [w[0], w[1], w[2], w[3], h[0], h[1]]
}

#[cfg(test)]
mod tests {
    //! The kernel runs each program (BPF_PROG_TEST_RUN) and its output is held against what
    //! the user-space overlay makes of the same frame.
    use super::*;
    use crate::fastpath::checks::{eval, eval_marked, L4Match};
    use crate::fastpath::ebpf::{load, test_run_data, test_run_skb, SkbIn, SkbOut};
    use crate::fastpath::sockfilter::{interp, socket_filter_with};
    use crate::overlay::encap::{encapsulate, Outer};
    use crate::overlay::wire::ipv4_header_checksum;
    use vireo_netconfig::Encap;

    const A: Mac = [2, 0, 0, 0, 0, 0xa];
    const B: Mac = [2, 0, 0, 0, 0, 0xb];
    const PA_US: [u8; 4] = [192, 0, 2, 1];
    const PA_PEER: [u8; 4] = [192, 0, 2, 2];

    fn tcp(sport: u16, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[..6].copy_from_slice(&B);
        f[6..12].copy_from_slice(&A);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        f[20] = 0x40; // DF
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        let c = ipv4_header_checksum(&f[14..34]);
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[46] = 0x50; // data offset 5
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    fn conn() -> FlowMatch {
        FlowMatch {
            ethertype: 0x0800,
            src: A,
            dst: B,
            tag: None,
            l4: Some(L4Match {
                src_ip: u32::from_be_bytes([10, 0, 0, 1]) as u128,
                dst_ip: u32::from_be_bytes([10, 0, 0, 2]) as u128,
                sport: 1000,
                dport: 80,
            }),
        }
    }

    /// What the user-space overlay sends for `inner` from us to the peer.
    fn user_space_encap(inner: &[u8], src: [u8; 4], vni: u32) -> Vec<u8> {
        let mut f = inner.to_vec();
        let o = Outer {
            src_mac: [2, 0xaa, 0, 0, 0, 1],
            dst_mac: [2, 0xbb, 0, 0, 0, 1],
            src_ip: src.into(),
            dst_ip: PA_PEER.into(),
        };
        encapsulate(&mut f, Encap::Vxlan, vni, 0x1234, &o);
        f
    }

    fn encap_flow() -> Tunnel {
        let first = user_space_encap(&tcp(1000, 10), PA_US, 100);
        let mut header = [0u8; ENCAP_HEADER];
        header.copy_from_slice(&first[..ENCAP_HEADER]);
        Tunnel::Encap {
            header,
            max_ip_len: 1450,
        }
    }

    fn decap_flow() -> Tunnel {
        Tunnel::Decap {
            our_mac: [2, 0xbb, 0, 0, 0, 1],
            our_pa: u32::from_be_bytes(PA_PEER),
            peer_pa: u32::from_be_bytes(PA_US),
            vni: 100,
            max_ip_len: 1450,
            provider_mtu: 1500,
        }
    }

    fn run(t: &Tunnel, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = load(
            &tunnel_classifier(&tunnel_checks(&conn(), t), t),
            "vireo_test",
        )
        .unwrap();
        test_run_data(&prog, frame).unwrap()
    }

    #[test]
    fn the_kernel_encapsulates_as_user_space_does() {
        if !vireo_testkit::require(vireo_testkit::Need::Root) {
            return;
        }
        let t = encap_flow();
        for payload in [6, 100, 1000, 1410] {
            let inner = tcp(1000, payload);
            let (r, out) = run(&t, &inner);
            assert_eq!(r, u32::MAX, "payload {payload}: matched");
            assert_eq!(
                out,
                user_space_encap(&inner, PA_US, 100),
                "payload {payload}"
            );
        }
        let (r, out) = run(&t, &tcp(1001, 100));
        assert_eq!(
            (r, out),
            (0, tcp(1001, 100)),
            "another connection: left alone"
        );
    }

    fn run_skb(t: &Tunnel, frame: &[u8], skb: SkbIn) -> SkbOut {
        let prog = load(
            &tunnel_classifier(&tunnel_checks(&conn(), t), t),
            "vireo_test",
        )
        .unwrap();
        test_run_skb(&prog, frame, skb).unwrap()
    }

    /// A frame over the limit is not redirected but marked (and a marked copy re-injected,
    /// which the kernel's test run does not show); a frame that already carries the mark is
    /// not taken at all, so the copy never loops.
    #[test]
    fn frames_over_the_limit_are_punted_with_the_mark() {
        if !vireo_testkit::require(vireo_testkit::Need::Root) {
            return;
        }
        let punted = |frame: &[u8]| SkbOut {
            retval: 0,
            frame: frame.to_vec(),
            mark: PUNT_MARK | 7,
        };
        let big = tcp(1000, 1411);
        let marked = SkbIn {
            mark: 7,
            gso_size: 0,
        };
        assert_eq!(
            run_skb(&encap_flow(), &big, marked),
            punted(&big),
            "encap, 1451 bytes"
        );
        // A super-frame whose segments (gso_size + 40) would be 1451 bytes.
        let sup = tcp(1000, 2000);
        let gso = SkbIn {
            mark: 7,
            gso_size: 1411,
        };
        assert_eq!(run_skb(&encap_flow(), &sup, gso), punted(&sup), "GSO 1411");
        let fits = SkbIn {
            mark: 7,
            gso_size: 1410,
        };
        assert_eq!(
            run_skb(&encap_flow(), &sup, fits).mark,
            7,
            "GSO 1410: not punted"
        );
        let outer = user_space_encap(&tcp(1000, 1411), PA_US, 100);
        assert_eq!(
            run_skb(&decap_flow(), &outer, marked),
            punted(&outer),
            "decap"
        );
        let small = tcp(1000, 100);
        let again = SkbIn {
            mark: PUNT_MARK,
            gso_size: 0,
        };
        let r = run_skb(&encap_flow(), &small, again);
        assert_eq!(
            (r.retval, r.mark),
            (0, PUNT_MARK),
            "a punted copy is not taken"
        );
        assert_eq!(r.frame, small);
    }

    #[test]
    fn the_kernel_decapsulates_only_from_the_policy_pa() {
        if !vireo_testkit::require(vireo_testkit::Need::Root) {
            return;
        }
        let t = decap_flow();
        for payload in [6, 1000, 1410] {
            let inner = tcp(1000, payload);
            let (r, out) = run(&t, &user_space_encap(&inner, PA_US, 100));
            assert_eq!(r, u32::MAX, "payload {payload}: matched");
            assert_eq!(out, inner, "payload {payload}");
        }
        for (what, frame) in [
            (
                "spoofed outer source",
                user_space_encap(&tcp(1000, 100), [192, 0, 2, 9], 100),
            ),
            ("another VNI", user_space_encap(&tcp(1000, 100), PA_US, 101)),
            (
                "another connection",
                user_space_encap(&tcp(1001, 100), PA_US, 100),
            ),
            ("not a tunnel", tcp(1000, 100)),
        ] {
            let (r, out) = run(&t, &frame);
            assert_eq!((r, &out), (0, &frame), "{what}: left alone");
        }
    }

    /// The socket filter hides exactly the frames the classifier takes (as the reference
    /// evaluation of the check list says), for both directions.
    #[test]
    fn the_socket_filter_hides_what_the_classifier_takes() {
        let frames = [
            tcp(1000, 100),
            tcp(1001, 100),
            user_space_encap(&tcp(1000, 100), PA_US, 100),
            user_space_encap(&tcp(1000, 100), [192, 0, 2, 9], 100),
            user_space_encap(&tcp(1000, 100), PA_US, 7),
            user_space_encap(&tcp(1001, 100), PA_US, 100),
        ];
        let want = [
            (encap_flow(), [true, false, false, false, false, false]),
            (decap_flow(), [false, false, true, false, false, false]),
        ];
        for (t, expect) in want {
            let c = tunnel_checks(&conn(), &t);
            let hide = socket_filter_with(&[], std::slice::from_ref(&c)).unwrap();
            for (f, e) in frames.iter().zip(expect) {
                assert_eq!(eval(&c, f, None), e, "{t:?} {f:02x?}");
                assert_eq!(interp::run_tci(&hide, f, None) == 0, e, "{t:?} {f:02x?}");
                // A punted copy reaches the switch, whatever else its mark holds.
                for mark in [PUNT_MARK, PUNT_MARK | 0x55] {
                    assert!(!eval_marked(&c, f, None, mark), "{t:?} {f:02x?}");
                    assert_ne!(interp::run_marked(&hide, f, None, mark), 0, "{f:02x?}");
                }
                assert_eq!(eval_marked(&c, f, None, 0x55), e, "other mark bits");
            }
        }
    }
}
