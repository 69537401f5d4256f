//! Converting between raw, VHD and VHDX images in any direction, and opening any of them by
//! content ("magic") as a [`BlockBackend`].
//!
//! Only the source's allocated ranges are read (VHD/VHDX block maps, `SEEK_DATA` on raw files)
//! and only non-zero data is written, so sparse sources give sparse outputs. Several threads copy
//! 4 MiB chunks at once. On error or cancellation the partial destination is **deleted**: a
//! half-written image that parses cleanly would silently hold a truncated disk.

mod copy;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use vireo_block::{BlockBackend, BlockError, RawFile};

use crate::newfile::{NewFile, NewFileError};
use crate::vhd::{self, Vhd, VhdCreateOptions, VhdError};
use crate::{CreateOptions, DiskType, OpenOptions, Vhdx, VhdxError};

pub use copy::is_zero;

/// An image format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Vhd,
    Vhdx,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        }
    }

    /// `.vhdx`/`.avhdx` → VHDX, `.vhd`/`.avhd` → VHD, `.raw`/`.img`/`.bin` → raw.
    pub fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "vhdx" | "avhdx" => Some(Format::Vhdx),
            "vhd" | "avhd" => Some(Format::Vhd),
            "raw" | "img" | "bin" => Some(Format::Raw),
            _ => None,
        }
    }

    /// The format of an existing file, by content: "vhdxfile" at offset 0 is VHDX, a
    /// "conectix" footer is VHD, anything else is raw.
    pub fn detect(path: &Path) -> Result<Format, ConvertError> {
        let file = File::open(path).map_err(|e| ConvertError::Open(path.to_path_buf(), e))?;
        let meta = file.metadata()?;
        if meta.is_dir() {
            // Opening a directory succeeds; reading it would fail without naming it.
            let e = std::io::Error::from_raw_os_error(libc::EISDIR);
            return Err(ConvertError::Open(path.to_path_buf(), e));
        }
        let mut magic = [0u8; 8];
        let len = meta.len();
        if len >= 8 {
            file.read_exact_at(&mut magic, 0)?;
            if &magic == b"vhdxfile" {
                return Ok(Format::Vhdx);
            }
        }
        if vhd::is_vhd(&file)? {
            return Ok(Format::Vhd);
        }
        Ok(Format::Raw)
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(Format::Raw),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            other => Err(format!(
                "unknown format {other:?} (expected vhdx, vhd or raw)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("cannot open {0}: {1}")]
    Open(PathBuf, std::io::Error),
    /// The destination cannot be started or put in place (exists, no directory, ...).
    #[error(transparent)]
    NewFile(#[from] NewFileError),
    #[error("{format} has 512-byte sectors only; --sector {sector} needs VHDX")]
    SectorUnsupported { format: &'static str, sector: u32 },
    #[error("conversion cancelled; the partial destination was removed")]
    Cancelled,
    #[error("virtual size {size} does not fit a {format} image (limit {limit} bytes)")]
    TooLarge {
        size: u64,
        format: &'static str,
        limit: u64,
    },
    #[error("VHD: {0}")]
    Vhd(#[from] VhdError),
    #[error("VHDX: {0}")]
    Vhdx(#[from] VhdxError),
    #[error("{0}")]
    Block(#[from] BlockError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Any supported image, open.
pub enum AnyDisk {
    Raw(RawFile, File),
    Vhd(Box<Vhd>),
    Vhdx(Vhdx),
}

impl AnyDisk {
    /// Opens `path`, recognising its format by content.
    pub fn open(path: &Path, read_only: bool) -> Result<AnyDisk, ConvertError> {
        let format = Format::detect(path)?;
        Self::open_as(path, format, read_only)
    }

    pub fn open_as(path: &Path, format: Format, read_only: bool) -> Result<AnyDisk, ConvertError> {
        Ok(match format {
            Format::Raw => AnyDisk::Raw(
                RawFile::open(path, read_only)?,
                File::open(path).map_err(|e| ConvertError::Open(path.to_path_buf(), e))?,
            ),
            Format::Vhd => AnyDisk::Vhd(Box::new(Vhd::open(path, read_only)?)),
            Format::Vhdx => AnyDisk::Vhdx(Vhdx::open(
                path,
                &OpenOptions {
                    read_only,
                    ..OpenOptions::default()
                },
            )?),
        })
    }

    pub fn format(&self) -> Format {
        match self {
            AnyDisk::Raw(..) => Format::Raw,
            AnyDisk::Vhd(_) => Format::Vhd,
            AnyDisk::Vhdx(_) => Format::Vhdx,
        }
    }

    pub fn backend(&self) -> &dyn BlockBackend {
        match self {
            AnyDisk::Raw(d, _) => d,
            AnyDisk::Vhd(d) => d.as_ref(),
            AnyDisk::Vhdx(d) => d,
        }
    }

    /// Virtual ranges `(offset, length)` that may hold non-zero data, in order; everything
    /// else reads as zeroes.
    pub fn allocated_ranges(&self) -> Result<Vec<(u64, u64)>, ConvertError> {
        Ok(match self {
            AnyDisk::Raw(d, f) => raw_data_ranges(f, d.size())?,
            AnyDisk::Vhd(d) => d.allocated_ranges(),
            AnyDisk::Vhdx(d) => d.allocated_ranges(),
        })
    }
}

/// Data ranges of a raw file from `SEEK_DATA`/`SEEK_HOLE`; the whole file where unsupported.
pub fn raw_data_ranges(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at = 0u64;
    while at < size {
        // SAFETY: lseek on a descriptor we own; it only moves this handle's file offset.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(ranges), // no data after `at`
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, size)]),
                _ => Err(err),
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if start >= size {
            break;
        }
        ranges.push((start, end - start));
        at = end.max(start + 1);
    }
    Ok(ranges)
}

/// Whether the destination is sparse (dynamic) or fully allocated (fixed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputType {
    Dynamic,
    Fixed,
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub format: Format,
    pub output_type: OutputType,
    /// VHD/VHDX block size; `None` = the format's default (VHD 2 MiB, VHDX 32 MiB).
    pub block_size: Option<u32>,
    /// VHDX logical/physical sector sizes; `None` = the source's (512 for raw and VHD).
    pub logical_sector: Option<u32>,
    pub physical_sector: Option<u32>,
    /// Copy threads; 0 = default (4: overlaps reads, zero checks and writes on small hosts).
    pub threads: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: Format::Vhdx,
            output_type: OutputType::Dynamic,
            block_size: None,
            logical_sector: None,
            physical_sector: None,
            threads: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConvertReport {
    pub source_format: Format,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes of the source inside allocated ranges (read).
    pub bytes_scanned: u64,
    /// Non-zero bytes written to the destination.
    pub bytes_written: u64,
}

/// Converts `src` (any format, detected by content) into a new file `dst`.
///
/// The destination is built under a temporary name and renamed to `dst` only after its final
/// flush ([`NewFile`]), so an interrupted conversion never leaves a complete-looking image.
pub fn convert(
    src: &Path,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<ConvertReport, ConvertError> {
    let source = AnyDisk::open(src, true)?;
    if opts.format == Format::Vhd && opts.logical_sector.is_some_and(|s| s != 512) {
        return Err(ConvertError::SectorUnsupported {
            format: "VHD",
            sector: opts.logical_sector.unwrap_or(0),
        });
    }
    let new = NewFile::begin(dst)?;
    let src = source.backend();
    let (src_logical, src_physical) = (src.logical_sector_size(), src.physical_sector_size());
    let logical = opts.logical_sector.unwrap_or(src_logical);
    let sector = match opts.format {
        Format::Raw => 1,
        Format::Vhd => 512,
        Format::Vhdx => logical as u64,
    };
    // A destination needs whole sectors; the padding reads as zeroes.
    let size = src.size().next_multiple_of(sector);
    let tmp = new.temp_path();
    let dest = create_destination(tmp, size, opts, logical, src_physical)?;
    let report = copy_into(&source, &dest, tmp, size, opts, progress, cancel)?;
    // Closed (unlocked, headers clean) before it gets its name.
    drop(dest);
    new.commit()?;
    Ok(report)
}

fn copy_into(
    source: &AnyDisk,
    dest: &AnyDisk,
    dst_path: &Path,
    size: u64,
    opts: &ConvertOptions,
    progress: &dyn Fn(u64, u64),
    cancel: &AtomicBool,
) -> Result<ConvertReport, ConvertError> {
    let src = source.backend();
    let ranges = source.allocated_ranges()?;
    let threads = if opts.threads == 0 { 4 } else { opts.threads };
    // The final fsync would otherwise write everything after the copy: with lots of RAM the
    // kernel starts background write-back late. Starting it as we go overlaps the two.
    let writeback = std::fs::OpenOptions::new().write(true).open(dst_path).ok();
    let tick = || {
        if let Some(f) = &writeback {
            // SAFETY: sync_file_range on a descriptor we own; offset 0, length 0 = whole file;
            // WRITE only starts write-back of dirty pages and has no effect on the data.
            unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
    };
    let stats = match copy::copy_ranges(
        src,
        dest.backend(),
        &ranges,
        threads,
        progress,
        &tick,
        cancel,
    ) {
        Ok(s) => s,
        Err(copy::CopyError::Cancelled) => return Err(ConvertError::Cancelled),
        Err(copy::CopyError::Block(e)) => return Err(e.into()),
    };
    dest.backend().flush()?;
    Ok(ConvertReport {
        source_format: source.format(),
        format: opts.format,
        virtual_size: size,
        bytes_scanned: stats.bytes_read,
        bytes_written: stats.bytes_written,
    })
}

/// Creates the destination at `tmp` (a fresh temporary name) and opens it read-write.
fn create_destination(
    tmp: &Path,
    size: u64,
    opts: &ConvertOptions,
    logical: u32,
    src_physical: u32,
) -> Result<AnyDisk, ConvertError> {
    Ok(match opts.format {
        Format::Raw => {
            write_raw(tmp, size, opts.output_type)?;
            AnyDisk::open_as(tmp, Format::Raw, false)?
        }
        Format::Vhd => {
            if size > vhd::format::MAX_SIZE {
                return Err(ConvertError::TooLarge {
                    size,
                    format: "VHD",
                    limit: vhd::format::MAX_SIZE,
                });
            }
            Vhd::write_file(
                tmp,
                &VhdCreateOptions {
                    size,
                    disk_type: match opts.output_type {
                        OutputType::Dynamic => vhd::DiskType::Dynamic,
                        OutputType::Fixed => vhd::DiskType::Fixed,
                    },
                    block_size: opts.block_size,
                },
            )?;
            AnyDisk::Vhd(Box::new(Vhd::open(tmp, false)?))
        }
        Format::Vhdx => {
            let defaults = CreateOptions::default();
            let physical = opts
                .physical_sector
                .unwrap_or(src_physical.max(logical))
                .max(logical);
            Vhdx::write_file(
                tmp,
                tmp,
                &CreateOptions {
                    size,
                    disk_type: match opts.output_type {
                        OutputType::Dynamic => DiskType::Dynamic,
                        OutputType::Fixed => DiskType::Fixed,
                    },
                    block_size: opts.block_size.unwrap_or(defaults.block_size),
                    logical_sector: logical,
                    physical_sector: physical,
                    ..defaults
                },
            )?;
            AnyDisk::Vhdx(Vhdx::open(tmp, &OpenOptions::default())?)
        }
    })
}

/// Creates a new raw image of `size` bytes at `path` (which must not exist): sparse, or with
/// every byte allocated for [`OutputType::Fixed`]. Like every new file it appears at `path`
/// only once complete ([`NewFile`]).
pub fn create_raw(path: &Path, size: u64, output_type: OutputType) -> Result<(), ConvertError> {
    let new = NewFile::begin(path)?;
    write_raw(new.temp_path(), size, output_type)?;
    new.commit()?;
    Ok(())
}

/// Writes a raw image at `at` (created here; must not exist).
fn write_raw(at: &Path, size: u64, output_type: OutputType) -> Result<(), ConvertError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(at)
        .map_err(|e| ConvertError::Open(at.to_path_buf(), e))?;
    file.set_len(size)?;
    if output_type == OutputType::Fixed && size > 0 {
        // SAFETY: fallocate on a descriptor we own with in-range arguments.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err.into());
            }
            // No fallocate here: allocating by writing is what "fixed" promises.
            let zeroes = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < size {
                let n = (size - at).min(zeroes.len() as u64) as usize;
                file.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
        }
    }
    file.sync_all()?;
    Ok(())
}
