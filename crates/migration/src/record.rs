//! Framing: every record is a 16-byte header and a payload.
//!
//! ```text
//! kind u8 | codec u8 | flags u16 | payload_len u32 | body_len u32 | crc32c u32
//! payload (payload_len bytes, body_len once decompressed)
//! ```
//! All integers little-endian. The CRC covers the payload as sent, so corruption is caught
//! before anything is decompressed; it catches our own bugs (a stream mixed up, a buffer
//! reused too early) where nothing else would, i.e. on a plain stream.
//!
//! On a TLS stream AES-GCM's tag already authenticates every byte, and the CRC over each page
//! record was ~14 % of the source's CPU and ~3 % of the destination's (docs/migration.md).
//! So from stream version 4 a sender on an [`Transport::Authenticated`] stream marks its page
//! records [`FLAG_NO_CRC`] (CRC field zero, not computed) and a receiver accepts that flag
//! only when its own side of the stream is authenticated too: a plain stream can never be
//! talked out of its checksums by what arrives on it.

use std::io::{Read, Write};

use crate::{Codec, MigrationError};

pub const HEADER_LEN: usize = 16;
/// Header flag: the payload carries no CRC (the field is zero); only on an authenticated
/// stream, only from stream version 4.
pub const FLAG_NO_CRC: u16 = 1;

/// What protects a stream's bytes besides our own checks. Each end states its own; neither
/// learns it from the other side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// No cipher: a test's socket pair, loopback TCP. Every record carries its CRC.
    #[default]
    Plain,
    /// Mutual TLS (AEAD): page records go without a CRC.
    Authenticated,
}
/// Largest body a record may carry once decompressed: a page batch of 2048 pages plus its
/// address list, or a device state; a hostile header cannot make the receiver allocate more.
pub const MAX_BODY: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A batch of guest pages ([`crate::pages`]).
    Pages = 1,
    /// The VM's complete device and vCPU state (the `vm.state` encoding), sent once, paused.
    DeviceState = 2,
    /// End of a pre-copy round: `round u32, pages_sent u64, dirty_remaining u64`.
    RoundEnd = 3,
    /// Nothing follows on this stream.
    Done = 4,
    /// The sender gave up; the body is a UTF-8 reason.
    Abort = 5,
    /// Post-copy: pages the destination does not have yet, as runs ([`crate::postcopy`]).
    Missing = 6,
    /// Post-copy, destination to source on the request channel: pages wanted now.
    PageRequest = 7,
    /// Post-copy: every missing page has been sent on this stream.
    PostcopyDone = 8,
}

