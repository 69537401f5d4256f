//! Post-copy's messages (docs/migration.md, "Post-copy"). When a source switches to post-copy
//! it pauses, and on stream 0, before the device state, lists the pages the destination does
//! not have yet ([`Kind::Missing`], runs). After the disk handoff the destination runs the VM
//! and asks for pages it faults on over the **request channel**, one extra connection opened
//! at the start (preamble flag [`crate::preamble::FLAG_REQUESTS`]), so each direction of
//! each TLS connection has one owner thread on each side:
//!
//! ```text
//! every stream, source → destination   Pages* ... PostcopyDone  (version 5; stream 0 before)
//! request channel, destination → source PageRequest* (count u32, count × gpa u64)
//! Missing body                          count u32, count × (gpa u64, pages u64)
//! ```
//!
//! The source answers requests first on stream 0 and pushes every other missing page in address
//! order on all streams, each page once (one claim per page on the source); the destination
//! still places only the first copy of a page it gets and skips any other.

use std::io::{Read, Write};

use crate::pages;
use crate::record::{read_record, write_record, Kind};
use crate::{Codec, MigrationError, PAGE_SIZE};

/// Runs per `Missing` record (16 bytes each: well inside a record's limit).
pub const RUNS_PER_RECORD: usize = 1 << 16;
/// Pages per request: a faulting page and its window never come near this.
pub const MAX_REQUEST: usize = pages::MAX_PAGES;

/// Encodes `(gpa, pages)` runs into `Missing` records and writes them.
pub fn send_missing(w: &mut impl Write, runs: &[(u64, u64)]) -> Result<u64, MigrationError> {
    let mut wire = 0;
    for part in runs.chunks(RUNS_PER_RECORD) {
        let mut body = Vec::with_capacity(4 + part.len() * 16);
        body.extend_from_slice(&(part.len() as u32).to_le_bytes());
        for &(gpa, n) in part {
            body.extend_from_slice(&gpa.to_le_bytes());
            body.extend_from_slice(&n.to_le_bytes());
        }
        wire += write_record(w, Kind::Missing, Codec::None, &body)? as u64;
    }
    Ok(wire)
}

/// Decodes one `Missing` body, checking every run lies page-aligned inside `ram_end`.
pub fn decode_missing(body: &[u8], ram_end: u64) -> Result<Vec<(u64, u64)>, MigrationError> {
    let n = count(body, 16)?;
    let mut out = Vec::with_capacity(n);
    for e in body[4..].chunks_exact(16) {
        let gpa = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
        let pages = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
        let end = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|l| l.checked_add(gpa));
        match end {
            Some(end) if pages > 0 && gpa % PAGE_SIZE as u64 == 0 && end <= ram_end => {}
            _ => {
                return Err(MigrationError::PageOutOfRange {
                    gpa,
                    ram_size: ram_end,
                })
            }
        }
        out.push((gpa, pages));
    }
    Ok(out)
}

/// Asks for `gpas` (destination → source, on the request channel).
pub fn send_request(w: &mut impl Write, gpas: &[u64]) -> Result<(), MigrationError> {
    if gpas.len() > MAX_REQUEST {
        return Err(MigrationError::Malformed("page request too long"));
    }
    let mut body = Vec::with_capacity(4 + gpas.len() * 8);
    body.extend_from_slice(&(gpas.len() as u32).to_le_bytes());
    for g in gpas {
        body.extend_from_slice(&g.to_le_bytes());
    }
    write_record(w, Kind::PageRequest, Codec::None, &body)?;
    w.flush()?;
    Ok(())
}

/// The next request on the request channel; `None` when the destination closed it cleanly.
pub fn read_request(r: &mut impl Read, ram_end: u64) -> Result<Option<Vec<u64>>, MigrationError> {
    let Some(rec) = read_record(r)? else {
        return Ok(None);
    };
    if rec.kind != Kind::PageRequest {
        return Err(MigrationError::Malformed(
            "not a page request on the request channel",
        ));
    }
    let n = count(&rec.body, 8)?;
    if n > MAX_REQUEST {
        return Err(MigrationError::Malformed("page request too long"));
    }
    let mut out = Vec::with_capacity(n);
    for e in rec.body[4..].chunks_exact(8) {
        let gpa = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        if gpa % PAGE_SIZE as u64 != 0 || gpa >= ram_end {
            return Err(MigrationError::PageOutOfRange {
                gpa,
                ram_size: ram_end,
            });
        }
        out.push(gpa);
    }
    Ok(Some(out))
}

