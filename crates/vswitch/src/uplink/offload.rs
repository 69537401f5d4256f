//! Segmentation and checksum offload between the switch and the kernel: the virtio-net header
//! that AF_PACKET (PACKET_VNET_HDR) and TAP put in front of frames, so TCP crosses the switch as
//! 64 KiB super-frames instead of MTU-sized ones. When such a frame must leave through a port
//! that cannot take the header, the switch finishes the checksum or cuts the frame into MSS
//! segments itself.

use crate::frame::{ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP};

pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;

/// `struct virtio_net_hdr` (legacy layout, host byte order = little endian on x86).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        }
    }

    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// True when the frame cannot go out as-is without offload support.
    pub fn needs_work(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0 || self.gso_type & !GSO_ECN != GSO_NONE
    }

    /// The header after 4 bytes were inserted (+4) or removed (-4) in front of L3.
    pub fn shifted(mut self, delta: i32) -> Self {
        let sh = |v: u16| {
            if v == 0 {
                0
            } else {
                (v as i32 + delta).clamp(0, u16::MAX as i32) as u16
            }
        };
        self.csum_start = sh(self.csum_start);
        self.hdr_len = sh(self.hdr_len);
        self
    }
}

/// Whether a port taking `o` can be handed `h` as it is (no software work first). ECN-marked
/// super-frames are never offered (no port negotiates TSO_ECN), so they are segmented.
pub fn accepted_by(o: vireo_netport::Offloads, h: &VnetHdr) -> bool {
    let csum_ok = h.flags & F_NEEDS_CSUM == 0 || o.csum;
    let gso_ok = match h.gso_type {
        GSO_NONE => true,
        GSO_TCPV4 => o.tso4,
        GSO_TCPV6 => o.tso6,
        _ => false,
    };
    csum_ok && gso_ok
}

/// Whether the offsets of a header asking for work lie inside `frame` (a guest or the kernel
/// may hand over anything; a receiver must never be given a checksum field past the end).
/// Headers asking for nothing always fit.
pub fn fits(frame: &[u8], h: &VnetHdr) -> bool {
    if !h.needs_work() {
        return true;
    }
    let field = h.csum_start as usize + h.csum_offset as usize + 2;
    let csum_ok = h.flags & F_NEEDS_CSUM == 0 || (field <= frame.len() && h.csum_offset >= 6);
    let gso_ok = h.gso_type & !GSO_ECN == GSO_NONE
        || (h.gso_size > 0 && (h.csum_start as usize) + 20 <= frame.len());
    csum_ok && gso_ok
}

/// Ones' complement sum of `data` (as big-endian 16-bit words), added to `acc`, not yet folded.
pub(crate) fn sum(data: &[u8], mut acc: u64) -> u64 {
    // Eight bytes at a time: the four words of each are added separately, so no carry is lost
    // (a u64 holds 2^48 such additions).
    let mut wide = data.chunks_exact(8);
    for c in &mut wide {
        let v = u64::from_be_bytes(c.try_into().expect("8 bytes"));
        acc += (v >> 48) + ((v >> 32) & 0xffff) + ((v >> 16) & 0xffff) + (v & 0xffff);
    }
    let mut chunks = wide.remainder().chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    acc
}

pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Completes a partial checksum (NEEDS_CSUM): the field already holds the pseudo-header sum.
/// Returns false when the offsets do not fit the frame.
pub fn finish_checksum(frame: &mut [u8], h: &VnetHdr) -> bool {
    let start = h.csum_start as usize;
    let field = start + h.csum_offset as usize;
    if field + 2 > frame.len() || start > frame.len() {
        return false;
    }
    let c = !fold(sum(&frame[start..], 0));
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Offset of the L3 header and its EtherType, skipping VLAN tags.
fn l3_of(frame: &[u8]) -> Option<(usize, u16)> {
    let mut off = 12;
    loop {
        let et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
        if matches!(et, 0x8100 | 0x88a8) && off < 12 + 8 {
            off += 4;
            continue;
        }
        return Some((off + 2, et));
    }
}

/// Length of the longest frame `frame` stands for on the wire: for a super-frame its headers
/// plus one MSS (the segments [`segment`] would cut), otherwise the frame itself. A header
/// whose offsets do not fit the frame gives the whole frame's length.
pub fn wire_len(frame: &[u8], h: &VnetHdr) -> usize {
    if h.gso_type & !GSO_ECN == GSO_NONE || h.gso_size == 0 {
        return frame.len();
    }
    let l4 = h.csum_start as usize;
    let Some(&off) = frame.get(l4 + 12) else {
        return frame.len();
    };
    let hdrs = l4 + (off >> 4) as usize * 4;
    (hdrs + h.gso_size as usize).min(frame.len())
}

/// Cuts a TCP super-frame into MSS-sized frames with complete IP and TCP checksums, handing
/// each to `emit`. Returns false (emitting nothing) for frames it cannot segment.
pub fn segment(frame: &[u8], h: &VnetHdr, buf: &mut Vec<u8>, mut emit: impl FnMut(&[u8])) -> bool {
    let Some((l3, et)) = l3_of(frame) else {
        return false;
    };
    let l4 = h.csum_start as usize;
    let mss = h.gso_size as usize;
    if mss == 0 || l4 + 20 > frame.len() || l4 <= l3 {
        return false;
    }
    let v4 = match (et, h.gso_type & !GSO_ECN) {
        (ETH_P_IPV4, GSO_TCPV4) => true,
        (ETH_P_IPV6, GSO_TCPV6) => false,
        _ => return false,
    };
    if (v4 && frame.get(l3 + 9) != Some(&IPPROTO_TCP))
        || (!v4 && (l4 != l3 + 40 || frame.get(l3 + 6) != Some(&IPPROTO_TCP)))
    {
        return false;
    }
    let thl = (frame[l4 + 12] >> 4) as usize * 4;
    if thl < 20 || l4 + thl > frame.len() {
        return false;
    }
    let hdrs = l4 + thl;
    let payload = &frame[hdrs..];
    let seq0 = u32::from_be_bytes(frame[l4 + 4..l4 + 8].try_into().expect("4 bytes"));
    let id0 = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]);
    let n = payload.len().div_ceil(mss).max(1);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(std::iter::once(&[][..]).take(usize::from(payload.is_empty())))
        .enumerate()
    {
        buf.clear();
        buf.extend_from_slice(&frame[..hdrs]);
        buf.extend_from_slice(chunk);
        let last = i + 1 == n;
        if v4 {
            let tot = (buf.len() - l3) as u16;
            buf[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
            buf[l3 + 4..l3 + 6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
            buf[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let ihl = (buf[l3] & 0x0f) as usize * 4;
            let c = !fold(sum(&buf[l3..l3 + ihl], 0));
            buf[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            let plen = (buf.len() - l3 - 40) as u16;
            buf[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
        }
        let seq = seq0.wrapping_add((i * mss) as u32);
        buf[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        // FIN and PSH belong to the last segment only, CWR to the first.
        if !last {
            buf[l4 + 13] &= !0x09;
        }
        if i > 0 {
            buf[l4 + 13] &= !0x80;
        }
        buf[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let tcp_len = buf.len() - l4;
        let mut acc = if v4 {
            sum(&buf[l3 + 12..l3 + 20], 0)
        } else {
            sum(&buf[l3 + 8..l3 + 40], 0)
        };
        acc += IPPROTO_TCP as u64 + tcp_len as u64;
        let c = !fold(sum(&buf[l4..], acc));
        buf[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        emit(buf);
    }
    true
}

/// Makes an offloaded frame safe for a port without offload support: `emit` gets each frame
/// to send (the frame itself with its checksum finished, or its segments).
pub fn resolve(
    frame: &[u8],
    h: &VnetHdr,
    scratch: &mut Vec<u8>,
    seg: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> bool {
    if h.gso_type & !GSO_ECN != GSO_NONE {
        return segment(frame, h, seg, emit);
    }
    if h.flags & F_NEEDS_CSUM != 0 {
        scratch.clear();
        scratch.extend_from_slice(frame);
        if !finish_checksum(scratch, h) {
            return false;
        }
        emit(scratch);
        return true;
    }
    emit(frame);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    fn checksums_ok(f: &[u8]) -> bool {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not IPv4")
        };
        let Some(TransportSlice::Tcp(tcp)) = &p.transport else {
            panic!("not TCP")
        };
        let ip_hdr = ip.header().to_header();
        let ip_ok = ip_hdr.calc_header_checksum() == ip_hdr.header_checksum;
        let want = tcp
            .to_header()
            .calc_checksum_ipv4(&ip_hdr, tcp.payload())
            .unwrap();
        ip_ok && want == tcp.checksum()
    }

    #[test]
    fn segments_a_tcp_super_frame_with_valid_checksums() {
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 2, 1000, 100)
            .psh()
            .fin();
        let mut f = Vec::new();
        b.write(&mut f, &payload).unwrap();
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut segs = Vec::new();
        assert!(segment(&f, &h, &mut Vec::new(), |s| segs.push(s.to_vec())));
        assert_eq!(segs.len(), 3);
        let mut got = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert!(checksums_ok(s), "segment {i}");
            let p = SlicedPacket::from_ethernet(s).unwrap();
            let Some(TransportSlice::Tcp(t)) = p.transport else {
                unreachable!()
            };
            assert_eq!(t.sequence_number(), 1000 + 1448 * i as u32);
            assert_eq!(t.fin(), i == 2);
            got.extend_from_slice(t.payload());
        }
        assert_eq!(got, payload);
    }

    #[test]
    fn wire_length_of_a_super_frame_is_headers_plus_one_mss() {
        let mut f = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 2, 1000, 100)
            .write(&mut f, &[0u8; 20000])
            .unwrap();
        let mut h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(wire_len(&f, &h), 54 + 1448);
        h.csum_start = 60000;
        assert_eq!(wire_len(&f, &h), f.len(), "bogus offsets: the whole frame");
        assert_eq!(wire_len(&f[..100], &VnetHdr::default()), 100);
    }

    #[test]
    fn finishes_a_partial_checksum() {
        let b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(1, 2, 1000, 100);
        let mut f = Vec::new();
        b.write(&mut f, &[7u8; 333]).unwrap();
        assert!(checksums_ok(&f));
        // Replace the checksum with the pseudo-header sum, as a sender using offload does.
        let tcp_len = (f.len() - 34) as u64;
        let pseudo = fold(sum(&f[26..34], 0) + 6 + tcp_len);
        f[50..52].copy_from_slice(&pseudo.to_be_bytes());
        assert!(!checksums_ok(&f));
        assert!(finish_checksum(
            &mut f,
            &VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 16,
                ..Default::default()
            }
        ));
        assert!(checksums_ok(&f));
    }
}
