//! Human sizes on the command line: `64G`, `512M`, `1.5G`, `4096` (binary units).
//!
//! [`parse_size`] is the one parser for every size option of every `vireo` command (disk sizes,
//! block sizes, `vireo run --memory`): one spelling everywhere, one error message. It lives in
//! vireo-worker because the control socket's `disk-resize` reads sizes too.

pub use vireo_worker::size::parse_size;

/// 34359738368 → "32 GiB"; exact values print without decimals.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human(32 << 30), "32 GiB");
        assert_eq!(human(1536), "1.50 KiB");
    }
}
