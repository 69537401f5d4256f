//! File type identifier and the two 4 KiB headers (MS-VHDX §2.2).

use super::*;

pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const HEADER_SIGNATURE: &[u8; 4] = b"head";
pub const HEADER_SIZE: usize = 4096;

/// Builds the 64 KiB-slot file identifier (only the first 520 bytes are meaningful).
pub fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    let c = utf16le(creator);
    let n = c.len().min(510);
    b[8..8 + n].copy_from_slice(&c[..n]);
    b
}

/// Returns the creator string of a file identifier, or an error for a wrong signature.
pub fn parse_file_identifier(b: &[u8]) -> Result<String, crate::VhdxError> {
    if b.len() < 520 {
        return Err(crate::VhdxError::Truncated {
            what: "the file identifier",
            len: b.len() as u64,
            needed: 520,
        });
    }
    let mut sig = [0u8; 8];
    sig.copy_from_slice(&b[..8]);
    if &sig != FILE_SIGNATURE {
        return Err(crate::VhdxError::BadFileSignature { found: sig });
    }
    let raw = &b[8..520];
    let end = raw
        .chunks_exact(2)
        .position(|c| c == [0, 0])
        .map_or(raw.len(), |p| p * 2);
    Ok(from_utf16le(&raw[..end]).unwrap_or_default())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub sequence_number: u64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(HEADER_SIGNATURE);
        put64(&mut b, 8, self.sequence_number);
        b[16..32].copy_from_slice(&self.file_write_guid.0);
        b[32..48].copy_from_slice(&self.data_write_guid.0);
        b[48..64].copy_from_slice(&self.log_guid.0);
        put16(&mut b, 64, self.log_version);
        put16(&mut b, 66, self.version);
        put32(&mut b, 68, self.log_length);
        put64(&mut b, 72, self.log_offset);
        let c = checksum(&b, 4);
        put32(&mut b, 4, c);
        b
    }

    /// Parses one header slot; the error string says why it is unusable.
    pub fn parse(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_SIZE {
            return Err("short".into());
        }
        let b = &b[..HEADER_SIZE];
        if &b[..4] != HEADER_SIGNATURE {
            return Err(format!("bad signature {:02x?}", &b[..4]));
        }
        if !checksum_ok(b, 4) {
            return Err(format!(
                "checksum mismatch (stored {:#x}, computed {:#x})",
                le32(b, 4),
                checksum(b, 4)
            ));
        }
        Ok(Header {
            sequence_number: le64(b, 8),
            file_write_guid: Guid::from_slice(&b[16..]),
            data_write_guid: Guid::from_slice(&b[32..]),
            log_guid: Guid::from_slice(&b[48..]),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        })
    }
}

/// Picks the current header from the two slots: the valid one with the higher sequence number.
/// Returns (slot index, header).
pub fn choose_current(
    h1: Result<Header, String>,
    h2: Result<Header, String>,
) -> Result<(usize, Header), crate::VhdxError> {
    match (h1, h2) {
        (Ok(a), Ok(b)) => Ok(if b.sequence_number > a.sequence_number {
            (1, b)
        } else {
            (0, a)
        }),
        (Ok(a), Err(_)) => Ok((0, a)),
        (Err(_), Ok(b)) => Ok((1, b)),
        (Err(h1), Err(h2)) => Err(crate::VhdxError::NoValidHeader { h1, h2 }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_corruption() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] ^= 1;
        assert!(Header::parse(&b).unwrap_err().contains("checksum"));
        let newer = Header {
            sequence_number: 8,
            ..h.clone()
        };
        let (slot, cur) = choose_current(Ok(h.clone()), Ok(newer.clone())).unwrap();
        assert_eq!((slot, cur), (1, newer));
        assert!(choose_current(Err("x".into()), Err("y".into())).is_err());
    }

    #[test]
    fn file_identifier_roundtrip() {
        let b = file_identifier("vireo");
        assert_eq!(parse_file_identifier(&b).unwrap(), "vireo");
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(parse_file_identifier(&bad).is_err());
        assert!(parse_file_identifier(&b[..100]).is_err());
    }
}