impl Kind {
    pub fn from_u8(v: u8) -> Result<Kind, MigrationError> {
        Ok(match v {
            1 => Kind::Pages,
            2 => Kind::DeviceState,
            3 => Kind::RoundEnd,
            4 => Kind::Done,
            5 => Kind::Abort,
            6 => Kind::Missing,
            7 => Kind::PageRequest,
            8 => Kind::PostcopyDone,
            other => return Err(MigrationError::UnknownKind(other)),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    /// The decompressed body.
    pub body: Vec<u8>,
    /// Bytes this record took on the wire (header included): what the link carried.
    pub wire_len: usize,
}

/// Encodes one record, compressed with `codec` unless that does not make it smaller (then it
/// goes raw, codec 0): the bytes to put on the wire.
pub fn encode_record(kind: Kind, codec: Codec, body: &[u8]) -> Result<Vec<u8>, MigrationError> {
    if body.len() > MAX_BODY {
        return Err(MigrationError::TooLarge {
            len: body.len() as u64,
            max: MAX_BODY as u64,
        });
    }
    let compressed = (codec != Codec::None).then(|| codec.compress(body));
    let (codec, payload) = match &compressed {
        Some(z) if z.len() < body.len() => (codec, z.as_slice()),
        _ => (Codec::None, body),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(kind, codec, payload, body.len()));
    out.extend_from_slice(payload);
    Ok(out)
}

/// The 16 header bytes of a record carrying `payload` (`body_len` once decompressed), with
/// its CRC.
pub fn header(kind: Kind, codec: Codec, payload: &[u8], body_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1] = codec as u8;
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[12..16].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h
}

/// The header of a record whose payload carries no CRC ([`FLAG_NO_CRC`]): for an
/// authenticated stream only, where the cipher's tag covers the payload.
pub fn header_unchecked(
    kind: Kind,
    codec: Codec,
    payload_len: usize,
    body_len: usize,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1] = codec as u8;
    h[2..4].copy_from_slice(&FLAG_NO_CRC.to_le_bytes());
    h[4..8].copy_from_slice(&(payload_len as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(body_len as u32).to_le_bytes());
    h
}

/// [`encode_record`] and write it; returns the bytes written.
pub fn write_record(
    w: &mut impl Write,
    kind: Kind,
    codec: Codec,
    body: &[u8],
) -> Result<usize, MigrationError> {
    let bytes = encode_record(kind, codec, body)?;
    w.write_all(&bytes)?;
    Ok(bytes.len())
}

/// Reads one record; `Ok(None)` at a clean end of stream (between records).
pub fn read_record(r: &mut impl Read) -> Result<Option<Record>, MigrationError> {
    let mut rb = RecordBuf::default();
    Ok(
        read_record_into(r, &mut rb)?.map(|(kind, wire_len)| Record {
            kind,
            body: rb.body().to_vec(),
            wire_len,
        }),
    )
}

/// A receiver's buffers, kept from record to record: a stream allocates them once (they grow
/// to the largest record seen, at most [`MAX_BODY`] each), never per batch.
#[derive(Default)]
pub struct RecordBuf {
    payload: Vec<u8>,
    body: Vec<u8>,
    /// The last record's body is `payload[..len]` (raw) or `body` (decompressed).
    raw: bool,
    len: usize,
    coder: crate::codec::Coder,
    /// Whether this end's transport authenticates the bytes ([`Transport`]): only then is a
    /// record without a CRC accepted.
    transport: Transport,
}

impl RecordBuf {
    /// Buffers for a stream whose own end is `transport`.
    pub fn new(transport: Transport) -> RecordBuf {
        RecordBuf {
            transport,
            ..RecordBuf::default()
        }
    }

    pub(crate) fn transport(&self) -> Transport {
        self.transport
    }

    /// The first `len` bytes of the payload buffer (grown if needed), for a caller that reads
    /// only part of a record into it.
    pub(crate) fn scratch(&mut self, len: usize) -> &mut [u8] {
        if self.payload.len() < len {
            self.payload.resize(len, 0);
        }
        &mut self.payload[..len]
    }

    /// The last record's body, decompressed.
    pub fn body(&self) -> &[u8] {
        if self.raw {
            &self.payload[..self.len]
        } else {
            &self.body
        }
    }
}

/// A record's header, checked: known kind, codec and flags, lengths within [`MAX_BODY`], a
/// missing CRC only on an authenticated stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub codec: Codec,
    /// Whether the payload carries a CRC (false: [`FLAG_NO_CRC`], accepted only because this
    /// end's transport is authenticated).
    pub checked: bool,
    pub payload_len: usize,
    pub body_len: usize,
    pub stored_crc: u32,
}

/// Reads and checks the next header; `None` at a clean end of stream.
pub(crate) fn read_header(
    r: &mut impl Read,
    transport: Transport,
) -> Result<Option<Header>, MigrationError> {
    let mut header = [0u8; HEADER_LEN];
    if !read_exact_or_eof(r, &mut header)? {
        return Ok(None);
    }
    let kind = Kind::from_u8(header[0])?;
    let codec = Codec::from_u8(header[1])?;
    let flags = u16::from_le_bytes([header[2], header[3]]);
    if flags & !FLAG_NO_CRC != 0 {
        return Err(MigrationError::Malformed("unknown record header flags"));
    }
    let checked = flags & FLAG_NO_CRC == 0;
    if !checked && transport != Transport::Authenticated {
        return Err(MigrationError::Malformed(
            "a record without a CRC on a stream TLS does not protect",
        ));
    }
    let payload_len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    let body_len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    let stored_crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    for len in [payload_len, body_len] {
        if len > MAX_BODY {
            return Err(MigrationError::TooLarge {
                len: len as u64,
                max: MAX_BODY as u64,
            });
        }
    }
    if codec == Codec::None && payload_len != body_len {
        return Err(MigrationError::Malformed(
            "raw record with two different lengths",
        ));
    }
    if !checked && stored_crc != 0 {
        return Err(MigrationError::Malformed(
            "a record without a CRC has a non-zero CRC field",
        ));
    }
    Ok(Some(Header {
        kind,
        codec,
        checked,
        payload_len,
        body_len,
        stored_crc,
    }))
}

/// [`read_record`] into reusable buffers: the kind and the bytes the record took on the
/// wire; the body is then `rb.body()`.
pub fn read_record_into(
    r: &mut impl Read,
    rb: &mut RecordBuf,
) -> Result<Option<(Kind, usize)>, MigrationError> {
    let Some(h) = read_header(r, rb.transport)? else {
        return Ok(None);
    };
    read_payload_into(r, rb, &h)?;
    Ok(Some((h.kind, HEADER_LEN + h.payload_len)))
}

/// Reads the payload `h` announced into `rb`, checks its CRC (if it has one) and decompresses
/// it: the body is then `rb.body()`.
pub(crate) fn read_payload_into(
    r: &mut impl Read,
    rb: &mut RecordBuf,
    h: &Header,
) -> Result<(), MigrationError> {
    // Grown, never shrunk: resizing down and up again would zero the bytes each time.
    if rb.payload.len() < h.payload_len {
        rb.payload.resize(h.payload_len, 0);
    }
    let payload = &mut rb.payload[..h.payload_len];
    read_exact_or_truncated(r, payload)?;
    if h.checked {
        let computed = crc32c::crc32c(payload);
        if computed != h.stored_crc {
            return Err(MigrationError::Checksum {
                stored: h.stored_crc,
                computed,
            });
        }
    }
    rb.raw = h.codec == Codec::None;
    rb.len = h.payload_len;
    if !rb.raw {
        rb.coder
            .decompress_into(h.codec, payload, h.body_len, &mut rb.body)?;
    }
    Ok(())
}

/// `read_exact`, a stream that ends part-way being [`MigrationError::Truncated`].
pub(crate) fn read_exact_or_truncated(
    r: &mut impl Read,
    buf: &mut [u8],
) -> Result<(), MigrationError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => MigrationError::Truncated,
        _ => MigrationError::Io(e),
    })
}

