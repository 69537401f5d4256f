//! ICMP errors from the physical side for NAT-ed connections (destination unreachable, time
//! exceeded, parameter problem — fragmentation needed among them): the error names the
//! connection only inside the packet it quotes, which left with the NAT address and outside
//! port. [`quoted`] reads that connection's key from the quote; [`translate`] rewrites the
//! error for the tenant — the outer destination and the quoted source address and port back
//! to the CA's — keeping the outer IP, quoted IP, quoted UDP/TCP/ICMP (when quoted) and the
//! error's own ICMP checksums right. Pure byte work; which connection it is, and so which
//! tenant, is the NAT table's answer (`gateway.rs`).

use std::net::Ipv4Addr;

use super::wire::{fold, sum};
use crate::frame::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

/// ICMP types that quote the packet they are about (RFC 792).
pub const ERROR_TYPES: [u8; 3] = [3, 11, 12];

/// The connection an error is about, as the outside saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted {
    pub proto: u8,
    /// Our outside port (TCP/UDP source port, or the echo id).
    pub outside_port: u16,
    pub peer: Ipv4Addr,
    /// The peer's port (0 for ICMP echo).
    pub peer_port: u16,
}

/// Offsets of an ICMP error in an untagged IPv4 frame: (ICMP header, quoted IP header,
/// quoted L4 header, end of the outer IP packet).
fn layout(f: &[u8]) -> Option<(usize, usize, usize, usize)> {
    let ihl = usize::from(*f.get(14)? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*f.get(16)?, *f.get(17)?]));
    let end = 14 + total;
    let icmp = 14 + ihl;
    let inner = icmp + 8;
    if ihl < 20 || end > f.len() || inner + 20 > end || f[inner] >> 4 != 4 {
        return None;
    }
    let ihl2 = usize::from(f[inner] & 0x0f) * 4;
    let l4 = inner + ihl2;
    // RFC 792: the quote holds the IP header and at least 8 bytes of what followed.
    if ihl2 < 20 || l4 + 8 > end {
        return None;
    }
    Some((icmp, inner, l4, end))
}

/// The connection quoted by the ICMP error in untagged IPv4 frame `f`, sent to `nat_addr`.
/// `None` when it is not an error we can attribute: bad ICMP checksum, a quote that is not
/// from the NAT address, a later fragment, a protocol NAT does not carry.
pub fn quoted(f: &[u8], nat_addr: Ipv4Addr) -> Option<Quoted> {
    let (icmp, inner, l4, end) = layout(f)?;
    if !ERROR_TYPES.contains(&f[icmp]) || fold(sum(0, &f[icmp..end])) != 0 {
        return None;
    }
    let addr = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    let frag_offset = u16::from_be_bytes([f[inner + 6], f[inner + 7]]) & 0x1fff;
    if addr(inner + 12) != nat_addr || frag_offset != 0 {
        return None;
    }
    let get16 = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let proto = f[inner + 9];
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => Some(Quoted {
            proto,
            outside_port: get16(l4),
            peer: addr(inner + 16),
            peer_port: get16(l4 + 2),
        }),
        // Only our echo requests were translated outbound.
        IPPROTO_ICMP if f[l4] == 8 => Some(Quoted {
            proto,
            outside_port: get16(l4 + 4),
            peer: addr(inner + 16),
            peer_port: 0,
        }),
        _ => None,
    }
}

