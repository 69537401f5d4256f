//! eBPF tc classifiers for offloaded flows whose VLAN tag the kernel must change on the way
//! (push on an access → trunk flow, pop on trunk → access). Classic BPF cannot call
//! `bpf_skb_vlan_push`/`bpf_skb_vlan_pop`, and this kernel has no `act_vlan`, so such a flow's
//! classifier is a small eBPF program, assembled here (no clang on these machines, and eight
//! opcodes do not need a compiler) and loaded with the `bpf()` syscall. It tests the same
//! [`Check`]s as the classic programs, changes the tag, and returns -1 ("match"), so the
//! filter's `mirred` action redirects the frame and keeps per-flow counters as for every
//! other flow.
//!
//! Legacy packet loads (`BPF_LD|BPF_ABS`) keep the program free of packet-pointer bounds
//! proofs: the kernel ends the program with 0 (no match) when a load is out of bounds, as
//! classic BPF does. They need the context in r6, which the helpers leave alone.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use super::checks::{Check, Load};

/// What the kernel does to the frame's (metadata) VLAN tag before redirecting it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TagAction {
    /// Leave it (untagged stays untagged, a trunk-to-trunk tag stays).
    Keep,
    /// Remove the tag (trunk → access).
    Pop,
    /// Add an 802.1Q tag with this VID, priority 0 (access → trunk), as the user-space path
    /// does for an untagged frame.
    Push(u16),
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst in the low nibble, src in the high nibble.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = self.regs;
        b[2..4].copy_from_slice(&self.off.to_ne_bytes());
        b[4..].copy_from_slice(&self.imm.to_ne_bytes());
        b
    }
}

pub(crate) const R0: u8 = 0;
pub(crate) const R1: u8 = 1;
pub(crate) const R2: u8 = 2;
pub(crate) const R3: u8 = 3;
pub(crate) const R6: u8 = 6;

pub const MOV64_X: u8 = 0xbf;
pub const MOV64_K: u8 = 0xb7;
pub const AND32_K: u8 = 0x54;
pub const LDX_W: u8 = 0x61;
pub const LD_ABS_W: u8 = 0x20;
pub const LD_ABS_H: u8 = 0x28;
pub const LD_ABS_B: u8 = 0x30;
/// `BPF_JMP32 | BPF_JNE | BPF_K`: compares the low 32 bits with the immediate as a u32.
pub const JNE32_K: u8 = 0x56;
/// `BPF_JMP32 | BPF_JLT | BPF_K` (unsigned).
pub const JLT32_K: u8 = 0xa6;
pub const CALL: u8 = 0x85;
pub const EXIT: u8 = 0x95;

/// Helper numbers (`enum bpf_func_id`).
pub const FN_SKB_VLAN_PUSH: i32 = 18;
pub const FN_SKB_VLAN_POP: i32 = 19;

/// `struct __sk_buff` offsets the program reads.
pub const SKB_LEN: i16 = 0;
pub const SKB_MARK: i16 = 8;
pub const SKB_IFINDEX: i16 = 40;
pub const SKB_VLAN_PRESENT: i16 = 20;
pub const SKB_VLAN_TCI: i16 = 24;
pub const SKB_VLAN_PROTO: i16 = 28;

pub(crate) fn ins(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: src << 4 | dst,
        off,
        imm,
    }
}

/// The classifier of one flow: all `checks` pass ⇒ apply `tag`, return -1; else return 0.
pub fn classifier(checks: &[Check], tag: TagAction) -> Vec<Insn> {
    let mut p = vec![ins(MOV64_X, R6, R1, 0, 0)];
    let fails = emit_checks(&mut p, checks);
    match tag {
        TagAction::Keep => {}
        TagAction::Pop => p.extend([
            ins(MOV64_X, R1, R6, 0, 0),
            ins(CALL, 0, 0, 0, FN_SKB_VLAN_POP),
        ]),
        TagAction::Push(vid) => p.extend([
            ins(MOV64_X, R1, R6, 0, 0),
            // vlan_proto is big-endian: 0x8100 on the wire.
            ins(MOV64_K, R2, 0, 0, 0x8100u16.to_be() as i32),
            ins(MOV64_K, R3, 0, 0, (vid & 0x0fff) as i32),
            ins(CALL, 0, 0, 0, FN_SKB_VLAN_PUSH),
        ]),
    }
    finish(p, fails)
}

