//! Receive-side coalescing (what the kernel's GRO does for a NIC): consecutive MSS-sized
//! segments of one TCP/IPv4 flow read in one batch from an offload port become one super-frame
//! with a GSO header, so the pipeline, the send and the receiving stack handle one frame where
//! there were dozens. Every segment's IP and TCP checksums are verified first, because the
//! super-frame goes out marked "checksum partial" and the receiver will not check it again.

use super::offload::{fold, sum, VnetHdr, F_NEEDS_CSUM, GSO_TCPV4};
use crate::frame::{ETH_P_IPV4, IPPROTO_TCP};

const L3: usize = 14;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Largest IPv4 datagram a super-frame may become.
const MAX_IP_LEN: usize = 65535;

/// Where a coalescible segment's parts are.
#[derive(Clone, Copy)]
struct Seg {
    l4: usize,
    /// End of the TCP header = start of the payload.
    hdrs: usize,
    seq: u32,
    payload: usize,
    flags: u8,
}

/// A plain (no offload header) IPv4 TCP segment without IP options, not fragmented, DF set,
/// only ACK (and maybe PSH) set, carrying data, with valid checksums.
fn parse(f: &[u8], h: &VnetHdr) -> Option<Seg> {
    if *h != VnetHdr::default() || f.len() < L3 + 40 {
        return None;
    }
    if u16::from_be_bytes([f[12], f[13]]) != ETH_P_IPV4 || f[L3] != 0x45 {
        return None;
    }
    let tot = u16::from_be_bytes([f[L3 + 2], f[L3 + 3]]) as usize;
    let frag = u16::from_be_bytes([f[L3 + 6], f[L3 + 7]]);
    if L3 + tot != f.len() || frag != 0x4000 || f[L3 + 9] != IPPROTO_TCP {
        return None;
    }
    let l4 = L3 + 20;
    let hdrs = l4 + (f[l4 + 12] >> 4) as usize * 4;
    let flags = f[l4 + 13];
    if hdrs < l4 + 20 || hdrs >= f.len() || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    if fold(sum(&f[L3..l4], 0)) != 0xffff {
        return None;
    }
    let pseudo = sum(&f[L3 + 12..L3 + 20], 0) + IPPROTO_TCP as u64 + (f.len() - l4) as u64;
    if fold(sum(&f[l4..], pseudo)) != 0xffff {
        return None;
    }
    Some(Seg {
        l4,
        hdrs,
        seq: u32::from_be_bytes(f[l4 + 4..l4 + 8].try_into().ok()?),
        payload: f.len() - hdrs,
        flags,
    })
}

/// True when `b` continues the flow of `a` with identical headers (IP id, length, checksums
/// and the sequence number aside, which the caller checks).
fn same_flow(a: &[u8], b: &[u8], sa: &Seg, sb: &Seg) -> bool {
    sa.hdrs == sb.hdrs
        && a[..L3 + 2] == b[..L3 + 2]
        && a[L3 + 6..L3 + 10] == b[L3 + 6..L3 + 10]
        && a[L3 + 12..sa.l4 + 4] == b[L3 + 12..sb.l4 + 4]
        && a[sa.l4 + 8..sa.l4 + 13] == b[sb.l4 + 8..sb.l4 + 13]
        && a[sa.l4 + 14..sa.l4 + 16] == b[sb.l4 + 14..sb.l4 + 16]
        && a[sa.l4 + 18..sa.hdrs] == b[sb.l4 + 18..sb.hdrs]
}

/// A super-frame being built in the buffer of its first segment.
struct Open {
    at: usize,
    first: Seg,
    mss: usize,
    next_seq: u32,
    segs: usize,
    closed: bool,
}

