use std::fmt;

/// A GUID in its on-disk (Microsoft mixed-endian) byte order.
///
/// Kept as raw bytes so that parsing and re-serialising a file never reorders anything; only
/// `Display`/`parse` deal with the textual form `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    /// Builds a GUID from its textual fields (as written in the spec).
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A fresh random (version 4) GUID.
    pub fn random() -> Guid {
        Guid(*uuid::Uuid::new_v4().as_bytes())
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    pub fn from_slice(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }

    /// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case).
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim().trim_start_matches('{').trim_end_matches('}');
        let parts: Vec<&str> = s.split('-').collect();
        if parts.len() != 5
            || [8, 4, 4, 4, 12]
                != [
                    parts[0].len(),
                    parts[1].len(),
                    parts[2].len(),
                    parts[3].len(),
                    parts[4].len(),
                ]
        {
            return None;
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let tail = format!("{}{}", parts[3], parts[4]);
        let mut d4 = [0u8; 8];
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(tail.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_roundtrip_and_byte_order() {
        let g = Guid::from_fields(
            0x2dc27766,
            0xf623,
            0x4200,
            [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
        );
        assert_eq!(g.0[..4], [0x66, 0x77, 0xc2, 0x2d]);
        let s = g.to_string();
        assert_eq!(s, "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(Guid::parse(&s), Some(g));
        assert_eq!(Guid::parse("nonsense"), None);
    }
}