/// Fills `buf`, or reports a clean end of stream when not a single byte came; a stream that
/// ends part-way is [`MigrationError::Truncated`].
pub(crate) fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, MigrationError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(MigrationError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_incompressible_bodies_go_raw() {
        let mut wire = Vec::new();
        let text = vec![7u8; 10_000];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        write_record(&mut wire, Kind::DeviceState, Codec::Lz4, &text).unwrap();
        let at = wire.len();
        let n = write_record(&mut wire, Kind::Abort, Codec::Zstd, &noise).unwrap();
        assert_eq!(n, HEADER_LEN + noise.len());
        assert_eq!(wire[at + 1], Codec::None as u8, "noise went raw");
        write_record(&mut wire, Kind::Done, Codec::None, &[]).unwrap();
        let mut r = wire.as_slice();
        let a = read_record(&mut r).unwrap().unwrap();
        assert_eq!(
            (a.kind, a.body.as_slice()),
            (Kind::DeviceState, text.as_slice())
        );
        assert!(
            a.wire_len < 200,
            "10 000 equal bytes compress: {}",
            a.wire_len
        );
        assert_eq!(read_record(&mut r).unwrap().unwrap().body, noise);
        assert_eq!(read_record(&mut r).unwrap().unwrap().kind, Kind::Done);
        assert!(read_record(&mut r).unwrap().is_none());
    }

    /// A page record as an authenticated sender frames it: flag set, CRC field zero.
    fn unchecked(body: &[u8]) -> Vec<u8> {
        let mut wire = header_unchecked(Kind::Pages, Codec::None, body.len(), body.len()).to_vec();
        wire.extend_from_slice(body);
        wire
    }

    fn read_as(wire: &[u8], transport: Transport) -> Result<Vec<u8>, MigrationError> {
        let mut rb = RecordBuf::new(transport);
        read_record_into(&mut &wire[..], &mut rb)?.ok_or(MigrationError::Truncated)?;
        Ok(rb.body().to_vec())
    }

    #[test]
    fn a_record_without_a_crc_is_read_only_on_an_authenticated_stream() {
        let wire = unchecked(b"pages");
        assert_eq!(read_as(&wire, Transport::Authenticated).unwrap(), b"pages");
        let plain = read_as(&wire, Transport::Plain).unwrap_err();
        assert!(plain.to_string().contains("without a CRC"), "{plain}");
        assert!(
            read_record(&mut wire.as_slice()).is_err(),
            "read_record is plain"
        );

        let mut stray_crc = wire.clone();
        stray_crc[12] = 1;
        assert!(read_as(&stray_crc, Transport::Authenticated).is_err());
        let mut unknown = wire.clone();
        unknown[2] |= 2;
        assert!(read_as(&unknown, Transport::Authenticated).is_err());

        // A checked record still has its CRC verified on an authenticated stream.
        let mut checked = Vec::new();
        write_record(&mut checked, Kind::Pages, Codec::None, b"pages").unwrap();
        *checked.last_mut().unwrap() ^= 1;
        assert!(matches!(
            read_as(&checked, Transport::Authenticated),
            Err(MigrationError::Checksum { .. })
        ));
    }

    #[test]
    fn a_flipped_bit_a_cut_and_a_huge_length_are_errors() {
        let mut wire = Vec::new();
        write_record(&mut wire, Kind::DeviceState, Codec::None, b"state").unwrap();
        let mut bad = wire.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            read_record(&mut bad.as_slice()),
            Err(MigrationError::Checksum { .. })
        ));
        assert!(matches!(
            read_record(&mut &wire[..wire.len() - 1]),
            Err(MigrationError::Truncated)
        ));
        assert!(matches!(
            read_record(&mut &wire[..5]),
            Err(MigrationError::Truncated)
        ));
        let mut huge = wire.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_record(&mut huge.as_slice()),
            Err(MigrationError::TooLarge { .. })
        ));
    }
}
