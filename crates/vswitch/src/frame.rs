//! One pass over a frame's headers into a compact [`FrameSummary`] that every pipeline stage
//! reads, so no stage re-parses. Hand-written slicing (bounds-checked `get`s only): it must take
//! any bytes without panicking and stay cheap enough for millions of frames per second.

/// An Ethernet MAC address in wire order.
pub type Mac = [u8; 6];

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// Pre-standard QinQ outer tag some switches still emit.
pub const ETH_P_QINQ_OLD: u16 = 0x9100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Address family of the L3 header a summary describes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum L3 {
    #[default]
    Other,
    Arp,
    Ipv4,
    Ipv6,
}

/// The ARP fields the ARP guard checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArpInfo {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: [u8; 4],
    pub target_ip: [u8; 4],
}

/// Where an IP fragment sits in its datagram: what the fragment guard keys and checks on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fragment {
    /// IPv4 identification (16 bits) or IPv6 fragment identification.
    pub id: u32,
    /// Offset of this fragment's data in the datagram, in 8-byte units.
    pub offset: u16,
    /// More fragments follow.
    pub more: bool,
    /// IPv4 protocol, or the IPv6 fragment header's next header (the first header of the
    /// fragmentable part). Every fragment of a datagram carries it, so it keys the datagram.
    pub proto: u8,
    /// First fragment only: bytes from the start of the fragment data to the upper-layer
    /// header (extension headers of the fragmentable part before it).
    pub l4_start: u16,
}

impl Fragment {
    /// Part of a datagram split in two or more (an IPv6 atomic fragment is a whole packet).
    pub fn is_split(&self) -> bool {
        self.offset != 0 || self.more
    }
}

/// IPv6 extension header numbers: as the next header of a non-first fragment they hide
/// which upper-layer protocol the datagram carries.
pub fn is_ipv6_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60 | 135 | 139 | 140 | 253 | 254)
}

/// What a frame is, as far as the switch cares. Addresses are kept as `u128`
/// (IPv4 in the low 32 bits) so ACL prefix tests are one AND and one compare.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrameSummary {
    pub dst: Mac,
    pub src: Mac,
    /// Number of VLAN tags (802.1Q/802.1ad) found, capped at 3.
    pub tags: u8,
    /// VLAN id and priority of the outer tag (0 when untagged).
    pub vid: u16,
    pub pcp: u8,
    /// EtherType after all tags.
    pub ethertype: u16,
    pub l3: L3,
    pub src_ip: u128,
    pub dst_ip: u128,
    /// IP protocol (IPv6: the upper-layer header after extension headers).
    pub proto: u8,
    /// True when the L4 header fields below were read (first fragment, long enough).
    pub has_l4: bool,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type and code.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// IPv6 neighbor solicitation/advertisement target address.
    pub nd_target: u128,
    /// True for an IPv6 packet whose upper-layer header could not be located (truncated or
    /// fragmented extension chain): guards treat such packets as suspicious.
    pub l4_hidden: bool,
    pub arp: Option<ArpInfo>,
    /// BOOTP op (1 request, 2 reply) of UDP from port 67 or to 67/68; 0 when absent.
    pub dhcp4_op: u8,
    /// DHCPv6 message type of UDP from port 547 or to 546/547; 0 when absent.
    pub dhcp6_type: u8,
    /// Set for an IP fragment: IPv4 with more-fragments or a non-zero offset, IPv6 with a
    /// fragment header (atomic fragments included).
    pub frag: Option<Fragment>,
}

impl FrameSummary {
    pub fn is_multicast_dst(&self) -> bool {
        self.dst[0] & 1 == 1
    }
    pub fn is_broadcast_dst(&self) -> bool {
        self.dst == [0xff; 6]
    }
    pub fn is_untagged(&self) -> bool {
        self.tags == 0
    }
}

/// Why a frame could not be summarised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("frame of {0} bytes is shorter than an Ethernet header")]
    Runt(usize),
}

#[inline]
fn be16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off + 2)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

#[inline]
fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

#[inline]
fn be128(b: &[u8], off: usize) -> Option<u128> {
    let s: [u8; 16] = b.get(off..off + 16)?.try_into().ok()?;
    Some(u128::from_be_bytes(s))
}

fn is_vlan_tpid(t: u16) -> bool {
    matches!(t, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_OLD)
}

/// Offset of the EtherType field that follows `tags` VLAN tags.
pub fn ethertype_offset(tags: u8) -> usize {
    12 + 4 * tags as usize
}

