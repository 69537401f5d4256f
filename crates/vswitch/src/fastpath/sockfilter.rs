//! Classic BPF programs matching offloaded flows. The same predicate runs in two places: as the
//! tc classifier of one flow on its ingress netdev (`cls_bpf`, match ⇒ mirred redirect), and,
//! inverted, as the socket filter of the switch's AF_PACKET socket on that netdev (match ⇒
//! drop), because ETH_P_ALL taps see every frame before tc ingress and the switch would
//! otherwise forward the kernel-redirected frames a second time.
//!
//! Predicate: no VLAN tag in the skb metadata (the kernel moves the outer tag there before the
//! taps and tc run), EtherType IPv4 with protocol TCP or IPv6 with next header TCP, and the
//! (source MAC, destination MAC) pair of one of the flows. Offsets are from the Ethernet
//! header: both AF_PACKET and `cls_bpf` at ingress run classic programs on the frame as sent.

pub use super::checks::FlowMatch;
use super::checks::{checks, Check, Load};
use crate::frame::{Mac, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP};

/// `struct sock_filter`: one classic BPF instruction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl SockFilter {
    /// The instruction as the kernel's `struct sock_filter` bytes (for netlink TCA_BPF_OPS).
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&self.code.to_ne_bytes());
        b[2] = self.jt;
        b[3] = self.jf;
        b[4..].copy_from_slice(&self.k.to_ne_bytes());
        b
    }
}

pub const LD_W_ABS: u16 = 0x20;
pub const LD_H_ABS: u16 = 0x28;
pub const LD_B_ABS: u16 = 0x30;
pub const JMP_JEQ_K: u16 = 0x15;
pub const JMP_JA: u16 = 0x05;
pub const RET_K: u16 = 0x06;
/// `SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT`: loads 1 when the skb carries a VLAN tag in metadata.
pub const LD_VLAN_TAG_PRESENT: u32 = (-0x1000i32 + 48) as u32;
/// `SKF_AD_OFF + SKF_AD_VLAN_TAG`: loads the metadata tag's TCI.
pub const LD_VLAN_TAG: u32 = (-0x1000i32 + 44) as u32;
/// `SKF_AD_OFF + SKF_AD_VLAN_TPID`: loads the metadata tag's TPID (host order).
pub const LD_VLAN_TPID: u32 = (-0x1000i32 + 60) as u32;
/// `SKF_AD_OFF + SKF_AD_MARK`: loads `skb->mark`.
pub const LD_MARK: u32 = (-0x1000i32 + 20) as u32;
/// `A = skb->len`.
pub const LD_W_LEN: u16 = 0x80;
pub const ALU_AND_K: u16 = 0x54;
pub const JMP_JGE_K: u16 = 0x35;

/// What a classifier returns on a match: `cls_bpf` reads -1 as "matched, run the actions";
/// a socket filter reads it as "keep the whole frame".
pub const MATCH_ALL: u32 = u32::MAX;
/// The classic program-length limit (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;
/// Instructions one flow adds to a program.
pub const INSNS_PER_FLOW: usize = 9;

fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter {
        code: JMP_JEQ_K,
        jt,
        jf,
        k,
    }
}

