//! VXLAN (RFC 7348) and NVGRE (RFC 7637) encapsulation and strict decapsulation over IPv4 or
//! IPv6 provider networks. Pure: a frame in, a frame (or a verdict) out.

use std::net::IpAddr;

use vireo_netconfig::{Encap, VXLAN_PORT};

use super::wire::{fold, ip_bytes, ipv4_header_checksum, pseudo, sum};
use crate::frame::{Mac, ETH_P_IPV4, ETH_P_IPV6};

const IPPROTO_GRE: u8 = 47;
const IPPROTO_UDP: u8 = 17;
/// GRE protocol type of transparent Ethernet bridging (the inner Ethernet frame).
const ETH_P_TEB: u16 = 0x6558;
/// GRE flags word of NVGRE: only the key bit set, version 0 (RFC 7637 §3.2).
const NVGRE_FLAGS: u16 = 0x2000;
/// VXLAN flags byte: the "valid VNI" bit.
const VXLAN_I: u8 = 0x08;
/// A reserved VXLAN flag bit (RFC 7348 §5: zero on transmit, ignored on receipt by other
/// VTEPs) that Vireo sets on a packet it relays for a VM that moved away (`relay.rs`).
const VXLAN_RELAYED: u8 = 0x01;
/// The NVGRE flow id that marks a relayed packet; ordinary packets' flow ids stop below it.
const NVGRE_RELAYED_FLOW: u8 = 0xff;

/// Outer header bytes: Ethernet + IP + (UDP + VXLAN | GRE with key), before the inner frame.
pub fn overhead(encap: Encap, v6: bool) -> usize {
    let ip = if v6 { 40 } else { 20 };
    let tun = match encap {
        Encap::Vxlan => 16,
        Encap::Nvgre => 8,
    };
    14 + ip + tun
}

/// The outer addresses of a tunnel packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outer {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
}

/// Prepends the outer headers to `frame` (an inner Ethernet frame). `entropy` is a hash of
/// the inner flow: the outer UDP source port (VXLAN) or the NVGRE flow id, so ECMP and RSS
/// spread tenants' flows. Outer IPv4 has DF set: the MTU is accounted for by the caller.
pub fn encapsulate(frame: &mut Vec<u8>, encap: Encap, vsid: u32, entropy: u16, o: &Outer) {
    let v6 = o.dst_ip.is_ipv6();
    let inner = frame.len();
    let hlen = overhead(encap, v6);
    let mut h = Vec::with_capacity(hlen);
    h.extend_from_slice(&o.dst_mac);
    h.extend_from_slice(&o.src_mac);
    h.extend_from_slice(&(if v6 { ETH_P_IPV6 } else { ETH_P_IPV4 }).to_be_bytes());
    let proto = match encap {
        Encap::Vxlan => IPPROTO_UDP,
        Encap::Nvgre => IPPROTO_GRE,
    };
    let l4_len = hlen - 14 - if v6 { 40 } else { 20 } + inner;
    let ip_at = h.len();
    if v6 {
        h.extend_from_slice(&[0x60, 0, 0, 0]);
        h.extend_from_slice(&(l4_len as u16).to_be_bytes());
        h.extend_from_slice(&[proto, 64]);
    } else {
        h.extend_from_slice(&[0x45, 0]);
        h.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    }
    h.extend_from_slice(&ip_bytes(o.src_ip));
    h.extend_from_slice(&ip_bytes(o.dst_ip));
    if !v6 {
        let c = ipv4_header_checksum(&h[ip_at..]);
        h[ip_at + 10..ip_at + 12].copy_from_slice(&c.to_be_bytes());
    }
    let l4_at = h.len();
    match encap {
        Encap::Vxlan => {
            // RFC 7348 §5: source port from the inner flow, in the dynamic range.
            let sport = 49152 | (entropy & 0x3fff);
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&VXLAN_PORT.to_be_bytes());
            h.extend_from_slice(&(l4_len as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            h.extend_from_slice(&[VXLAN_I, 0, 0, 0]);
            h.extend_from_slice(&(vsid << 8).to_be_bytes());
        }
        Encap::Nvgre => {
            h.extend_from_slice(&NVGRE_FLAGS.to_be_bytes());
            h.extend_from_slice(&ETH_P_TEB.to_be_bytes());
            let key = (vsid << 8) | u32::from((entropy as u8).min(NVGRE_RELAYED_FLOW - 1));
            h.extend_from_slice(&key.to_be_bytes());
        }
    }
    frame.splice(0..0, h);
    // IPv6 forbids a zero UDP checksum unless both ends agree (RFC 6935); compute it.
    if v6 && encap == Encap::Vxlan {
        let acc = pseudo(&ip_bytes(o.src_ip), &ip_bytes(o.dst_ip), proto, l4_len);
        let mut c = fold(sum(acc, &frame[l4_at..]));
        if c == 0 {
            c = 0xffff;
        }
        frame[l4_at + 6..l4_at + 8].copy_from_slice(&c.to_be_bytes());
    }
}

/// Marks a packet [`encapsulate`] just built as relayed by this host for a VM that moved
/// away, so that the next host delivers it but never relays it again (no chains).
pub fn mark_relayed(frame: &mut [u8], encap: Encap) {
    let l4 = if frame.get(12..14) == Some(&ETH_P_IPV6.to_be_bytes()) {
        54
    } else {
        34
    };
    match encap {
        Encap::Vxlan => {
            if let Some(f) = frame.get_mut(l4 + 8) {
                *f |= VXLAN_RELAYED;
            }
        }
        Encap::Nvgre => {
            if let Some(f) = frame.get_mut(l4 + 7) {
                *f = NVGRE_RELAYED_FLOW;
            }
        }
    }
}

/// A tunnel packet addressed to us, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    pub encap: Encap,
    pub vsid: u32,
    pub outer_src_mac: Mac,
    pub outer_src: IpAddr,
    pub outer_dst: IpAddr,
    /// The inner Ethernet frame is `frame[inner.0..inner.1]`.
    pub inner: (usize, usize),
    /// Relayed by the host a VM moved away from ([`mark_relayed`]).
    pub relayed: bool,
}

