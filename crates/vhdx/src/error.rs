use std::io;
use std::path::PathBuf;

use crate::guid::Guid;

/// Everything that can go wrong opening, parsing or changing a VHDX file.
///
/// Parsing errors name the structure and the offending value so a user can tell a truncated
/// download from a foreign extension from real corruption.
#[derive(Debug, thiserror::Error)]
pub enum VhdxError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("file is {len} bytes, too short to hold {what} (needs {needed})")]
    Truncated {
        what: &'static str,
        len: u64,
        needed: u64,
    },
    #[error("not a VHDX file: file identifier signature is {found:02x?}, expected \"vhdxfile\"")]
    BadFileSignature { found: [u8; 8] },
    #[error("both VHDX headers are invalid (header 1: {h1}; header 2: {h2})")]
    NoValidHeader { h1: String, h2: String },
    #[error("unsupported VHDX version {0} (only version 1 is supported)")]
    UnsupportedVersion(u16),
    #[error("unsupported log version {0} (only version 0 is supported)")]
    UnsupportedLogVersion(u16),
    #[error("log at offset {offset} length {length} is invalid: {why}")]
    BadLogLocation {
        offset: u64,
        length: u32,
        why: &'static str,
    },
    #[error("both region tables are invalid (table 1: {t1}; table 2: {t2})")]
    NoValidRegionTable { t1: String, t2: String },
    #[error("region {guid} at offset {offset} length {length} is invalid: {why}")]
    BadRegion {
        guid: Guid,
        offset: u64,
        length: u64,
        why: String,
    },
    #[error("region {0} is required but unknown to this implementation")]
    UnknownRequiredRegion(Guid),
    #[error("required region {0} is missing")]
    MissingRegion(&'static str),
    #[error("metadata table is invalid: {0}")]
    BadMetadataTable(String),
    #[error("metadata item {0} is required but unknown to this implementation")]
    UnknownRequiredMetadata(Guid),
    #[error("required metadata item {0} is missing")]
    MissingMetadata(&'static str),
    #[error("metadata item {item} has invalid value {value}")]
    BadMetadataValue { item: &'static str, value: u64 },
    #[error("parent locator is invalid: {0}")]
    BadParentLocator(String),
    #[error("BAT region holds {have} entries but the disk needs {need}")]
    BatTooSmall { have: u64, need: u64 },
    #[error("BAT entry {index} has invalid state {state}")]
    BadBatState { index: u64, state: u8 },
    #[error("BAT entry {index} points at file offset {offset}, {why}")]
    BadBatOffset {
        index: u64,
        offset: u64,
        why: &'static str,
    },
    #[error("BAT entries {a} and {b} both use file offset {offset}")]
    BatOverlap { a: u64, b: u64, offset: u64 },
    #[error("log is corrupt: {0}")]
    BadLog(String),
    #[error("the file has a non-empty log that must be replayed, and it was opened read-only with replay refused")]
    LogReplayRefused,
    #[error("virtual size {0} is invalid (must be a non-zero multiple of the logical sector size and at most 64 TiB)")]
    BadVirtualSize(u64),
    #[error("block size {0} is invalid (must be a power of two from 1 MiB to 256 MiB)")]
    BadBlockSize(u64),
    #[error("sector size {0} is invalid (must be 512 or 4096)")]
    BadSectorSize(u64),
    #[error("a differencing disk needs a parent path")]
    MissingParentOption,
    #[error("parent of {child} not found (tried {tried:?})")]
    ParentNotFound { child: PathBuf, tried: Vec<String> },
    #[error("parent {parent} has DataWriteGuid {found}, but {child} expects {expected}: the parent was modified after the child was created")]
    ParentLinkageMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: Guid,
    },
    #[error(
        "parent {parent} has logical sector size {parent_sector}, child {child} has {child_sector}"
    )]
    ParentSectorMismatch {
        child: PathBuf,
        parent: PathBuf,
        child_sector: u32,
        parent_sector: u32,
    },
    #[error("differencing chain loops back to {0}")]
    ParentLoop(PathBuf),
    #[error("differencing chain is deeper than {0} disks")]
    ChainTooDeep(usize),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request at offset {offset} length {len} is outside the disk ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("shrinking to {new_size} would discard allocated data at virtual offset {data_at} (use force)")]
    ShrinkOverData { new_size: u64, data_at: u64 },
    #[error("{0} is not a differencing disk")]
    NotDifferencing(PathBuf),
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    #[error("operation cancelled; the file is valid and the operation can be resumed or retried")]
    Cancelled,
    #[error("metadata region has no room for item {0}")]
    MetadataFull(Guid),
    /// Another open (in this or another process) holds a conflicting lock on the file.
    #[error("{}", vireo_block::locked_message(path, *wanted))]
    Locked {
        path: PathBuf,
        wanted: vireo_block::LockKind,
    },
    #[error("injected failure (test fault injection)")]
    InjectedFault,
    #[error("{} cannot be the parent of {}: it is that disk or depends on it (a loop)", parent.display(), child.display())]
    RebaseLoop { child: PathBuf, parent: PathBuf },
    #[error("{} is {parent_size} bytes but {} is {child_size}: a parent must have its child's virtual size", parent.display(), child.display())]
    ParentSizeMismatch {
        child: PathBuf,
        child_size: u64,
        parent: PathBuf,
        parent_size: u64,
    },
    #[error("{} has an unfinished merge; run the merge again to finish it first", .0.display())]
    MergeUnfinished(PathBuf),
    /// A new file could not be started or put in place (names the path).
    #[error(transparent)]
    NewFile(#[from] crate::newfile::NewFileError),
}

impl VhdxError {
    pub(crate) fn corrupt_log(msg: impl Into<String>) -> Self {
        VhdxError::BadLog(msg.into())
    }
}

impl From<VhdxError> for vireo_block::BlockError {
    fn from(e: VhdxError) -> Self {
        use vireo_block::BlockError;
        match e {
            VhdxError::Io(e) => BlockError::Io(e),
            VhdxError::ReadOnly => BlockError::ReadOnly,
            VhdxError::OutOfRange { offset, len, size } => {
                BlockError::OutOfRange { offset, len, size }
            }
            VhdxError::Unsupported(what) => BlockError::Unsupported(what),
            VhdxError::Locked { path, wanted } => BlockError::Locked { path, wanted },
            e @ (VhdxError::ShrinkOverData { .. }
            | VhdxError::BadVirtualSize(_)
            | VhdxError::Cancelled
            | VhdxError::NewFile(_)) => BlockError::Refused(e.to_string()),
            other => BlockError::Corrupt(other.to_string()),
        }
    }
}

impl From<vireo_block::LockError> for VhdxError {
    fn from(e: vireo_block::LockError) -> Self {
        match e {
            vireo_block::LockError::Locked { path, wanted } => VhdxError::Locked { path, wanted },
            vireo_block::LockError::Io(e) => VhdxError::Io(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_block::BlockError;

    #[test]
    fn a_refused_resize_is_not_reported_as_corruption() {
        let e: BlockError = VhdxError::ShrinkOverData {
            new_size: 1 << 20,
            data_at: 2 << 20,
        }
        .into();
        assert!(matches!(e, BlockError::Refused(_)), "{e:?}");
        assert!(!e.to_string().contains("corrupt"), "{e}");
    }
}
