//! Frames the host answers with instead of flooding: ARP replies and neighbor advertisements
//! from the policy table, ARP requests for provider next hops, ICMP "too big" when the
//! encapsulated packet would not fit the provider MTU. Each builder overwrites `frame`.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::wire::{fold, ipv4_header_checksum, pseudo, sum};
use crate::frame::{Mac, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6};
use crate::switch::ETH_MIN_FRAME;

fn eth(frame: &mut Vec<u8>, dst: Mac, src: Mac, et: u16) {
    frame.clear();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&et.to_be_bytes());
}

fn pad(frame: &mut Vec<u8>) {
    if frame.len() < ETH_MIN_FRAME {
        frame.resize(ETH_MIN_FRAME, 0);
    }
}

/// An ARP packet (op 1 request, 2 reply) in a frame from `src` to `dst`.
#[allow(clippy::too_many_arguments)]
pub fn arp(
    frame: &mut Vec<u8>,
    dst: Mac,
    src: Mac,
    op: u16,
    sha: Mac,
    spa: Ipv4Addr,
    tha: Mac,
    tpa: Ipv4Addr,
) {
    eth(frame, dst, src, ETH_P_ARP);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    frame.extend_from_slice(&op.to_be_bytes());
    frame.extend_from_slice(&sha);
    frame.extend_from_slice(&spa.octets());
    frame.extend_from_slice(&tha);
    frame.extend_from_slice(&tpa.octets());
    pad(frame);
}

/// A solicited neighbor advertisement for `target` (owned by `target_mac`) to `to`/`to_mac`.
pub fn neighbor_advert(
    frame: &mut Vec<u8>,
    to_mac: Mac,
    to: Ipv6Addr,
    target: Ipv6Addr,
    target_mac: Mac,
    router: bool,
) {
    // A DAD probe (from ::) is answered to all-nodes, unsolicited (RFC 4861 §7.2.4).
    let solicited = !to.is_unspecified();
    let dst = if solicited {
        to
    } else {
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)
    };
    advert(frame, to_mac, dst, target, target_mac, router, solicited);
}

/// An unsolicited neighbor advertisement (override set, solicited clear: RFC 4861 §7.2.6)
/// of `target` at `target_mac`, sent to one neighbour `to`/`to_mac` rather than all-nodes:
/// what a VM that moved tells its peers across the overlay.
pub fn unsolicited_advert(
    frame: &mut Vec<u8>,
    to_mac: Mac,
    to: Ipv6Addr,
    target: Ipv6Addr,
    target_mac: Mac,
) {
    advert(frame, to_mac, to, target, target_mac, false, false);
}

fn advert(
    frame: &mut Vec<u8>,
    to_mac: Mac,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    target_mac: Mac,
    router: bool,
    solicited: bool,
) {
    eth(frame, to_mac, target_mac, ETH_P_IPV6);
    let body_len = 32;
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(body_len as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&target.octets());
    frame.extend_from_slice(&dst.octets());
    let at = frame.len();
    let flags = (u8::from(router) << 7) | (u8::from(solicited) << 6) | 0x20;
    frame.extend_from_slice(&[136, 0, 0, 0, flags, 0, 0, 0]);
    frame.extend_from_slice(&target.octets());
    frame.extend_from_slice(&[2, 1]);
    frame.extend_from_slice(&target_mac);
    let c = fold(sum(
        pseudo(&target.octets(), &dst.octets(), 58, body_len),
        &frame[at..],
    ));
    frame[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
}

/// Rewrites the IPv4/IPv6 packet in `frame` (Ethernet header at 0, untagged) into an ICMP
/// "fragmentation needed" (v4) / "packet too big" (v6) from `from` to its sender, carrying
/// `mtu` and as much of the original as RFC 792 / RFC 4443 allow. `from_mac` is the sender
/// of the answer (the subnet's gateway). Returns false when the packet cannot be answered
/// (not IP, or itself an ICMP error — never answer those).
pub fn too_big(
    frame: &mut Vec<u8>,
    from_mac: Mac,
    from: Option<std::net::IpAddr>,
    mtu: u16,
) -> bool {
    icmp_error(frame, from_mac, from, IcmpError::TooBig(mtu))
}

/// Which ICMP error [`icmp_error`] sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Fragmentation needed (v4) / packet too big (v6), with the usable MTU.
    TooBig(u16),
    /// Time exceeded in transit (the distributed router's TTL ran out).
    TimeExceeded,
}