/// Summarises `frame`. Only an Ethernet header is required; anything after it that is
/// truncated or unknown just leaves the corresponding fields at their defaults.
pub fn parse(frame: &[u8]) -> Result<FrameSummary, ParseError> {
    if frame.len() < 14 {
        return Err(ParseError::Runt(frame.len()));
    }
    let mut s = FrameSummary::default();
    s.dst.copy_from_slice(&frame[0..6]);
    s.src.copy_from_slice(&frame[6..12]);
    let mut off = 12;
    let mut et = be16(frame, off).unwrap_or(0);
    while is_vlan_tpid(et) && s.tags < 3 {
        let Some(tci) = be16(frame, off + 2) else {
            // A tag header cut short: count it so VLAN policy still sees a tagged frame.
            s.tags += 1;
            s.ethertype = 0;
            return Ok(s);
        };
        if s.tags == 0 {
            s.vid = tci & 0x0fff;
            s.pcp = (tci >> 13) as u8;
        }
        s.tags += 1;
        off += 4;
        et = be16(frame, off).unwrap_or(0);
    }
    s.ethertype = et;
    let l3 = off + 2;
    match et {
        ETH_P_ARP => parse_arp(frame, l3, &mut s),
        ETH_P_IPV4 => parse_ipv4(frame, l3, &mut s),
        ETH_P_IPV6 => parse_ipv6(frame, l3, &mut s),
        _ => {}
    }
    Ok(s)
}

fn parse_arp(f: &[u8], o: usize, s: &mut FrameSummary) {
    s.l3 = L3::Arp;
    // Only Ethernet/IPv4 ARP (htype 1, ptype 0x0800, hlen 6, plen 4) carries addresses we check.
    let (Some(htype), Some(ptype), Some(lens), Some(op)) =
        (be16(f, o), be16(f, o + 2), be16(f, o + 4), be16(f, o + 6))
    else {
        return;
    };
    if htype != 1 || ptype != ETH_P_IPV4 || lens != 0x0604 {
        s.arp = Some(ArpInfo {
            op,
            ..ArpInfo::default()
        });
        return;
    }
    let (Some(sm), Some(si), Some(ti)) = (f.get(o + 8..o + 14), be32(f, o + 14), be32(f, o + 24))
    else {
        s.arp = Some(ArpInfo {
            op,
            ..ArpInfo::default()
        });
        return;
    };
    let mut sender_mac = [0; 6];
    sender_mac.copy_from_slice(sm);
    s.src_ip = si as u128;
    s.dst_ip = ti as u128;
    s.arp = Some(ArpInfo {
        op,
        sender_mac,
        sender_ip: si.to_be_bytes(),
        target_ip: ti.to_be_bytes(),
    });
}

fn parse_ipv4(f: &[u8], o: usize, s: &mut FrameSummary) {
    let Some(&vihl) = f.get(o) else { return };
    if vihl >> 4 != 4 {
        return;
    }
    let ihl = (vihl & 0x0f) as usize * 4;
    let (Some(total), Some(id), Some(frag), Some(&proto), Some(src), Some(dst)) = (
        be16(f, o + 2),
        be16(f, o + 4),
        be16(f, o + 6),
        f.get(o + 9),
        be32(f, o + 12),
        be32(f, o + 16),
    ) else {
        return;
    };
    s.l3 = L3::Ipv4;
    s.proto = proto;
    s.src_ip = src as u128;
    s.dst_ip = dst as u128;
    let offset = frag & 0x1fff;
    if offset != 0 || frag & 0x2000 != 0 {
        s.frag = Some(Fragment {
            id: id as u32,
            offset,
            more: frag & 0x2000 != 0,
            proto,
            l4_start: 0,
        });
    }
    if ihl < 20 || offset != 0 {
        // Not a first fragment: there is no L4 header here.
        return;
    }
    parse_l4(within(f, o, total as usize, ihl), o + ihl, proto, s);
}

/// The frame up to the end of the IP packet that starts at `o` and claims `len` bytes, so
/// that Ethernet padding is never read as headers (a tiny fragment padded to 60 bytes must
/// not look complete). A length shorter than the header (0 in some offload super-frames)
/// or past the frame's end leaves the frame as it is.
fn within(f: &[u8], o: usize, len: usize, header: usize) -> &[u8] {
    match f.get(..o + len) {
        Some(packet) if len >= header => packet,
        _ => f,
    }
}

