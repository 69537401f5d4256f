//! Parent locator (MS-VHDX §2.6.2.6): UTF-16 key/value pairs naming a differencing disk's parent.

use super::*;
use crate::VhdxError;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParentLocator {
    pub locator_type: Guid,
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn parse(b: &[u8]) -> Result<ParentLocator, VhdxError> {
        let bad = |s: String| VhdxError::BadParentLocator(s);
        if b.len() < 20 {
            return Err(bad(format!(
                "item is {} bytes, shorter than its 20-byte header",
                b.len()
            )));
        }
        let locator_type = Guid::from_slice(b);
        if locator_type != VHDX_PARENT_LOCATOR_TYPE {
            return Err(bad(format!("unknown locator type {locator_type}")));
        }
        let count = le16(b, 18) as usize;
        if 20 + count * 12 > b.len() {
            return Err(bad(format!(
                "{count} entries do not fit in {} bytes",
                b.len()
            )));
        }
        let mut entries = Vec::with_capacity(count);
        for i in 0..count {
            let o = 20 + i * 12;
            let field = |off: u32, len: u16, what: &str| -> Result<String, VhdxError> {
                let (off, len) = (off as usize, len as usize);
                let s = b.get(off..off + len).ok_or_else(|| {
                    bad(format!(
                        "{what} of entry {i} at {off}+{len} is outside the item"
                    ))
                })?;
                if len == 0 {
                    return Err(bad(format!("{what} of entry {i} is empty")));
                }
                from_utf16le(s).ok_or_else(|| bad(format!("{what} of entry {i} is not UTF-16")))
            };
            let k = field(le32(b, o), le16(b, o + 8), "key")?;
            let v = field(le32(b, o + 4), le16(b, o + 10), "value")?;
            if entries.iter().any(|(x, _): &(String, String)| *x == k) {
                return Err(bad(format!("key {k} appears twice")));
            }
            entries.push((k, v));
        }
        if !entries.iter().any(|(k, _)| k == "parent_linkage") {
            return Err(bad("parent_linkage is missing".into()));
        }
        Ok(ParentLocator {
            locator_type,
            entries,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 20 + self.entries.len() * 12];
        b[..16].copy_from_slice(&self.locator_type.0);
        put16(&mut b, 18, self.entries.len() as u16);
        for (i, (k, v)) in self.entries.iter().enumerate() {
            let (k, v) = (utf16le(k), utf16le(v));
            let o = 20 + i * 12;
            let ko = b.len();
            b.extend_from_slice(&k);
            let vo = b.len();
            b.extend_from_slice(&v);
            put32(&mut b, o, ko as u32);
            put32(&mut b, o + 4, vo as u32);
            put16(&mut b, o + 8, k.len() as u16);
            put16(&mut b, o + 10, v.len() as u16);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bounds() {
        let l = ParentLocator {
            locator_type: VHDX_PARENT_LOCATOR_TYPE,
            entries: vec![
                ("parent_linkage".into(), Guid::random().to_string()),
                ("relative_path".into(), ".\\base.vhdx".into()),
            ],
        };
        let b = l.to_bytes();
        assert_eq!(ParentLocator::parse(&b).unwrap(), l);
        let mut bad = b.clone();
        put32(&mut bad, 20, 60_000);
        assert!(ParentLocator::parse(&bad).is_err());
        assert!(ParentLocator::parse(&b[..10]).is_err());
    }
}