/// [`too_big`] for any [`IcmpError`].
pub fn icmp_error(
    frame: &mut Vec<u8>,
    from_mac: Mac,
    from: Option<std::net::IpAddr>,
    kind: IcmpError,
) -> bool {
    let (v4_head, v6_head): ([u8; 8], [u8; 8]) = match kind {
        IcmpError::TooBig(mtu) => {
            let m = mtu.to_be_bytes();
            let m6 = u32::from(mtu).to_be_bytes();
            (
                [3, 4, 0, 0, 0, 0, m[0], m[1]],
                [2, 0, 0, 0, m6[0], m6[1], m6[2], m6[3]],
            )
        }
        IcmpError::TimeExceeded => ([11, 0, 0, 0, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0, 0]),
    };
    let Some(et) = frame.get(12..14) else {
        return false;
    };
    let et = u16::from_be_bytes([et[0], et[1]]);
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    match et {
        ETH_P_IPV4 if frame.len() >= 34 => {
            let ip = frame[14..].to_vec();
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ihl < 20
                || ip.len() < ihl
                || (ip[9] == 1 && ip.get(ihl).is_some_and(|t| *t != 8 && *t != 0))
            {
                return false;
            }
            let orig_src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let me = match from {
                Some(std::net::IpAddr::V4(a)) => a,
                _ => Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            };
            let quote = &ip[..(ihl + 8).min(ip.len())];
            eth(frame, src_mac, from_mac, ETH_P_IPV4);
            let total = 20 + 8 + quote.len();
            frame.extend_from_slice(&[0x45, 0]);
            frame.extend_from_slice(&(total as u16).to_be_bytes());
            frame.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
            frame.extend_from_slice(&me.octets());
            frame.extend_from_slice(&orig_src.octets());
            let c = ipv4_header_checksum(&frame[14..34]);
            frame[24..26].copy_from_slice(&c.to_be_bytes());
            let at = frame.len();
            frame.extend_from_slice(&v4_head);
            frame.extend_from_slice(quote);
            let c = fold(sum(0, &frame[at..]));
            frame[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
            pad(frame);
            true
        }
        ETH_P_IPV6 if frame.len() >= 54 => {
            let ip = frame[14..].to_vec();
            // An ICMPv6 error (type < 128) is never answered.
            if ip[6] == 58 && ip.get(40).is_some_and(|t| *t < 128) {
                return false;
            }
            let orig_src: [u8; 16] = ip[8..24].try_into().unwrap_or_default();
            let me: [u8; 16] = match from {
                Some(std::net::IpAddr::V6(a)) => a.octets(),
                _ => ip[24..40].try_into().unwrap_or_default(),
            };
            // The whole answer within the IPv6 minimum MTU of 1280.
            let quote = &ip[..ip.len().min(1280 - 48)];
            eth(frame, src_mac, from_mac, ETH_P_IPV6);
            let body = 8 + quote.len();
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(body as u16).to_be_bytes());
            frame.extend_from_slice(&[58, 64]);
            frame.extend_from_slice(&me);
            frame.extend_from_slice(&orig_src);
            let at = frame.len();
            frame.extend_from_slice(&v6_head);
            frame.extend_from_slice(quote);
            let c = fold(sum(pseudo(&me, &orig_src, 58, body), &frame[at..]));
            frame[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::parse;

    #[test]
    fn neighbor_advert_checksum_verifies() {
        let mut f = Vec::new();
        let t: Ipv6Addr = "fd00::2".parse().unwrap();
        neighbor_advert(&mut f, [2; 6], "fd00::1".parse().unwrap(), t, [4; 6], false);
        let s = parse(&f).unwrap();
        assert_eq!((s.icmp_type, s.nd_target), (136, u128::from(t)));
        let acc = pseudo(&f[22..38], &f[38..54], 58, 32);
        assert_eq!(fold(sum(acc, &f[54..])), 0);
    }

    #[test]
    fn too_big_quotes_the_header_and_verifies() {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 8, 0];
        let mut ip = vec![
            0x45, 0, 5, 0xdc, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = ipv4_header_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0u8; 1480]);
        assert!(too_big(&mut f, [9; 6], None, 1450));
        let s = parse(&f).unwrap();
        assert_eq!((s.icmp_type, s.icmp_code), (3, 4));
        assert_eq!(&f[0..6], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(
            ipv4_header_checksum(&f[14..34]),
            u16::from_be_bytes([f[24], f[25]])
        );
        assert_eq!(fold(sum(0, &f[34..34 + 36])), 0);
    }
}