fn parse_ipv6(f: &[u8], o: usize, s: &mut FrameSummary) {
    let Some(&v) = f.get(o) else { return };
    let (Some(payload), Some(mut next), Some(src), Some(dst)) = (
        be16(f, o + 4),
        f.get(o + 6).copied(),
        be128(f, o + 8),
        be128(f, o + 24),
    ) else {
        return;
    };
    if v >> 4 != 6 {
        return;
    }
    s.l3 = L3::Ipv6;
    s.src_ip = src;
    s.dst_ip = dst;
    // Payload length 0 is a jumbogram (or an offload super-frame): the frame decides.
    let f = if payload == 0 {
        f
    } else {
        within(f, o, 40 + payload as usize, 40)
    };
    let mut off = o + 40;
    // Where the fragmentable part starts (right after the fragment header), if any.
    let mut fragmentable = None;
    // Walk a bounded number of extension headers; RA-guard evasion hides ICMPv6 behind them.
    for _ in 0..8 {
        match next {
            0 | 43 | 60 | 51 => {
                let (Some(&n), Some(&len)) = (f.get(off), f.get(off + 1)) else {
                    s.l4_hidden = true;
                    s.proto = next;
                    return;
                };
                // AH counts its length in 4-byte words minus 2, the others in 8-byte units.
                off += if next == 51 {
                    (len as usize + 2) * 4
                } else {
                    (len as usize + 1) * 8
                };
                next = n;
            }
            44 => {
                let (Some(&n), Some(fo), Some(id)) =
                    (f.get(off), be16(f, off + 2), be32(f, off + 4))
                else {
                    s.l4_hidden = true;
                    s.proto = next;
                    return;
                };
                if s.frag.is_some() {
                    // A second fragment header: no receiver reassembles that honestly.
                    s.l4_hidden = true;
                    s.proto = next;
                    return;
                }
                s.frag = Some(Fragment {
                    id,
                    offset: fo >> 3,
                    more: fo & 1 != 0,
                    proto: n,
                    l4_start: 0,
                });
                next = n;
                off += 8;
                fragmentable = Some(off);
                if fo & 0xfff8 != 0 {
                    s.proto = next;
                    return;
                }
            }
            _ => {
                s.proto = next;
                if let (Some(fr), Some(start)) = (&mut s.frag, fragmentable) {
                    fr.l4_start = (off - start).min(u16::MAX as usize) as u16;
                }
                parse_l4(f, off, next, s);
                if !s.has_l4 && matches!(next, IPPROTO_ICMPV6 | IPPROTO_UDP | IPPROTO_TCP) {
                    s.l4_hidden = true;
                }
                return;
            }
        }
    }
    s.proto = next;
    s.l4_hidden = true;
}

fn parse_l4(f: &[u8], o: usize, proto: u8, s: &mut FrameSummary) {
    match proto {
        IPPROTO_TCP => {
            let (Some(sp), Some(dp), Some(&flags)) = (be16(f, o), be16(f, o + 2), f.get(o + 13))
            else {
                return;
            };
            s.sport = sp;
            s.dport = dp;
            s.tcp_flags = flags;
            s.has_l4 = true;
        }
        IPPROTO_UDP => {
            let (Some(sp), Some(dp)) = (be16(f, o), be16(f, o + 2)) else {
                return;
            };
            s.sport = sp;
            s.dport = dp;
            s.has_l4 = true;
            let payload = o + 8;
            // From a server port or to any DHCP port: a BOOTREPLY sent to a client's port 68
            // from another source port, or to a relay's port 67, is still a server message.
            if sp == 67 || dp == 67 || dp == 68 {
                s.dhcp4_op = f.get(payload).copied().unwrap_or(0);
            } else if sp == 547 || dp == 547 || dp == 546 {
                s.dhcp6_type = f.get(payload).copied().unwrap_or(0);
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let (Some(&t), Some(&c)) = (f.get(o), f.get(o + 1)) else {
                return;
            };
            s.icmp_type = t;
            s.icmp_code = c;
            s.has_l4 = true;
            // ICMP echo id doubles as a "port" so stateful ACLs can track pings.
            if let Some(id) = be16(f, o + 4) {
                s.sport = id;
                s.dport = id;
            }
            if proto == IPPROTO_ICMPV6 && (t == 135 || t == 136 || t == 137) {
                s.nd_target = be128(f, o + 8).unwrap_or(0);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    #[test]
    fn parses_tagged_udp_and_dhcp() {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [0xff; 6])
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv4([10, 0, 0, 1], [255, 255, 255, 255], 64)
            .udp(67, 68);
        let mut payload = vec![0u8; 240];
        payload[0] = 2;
        let mut f = Vec::new();
        b.write(&mut f, &payload).unwrap();
        let s = parse(&f).unwrap();
        assert_eq!(
            (s.tags, s.vid, s.ethertype, s.l3),
            (1, 42, ETH_P_IPV4, L3::Ipv4)
        );
        assert_eq!(
            (s.sport, s.dport, s.dhcp4_op, s.proto),
            (67, 68, 2, IPPROTO_UDP)
        );
        assert_eq!(s.src_ip, 0x0a000001);
        assert!(s.is_broadcast_dst() && s.is_multicast_dst());
    }

    #[test]
    fn short_and_garbage_frames_do_not_panic() {
        assert_eq!(parse(&[0; 13]).unwrap_err(), ParseError::Runt(13));
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x81, 0x00, 0x00]);
        assert_eq!(parse(&f).unwrap().tags, 1);
        for len in 14..80 {
            let mut g = vec![0xffu8; len];
            g[12] = 0x86;
            g[13] = 0xdd;
            let _ = parse(&g);
        }
    }
}
