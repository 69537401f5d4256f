//! Builds IP datagrams and splits them into fragments by hand (the way a hostile guest
//! would), for the fragment-guard tests and the netns test.

// The DHCP body lives with the other shared helpers in common/, which the fragment tests do
// not include (its frame builders clash with these); a test including both gets two copies.
#[allow(clippy::duplicate_mod)]
#[path = "../common/dhcp.rs"]
mod dhcp;
pub mod guest;

pub use dhcp::bootp;

use etherparse::PacketBuilder;

pub type Mac = [u8; 6];

/// Ethernet header length (all frames here are untagged).
const ETH: usize = 14;

pub fn udp4(
    src: Mac,
    dst: Mac,
    sip: [u8; 4],
    dip: [u8; 4],
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .udp(ports.0, ports.1)
        .write(&mut f, payload)
        .unwrap();
    f
}

pub fn icmp4(src: Mac, dst: Mac, sip: [u8; 4], dip: [u8; 4], ty: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv4(sip, dip, 64)
        .icmpv4_raw(ty, 0, [0; 4])
        .write(&mut f, body)
        .unwrap();
    f
}

pub fn udp6(
    src: Mac,
    dst: Mac,
    sip: [u8; 16],
    dip: [u8; 16],
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv6(sip, dip, 64)
        .udp(ports.0, ports.1)
        .write(&mut f, payload)
        .unwrap();
    f
}

/// An ICMPv6 message: `rest` is the 4 bytes after type/code/checksum, `body` what follows
/// (the target address of NS/NA/redirect, options).
pub fn icmp6(src: Mac, dst: Mac, sip: [u8; 16], dip: [u8; 16], ty: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    PacketBuilder::ethernet2(src, dst)
        .ipv6(sip, dip, 255)
        .icmpv6_raw(ty, 0, [0; 4])
        .write(&mut f, body)
        .unwrap();
    f
}

/// Inserts an IPv6 destination-options header (8 bytes, PadN) in front of the upper-layer
/// header of an unfragmented IPv6 frame: after fragmentation it is part of the fragmentable
/// part, so the fragment header's next header no longer names the upper-layer protocol.
pub fn with_dstopts(frame: &[u8]) -> Vec<u8> {
    let ip = ETH;
    let next = frame[ip + 6];
    let mut f = frame[..ip + 40].to_vec();
    f[ip + 6] = 60;
    let plen = u16::from_be_bytes([f[ip + 4], f[ip + 5]]) + 8;
    f[ip + 4..ip + 6].copy_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    f.extend_from_slice(&frame[ip + 40..]);
    f
}

/// Byte ranges of a datagram's payload split at `cuts` (multiples of 8, ascending).
fn pieces(len: usize, cuts: &[usize]) -> Vec<(usize, usize)> {
    let mut edges: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|c| *c > 0 && *c < len)
        .collect();
    edges.sort_unstable();
    edges.dedup();
    let mut out = Vec::new();
    let mut a = 0;
    for b in edges.into_iter().chain([len]) {
        out.push((a, b));
        a = b;
    }
    out
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum = 0u32;
    for w in h.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One IPv4 fragment of `frame`'s datagram: payload bytes `a..b`, more-fragments as given.
pub fn ipv4_piece(frame: &[u8], id: u16, a: usize, b: usize, more: bool) -> Vec<u8> {
    let ip = ETH;
    let ihl = (frame[ip] & 0x0f) as usize * 4;
    let payload = &frame[ip + ihl..];
    let mut f = frame[..ip + ihl].to_vec();
    f[ip + 2..ip + 4].copy_from_slice(&((ihl + b - a) as u16).to_be_bytes());
    f[ip + 4..ip + 6].copy_from_slice(&id.to_be_bytes());
    let flags = ((a / 8) as u16) | if more { 0x2000 } else { 0 };
    f[ip + 6..ip + 8].copy_from_slice(&flags.to_be_bytes());
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let c = ipv4_checksum(&f[ip..ip + ihl]);
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&payload[a..b]);
    f
}

/// Splits an untagged IPv4 frame's datagram at `cuts` (byte offsets into the IP payload).
pub fn fragment4(frame: &[u8], id: u16, cuts: &[usize]) -> Vec<Vec<u8>> {
    let ihl = (frame[ETH] & 0x0f) as usize * 4;
    let len = frame.len() - ETH - ihl;
    let ps = pieces(len, cuts);
    let n = ps.len();
    ps.into_iter()
        .enumerate()
        .map(|(i, (a, b))| ipv4_piece(frame, id, a, b, i + 1 < n))
        .collect()
}

/// One IPv6 fragment: IPv6 header, optionally a hop-by-hop header (unfragmentable part),
/// the fragment header, payload bytes `a..b` of the original upper layer.
pub fn ipv6_piece(
    frame: &[u8],
    id: u32,
    a: usize,
    b: usize,
    more: bool,
    hop_by_hop: bool,
) -> Vec<u8> {
    let ip = ETH;
    let next = frame[ip + 6];
    let payload = &frame[ip + 40..];
    let mut f = frame[..ip + 40].to_vec();
    let mut ext = Vec::new();
    if hop_by_hop {
        f[ip + 6] = 0;
        ext.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]);
    } else {
        f[ip + 6] = 44;
    }
    let fo = ((a / 8) as u16) << 3 | u16::from(more);
    ext.push(next);
    ext.push(0);
    ext.extend_from_slice(&fo.to_be_bytes());
    ext.extend_from_slice(&id.to_be_bytes());
    let plen = (ext.len() + b - a) as u16;
    f[ip + 4..ip + 6].copy_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&ext);
    f.extend_from_slice(&payload[a..b]);
    f
}

/// Splits an untagged IPv6 frame's datagram (everything after the fixed header is the
/// fragmentable part) at `cuts`.
pub fn fragment6(frame: &[u8], id: u32, cuts: &[usize], hop_by_hop: bool) -> Vec<Vec<u8>> {
    let len = frame.len() - ETH - 40;
    let ps = pieces(len, cuts);
    let n = ps.len();
    ps.into_iter()
        .enumerate()
        .map(|(i, (a, b))| ipv6_piece(frame, id, a, b, i + 1 < n, hop_by_hop))
        .collect()
}

/// Cut points every `step` bytes up to `len` (`step` a multiple of 8), starting at `first`.
pub fn every(first: usize, step: usize, len: usize) -> Vec<usize> {
    (0..)
        .map(|i| first + i * step)
        .take_while(|c| *c < len)
        .collect()
}