/// A program returning `on_match` for frames of any of `flows` and `otherwise` for all other
/// frames. `None` when the flows do not fit in one classic program.
pub fn program(flows: &[FlowMatch], on_match: u32, otherwise: u32) -> Option<Vec<SockFilter>> {
    // Tagged flows and flows narrowed to a connection (ACLs): one self-contained block each,
    // first. The plain flows after them keep the compact per-EtherType sections.
    let mut p = Vec::new();
    for f in flows.iter().filter(|f| !f.plain()) {
        p.extend(block(&checks(f), on_match)?);
    }
    let plain: Vec<FlowMatch> = flows.iter().filter(|f| f.plain()).copied().collect();
    let flows = &plain[..];
    if p.len() + 17 + flows.len() * INSNS_PER_FLOW > MAX_INSNS {
        return None;
    }
    p.extend([
        stmt(LD_W_ABS, LD_VLAN_TAG_PRESENT),
        jeq(0, 1, 0),
        stmt(RET_K, otherwise),
        stmt(LD_H_ABS, 12),
    ]);
    // One section per EtherType; A holds the EtherType on entry to each section's test (the
    // `ja` that skips a section leaves A alone), and every section ends in a `ret`, so the
    // conditional jumps stay short whatever the number of flows.
    for (ethertype, proto_at) in [(ETH_P_IPV4, 14 + 9), (ETH_P_IPV6, 14 + 6)] {
        let group: Vec<&FlowMatch> = flows.iter().filter(|f| f.ethertype == ethertype).collect();
        if group.is_empty() {
            continue;
        }
        let section = 4 + group.len() * INSNS_PER_FLOW;
        p.push(jeq(ethertype as u32, 1, 0));
        p.push(stmt(JMP_JA, section as u32));
        p.push(stmt(LD_B_ABS, proto_at));
        p.push(jeq(IPPROTO_TCP as u32, 1, 0));
        p.push(stmt(RET_K, otherwise));
        for f in group {
            let word = |m: &Mac| u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
            let half = |m: &Mac| u16::from_be_bytes([m[4], m[5]]) as u32;
            p.extend([
                stmt(LD_W_ABS, 0),
                jeq(word(&f.dst), 0, 7),
                stmt(LD_H_ABS, 4),
                jeq(half(&f.dst), 0, 5),
                stmt(LD_W_ABS, 6),
                jeq(word(&f.src), 0, 3),
                stmt(LD_H_ABS, 10),
                jeq(half(&f.src), 0, 1),
                stmt(RET_K, on_match),
            ]);
        }
        p.push(stmt(RET_K, otherwise));
    }
    p.push(stmt(RET_K, otherwise));
    Some(p)
}

/// One flow's checks as a classic block that returns `on_match` when all pass and falls
/// through to the instruction after it otherwise. `None` if a jump would not fit in 8 bits.
fn block(checks: &[Check], on_match: u32) -> Option<Vec<SockFilter>> {
    let mut b = Vec::new();
    // Each entry: the index of a conditional jump whose false branch leaves the block.
    let mut fails = Vec::new();
    for c in checks {
        match c.load {
            Load::VlanPresent => b.push(stmt(LD_W_ABS, LD_VLAN_TAG_PRESENT)),
            Load::VlanTci => b.push(stmt(LD_W_ABS, LD_VLAN_TAG)),
            Load::VlanProto => b.push(stmt(LD_W_ABS, LD_VLAN_TPID)),
            Load::Len => b.push(stmt(LD_W_LEN, 0)),
            Load::Mark => b.push(stmt(LD_W_ABS, LD_MARK)),
            Load::Abs { size, off } => b.push(stmt(ld_code(size), off)),
        }
        if c.mask != u32::MAX {
            b.push(stmt(ALU_AND_K, c.mask));
        }
        fails.push(b.len());
        let code = if c.at_least { JMP_JGE_K } else { JMP_JEQ_K };
        b.push(SockFilter {
            code,
            jt: 0,
            jf: 0,
            k: c.value,
        });
    }
    b.push(stmt(RET_K, on_match));
    let end = b.len();
    for at in fails {
        b[at].jf = u8::try_from(end - at - 1).ok()?;
    }
    Some(b)
}

fn ld_code(size: u8) -> u16 {
    match size {
        4 => LD_W_ABS,
        2 => LD_H_ABS,
        _ => LD_B_ABS,
    }
}

/// The tc classifier of one flow: matches exactly its frames.
pub fn classifier(flow: &FlowMatch) -> Vec<SockFilter> {
    program(std::slice::from_ref(flow), MATCH_ALL, 0).expect("one flow always fits")
}

