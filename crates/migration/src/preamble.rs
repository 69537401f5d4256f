//! The first 36 bytes of every migration stream. The version comes right after the magic so
//! a host can refuse a peer it does not understand before reading anything else (an old or a
//! newer vireod on the other side is a clear error, never a misread VM).
//!
//! Version 2 (post-copy): the last four bytes are flags; [`FLAG_REQUESTS`] marks the one extra
//! connection a source opens when it may switch to post-copy, on which the destination asks
//! for pages (`crate::postcopy`). A version-1 reader refuses such a preamble (non-zero bytes).
//!
//! Version 3: the destination answers every `RoundEnd` record with the 8 bytes `DRAINED\n`
//! on the same stream once everything before it is applied, and a source waits for that at
//! the end of each pre-copy pass. The stream format is unchanged; the version tells a
//! version-2 destination (which would never answer) to refuse the source at once.
//!
//! Version 4: on a TLS stream, page records carry no CRC (record header flag
//! `record::FLAG_NO_CRC`; the cipher's tag covers them). A version-3 destination would refuse
//! the flag only at the first page; the version makes it refuse the source at the preamble,
//! naming both versions.
//!
//! Version 5: post-copy's pages travel on every stream, not on stream 0 alone: after `Done`
//! the other streams stay open and each carries pages until its own `PostcopyDone`. A
//! version-4 destination closes them at `Done` (the source's first page on one would then
//! fail after the switch-over and lose the VM), so it must refuse the source at the preamble;
//! a version-5 destination reads a version-4 source's pages from stream 0 only
//! ([`POSTCOPY_ON_EVERY_STREAM`]).

use std::io::{Read, Write};

use uuid::Uuid;

use crate::record::read_exact_or_eof;
use crate::MigrationError;

pub const MAGIC: [u8; 8] = *b"VIREOMIG";
/// The format this build writes. Bump it when a reader of the current version would misread
/// a stream; keep reading older ones as long as they can be converted.
pub const VERSION: u32 = 5;
pub const OLDEST_VERSION: u32 = 1;
/// The first version whose sources send post-copy's pages on every stream (older ones on
/// stream 0 only, closing the others at `Done`).
pub const POSTCOPY_ON_EVERY_STREAM: u32 = 5;
pub const PREAMBLE_LEN: usize = 36;
/// More streams than this gains nothing on the links Vireo targets and costs a TLS session
/// each.
pub const MAX_STREAMS: u16 = 16;
/// Preamble flag: this connection is a post-copy request channel, not a page stream (its
/// `stream` is 0 and `streams` the count of page streams).
pub const FLAG_REQUESTS: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub version: u32,
    /// One migration: every stream of it carries the same id.
    pub session: Uuid,
    pub stream: u16,
    pub streams: u16,
    /// [`FLAG_REQUESTS`] or 0 (version 2 on).
    pub flags: u32,
}

impl Preamble {
    pub fn new(session: Uuid, stream: u16, streams: u16) -> Preamble {
        Preamble {
            version: VERSION,
            session,
            stream,
            streams,
            flags: 0,
        }
    }

    /// The preamble of a post-copy request channel beside `streams` page streams.
    pub fn requests(session: Uuid, streams: u16) -> Preamble {
        Preamble {
            flags: FLAG_REQUESTS,
            ..Preamble::new(session, 0, streams)
        }
    }

    pub fn is_request_channel(&self) -> bool {
        self.flags & FLAG_REQUESTS != 0
    }

    pub fn write(&self, w: &mut impl Write) -> Result<(), MigrationError> {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..28].copy_from_slice(self.session.as_bytes());
        b[28..30].copy_from_slice(&self.stream.to_le_bytes());
        b[30..32].copy_from_slice(&self.streams.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        w.write_all(&b)?;
        Ok(())
    }

    pub fn read(r: &mut impl Read) -> Result<Preamble, MigrationError> {
        let mut b = [0u8; PREAMBLE_LEN];
        if !read_exact_or_eof(r, &mut b)? {
            return Err(MigrationError::Truncated);
        }
        let magic: [u8; 8] = b[..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(MigrationError::BadMagic(magic));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(MigrationError::Version {
                found: version,
                oldest: OLDEST_VERSION,
                newest: VERSION,
            });
        }
        let session = Uuid::from_bytes(b[12..28].try_into().expect("16 bytes"));
        let stream = u16::from_le_bytes(b[28..30].try_into().expect("2 bytes"));
        let streams = u16::from_le_bytes(b[30..32].try_into().expect("2 bytes"));
        if streams == 0 || streams > MAX_STREAMS || stream >= streams {
            return Err(MigrationError::Malformed(
                "stream index or count out of range",
            ));
        }
        let flags = u32::from_le_bytes(b[32..36].try_into().expect("4 bytes"));
        // Version 1 had no flags; unknown flags are refused rather than ignored.
        if (version < 2 && flags != 0) || flags & !FLAG_REQUESTS != 0 {
            return Err(MigrationError::Malformed(
                "reserved preamble bytes are not zero",
            ));
        }
        Ok(Preamble {
            version,
            session,
            stream,
            streams,
            flags,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let p = Preamble::new(Uuid::new_v4(), 1, 2);
        let mut b = Vec::new();
        p.write(&mut b).unwrap();
        assert_eq!(b.len(), PREAMBLE_LEN);
        assert_eq!(Preamble::read(&mut b.as_slice()).unwrap(), p);

        let mut newer = b.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let e = Preamble::read(&mut newer.as_slice()).unwrap_err();
        assert!(e.to_string().contains("upgrade"), "{e}");
        // What a version-4 host answers this build's streams: one line, both versions.
        let old = MigrationError::Version {
            found: VERSION,
            oldest: OLDEST_VERSION,
            newest: 4,
        }
        .to_string();
        assert!(
            old.contains("version 5 ") && old.contains("1..=4") && !old.contains('\n'),
            "{old}"
        );
        // A version-4 source's preamble is still read (its post-copy uses stream 0 only).
        let mut v4 = b.clone();
        v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        let p4 = Preamble::read(&mut v4.as_slice()).unwrap();
        assert!(p4.version < POSTCOPY_ON_EVERY_STREAM && VERSION >= POSTCOPY_ON_EVERY_STREAM);

        let mut other = b.clone();
        other[0] = b'X';
        assert!(matches!(
            Preamble::read(&mut other.as_slice()),
            Err(MigrationError::BadMagic(_))
        ));
        let mut idx = b.clone();
        idx[28..30].copy_from_slice(&2u16.to_le_bytes());
        assert!(Preamble::read(&mut idx.as_slice()).is_err());
        assert!(Preamble::read(&mut &b[..10]).is_err());

        let r = Preamble::requests(p.session, 2);
        let mut rb = Vec::new();
        r.write(&mut rb).unwrap();
        let back = Preamble::read(&mut rb.as_slice()).unwrap();
        assert!(back.is_request_channel() && !p.is_request_channel());
        let mut unknown = rb.clone();
        unknown[32] = 2;
        assert!(Preamble::read(&mut unknown.as_slice()).is_err());
        let mut v1 = rb.clone();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(
            Preamble::read(&mut v1.as_slice()).is_err(),
            "v1 had no flags"
        );
    }
}
