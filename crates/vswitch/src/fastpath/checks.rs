//! What the kernel tests for one offloaded flow, as a list of equality checks on loads from
//! the frame or its skb metadata. Two emitters turn the same list into programs: classic BPF
//! (`sockfilter.rs`: the socket filter that hides offloaded frames from the switch, and the
//! tc classifier of flows without a tag operation) and eBPF (`ebpf.rs`: the tc classifier of
//! flows whose VLAN tag the kernel pushes or pops). One source of truth, so the frames the
//! socket filter hides are exactly the frames tc redirects.
//!
//! Offsets are from the Ethernet header with the outer VLAN tag already moved into the skb
//! metadata (the kernel does so before taps and tc see a frame).

use crate::frame::{Mac, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP};

/// The exact TCP connection a flow is limited to when ACL rules decide it (their verdict is
/// a function of addresses, protocol and ports, so it holds for every frame of the 5-tuple).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L4Match {
    /// IPv4 in the low 32 bits, as in [`crate::frame::FrameSummary`].
    pub src_ip: u128,
    pub dst_ip: u128,
    pub sport: u16,
    pub dport: u16,
}

/// One offloaded flow as the kernel matches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowMatch {
    /// ETH_P_IPV4 or ETH_P_IPV6.
    pub ethertype: u16,
    pub src: Mac,
    pub dst: Mac,
    /// The VLAN id of the (metadata) tag the frame arrives with; `None`: untagged.
    pub tag: Option<u16>,
    /// The connection, when the match must be that narrow (ACLs).
    pub l4: Option<L4Match>,
}

impl FlowMatch {
    /// Untagged, any connection between the two MACs: the original fast-path match.
    pub fn plain(&self) -> bool {
        self.tag.is_none() && self.l4.is_none()
    }
}

/// Where a check loads its value from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// 1 when the skb carries a VLAN tag in its metadata, else 0.
    VlanPresent,
    /// The metadata tag's TCI (PCP, DEI, VID).
    VlanTci,
    /// The metadata tag's TPID (0x8100 for 802.1Q).
    VlanProto,
    /// The frame's length from the Ethernet header on.
    Len,
    /// The skb's mark (`skb->mark`): lets a classifier hand a frame back to user space by
    /// re-injecting a marked copy that its own checks (and the socket filter's) refuse.
    Mark,
    /// `size` bytes (1, 2 or 4, big-endian) at `off` from the Ethernet header.
    Abs { size: u8, off: u32 },
}

/// Passes when `load & mask == value`, or, with `at_least`, when `load >= value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub load: Load,
    pub mask: u32,
    pub value: u32,
    pub at_least: bool,
}

fn abs(size: u8, off: u32, value: u32) -> Check {
    Check {
        load: Load::Abs { size, off },
        mask: u32::MAX,
        value,
        at_least: false,
    }
}

fn words(a: u128, n: usize) -> impl Iterator<Item = u32> {
    // The address's bytes in wire order, 4 at a time: IPv4 is the low 32 bits.
    let b = a.to_be_bytes();
    let start = 16 - 4 * n;
    (0..n).map(move |i| {
        let o = start + 4 * i;
        u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    })
}

