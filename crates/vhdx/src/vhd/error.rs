use std::io;
use std::path::PathBuf;

/// Why a VHD (v1) image could not be opened, created or used.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Another open (in this or another process) holds a conflicting lock on the file.
    #[error("{}", vireo_block::locked_message(path, *wanted))]
    Locked {
        path: PathBuf,
        wanted: vireo_block::LockKind,
    },
    #[error("file is {len} bytes, too small to hold a VHD footer (512 bytes)")]
    TooSmall { len: u64 },
    #[error("no VHD footer: the last 512 bytes do not start with \"conectix\"")]
    NoFooter,
    #[error("VHD footer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    FooterChecksum { stored: u32, computed: u32 },
    #[error("unsupported VHD file format version {0:#010x} (only 1.0 is defined)")]
    Version(u32),
    #[error("unsupported VHD disk type {0} (2 = fixed, 3 = dynamic, 4 = differencing)")]
    DiskType(u32),
    #[error("VHD virtual size {0} is not a multiple of 512 or exceeds 2040 GiB")]
    BadSize(u64),
    #[error("fixed VHD claims {size} bytes of data but the file holds only {available}")]
    FixedTruncated { size: u64, available: u64 },
    #[error("dynamic header at offset {0} is outside the file or misaligned")]
    HeaderOffset(u64),
    #[error("dynamic header does not start with \"cxsparse\"")]
    NoDynamicHeader,
    #[error("dynamic header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("VHD block size {0} is not a power of two between 512 bytes and 256 MiB")]
    BlockSize(u32),
    #[error("BAT has {entries} entries but {needed} are needed for the virtual size")]
    BatTooSmall { entries: u32, needed: u64 },
    #[error("BAT at offset {offset} ({len} bytes) lies outside the file or overlaps the headers")]
    BatOutside { offset: u64, len: u64 },
    #[error("BAT entry {index} points at sector {sector}, outside the file's data area")]
    BlockOutside { index: usize, sector: u32 },
    #[error("parent of {child} not found (tried: {tried})")]
    ParentMissing { child: PathBuf, tried: String },
    #[error("parent {parent} has unique id {found} but {child} expects {expected}")]
    ParentMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: String,
    },
    #[error("differencing chain deeper than {0} disks (or a loop) starting at {1}")]
    ChainTooDeep(usize, PathBuf),
    #[error("parent locator in {0} is malformed: {1}")]
    Locator(PathBuf, String),
    #[error("writing to a differencing VHD is not supported; convert it to VHDX first")]
    DifferencingWrite,
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("shrinking to {new_size} would discard data at virtual offset {data_at} (use force)")]
    ShrinkOverData { new_size: u64, data_at: u64 },
    /// A new file could not be started or put in place (names the path).
    #[error(transparent)]
    NewFile(#[from] crate::newfile::NewFileError),
}

impl From<VhdError> for vireo_block::BlockError {
    fn from(e: VhdError) -> Self {
        match e {
            VhdError::Io(io) => vireo_block::BlockError::Io(io),
            VhdError::Unsupported(what) => vireo_block::BlockError::Unsupported(what),
            VhdError::Locked { path, wanted } => vireo_block::BlockError::Locked { path, wanted },
            VhdError::ReadOnly => vireo_block::BlockError::ReadOnly,
            e @ (VhdError::ShrinkOverData { .. } | VhdError::BadSize(_)) => {
                vireo_block::BlockError::Refused(e.to_string())
            }
            other => vireo_block::BlockError::Corrupt(other.to_string()),
        }
    }
}

impl From<vireo_block::LockError> for VhdError {
    fn from(e: vireo_block::LockError) -> Self {
        match e {
            vireo_block::LockError::Locked { path, wanted } => VhdError::Locked { path, wanted },
            vireo_block::LockError::Io(e) => VhdError::Io(e),
        }
    }
}
