use thiserror::Error;

/// Everything that can be wrong with a migration stream. A receiver that sees any of these
/// stops applying: the source keeps the VM, so nothing is lost by refusing.
#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("migration stream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Vireo migration stream (magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("migration format version {found} is not supported here (this host reads {oldest}..={newest}); upgrade the older host")]
    Version {
        found: u32,
        oldest: u32,
        newest: u32,
    },
    #[error("record kind {0} is unknown")]
    UnknownKind(u8),
    #[error("codec {0} is unknown")]
    UnknownCodec(u8),
    #[error("record of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("stream ended inside a record")]
    Truncated,
    #[error("page batch malformed: {0}")]
    Malformed(&'static str),
    #[error("page {gpa:#x} is not page-aligned or lies outside guest RAM ({ram_size:#x} bytes)")]
    PageOutOfRange { gpa: u64, ram_size: u64 },
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("record for session {found} on a stream of session {expected}")]
    WrongSession {
        found: uuid::Uuid,
        expected: uuid::Uuid,
    },
    #[error("the source aborted the migration: {0}")]
    Aborted(String),
    #[error("{0} after the end of the migration")]
    AfterDone(&'static str),
}
