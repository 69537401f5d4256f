//! Number and hex parsing for command lines.

/// A u64 written in decimal or as `0x` hex.
pub fn number(txt: &[u8]) -> Option<u64> {
    let (digits, radix) = match txt {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (txt, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: u64 = 0;
    for &b in digits {
        let d = (b as char).to_digit(radix)? as u64;
        value = value.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(value)
}

/// Decodes lowercase or uppercase hex without separators into `out`; returns the byte count.
pub fn hex_decode(txt: &[u8], out: &mut [u8]) -> Option<usize> {
    if !txt.len().is_multiple_of(2) || txt.len() / 2 > out.len() {
        return None;
    }
    for (i, pair) in txt.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi << 4 | lo) as u8;
    }
    Some(txt.len() / 2)
}
