use std::io;
use std::path::{Path, PathBuf};

use crate::lock::LockKind;

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
    /// A valid request the backend declines as asked (e.g. a shrink that would drop data);
    /// the message says why and what would work.
    #[error("{0}")]
    Refused(String),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Another open (in this or another process) holds a conflicting lock on the file.
    #[error("{}", locked_message(path, *wanted))]
    Locked { path: PathBuf, wanted: LockKind },
}

/// One line for the user: whose lock it is and what to do.
pub fn locked_message(path: &Path, wanted: LockKind) -> String {
    match wanted {
        LockKind::Exclusive => format!(
            "disk {} is in use by another process (locked); stop that process or open it read-only",
            path.display()
        ),
        LockKind::Shared => format!(
            "disk {} is being written by another process (locked); stop that process first",
            path.display()
        ),
    }
}
