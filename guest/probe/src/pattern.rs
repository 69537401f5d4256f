//! The disk/memory test pattern (docs/probe-protocol.md): byte offset `o` (multiple of 8) holds
//! the little-endian u64 `splitmix64(seed ^ o)`.

#[inline(always)]
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `words` as the pattern for the range starting at byte `offset`.
pub fn fill(words: &mut [u64], seed: u64, offset: u64) {
    for (i, w) in words.iter_mut().enumerate() {
        *w = splitmix64(seed ^ (offset + 8 * i as u64)).to_le();
    }
}

/// Returns the byte offset (relative to `offset`'s origin) of the first byte that differs.
pub fn verify(words: &[u64], seed: u64, offset: u64) -> Option<u64> {
    for (i, &w) in words.iter().enumerate() {
        let o = offset + 8 * i as u64;
        let diff = u64::from_le(w) ^ splitmix64(seed ^ o);
        if diff != 0 {
            return Some(o + (diff.trailing_zeros() / 8) as u64);
        }
    }
    None
}