/// Ends a program: the success path (already emitted) returns -1, and every jump in `fails`
/// goes to a tail that returns 0.
pub(crate) fn finish(mut p: Vec<Insn>, fails: Vec<usize>) -> Vec<Insn> {
    p.extend([ins(MOV64_K, R0, 0, 0, -1), ins(EXIT, 0, 0, 0, 0)]);
    let fail = p.len();
    p.extend([ins(MOV64_K, R0, 0, 0, 0), ins(EXIT, 0, 0, 0, 0)]);
    for at in fails {
        p[at].off = (fail - at - 1) as i16;
    }
    p
}

/// Appends the tests of `checks` (the context in r6); returns the jumps that must go to the
/// "no match" tail.
pub(crate) fn emit_checks(p: &mut Vec<Insn>, checks: &[Check]) -> Vec<usize> {
    let mut fails = Vec::new();
    for c in checks {
        match c.load {
            Load::VlanPresent => p.push(ins(LDX_W, R0, R6, SKB_VLAN_PRESENT, 0)),
            Load::VlanTci => p.push(ins(LDX_W, R0, R6, SKB_VLAN_TCI, 0)),
            // __sk_buff.vlan_proto is the raw (network-order) TPID: compared swapped below.
            Load::VlanProto => p.push(ins(LDX_W, R0, R6, SKB_VLAN_PROTO, 0)),
            Load::Len => p.push(ins(LDX_W, R0, R6, SKB_LEN, 0)),
            Load::Mark => p.push(ins(LDX_W, R0, R6, SKB_MARK, 0)),
            Load::Abs { size, off } => {
                let code = match size {
                    4 => LD_ABS_W,
                    2 => LD_ABS_H,
                    _ => LD_ABS_B,
                };
                p.push(ins(code, 0, 0, 0, off as i32));
            }
        }
        if c.mask != u32::MAX {
            p.push(ins(AND32_K, R0, 0, 0, c.mask as i32));
        }
        fails.push(p.len());
        let code = if c.at_least { JLT32_K } else { JNE32_K };
        let value = if c.load == Load::VlanProto {
            (c.value as u16).to_be() as u32
        } else {
            c.value
        };
        p.push(ins(code, R0, 0, 0, value as i32));
    }
    fails
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// GPL-compatible (the VLAN helpers are GPL-only), and true of this crate's programs.
const LICENSE: &[u8] = b"Dual MIT/GPL\0";

/// Loads a `sched_cls` program; the verifier's log is in the error when it refuses.
pub fn load(prog: &[Insn], name: &str) -> io::Result<OwnedFd> {
    let insns: Vec<u8> = prog.iter().flat_map(|i| i.to_bytes()).collect();
    let mut log = vec![0u8; 16 * 1024];
    // union bpf_attr, BPF_PROG_LOAD part: prog_type, insn_cnt, insns, license, log_level,
    // log_size, log_buf, kern_version, prog_flags, prog_name[16]. The rest stays zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&(prog.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(LICENSE.as_ptr() as u64).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
    attr[28..32].copy_from_slice(&(log.len() as u32).to_ne_bytes());
    attr[32..40].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    let n = name.len().min(15);
    attr[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: bpf(2) reads the attr (whose pointers refer to live buffers of the stated
    // lengths: insns, license, log) and writes only into the log buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let last: Vec<&str> = text.lines().rev().take(3).collect();
        return Err(io::Error::new(
            e.kind(),
            format!("loading the eBPF classifier: {e}: {}", last.join(" | ")),
        ));
    }
    // SAFETY: a fresh fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs a loaded program once on `frame` in the kernel (`BPF_PROG_TEST_RUN`, the skb built
/// as tc would see it, untagged) and returns its return value.
pub fn test_run(prog: &OwnedFd, frame: &[u8]) -> io::Result<u32> {
    test_run_data(prog, frame).map(|(r, _)| r)
}

/// [`test_run`], also returning the frame as the program left it.
pub fn test_run_data(prog: &OwnedFd, frame: &[u8]) -> io::Result<(u32, Vec<u8>)> {
    test_run_skb(prog, frame, SkbIn::default()).map(|r| (r.retval, r.frame))
}

/// The `struct __sk_buff` fields a test run sets besides the frame.
#[derive(Clone, Copy, Debug, Default)]
pub struct SkbIn {
    pub mark: u32,
    /// Non-zero: the skb is a GSO super-frame of segments this long.
    pub gso_size: u32,
}

/// What a test run leaves: the return value, the frame and the skb's mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkbOut {
    pub retval: u32,
    pub frame: Vec<u8>,
    pub mark: u32,
}

/// Runs a loaded program once on `frame` with the skb metadata `skb` (`BPF_PROG_TEST_RUN`
/// with a `__sk_buff` context in and out).
pub fn test_run_skb(prog: &OwnedFd, frame: &[u8], skb: SkbIn) -> io::Result<SkbOut> {
    use std::os::fd::AsRawFd;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    /// `sizeof(struct __sk_buff)` on 6.x kernels.
    const SK_BUFF_LEN: usize = 192;
    let mut ctx_in = [0u8; SK_BUFF_LEN];
    ctx_in[SKB_MARK as usize..][..4].copy_from_slice(&skb.mark.to_ne_bytes());
    ctx_in[SKB_GSO_SIZE..][..4].copy_from_slice(&skb.gso_size.to_ne_bytes());
    if skb.gso_size != 0 {
        // gso_segs: the kernel wants a super-frame to claim more than one segment.
        ctx_in[SKB_GSO_SEGS..][..4].copy_from_slice(&2u32.to_ne_bytes());
    }
    let mut ctx_out = [0u8; SK_BUFF_LEN];
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
    attr[40..44].copy_from_slice(&(SK_BUFF_LEN as u32).to_ne_bytes());
    attr[44..48].copy_from_slice(&(SK_BUFF_LEN as u32).to_ne_bytes());
    attr[48..56].copy_from_slice(&(ctx_in.as_ptr() as u64).to_ne_bytes());
    attr[56..64].copy_from_slice(&(ctx_out.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: bpf(2) reads the attr, whose pointers refer to live buffers of the stated
    // lengths, and writes the retval into it, the frame into `out`, the context into
    // `ctx_out`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = u32::from_ne_bytes([attr[12], attr[13], attr[14], attr[15]]) as usize;
    out.truncate(n);
    let word = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    Ok(SkbOut {
        retval: word(&attr, 4),
        frame: out,
        mark: word(&ctx_out, SKB_MARK as usize),
    })
}

const SKB_GSO_SEGS: usize = 164;
const SKB_GSO_SIZE: usize = 176;

#[cfg(test)]
pub(crate) mod interp {
    //! An interpreter for the instructions [`super::classifier`] emits, with the kernel's
    //! semantics (legacy loads: big-endian, out of bounds ends the program with 0), and the
    //! two helpers acting on a modelled metadata tag.
    use super::*;

    /// Returns (r0, the metadata TCI afterwards).
    pub fn run(prog: &[Insn], frame: &[u8], mut tci: Option<u16>) -> (i64, Option<u16>) {
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = prog[pc];
            pc += 1;
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            let load = |at: i64, n: usize| -> Option<u64> {
                let at = usize::try_from(at).ok()?;
                let b = frame.get(at..at + n)?;
                Some(b.iter().fold(0u64, |v, x| v << 8 | *x as u64))
            };
            let size = |c: u8| match c & 0x18 {
                0x00 => 4,
                0x08 => 2,
                _ => 1,
            };
            match i.code {
                MOV64_X => r[dst] = r[src],
                MOV64_K => r[dst] = i.imm as i64 as u64,
                AND32_K => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
                LDX_W => {
                    assert_eq!(src, R6 as usize, "ctx loads only");
                    r[dst] = match i.off {
                        SKB_LEN => frame.len() as u64,
                        SKB_MARK => 0,
                        SKB_VLAN_PRESENT => tci.is_some() as u64,
                        SKB_VLAN_TCI => tci.unwrap_or(0) as u64,
                        SKB_VLAN_PROTO => tci.map_or(0, |_| 0x8100u16.to_be()) as u64,
                        o => panic!("unexpected ctx offset {o}"),
                    };
                }
                LD_ABS_W | LD_ABS_H | LD_ABS_B => match load(i.imm as i64, size(i.code)) {
                    Some(v) => r[0] = v,
                    None => return (0, tci),
                },
                JNE32_K | JLT32_K => {
                    let (a, k) = (r[dst] as u32, i.imm as u32);
                    if (i.code == JNE32_K && a != k) || (i.code == JLT32_K && a < k) {
                        pc = (pc as i64 + i.off as i64) as usize;
                    }
                }
                CALL => {
                    r[0] = 0;
                    match i.imm {
                        FN_SKB_VLAN_POP => tci = None,
                        FN_SKB_VLAN_PUSH => {
                            assert_eq!(r[2] as u16, 0x8100u16.to_be(), "TPID");
                            assert!(tci.is_none(), "push onto a tag would make QinQ");
                            tci = Some(r[3] as u16);
                        }
                        f => panic!("unexpected helper {f}"),
                    }
                }
                EXIT => return (r[0] as i64, tci),
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
        panic!("program did not exit");
    }
}
