//! Byte-level helpers of the overlay: Internet checksums and address conversions. Pure
//! functions over slices; nothing here allocates except the callers' buffers.

use std::net::IpAddr;

/// One's-complement sum of `data` (odd length padded with a zero byte) added to `acc`.
pub fn sum(mut acc: u32, data: &[u8]) -> u32 {
    let mut c = data.chunks_exact(2);
    for w in &mut c {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = c.remainder() {
        acc += u32::from(*b) << 8;
    }
    acc
}

/// Folds a sum into the final checksum.
pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The pseudo-header sum of an upper-layer packet (RFC 768 / RFC 8200 §8.1).
pub fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut acc = sum(0, src);
    acc = sum(acc, dst);
    acc + u32::from(proto) + len as u32
}

/// An IPv4 header checksum (the header's own checksum field zero or not: it is skipped).
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    let acc = sum(sum(0, &hdr[..10]), &hdr[12..]);
    fold(acc)
}

/// An address as the `u128` of a `FrameSummary` (IPv4 in the low 32 bits).
pub fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address a `FrameSummary` field holds, given the family.
pub fn u128_to_ip(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(v.into())
    } else {
        IpAddr::V4((v as u32).into())
    }
}

/// An address's wire bytes.
pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_checksum_of_a_known_header() {
        // RFC 1071 style example: a real header captured from Linux, checksum 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header_checksum(&h), 0xb861);
    }
}