/// Sends one batch of pages (at most [`pages::MAX_PAGES`]); returns the bytes on the wire.
pub fn send_pages<'a>(
    w: &mut impl Write,
    codec: Codec,
    batch: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Result<u64, MigrationError> {
    let body = pages::encode(batch)?;
    Ok(write_record(w, Kind::Pages, codec, &body)? as u64)
}

/// Ends post-copy on a stream: nothing more of it comes there.
pub fn send_done(w: &mut impl Write) -> Result<(), MigrationError> {
    write_record(w, Kind::PostcopyDone, Codec::None, &[])?;
    w.flush()?;
    Ok(())
}

/// What came on a stream during post-copy.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrived {
    /// A page batch body; decode it with [`pages::decode`] (checked there).
    Pages(Vec<u8>),
    Done,
}

/// Reads the next post-copy record from a stream: its end before `PostcopyDone` is an error.
pub fn read_arrival(r: &mut impl Read) -> Result<(Arrived, u64), MigrationError> {
    let rec = read_record(r)?.ok_or(MigrationError::Truncated)?;
    let wire = rec.wire_len as u64;
    match rec.kind {
        Kind::Pages => Ok((Arrived::Pages(rec.body), wire)),
        Kind::PostcopyDone => Ok((Arrived::Done, wire)),
        Kind::Abort => Err(MigrationError::Aborted(
            String::from_utf8_lossy(&rec.body).into_owned(),
        )),
        _ => Err(MigrationError::Malformed(
            "unexpected record during post-copy",
        )),
    }
}

/// The entry count of a body of `count u32` and that many entries of `size` bytes.
fn count(body: &[u8], size: usize) -> Result<usize, MigrationError> {
    let c = body
        .get(..4)
        .ok_or(MigrationError::Malformed("body shorter than its count"))?;
    let n = u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize;
    if body.len() != 4 + n * size {
        return Err(MigrationError::Malformed(
            "body length does not match its count",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_runs_requests_and_pages_round_trip() {
        let runs = vec![(0x1000, 3), (0x10_0000, 256)];
        let mut wire = Vec::new();
        send_missing(&mut wire, &runs).unwrap();
        let rec = read_record(&mut wire.as_slice()).unwrap().unwrap();
        assert_eq!(rec.kind, Kind::Missing);
        assert_eq!(decode_missing(&rec.body, 2 << 20).unwrap(), runs);
        // A run past the end of RAM, an unaligned one and an empty one are refused.
        assert!(decode_missing(&rec.body, 0x10_0000).is_err());
        for bad in [(0x1001, 1), (0, 0), (!0xfff, u64::MAX)] {
            let mut w = Vec::new();
            send_missing(&mut w, &[bad]).unwrap();
            let rec = read_record(&mut w.as_slice()).unwrap().unwrap();
            assert!(decode_missing(&rec.body, 1 << 30).is_err(), "{bad:?}");
        }

        let mut req = Vec::new();
        send_request(&mut req, &[0x2000, 0x3000]).unwrap();
        let mut r = req.as_slice();
        assert_eq!(
            read_request(&mut r, 1 << 20).unwrap(),
            Some(vec![0x2000, 0x3000])
        );
        assert_eq!(read_request(&mut r, 1 << 20).unwrap(), None, "clean end");
        assert!(
            read_request(&mut req.as_slice(), 0x3000).is_err(),
            "outside RAM"
        );
        assert!(send_request(&mut Vec::new(), &vec![0; MAX_REQUEST + 1]).is_err());

        let page = vec![7u8; PAGE_SIZE];
        let zero = vec![0u8; PAGE_SIZE];
        let mut s = Vec::new();
        send_pages(
            &mut s,
            Codec::Lz4,
            [(0x1000, &page[..]), (0x2000, &zero[..])],
        )
        .unwrap();
        send_done(&mut s).unwrap();
        let mut r = s.as_slice();
        let (Arrived::Pages(body), _) = read_arrival(&mut r).unwrap() else {
            panic!("pages first")
        };
        let got = pages::decode(&body, 1 << 20).unwrap();
        assert_eq!(got[0], (0x1000, Some(&page[..])));
        assert_eq!(got[1], (0x2000, None));
        assert_eq!(read_arrival(&mut r).unwrap().0, Arrived::Done);
        assert!(matches!(
            read_arrival(&mut r),
            Err(MigrationError::Truncated)
        ));
    }
}
