use thiserror::Error;

/// Everything that can be wrong with a migration stream. A receiver that sees any of these
/// stops applying: the source keeps the VM, so nothing is lost by refusing.
#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("migration stream I/O: {}", plain_io(.0))]
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

/// An I/O error in words for the user: rustls adds a link to its manual to some (a peer that
/// closed without `close_notify`), which only says the connection ended.
fn plain_io(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(": https://") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod plain_io_tests {
    use super::*;

    #[test]
    fn a_rustls_manual_link_is_left_out_of_the_message() {
        let e = MigrationError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify: \
             https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof",
        ));
        assert_eq!(
            e.to_string(),
            "migration stream I/O: peer closed connection without sending TLS close_notify"
        );
        let plain = MigrationError::Io(std::io::Error::other("connection reset"));
        assert_eq!(plain.to_string(), "migration stream I/O: connection reset");
    }
}
