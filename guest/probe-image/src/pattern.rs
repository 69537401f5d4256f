//! The probe's test pattern: byte offset `o` (a multiple of 8) holds the little-endian u64
//! `splitmix64(seed ^ o)`. For disks `o` is the byte offset on the disk, for memory the
//! guest-physical address.

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The pattern byte at absolute byte offset `offset`.
pub fn byte_at(seed: u64, offset: u64) -> u8 {
    let word = offset & !7;
    splitmix64(seed ^ word).to_le_bytes()[(offset & 7) as usize]
}

/// Fills `buf` with the pattern as it appears from absolute byte offset `offset` on (which need
/// not be 8-byte aligned).
pub fn fill(buf: &mut [u8], seed: u64, offset: u64) {
    let mut i = 0;
    while i < buf.len() {
        let at = offset + i as u64;
        if at.is_multiple_of(8) && buf.len() - i >= 8 {
            buf[i..i + 8].copy_from_slice(&splitmix64(seed ^ at).to_le_bytes());
            i += 8;
        } else {
            buf[i] = byte_at(seed, at);
            i += 1;
        }
    }
}

/// Returns the absolute offset of the first byte of `buf` (which starts at `offset`) that does
/// not match the pattern.
pub fn verify(buf: &[u8], seed: u64, offset: u64) -> Option<u64> {
    let mut expected = vec![0u8; buf.len().min(1 << 20)];
    for (chunk_index, chunk) in buf.chunks(expected.len().max(1)).enumerate() {
        let chunk_offset = offset + (chunk_index * expected.len()) as u64;
        let want = &mut expected[..chunk.len()];
        fill(want, seed, chunk_offset);
        if let Some(i) = chunk.iter().zip(want.iter()).position(|(a, b)| a != b) {
            return Some(chunk_offset + i as u64);
        }
    }
    None
}

/// FNV-1a 64, as `MEM SUM` computes it.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs of the reference splitmix64 generator seeded with 0 (state advances by
        // the golden gamma, so output n is splitmix64(n * gamma) here).
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn unaligned_fill_matches_aligned_fill() {
        let mut whole = vec![0u8; 64];
        fill(&mut whole, 42, 1000);
        let mut part = vec![0u8; 29];
        fill(&mut part, 42, 1003);
        assert_eq!(&part[..], &whole[3..32]);
    }

    #[test]
    fn verify_finds_first_bad_byte() {
        let mut buf = vec![0u8; 3 << 20];
        fill(&mut buf, 7, 4096);
        assert_eq!(verify(&buf, 7, 4096), None);
        assert_eq!(verify(&buf, 8, 4096), Some(4096));
        buf[(2 << 20) + 5] ^= 1;
        assert_eq!(verify(&buf, 7, 4096), Some(4096 + (2 << 20) + 5));
        assert_eq!(verify(&[], 7, 0), None);
    }

    #[test]
    fn fnv_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