/// Why a frame did not decapsulate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// Not IP/UDP-4789 or IP/GRE at all: ordinary traffic for the L2 switch.
    #[error("not a tunnel packet")]
    NotTunnel,
    /// Claims to be a tunnel packet but a header is wrong or cut short.
    #[error("malformed tunnel packet")]
    Malformed,
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

/// Parses an untagged frame as VXLAN or NVGRE over IPv4/IPv6. Strict: IP version and header
/// length, IPv4 header checksum, no fragments, lengths that agree with the frame, VXLAN's I
/// flag, NVGRE's exact flags and protocol, an inner frame of at least an Ethernet header.
pub fn decapsulate(frame: &[u8]) -> Result<Tunnel, DecapError> {
    use DecapError::*;
    let et = be16(frame, 12).ok_or(NotTunnel)?;
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(frame.get(6..12).ok_or(NotTunnel)?);
    let (proto, l4, end, src, dst) = match et {
        ETH_P_IPV4 => {
            let ip = frame.get(14..34).ok_or(NotTunnel)?;
            let proto = ip[9];
            if proto != IPPROTO_UDP && proto != IPPROTO_GRE {
                return Err(NotTunnel);
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(be16(ip, 2).ok_or(Malformed)?);
            if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || 14 + total > frame.len() {
                return Err(Malformed);
            }
            let hdr = frame.get(14..14 + ihl).ok_or(Malformed)?;
            if ipv4_header_checksum(hdr) != be16(hdr, 10).ok_or(Malformed)? {
                return Err(Malformed);
            }
            // More-fragments or an offset: we never reassemble tunnel packets.
            if be16(ip, 6).ok_or(Malformed)? & 0x3fff != 0 {
                return Err(Malformed);
            }
            let s: [u8; 4] = ip[12..16].try_into().unwrap_or_default();
            let d: [u8; 4] = ip[16..20].try_into().unwrap_or_default();
            (
                proto,
                14 + ihl,
                14 + total,
                IpAddr::from(s),
                IpAddr::from(d),
            )
        }
        ETH_P_IPV6 => {
            let ip = frame.get(14..54).ok_or(NotTunnel)?;
            let proto = ip[6];
            if proto != IPPROTO_UDP && proto != IPPROTO_GRE {
                return Err(NotTunnel);
            }
            let plen = usize::from(be16(ip, 4).ok_or(Malformed)?);
            if ip[0] >> 4 != 6 || 54 + plen > frame.len() {
                return Err(Malformed);
            }
            let s: [u8; 16] = ip[8..24].try_into().unwrap_or_default();
            let d: [u8; 16] = ip[24..40].try_into().unwrap_or_default();
            (proto, 54, 54 + plen, IpAddr::from(s), IpAddr::from(d))
        }
        _ => return Err(NotTunnel),
    };
    let (encap, vsid, inner, relayed) = if proto == IPPROTO_UDP {
        if be16(frame, l4 + 2) != Some(VXLAN_PORT) {
            return Err(NotTunnel);
        }
        let ulen = usize::from(be16(frame, l4 + 4).ok_or(Malformed)?);
        if ulen != end - l4 || ulen < 16 {
            return Err(Malformed);
        }
        let vx = frame.get(l4 + 8..l4 + 16).ok_or(Malformed)?;
        if vx[0] & VXLAN_I == 0 {
            return Err(Malformed);
        }
        let vni = u32::from_be_bytes([0, vx[4], vx[5], vx[6]]);
        (Encap::Vxlan, vni, l4 + 16, vx[0] & VXLAN_RELAYED != 0)
    } else {
        let g = frame.get(l4..l4 + 8).ok_or(Malformed)?;
        if be16(g, 0) != Some(NVGRE_FLAGS) || be16(g, 2) != Some(ETH_P_TEB) {
            return Err(Malformed);
        }
        (
            Encap::Nvgre,
            u32::from_be_bytes([0, g[4], g[5], g[6]]),
            l4 + 8,
            g[7] == NVGRE_RELAYED_FLOW,
        )
    };
    if end < inner + 14 {
        return Err(Malformed);
    }
    Ok(Tunnel {
        encap,
        vsid,
        outer_src_mac: src_mac,
        outer_src: src,
        outer_dst: dst,
        inner: (inner, end),
        relayed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner() -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(&[0x45; 46]);
        f
    }

    fn outer(v6: bool) -> Outer {
        let (s, d): (IpAddr, IpAddr) = if v6 {
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
        } else {
            (
                "192.168.7.1".parse().unwrap(),
                "192.168.7.2".parse().unwrap(),
            )
        };
        Outer {
            src_mac: [2, 0, 0, 0, 1, 1],
            dst_mac: [2, 0, 0, 0, 1, 2],
            src_ip: s,
            dst_ip: d,
        }
    }

    #[test]
    fn both_encapsulations_round_trip_over_both_families() {
        for encap in [Encap::Vxlan, Encap::Nvgre] {
            for v6 in [false, true] {
                let mut f = inner();
                encapsulate(&mut f, encap, 0xabcdef, 0x1234, &outer(v6));
                assert_eq!(f.len(), inner().len() + overhead(encap, v6));
                let t = decapsulate(&f).unwrap();
                assert_eq!((t.encap, t.vsid), (encap, 0xabcdef));
                assert_eq!(t.outer_dst, outer(v6).dst_ip);
                assert_eq!(&f[t.inner.0..t.inner.1], &inner()[..]);
            }
        }
    }

    #[test]
    fn every_truncation_and_flag_error_is_refused_without_panic() {
        for encap in [Encap::Vxlan, Encap::Nvgre] {
            for v6 in [false, true] {
                let mut f = inner();
                encapsulate(&mut f, encap, 77, 1, &outer(v6));
                for n in 0..f.len() - 1 {
                    assert!(
                        decapsulate(&f[..n]).is_err(),
                        "{encap:?} v6={v6} cut at {n}"
                    );
                }
                // Flip each header byte: never a panic; IPv4 header bytes always refused.
                for i in 0..overhead(encap, v6) {
                    let mut g = f.clone();
                    g[i] ^= 0x5a;
                    let r = decapsulate(&g);
                    if !v6 && (14..34).contains(&i) {
                        assert!(r.is_err(), "flipped IPv4 byte {i} accepted");
                    }
                }
            }
        }
        let mut f = inner();
        encapsulate(&mut f, Encap::Nvgre, 77, 1, &outer(false));
        f[34] |= 0x80; // checksum-present bit
        assert_eq!(decapsulate(&f), Err(DecapError::Malformed));
        let mut f = inner();
        encapsulate(&mut f, Encap::Vxlan, 77, 1, &outer(false));
        f[42] = 0; // VXLAN I flag cleared
        assert_eq!(decapsulate(&f), Err(DecapError::Malformed));
    }
}