/// The socket filter of an ingress port: drops the frames its offloaded flows redirect, keeps
/// everything else whole. `None` when there are too many flows for one program.
pub fn socket_filter(flows: &[FlowMatch]) -> Option<Vec<SockFilter>> {
    program(flows, 0, MATCH_ALL)
}

/// [`socket_filter`] that also drops the frames of flows given as check lists (overlay flows,
/// whose match on the uplink reads outer and inner headers: `tunnel.rs`).
pub fn socket_filter_with(flows: &[FlowMatch], lists: &[Vec<Check>]) -> Option<Vec<SockFilter>> {
    let mut p = Vec::new();
    for c in lists {
        p.extend(block(c, 0)?);
    }
    let rest = program(flows, 0, MATCH_ALL)?;
    if p.len() + rest.len() > MAX_INSNS {
        return None;
    }
    p.extend(rest);
    Some(p)
}

#[cfg(test)]
pub(crate) mod interp {
    //! A classic BPF interpreter for the instructions [`super::program`] emits, with the
    //! kernel's semantics: big-endian loads, an out-of-bounds load ends the program with 0.
    use super::*;

    pub fn run(prog: &[SockFilter], frame: &[u8], vlan_tag_present: bool) -> u32 {
        run_tci(prog, frame, vlan_tag_present.then_some(0))
    }

    /// `tci`: the tag the skb carries in its metadata, if any.
    pub fn run_tci(prog: &[SockFilter], frame: &[u8], tci: Option<u16>) -> u32 {
        run_marked(prog, frame, tci, 0)
    }

    /// [`run_tci`] of a frame whose skb carries `mark`.
    pub fn run_marked(prog: &[SockFilter], frame: &[u8], tci: Option<u16>, mark: u32) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        for _ in 0..=MAX_INSNS {
            let Some(i) = prog.get(pc) else {
                panic!("fell off the program at {pc}");
            };
            pc += 1;
            let load = |at: usize, n: usize| -> Option<u32> {
                let b = frame.get(at..at + n)?;
                Some(b.iter().fold(0u32, |v, x| v << 8 | *x as u32))
            };
            let k = i.k as usize;
            let loaded = match i.code {
                LD_W_ABS if i.k == LD_VLAN_TAG_PRESENT => Some(tci.is_some() as u32),
                LD_W_ABS if i.k == LD_VLAN_TAG => Some(tci.unwrap_or(0) as u32),
                LD_W_ABS if i.k == LD_VLAN_TPID => Some(if tci.is_some() { 0x8100 } else { 0 }),
                LD_W_ABS if i.k == LD_MARK => Some(mark),
                LD_W_ABS => load(k, 4),
                LD_H_ABS => load(k, 2),
                LD_B_ABS => load(k, 1),
                LD_W_LEN => Some(frame.len() as u32),
                ALU_AND_K => {
                    a &= i.k;
                    continue;
                }
                JMP_JEQ_K => {
                    pc += if a == i.k { i.jt } else { i.jf } as usize;
                    continue;
                }
                JMP_JGE_K => {
                    pc += if a >= i.k { i.jt } else { i.jf } as usize;
                    continue;
                }
                JMP_JA => {
                    pc += k;
                    continue;
                }
                RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            };
            match loaded {
                Some(v) => a = v,
                None => return 0,
            }
        }
        panic!("program did not return");
    }
}

#[cfg(test)]
mod tests {
    use super::interp::run;
    use super::*;

    const A: Mac = [0x02, 0, 0, 0, 0, 0xa];
    const B: Mac = [0x02, 0, 0, 0, 0, 0xb];
    const C: Mac = [0x02, 0, 0, 0, 0, 0xc];

    fn frame(dst: Mac, src: Mac, ethertype: u16, proto: u8) -> Vec<u8> {
        let mut f = vec![0u8; 80];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        match ethertype {
            ETH_P_IPV4 => {
                f[14] = 0x45;
                f[23] = proto;
            }
            ETH_P_IPV6 => {
                f[14] = 0x60;
                f[20] = proto;
            }
            _ => {}
        }
        f
    }

