//! Human sizes: `64G`, `512M`, `1.5G`, `4096` (binary units). The one size parser of every
//! `vireo` command and of the control socket's `disk-resize` (the CLI re-exports it).

/// Parses a byte count: a whole or decimal number (`64`, `1.5`) with an optional K/M/G/T/P
/// suffix (powers of 1024; "B" and "iB" may follow, any case). A decimal must come to a whole
/// number of bytes (`1.5G` does, `0.1K` does not). The error names the text and shows the form.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size {text:?}: use a number of bytes with an optional K, M, G or T suffix \
             (powers of 1024), e.g. 64G, 512M or 1.5G (a decimal must come to whole bytes)"
        )
    };
    let t = text.trim();
    let upper = t.to_ascii_uppercase();
    let trimmed = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (number, shift) = match trimmed.chars().last() {
        Some('K') => (&trimmed[..trimmed.len() - 1], 10),
        Some('M') => (&trimmed[..trimmed.len() - 1], 20),
        Some('G') => (&trimmed[..trimmed.len() - 1], 30),
        Some('T') => (&trimmed[..trimmed.len() - 1], 40),
        Some('P') => (&trimmed[..trimmed.len() - 1], 50),
        Some(c) if c.is_ascii_digit() => (trimmed, 0),
        _ => return Err(bad()),
    };
    let number = number.trim();
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    // Fractions ("1.5G") are exact only when they land on whole bytes. Only digits and one
    // point: f64's parser would also take "1e3", "inf" and "NaN".
    let plain = number.chars().all(|c| c.is_ascii_digit() || c == '.')
        && number.matches('.').count() == 1
        && number.chars().any(|c| c.is_ascii_digit());
    if !plain {
        return Err(bad());
    }
    let f: f64 = number.parse().map_err(|_| bad())?;
    let bytes = f * (1u64 << shift) as f64;
    if !f.is_finite() || f < 0.0 || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64G").unwrap(), 64 << 30);
        assert_eq!(parse_size("32M").unwrap(), 32 << 20);
        assert_eq!(parse_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5GiB").unwrap(), 1 << 29);
        assert_eq!(parse_size("2.25M").unwrap(), 9 << 18);
        assert_eq!(parse_size(" 64 G ").unwrap(), 64 << 30);
        assert_eq!(parse_size(".5K").unwrap(), 512);
        for bad in [
            "0.1K", "1.5", "1e3", "1e3K", "inf", "NaNG", "1.2.3G", ".G", "1,5G",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(parse_size("64Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