/// The checks of one flow, cheapest and most selective first; all must pass.
pub fn checks(f: &FlowMatch) -> Vec<Check> {
    let v4 = f.ethertype == ETH_P_IPV4;
    let mut c = vec![Check {
        load: Load::VlanPresent,
        mask: u32::MAX,
        value: f.tag.is_some() as u32,
        at_least: false,
    }];
    if let Some(vid) = f.tag {
        c.push(Check {
            load: Load::VlanTci,
            mask: 0x0fff,
            value: (vid & 0x0fff) as u32,
            at_least: false,
        });
        // 802.1Q only: the tc filter of tagged flows is for that protocol, so a frame the
        // socket filter hid but tc would not see must not exist.
        c.push(Check {
            load: Load::VlanProto,
            mask: u32::MAX,
            value: 0x8100,
            at_least: false,
        });
    }
    if f.l4.is_some() {
        // Long enough for every load below: a load past the end would end a classic
        // program with 0, which the socket filter reads as "drop" (hidden, never redirected).
        c.push(Check {
            load: Load::Len,
            mask: u32::MAX,
            value: if v4 { 14 + 20 + 4 } else { 14 + 40 + 4 },
            at_least: true,
        });
    }
    c.push(abs(2, 12, f.ethertype as u32));
    c.push(abs(1, if v4 { 14 + 9 } else { 14 + 6 }, IPPROTO_TCP as u32));
    let word = |m: &Mac| u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
    let half = |m: &Mac| u16::from_be_bytes([m[4], m[5]]) as u32;
    c.extend([
        abs(4, 0, word(&f.dst)),
        abs(2, 4, half(&f.dst)),
        abs(4, 6, word(&f.src)),
        abs(2, 10, half(&f.src)),
    ]);
    if let Some(l4) = f.l4 {
        if v4 {
            // A 20-byte header (no options: the ports are at a fixed offset; TCP with IP
            // options stays in user space) and whole datagrams only: a fragment's "ports"
            // are payload bytes, and the user-space path decides fragments.
            c.push(abs(1, 14, 0x45));
            c.push(Check {
                load: Load::Abs { size: 2, off: 20 },
                mask: 0x3fff,
                value: 0,
                at_least: false,
            });
            c.extend(words(l4.src_ip, 1).map(|w| abs(4, 26, w)));
            c.extend(words(l4.dst_ip, 1).map(|w| abs(4, 30, w)));
            c.push(abs(2, 34, l4.sport as u32));
            c.push(abs(2, 36, l4.dport as u32));
        } else {
            debug_assert_eq!(f.ethertype, ETH_P_IPV6);
            // Next header TCP right after the fixed header (tested above): no extension
            // headers, so the ports are at a fixed offset.
            c.extend(
                words(l4.src_ip, 4)
                    .zip(0..)
                    .map(|(w, i)| abs(4, 22 + 4 * i, w)),
            );
            c.extend(
                words(l4.dst_ip, 4)
                    .zip(0..)
                    .map(|(w, i)| abs(4, 38 + 4 * i, w)),
            );
            c.push(abs(2, 54, l4.sport as u32));
            c.push(abs(2, 56, l4.dport as u32));
        }
    }
    c
}

/// A reference evaluation of the checks on a frame (tests, and the contract both emitters
/// follow): a load past the end fails the flow, as in the kernel. `tci`: the metadata tag,
/// an 802.1Q one.
pub fn eval(checks: &[Check], frame: &[u8], tci: Option<u16>) -> bool {
    eval_marked(checks, frame, tci, 0)
}

/// [`eval`] of a frame whose skb carries `mark`.
pub fn eval_marked(checks: &[Check], frame: &[u8], tci: Option<u16>, mark: u32) -> bool {
    let get = |at: usize, n: u8| -> Option<u32> {
        let b = frame.get(at..at + n as usize)?;
        Some(b.iter().fold(0u32, |v, x| v << 8 | *x as u32))
    };
    checks.iter().all(|c| {
        let v = match c.load {
            Load::VlanPresent => Some(tci.is_some() as u32),
            Load::VlanTci => Some(tci.unwrap_or(0) as u32),
            Load::VlanProto => Some(if tci.is_some() { 0x8100 } else { 0 }),
            Load::Len => Some(frame.len() as u32),
            Load::Mark => Some(mark),
            Load::Abs { size, off } => get(off as usize, size),
        };
        v.is_some_and(|v| {
            if c.at_least {
                v >= c.value
            } else {
                v & c.mask == c.value
            }
        })
    })
}

#[cfg(test)]
mod tests {
    //! The three readings of a flow's checks — the reference, the classic program and the
    //! eBPF classifier — agree on every frame, and the eBPF one changes the tag as asked.
    use super::*;
    use crate::fastpath::ebpf::{self, TagAction};
    use crate::fastpath::sockfilter::{interp, program, MATCH_ALL};

    const A: Mac = [2, 0, 0, 0, 0, 0xa];
    const B: Mac = [2, 0, 0, 0, 0, 0xb];