/// Turns `open` into a valid GSO super-frame (when it took more than one segment).
fn seal(o: &Open, bufs: &mut [Vec<u8>], lens: &[usize], hdrs: &mut [VnetHdr]) {
    if o.segs < 2 {
        return;
    }
    let f = &mut bufs[o.at][..lens[o.at]];
    let s = o.first;
    let tot = (f.len() - L3) as u16;
    f[L3 + 2..L3 + 4].copy_from_slice(&tot.to_be_bytes());
    f[L3 + 10..L3 + 12].copy_from_slice(&[0, 0]);
    let c = !fold(sum(&f[L3..s.l4], 0));
    f[L3 + 10..L3 + 12].copy_from_slice(&c.to_be_bytes());
    // "Checksum partial": the field holds the pseudo-header sum; the payload is summed by
    // whoever finishes it (or nobody, for local delivery of verified data).
    let pseudo = sum(&f[L3 + 12..L3 + 20], 0) + IPPROTO_TCP as u64 + (f.len() - s.l4) as u64;
    f[s.l4 + 16..s.l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
    hdrs[o.at] = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: s.hdrs as u16,
        gso_size: o.mss as u16,
        csum_start: s.l4 as u16,
        csum_offset: 16,
    };
}

/// Coalesces the first `count` frames of a batch (frame `i` is `bufs[i][..lens[i]]`, each
/// buffer at least `cap` long): segments appended to an earlier frame get length 0 (skip
/// them). Order between flows is kept, since only runs of adjacent frames merge. Returns
/// how many frames were absorbed.
pub fn coalesce_batch(
    bufs: &mut [Vec<u8>],
    lens: &mut [usize],
    hdrs: &mut [VnetHdr],
    count: usize,
    cap: usize,
) -> usize {
    let mut open: Option<Open> = None;
    let mut absorbed = 0;
    for i in 0..count {
        if lens[i] == 0 {
            continue;
        }
        let seg = parse(&bufs[i][..lens[i]], &hdrs[i]);
        if let (Some(o), Some(s)) = (open.as_mut(), seg) {
            let fits = lens[o.at] + s.payload <= cap.min(L3 + MAX_IP_LEN);
            let (head, tail) = bufs.split_at_mut(i);
            let a = &head[o.at][..lens[o.at]];
            let b = &tail[0][..lens[i]];
            if !o.closed
                && fits
                && s.seq == o.next_seq
                && s.payload <= o.mss
                && same_flow(a, b, &o.first, &s)
            {
                let end = lens[o.at];
                head[o.at][end..end + s.payload].copy_from_slice(&b[s.hdrs..]);
                lens[o.at] = end + s.payload;
                lens[i] = 0;
                absorbed += 1;
                o.next_seq = o.next_seq.wrapping_add(s.payload as u32);
                o.segs += 1;
                // A short segment or a push ends the super-frame, as in the kernel's GRO.
                if s.payload < o.mss || s.flags & TCP_PSH != 0 {
                    o.closed = true;
                    // Carry the push to the super-frame's header.
                    head[o.at][o.first.l4 + 13] |= s.flags & TCP_PSH;
                }
                continue;
            }
        }
        if let Some(o) = open.take() {
            seal(&o, bufs, lens, hdrs);
        }
        open = seg.map(|s| Open {
            at: i,
            first: s,
            mss: s.payload,
            next_seq: s.seq.wrapping_add(s.payload as u32),
            segs: 1,
            closed: s.flags & TCP_PSH != 0,
        });
    }
    if let Some(o) = open {
        seal(&o, bufs, lens, hdrs);
    }
    absorbed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::offload::segment;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const CAP: usize = 65536 + 64;

    fn seg(seq: u32, payload: &[u8], psh: bool, sport: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(sport, 2, seq, 500)
            .ack(77);
        let b = if psh { b.psh() } else { b };
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        // etherparse leaves DF clear; Linux TCP sets it (path MTU discovery).
        f[20] |= 0x40;
        f[24..26].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&f[14..34], 0));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// Loads frames into RX-style buffers (each `CAP` long) with their lengths.
    fn batch(frames: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<usize>, Vec<VnetHdr>) {
        let bufs = frames
            .iter()
            .map(|f| {
                let mut b = f.clone();
                b.resize(CAP, 0);
                b
            })
            .collect();
        let lens = frames.iter().map(|f| f.len()).collect();
        (bufs, lens, vec![VnetHdr::default(); frames.len()])
    }

    fn tcp_payload(f: &[u8]) -> (u32, Vec<u8>) {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(TransportSlice::Tcp(t)) = p.transport else {
            panic!("not TCP")
        };
        (t.sequence_number(), t.payload().to_vec())
    }

    #[test]
    fn merges_a_run_and_resegments_to_the_same_stream() {
        let data: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
        let mss = 1448;
        let frames: Vec<Vec<u8>> = data
            .chunks(mss)
            .enumerate()
            .map(|(i, c)| seg(1000 + (i * mss) as u32, c, i == 2, 1))
            .collect();
        let (mut bufs, mut lens, mut hdrs) = batch(&frames);
        assert_eq!(coalesce_batch(&mut bufs, &mut lens, &mut hdrs, 3, CAP), 2);
        assert_eq!(&lens[1..], &[0, 0]);
        let h = hdrs[0];
        assert_eq!(
            (h.gso_type, h.gso_size, h.flags),
            (GSO_TCPV4, 1448, F_NEEDS_CSUM)
        );
        let sup = &bufs[0][..lens[0]];
        let (seq, payload) = tcp_payload(sup);
        assert_eq!((seq, payload.as_slice()), (1000, data.as_slice()));
        // Cutting it again gives valid segments carrying the same stream, push on the last.
        let mut out = Vec::new();
        assert!(segment(sup, &h, &mut Vec::new(), |s| out.push(s.to_vec())));
        assert_eq!(out.len(), 3);
        let mut got = Vec::new();
        for (i, s) in out.iter().enumerate() {
            assert!(
                parse(s, &VnetHdr::default()).is_some(),
                "segment {i} checksums"
            );
            assert_eq!(s[14 + 20 + 13] & TCP_PSH != 0, i == 2);
            got.extend(tcp_payload(s).1);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn leaves_gaps_other_flows_bad_checksums_and_pure_acks_alone() {
        let p = [9u8; 1000];
        // Each frame would continue the one before it but for the one flaw it names.
        let mut bad = seg(2000, &p, false, 1);
        let n = bad.len();
        bad[n - 1] ^= 1;
        let frames = vec![
            seg(1000, &p, false, 1),
            bad,                      // corrupted payload
            seg(3000, &p, false, 2),  // another flow
            seg(4000, &p, false, 1),  // (starts a run of flow 1)
            seg(5500, &p, false, 1),  // gap: 5000 expected
            seg(6500, &[], false, 1), // pure ACK
        ];
        let (mut bufs, mut lens, mut hdrs) = batch(&frames);
        let before = lens.clone();
        assert_eq!(coalesce_batch(&mut bufs, &mut lens, &mut hdrs, 6, CAP), 0);
        assert_eq!(lens, before);
        assert!(hdrs.iter().all(|h| *h == VnetHdr::default()));
        for (b, f) in bufs.iter().zip(&frames) {
            assert_eq!(&b[..f.len()], f.as_slice());
        }
    }

    #[test]
    fn stops_at_the_ip_length_limit() {
        let p = vec![1u8; 1448];
        let frames: Vec<Vec<u8>> = (0..60).map(|i| seg(i * 1448, &p, false, 1)).collect();
        let (mut bufs, mut lens, mut hdrs) = batch(&frames);
        coalesce_batch(&mut bufs, &mut lens, &mut hdrs, 60, CAP);
        let kept: Vec<usize> = lens.iter().copied().filter(|l| *l > 0).collect();
        assert!(kept.len() >= 2);
        assert!(kept.iter().all(|l| l - 14 <= MAX_IP_LEN));
        let total: usize = kept.iter().map(|l| l - 54).sum();
        assert_eq!(total, 60 * 1448);
    }
}
