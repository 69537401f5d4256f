//! Disk data of a shared-nothing migration (docs/migration.md, "Shared-nothing migration"):
//! the source worker sends what each disk holds, then what the guest wrote meanwhile, as
//! records on one TLS connection to the destination vireod, which writes them into the copies
//! it created.
//!
//! ```text
//! kind u8 | disk u8 | reserved u16 (0) | len u32 | offset u64 | crc32c(payload) u32 | payload
//! ```
//! Little-endian. `Data` carries `len` bytes for virtual offset `offset` of disk `disk`;
//! `Zero` says those bytes are zero now (no payload: the guest zeroed a chunk sent before);
//! `Done` ends the stream: the receiver flushes and closes every copy and answers `Done`
//! itself, so the sender knows the copies are durable before it lets the destination open
//! them. `Abort` carries a UTF-8 reason. The receiver checks a header against the disks it
//! expects (index, bounds, sizes) before it reads or writes anything of the payload.

use std::io::{Read, Write};

/// Header bytes.
pub const HEADER_LEN: usize = 20;
/// Largest `Data` payload: the copy unit, so a hostile header cannot make the receiver
/// allocate more.
pub const MAX_DATA: u32 = 1 << 20;
/// Largest `Abort` reason.
const MAX_REASON: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DiskStreamError {
    #[error("disk stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("disk stream: unknown record kind {0}")]
    Kind(u8),
    #[error("disk stream: disk {disk} is not one of the {count} disks offered")]
    Disk { disk: u8, count: usize },
    #[error("disk stream: {len} bytes at {offset} are outside disk {disk} ({size} bytes)")]
    Bounds {
        disk: u8,
        offset: u64,
        len: u32,
        size: u64,
    },
    #[error("disk stream: a record of {0} bytes is larger than allowed")]
    TooLarge(u32),
    #[error("disk stream: checksum mismatch at disk {disk} offset {offset}")]
    Crc { disk: u8, offset: u64 },
    #[error("disk stream: the sender gave up: {0}")]
    Aborted(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Data = 1,
    Zero = 2,
    Done = 3,
    Abort = 4,
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskRecord {
    Data {
        disk: u8,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: u8,
        offset: u64,
        len: u32,
    },
    Done,
}

fn header(kind: Kind, disk: u8, len: u32, offset: u64, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1] = disk;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// `data` for `offset` of `disk` (at most [`MAX_DATA`] bytes).
pub fn write_data(w: &mut impl Write, disk: u8, offset: u64, data: &[u8]) -> std::io::Result<()> {
    assert!(data.len() <= MAX_DATA as usize, "callers send chunks");
    let h = header(
        Kind::Data,
        disk,
        data.len() as u32,
        offset,
        crc32c::crc32c(data),
    );
    w.write_all(&h)?;
    w.write_all(data)
}

pub fn write_zero(w: &mut impl Write, disk: u8, offset: u64, len: u32) -> std::io::Result<()> {
    w.write_all(&header(Kind::Zero, disk, len, offset, 0))
}

pub fn write_done(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&header(Kind::Done, 0, 0, 0, 0))?;
    w.flush()
}

pub fn write_abort(w: &mut impl Write, reason: &str) -> std::io::Result<()> {
    let r = &reason.as_bytes()[..reason.len().min(MAX_REASON as usize)];
    w.write_all(&header(
        Kind::Abort,
        0,
        r.len() as u32,
        0,
        crc32c::crc32c(r),
    ))?;
    w.write_all(r)?;
    w.flush()
}

/// What a header announces, checked against the disks' sizes; `Ok(None)` for `Abort` (whose
/// reason the caller reads with [`read_reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub disk: u8,
    pub len: u32,
    pub offset: u64,
    pub crc: u32,
}

/// Decodes and checks a header: `sizes[i]` is disk `i`'s virtual size.
pub fn parse_header(h: &[u8; HEADER_LEN], sizes: &[u64]) -> Result<Header, DiskStreamError> {
    let kind = match h[0] {
        1 => Kind::Data,
        2 => Kind::Zero,
        3 => Kind::Done,
        4 => Kind::Abort,
        k => return Err(DiskStreamError::Kind(k)),
    };
    let disk = h[1];
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let offset = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
    let hd = Header {
        kind,
        disk,
        len,
        offset,
        crc,
    };
    match kind {
        Kind::Done => return Ok(hd),
        Kind::Abort => {
            if len > MAX_REASON {
                return Err(DiskStreamError::TooLarge(len));
            }
            return Ok(hd);
        }
        Kind::Data | Kind::Zero => {}
    }
    if kind == Kind::Data && len > MAX_DATA {
        return Err(DiskStreamError::TooLarge(len));
    }
    let size = *sizes.get(disk as usize).ok_or(DiskStreamError::Disk {
        disk,
        count: sizes.len(),
    })?;
    if offset.checked_add(len.into()).is_none_or(|end| end > size) {
        return Err(DiskStreamError::Bounds {
            disk,
            offset,
            len,
            size,
        });
    }
    Ok(hd)
}