    fn v4(src: Mac, dst: Mac, sport: u16, ihl: u8, frag: u16, proto: u8) -> Vec<u8> {
        let hl = 4 * ihl as usize;
        let mut f = vec![0u8; 14 + hl + 20];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        f[14] = 0x40 | ihl;
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[23] = proto;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[14 + hl..16 + hl].copy_from_slice(&sport.to_be_bytes());
        f[16 + hl..18 + hl].copy_from_slice(&80u16.to_be_bytes());
        f
    }

    fn v6(src: Mac, dst: Mac, sport: u16, last_dst_byte: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 40 + 20];
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        f[14] = 0x60;
        f[20] = IPPROTO_TCP;
        f[22..38].copy_from_slice(&[0xfd; 16]);
        f[38..54].copy_from_slice(&[0xfe; 16]);
        f[53] = last_dst_byte;
        f[54..56].copy_from_slice(&sport.to_be_bytes());
        f[56..58].copy_from_slice(&80u16.to_be_bytes());
        f
    }

    fn flows() -> Vec<FlowMatch> {
        let l4v4 = L4Match {
            src_ip: u32::from_be_bytes([10, 0, 0, 1]) as u128,
            dst_ip: u32::from_be_bytes([10, 0, 0, 2]) as u128,
            sport: 1000,
            dport: 80,
        };
        let mut l4v6 = l4v4;
        l4v6.src_ip = u128::from_be_bytes([0xfd; 16]);
        l4v6.dst_ip = u128::from_be_bytes([0xfe; 16]);
        let f = |ethertype, tag, l4| FlowMatch {
            ethertype,
            src: A,
            dst: B,
            tag,
            l4,
        };
        vec![
            f(ETH_P_IPV4, None, None),
            f(ETH_P_IPV4, Some(10), None),
            f(ETH_P_IPV4, None, Some(l4v4)),
            f(ETH_P_IPV4, Some(10), Some(l4v4)),
            f(ETH_P_IPV6, Some(4095), Some(l4v6)),
            f(ETH_P_IPV6, None, Some(l4v6)),
        ]
    }

    fn frames() -> Vec<(Vec<u8>, Option<u16>)> {
        let mut out = Vec::new();
        for tci in [None, Some(10), Some(0x200a), Some(11), Some(4095)] {
            for f in [
                v4(A, B, 1000, 5, 0, 6),
                v4(A, B, 1000, 6, 0, 6), // IP options: left to user space
                v4(A, B, 1001, 5, 0, 6),
                v4(A, B, 1000, 5, 0x2000, 6), // first fragment
                v4(A, B, 1000, 5, 0x0010, 6), // later fragment
                v4(A, B, 1000, 5, 0x4000, 6), // DF is fine
                v4(A, B, 1000, 5, 0, 17),
                v4(B, A, 1000, 5, 0, 6),
                v4(A, B, 1000, 5, 0, 6)[..30].to_vec(),
                v6(A, B, 1000, 0xfe),
                v6(A, B, 1000, 0xff),
                v6(A, B, 999, 0xfe),
            ] {
                out.push((f, tci));
            }
        }
        out
    }

    #[test]
    fn classic_and_ebpf_programs_agree_with_the_checks() {
        let mut matched = 0;
        for flow in flows() {
            let c = checks(&flow);
            let classic = program(std::slice::from_ref(&flow), MATCH_ALL, 0).unwrap();
            let hide = program(std::slice::from_ref(&flow), 0, MATCH_ALL).unwrap();
            let bpf = ebpf::classifier(&c, TagAction::Keep);
            for (frame, tci) in frames() {
                let want = eval(&c, &frame, tci);
                matched += want as usize;
                let ctx = format!("{flow:?} {tci:?} {frame:02x?}");
                assert_eq!(
                    interp::run_tci(&classic, &frame, tci) == MATCH_ALL,
                    want,
                    "classic {ctx}"
                );
                assert_eq!(
                    interp::run_tci(&hide, &frame, tci) == 0,
                    want,
                    "socket filter {ctx}"
                );
                assert_eq!(
                    ebpf::interp::run(&bpf, &frame, tci).0 == -1,
                    want,
                    "ebpf {ctx}"
                );
            }
        }
        // Each flow matches its own frames (the checks are not vacuous): plain v4 matches
        // 6 frames x 1 tci, ...; at least one per flow.
        assert!(matched >= flows().len(), "{matched}");
    }

    #[test]
    fn the_reference_reads_each_field() {
        let [plain, tagged, l4, tagged_l4, v6_4095, l4v6] = flows()[..] else {
            unreachable!()
        };
        let ok = v4(A, B, 1000, 5, 0, 6);
        assert!(eval(&checks(&plain), &ok, None));
        assert!(!eval(&checks(&plain), &ok, Some(10)), "tag present");
        assert!(
            eval(&checks(&plain), &v4(A, B, 1001, 5, 0, 6), None),
            "any ports"
        );
        assert!(eval(&checks(&tagged), &ok, Some(0x200a)), "PCP ignored");
        assert!(!eval(&checks(&tagged), &ok, Some(11)));
        assert!(!eval(&checks(&tagged), &ok, None));
        assert!(eval(&checks(&l4), &ok, None));
        assert!(
            !eval(&checks(&l4), &v4(A, B, 1000, 6, 0, 6), None),
            "options"
        );
        assert!(
            eval(&checks(&plain), &v4(A, B, 1000, 6, 0, 6), None),
            "any header"
        );
        assert!(!eval(&checks(&l4), &v4(A, B, 1001, 5, 0, 6), None));
        assert!(
            !eval(&checks(&l4), &v4(A, B, 1000, 5, 0x2000, 6), None),
            "fragment"
        );
        assert!(
            eval(&checks(&l4), &v4(A, B, 1000, 5, 0x4000, 6), None),
            "DF"
        );
        assert!(eval(&checks(&tagged_l4), &ok, Some(10)));
        assert!(eval(&checks(&v6_4095), &v6(A, B, 1000, 0xfe), Some(4095)));
        assert!(eval(&checks(&l4v6), &v6(A, B, 1000, 0xfe), None));
        assert!(!eval(&checks(&l4v6), &v6(A, B, 1000, 0xff), None));
        assert!(!eval(&checks(&l4v6), &v6(A, B, 999, 0xfe), None));
        assert!(!eval(&checks(&l4v6), &ok, None), "IPv4 frame");
    }

    #[test]
    fn ebpf_classifier_pushes_and_pops_only_on_a_match() {
        let [plain, tagged, ..] = flows()[..] else {
            unreachable!()
        };
        let ok = v4(A, B, 1000, 5, 0, 6);
        let push = ebpf::classifier(&checks(&plain), TagAction::Push(20));
        assert_eq!(ebpf::interp::run(&push, &ok, None), (-1, Some(20)));
        let other = v4(B, A, 1000, 5, 0, 6);
        assert_eq!(ebpf::interp::run(&push, &other, None), (0, None));
        let pop = ebpf::classifier(&checks(&tagged), TagAction::Pop);
        assert_eq!(ebpf::interp::run(&pop, &ok, Some(10)), (-1, None));
        assert_eq!(ebpf::interp::run(&pop, &ok, Some(11)), (0, Some(11)));
    }

    /// The kernel's verifier takes the eBPF classifiers, and the kernel runs them as the
    /// interpreter does (untagged frames: BPF_PROG_TEST_RUN cannot set a metadata tag).
    #[test]
    fn kernel_runs_the_ebpf_classifiers_as_the_interpreter_does() {
        if !vireo_testkit::require(vireo_testkit::Need::Root) {
            return;
        }
        for flow in flows().into_iter().filter(|f| f.tag.is_none()) {
            let c = checks(&flow);
            for action in [TagAction::Keep, TagAction::Push(7)] {
                let fd = ebpf::load(&ebpf::classifier(&c, action), "vireo_test").unwrap();
                for (frame, _) in frames().into_iter().filter(|(_, t)| t.is_none()) {
                    if frame.len() < 60 {
                        continue; // test_run wants at least an Ethernet header and more
                    }
                    let want = eval(&c, &frame, None);
                    let got = ebpf::test_run(&fd, &frame).unwrap();
                    assert_eq!(
                        got == u32::MAX,
                        want,
                        "{flow:?} {action:?} {frame:02x?}: {got}"
                    );
                }
            }
        }
    }
}