/// RFC 1624 incremental update of the checksum at `at` for 16-bit-aligned `old` → `new`.
fn adjust(f: &mut [u8], at: usize, old: &[u8], new: &[u8], udp: bool) {
    let c = u16::from_be_bytes([f[at], f[at + 1]]);
    if udp && c == 0 {
        return; // no UDP checksum was sent
    }
    let mut acc = u32::from(!c);
    for w in old.chunks_exact(2) {
        acc += u32::from(!u16::from_be_bytes([w[0], w[1]]));
    }
    for w in new.chunks_exact(2) {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    let mut n = fold(acc);
    if udp && n == 0 {
        n = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&n.to_be_bytes());
}

/// Rewrites the ICMP error in `f` (already checked by [`quoted`]) for the tenant behind the
/// connection: outer destination and quoted source become `ca`, the quoted source port (or
/// echo id) `port`.
pub fn translate(f: &mut [u8], ca: Ipv4Addr, port: u16) {
    let Some((icmp, inner, l4, end)) = layout(f) else {
        return;
    };
    let new_ip = ca.octets();
    let old_dst: [u8; 4] = f[30..34].try_into().expect("4 bytes");
    adjust(f, 24, &old_dst, &new_ip, false);
    f[30..34].copy_from_slice(&new_ip);

    let old_src: [u8; 4] = f[inner + 12..inner + 16].try_into().expect("4 bytes");
    adjust(f, inner + 10, &old_src, &new_ip, false);
    f[inner + 12..inner + 16].copy_from_slice(&new_ip);

    let new_port = port.to_be_bytes();
    match f[inner + 9] {
        IPPROTO_UDP | IPPROTO_TCP => {
            let old_port = [f[l4], f[l4 + 1]];
            let check = if f[inner + 9] == IPPROTO_UDP {
                Some(l4 + 6)
            } else {
                // The TCP checksum is quoted only when the router sent more than 8 bytes.
                Some(l4 + 16).filter(|c| c + 2 <= end)
            };
            if let Some(c) = check {
                let udp = f[inner + 9] == IPPROTO_UDP;
                adjust(f, c, &old_src, &new_ip, udp);
                adjust(f, c, &old_port, &new_port, udp);
            }
            f[l4..l4 + 2].copy_from_slice(&new_port);
        }
        _ => {
            let old_id = [f[l4 + 4], f[l4 + 5]];
            adjust(f, l4 + 2, &old_id, &new_port, false);
            f[l4 + 4..l4 + 6].copy_from_slice(&new_port);
        }
    }
    // The error's own checksum covers everything quoted: computed afresh (it verified on
    // arrival, so nothing broken is laundered).
    f[icmp + 2..icmp + 4].fill(0);
    let c = fold(sum(0, &f[icmp..end]));
    f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::wire::{ipv4_header_checksum, pseudo};

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
        ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let c = ipv4_header_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(payload);
        ip
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(data);
        let c = fold(sum(pseudo(&src, &dst, 17, u.len()), &u));
        u[6..8].copy_from_slice(&c.to_be_bytes());
        ipv4(src, dst, 17, &u)
    }

    /// A port-unreachable from `from` to `to` quoting `orig` whole, in an Ethernet frame.
    fn unreachable(from: [u8; 4], to: [u8; 4], orig: &[u8]) -> Vec<u8> {
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(orig);
        let c = fold(sum(0, &icmp));
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[8, 0]);
        f.extend_from_slice(&ipv4(from, to, 1, &icmp));
        f
    }

    const NAT: [u8; 4] = [198, 51, 100, 1];
    const PEER: [u8; 4] = [198, 51, 100, 9];
    const CA: [u8; 4] = [10, 0, 0, 1];

    #[test]
    fn a_port_unreachable_becomes_the_one_the_tenant_would_have_got() {
        let sent = udp(NAT, PEER, 20001, 9999, b"probe");
        let mut f = unreachable(PEER, NAT, &sent);
        let q = quoted(&f, NAT.into()).unwrap();
        assert_eq!(
            q,
            Quoted {
                proto: 17,
                outside_port: 20001,
                peer: PEER.into(),
                peer_port: 9999
            }
        );
        translate(&mut f, CA.into(), 5000);
        // Exactly what the peer would have sent the tenant without NAT.
        let expect = unreachable(PEER, CA, &udp(CA, PEER, 5000, 9999, b"probe"));
        assert_eq!(f, expect);
    }

    #[test]
    fn a_short_tcp_quote_and_an_echo_quote_translate_with_valid_checksums() {
        // TCP quoted with only 8 bytes of its header: its checksum is not there to fix.
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&20002u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        let sent = ipv4(NAT, PEER, 6, &tcp);
        let mut f = unreachable([203, 0, 113, 7], NAT, &sent[..28]);
        let q = quoted(&f, NAT.into()).unwrap();
        assert_eq!((q.proto, q.outside_port, q.peer_port), (6, 20002, 80));
        translate(&mut f, CA.into(), 40000);
        assert_eq!(fold(sum(0, &f[34..])), 0, "ICMP checksum");
        assert_eq!(
            ipv4_header_checksum(&f[14..34]),
            u16::from_be_bytes([f[24], f[25]])
        );
        assert_eq!(
            ipv4_header_checksum(&f[42..62]),
            u16::from_be_bytes([f[52], f[53]])
        );
        assert_eq!((&f[30..34], &f[54..58]), (&CA[..], &CA[..]));
        assert_eq!(&f[62..64], &40000u16.to_be_bytes());

        let mut echo = vec![8, 0, 0, 0, 0x4e, 0x21, 0, 1, 1, 2, 3, 4];
        let c = fold(sum(0, &echo));
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        let mut f = unreachable(PEER, NAT, &ipv4(NAT, PEER, 1, &echo));
        assert_eq!(quoted(&f, NAT.into()).unwrap().outside_port, 0x4e21);
        translate(&mut f, CA.into(), 7);
        assert_eq!(fold(sum(0, &f[34..])), 0);
        assert_eq!(fold(sum(0, &f[62..])), 0, "quoted echo checksum");
    }

    #[test]
    fn unattributable_errors_are_refused() {
        let sent = udp(NAT, PEER, 20001, 9999, b"probe");
        let good = unreachable(PEER, NAT, &sent);
        // Bad ICMP checksum.
        let mut f = good.clone();
        f[60] ^= 1;
        assert_eq!(quoted(&f, NAT.into()), None);
        // A quote that did not come from our NAT address.
        assert_eq!(quoted(&good, [198, 51, 100, 2].into()), None);
        // Echo replies and other non-errors.
        let mut f = good.clone();
        f[34] = 0;
        assert_eq!(quoted(&f, NAT.into()), None);
        // Every truncation refused, never a panic.
        for n in 0..good.len() {
            let mut t = good[..n].to_vec();
            let _ = quoted(&t, NAT.into());
            translate(&mut t, CA.into(), 1);
        }
    }
}