/// Checks a payload read for `h` against its CRC.
pub fn check_payload(h: &Header, payload: &[u8]) -> Result<(), DiskStreamError> {
    if crc32c::crc32c(payload) != h.crc {
        return Err(DiskStreamError::Crc {
            disk: h.disk,
            offset: h.offset,
        });
    }
    Ok(())
}

/// Reads one record from a blocking reader (the receiver's loop in tests and tools; vireod
/// reads asynchronously with [`parse_header`] and [`check_payload`]).
pub fn read_record(r: &mut impl Read, sizes: &[u64]) -> Result<DiskRecord, DiskStreamError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    let h = parse_header(&h, sizes)?;
    match h.kind {
        Kind::Done => Ok(DiskRecord::Done),
        Kind::Zero => Ok(DiskRecord::Zero {
            disk: h.disk,
            offset: h.offset,
            len: h.len,
        }),
        Kind::Data => {
            let mut data = vec![0u8; h.len as usize];
            r.read_exact(&mut data)?;
            check_payload(&h, &data)?;
            Ok(DiskRecord::Data {
                disk: h.disk,
                offset: h.offset,
                data,
            })
        }
        Kind::Abort => {
            let mut reason = vec![0u8; h.len as usize];
            r.read_exact(&mut reason)?;
            Err(DiskStreamError::Aborted(
                String::from_utf8_lossy(&reason).into_owned(),
            ))
        }
    }
}

/// The reason of an `Abort` whose payload was read.
pub fn read_reason(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut w = Vec::new();
        write_data(&mut w, 1, 4096, &[7u8; 512]).unwrap();
        write_zero(&mut w, 0, 0, MAX_DATA).unwrap();
        write_done(&mut w).unwrap();
        let sizes = [MAX_DATA as u64, 8192];
        let mut r = &w[..];
        assert_eq!(
            read_record(&mut r, &sizes).unwrap(),
            DiskRecord::Data {
                disk: 1,
                offset: 4096,
                data: vec![7u8; 512]
            }
        );
        assert_eq!(
            read_record(&mut r, &sizes).unwrap(),
            DiskRecord::Zero {
                disk: 0,
                offset: 0,
                len: MAX_DATA
            }
        );
        assert_eq!(read_record(&mut r, &sizes).unwrap(), DiskRecord::Done);
        assert!(r.is_empty());
    }

    #[test]
    fn bad_headers_are_refused_before_the_payload_is_read() {
        let sizes = [8192u64];
        let mut w = Vec::new();
        write_data(&mut w, 1, 0, &[1u8; 16]).unwrap();
        assert!(matches!(
            read_record(&mut &w[..], &sizes),
            Err(DiskStreamError::Disk { disk: 1, count: 1 })
        ));
        w.clear();
        write_data(&mut w, 0, 8190, &[1u8; 16]).unwrap();
        assert!(matches!(
            read_record(&mut &w[..], &sizes),
            Err(DiskStreamError::Bounds { .. })
        ));
        w.clear();
        write_zero(&mut w, 0, u64::MAX - 1, 16).unwrap();
        assert!(matches!(
            read_record(&mut &w[..], &sizes),
            Err(DiskStreamError::Bounds { .. })
        ));
        let mut h = header(Kind::Data, 0, MAX_DATA + 1, 0, 0);
        assert!(matches!(
            parse_header(&h, &sizes),
            Err(DiskStreamError::TooLarge(_))
        ));
        h[0] = 9;
        assert!(matches!(
            parse_header(&h, &sizes),
            Err(DiskStreamError::Kind(9))
        ));
    }

    #[test]
    fn a_flipped_payload_bit_fails_the_crc_and_an_abort_carries_its_reason() {
        let sizes = [8192u64];
        let mut w = Vec::new();
        write_data(&mut w, 0, 0, &[3u8; 64]).unwrap();
        w[HEADER_LEN + 5] ^= 1;
        assert!(matches!(
            read_record(&mut &w[..], &sizes),
            Err(DiskStreamError::Crc { .. })
        ));
        w.clear();
        write_abort(&mut w, "cancelled").unwrap();
        match read_record(&mut &w[..], &sizes) {
            Err(DiskStreamError::Aborted(r)) => assert_eq!(r, "cancelled"),
            other => panic!("{other:?}"),
        }
        // A stream cut inside a payload is an error, never a short write.
        w.clear();
        write_data(&mut w, 0, 0, &[3u8; 64]).unwrap();
        w.truncate(HEADER_LEN + 10);
        assert!(matches!(
            read_record(&mut &w[..], &sizes),
            Err(DiskStreamError::Io(_))
        ));
    }
}