    fn flow(ethertype: u16, src: Mac, dst: Mac) -> FlowMatch {
        FlowMatch {
            ethertype,
            src,
            dst,
            tag: None,
            l4: None,
        }
    }

    #[test]
    fn classifier_matches_only_its_flow() {
        let p = classifier(&flow(ETH_P_IPV4, A, B));
        assert_eq!(run(&p, &frame(B, A, ETH_P_IPV4, 6), false), MATCH_ALL);
        assert_eq!(run(&p, &frame(B, A, ETH_P_IPV4, 6), true), 0, "tagged");
        assert_eq!(run(&p, &frame(B, A, ETH_P_IPV4, 17), false), 0, "UDP");
        assert_eq!(run(&p, &frame(B, A, ETH_P_IPV6, 6), false), 0, "IPv6");
        assert_eq!(run(&p, &frame(A, B, ETH_P_IPV4, 6), false), 0, "reverse");
        assert_eq!(run(&p, &frame(B, C, ETH_P_IPV4, 6), false), 0, "other src");
        assert_eq!(run(&p, &frame(C, A, ETH_P_IPV4, 6), false), 0, "other dst");
        assert_eq!(run(&p, &frame(B, A, 0x0806, 6), false), 0, "ARP");
        assert_eq!(run(&p, &frame(B, A, 0x8100, 6), false), 0, "in-band tag");
        let mut near = frame(B, A, ETH_P_IPV4, 6);
        near[5] ^= 1;
        assert_eq!(run(&p, &near, false), 0, "dst differs in the last byte");
        near = frame(B, A, ETH_P_IPV4, 6);
        near[11] ^= 1;
        assert_eq!(run(&p, &near, false), 0, "src differs in the last byte");
        assert_eq!(
            run(&p, &frame(B, A, ETH_P_IPV4, 6)[..20], false),
            0,
            "short"
        );
    }

    #[test]
    fn socket_filter_drops_exactly_the_offloaded_flows() {
        let flows = [
            flow(ETH_P_IPV4, A, B),
            flow(ETH_P_IPV6, A, C),
            flow(ETH_P_IPV4, C, B),
        ];
        let p = socket_filter(&flows).unwrap();
        for f in &flows {
            assert_eq!(run(&p, &frame(f.dst, f.src, f.ethertype, 6), false), 0);
            assert_eq!(
                run(&p, &frame(f.dst, f.src, f.ethertype, 6), true),
                MATCH_ALL,
                "a tagged frame is not redirected, so the switch must see it"
            );
            assert_eq!(
                run(&p, &frame(f.dst, f.src, f.ethertype, 58), false),
                MATCH_ALL
            );
        }
        assert_eq!(run(&p, &frame(C, A, ETH_P_IPV4, 6), false), MATCH_ALL);
        assert_eq!(run(&p, &frame(B, A, ETH_P_IPV6, 6), false), MATCH_ALL);
        assert_eq!(run(&p, &frame(B, A, 0x0806, 0), false), MATCH_ALL);
        assert_eq!(
            socket_filter(&[]).map(|p| run(&p, &[0; 60], false)),
            Some(MATCH_ALL)
        );
    }

    #[test]
    fn many_flows_keep_short_jumps_and_fit_the_limit() {
        let flows: Vec<FlowMatch> = (0..400u16)
            .map(|i| {
                let mut s = A;
                s[4..].copy_from_slice(&i.to_be_bytes());
                flow(if i % 2 == 0 { ETH_P_IPV4 } else { ETH_P_IPV6 }, s, B)
            })
            .collect();
        let p = socket_filter(&flows).unwrap();
        assert!(p.len() <= MAX_INSNS);
        for f in &flows {
            assert_eq!(run(&p, &frame(f.dst, f.src, f.ethertype, 6), false), 0);
        }
        assert!(socket_filter(&vec![flows[0]; 500]).is_none());
    }
}
