//! The first 36 bytes of every migration stream. The version comes right after the magic so
//! a host can refuse a peer it does not understand before reading anything else (an old or a
//! newer vireod on the other side is a clear error, never a misread VM).

use std::io::{Read, Write};

use uuid::Uuid;

use crate::record::read_exact_or_eof;
use crate::MigrationError;

pub const MAGIC: [u8; 8] = *b"VIREOMIG";
/// The format this build writes. Bump it when a reader of the current version would misread
/// a stream; keep reading older ones as long as they can be converted.
pub const VERSION: u32 = 1;
pub const OLDEST_VERSION: u32 = 1;
pub const PREAMBLE_LEN: usize = 36;
/// More streams than this gains nothing on the links Vireo targets and costs a TLS session
/// each.
pub const MAX_STREAMS: u16 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub version: u32,
    /// One migration: every stream of it carries the same id.
    pub session: Uuid,
    pub stream: u16,
    pub streams: u16,
}

impl Preamble {
    pub fn new(session: Uuid, stream: u16, streams: u16) -> Preamble {
        Preamble {
            version: VERSION,
            session,
            stream,
            streams,
        }
    }

    pub fn write(&self, w: &mut impl Write) -> Result<(), MigrationError> {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..28].copy_from_slice(self.session.as_bytes());
        b[28..30].copy_from_slice(&self.stream.to_le_bytes());
        b[30..32].copy_from_slice(&self.streams.to_le_bytes());
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
        if b[32..].iter().any(|&x| x != 0) {
            return Err(MigrationError::Malformed(
                "reserved preamble bytes are not zero",
            ));
        }
        Ok(Preamble {
            version,
            session,
            stream,
            streams,
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
    }
}
