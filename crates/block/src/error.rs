use std::io;

/// Why a block request failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request at offset {offset} length {len} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("operation not supported by this backend: {0}")]
    Unsupported(&'static str),
    #[error("disk image is corrupt: {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}
