//! Creating new VHDX files: fixed, dynamic and differencing.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::{Component, Path, PathBuf};

use crate::disk::{OpenOptions, Vhdx};
use crate::fileio::FileIo;
use crate::format::bat::{self, Geometry};
use crate::format::header::{self, Header};
use crate::format::locator::ParentLocator;
use crate::format::metadata::{self, DiskParams, Metadata};
use crate::format::region::RegionTable;
use crate::format::*;
use crate::guid::Guid;
use crate::layer::region_entry;
use crate::newfile::NewFile;
use crate::VhdxError;

/// Kind of disk to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskType {
    #[default]
    Dynamic,
    Fixed,
    Differencing,
}

/// Parameters of a new disk.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size in bytes; 0 for a differencing disk means "same as the parent".
    pub size: u64,
    pub disk_type: DiskType,
    /// Payload block size; 0 (the default) means the parent's for a differencing disk (so a
    /// child of a small-block parent does not turn each small write into a 32 MiB block), else
    /// 32 MiB.
    pub block_size: u32,
    /// 512 or 4096; ignored for differencing disks (the parent's is used).
    pub logical_sector: u32,
    pub physical_sector: u32,
    /// Parent of a differencing disk.
    pub parent: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            disk_type: DiskType::Dynamic,
            block_size: 0,
            logical_sector: 512,
            physical_sector: 4096,
            parent: None,
        }
    }
}

pub(crate) const LOG_OFFSET: u64 = MIB;
pub(crate) const LOG_LENGTH: u64 = MIB;
pub(crate) const METADATA_OFFSET: u64 = 2 * MIB;
pub(crate) const METADATA_LENGTH: u64 = MIB;
pub(crate) const BAT_OFFSET: u64 = 3 * MIB;

/// `target` expressed relative to directory `from` (both absolute).
fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let t: Vec<Component> = target.components().collect();
    let f: Vec<Component> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

pub(crate) fn parent_locator(
    child: &Path,
    parent: &Path,
    linkage: Guid,
) -> Result<ParentLocator, VhdxError> {
    let parent_abs = std::fs::canonicalize(parent)?;
    let child_dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => std::fs::canonicalize(d)?,
        _ => std::env::current_dir()?,
    };
    let rel = relative_to(&parent_abs, &child_dir);
    // Windows style, as Hyper-V writes it; our resolver accepts both separators.
    let rel = format!(".\\{}", rel.to_string_lossy().replace('/', "\\"));
    Ok(ParentLocator {
        locator_type: VHDX_PARENT_LOCATOR_TYPE,
        entries: vec![
            ("parent_linkage".into(), linkage.to_string()),
            ("relative_path".into(), rel),
            (
                "absolute_win32_path".into(),
                parent_abs.to_string_lossy().into_owned(),
            ),
        ],
    })
}

pub(crate) fn validate_size(size: u64, logical_sector: u32) -> Result<(), VhdxError> {
    if size == 0 || size > MAX_VIRTUAL_SIZE || !size.is_multiple_of(logical_sector as u64) {
        return Err(VhdxError::BadVirtualSize(size));
    }
    Ok(())
}

impl Vhdx {
    /// Creates a new disk at `path` (which must not exist) and opens it read-write. The file is
    /// built under a temporary name and appears at `path` only once complete ([`NewFile`]).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Vhdx, VhdxError> {
        let new = NewFile::begin(path)?;
        Self::write_file(new.temp_path(), path, opts)?;
        new.commit()?;
        Vhdx::open(path, &OpenOptions::default())
    }

    /// Writes a complete, synced new disk at `at` (created here; must not exist). `named` is
    /// the path it will finally have: a differencing disk's parent locator is relative to it.
    pub(crate) fn write_file(
        at: &Path,
        named: &Path,
        opts: &CreateOptions,
    ) -> Result<(), VhdxError> {
        let block_size = opts.block_size;
        if block_size != 0
            && (!(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&(block_size as u64))
                || !block_size.is_power_of_two())
        {
            return Err(VhdxError::BadBlockSize(block_size as u64));
        }
        for s in [opts.logical_sector, opts.physical_sector] {
            if s != 512 && s != 4096 {
                return Err(VhdxError::BadSectorSize(s as u64));
            }
        }
        let mut p = DiskParams {
            block_size: if block_size == 0 {
                DEFAULT_BLOCK_SIZE
            } else {
                block_size
            },
            leave_blocks_allocated: opts.disk_type == DiskType::Fixed,
            has_parent: opts.disk_type == DiskType::Differencing,
            virtual_size: opts.size,
            logical_sector: opts.logical_sector,
            physical_sector: opts.physical_sector,
            page83: Guid::random(),
            parent_locator: None,
        };
        if p.has_parent {
            let parent_path = opts.parent.as_ref().ok_or(VhdxError::MissingParentOption)?;
            let parent = Vhdx::open(parent_path, &OpenOptions::read_only())?;
            if p.virtual_size == 0 {
                p.virtual_size = parent.virtual_size();
            }
            if block_size == 0 {
                p.block_size = parent.block_size();
            }
            p.logical_sector = parent.logical_sector_size();
            p.physical_sector = parent.physical_sector_size();
            p.parent_locator = Some(parent_locator(
                named,
                parent_path,
                parent.top().header().data_write_guid,
            )?);
        }
        validate_size(p.virtual_size, p.logical_sector)?;

        let geo = Geometry::new(p.block_size, p.logical_sector, p.has_parent);
        let entries = geo.bat_entries(p.virtual_size);
        let bat_len = round_up(entries * 8, ALIGN);
        let data_start = BAT_OFFSET + bat_len;
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(at)?;
        let io = FileIo::new(file, None);
        let result = write_new(&io, &p, &geo, bat_len, data_start);
        drop(io);
        if result.is_err() {
            let _ = std::fs::remove_file(at);
        }
        result
    }
}

fn write_new(
    io: &FileIo,
    p: &DiskParams,
    geo: &Geometry,
    bat_len: u64,
    data_start: u64,
) -> Result<(), VhdxError> {
    io.write_at(&header::file_identifier("vireo"), FILE_ID_OFFSET)?;
    let h = Header {
        sequence_number: 0,
        file_write_guid: Guid::random(),
        data_write_guid: Guid::random(),
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH as u32,
        log_offset: LOG_OFFSET,
    };
    for (i, off) in HEADER_OFFSETS.iter().enumerate() {
        io.write_at(
            &Header {
                sequence_number: i as u64,
                ..h.clone()
            }
            .to_bytes(),
            *off,
        )?;
    }
    let rt = RegionTable {
        entries: vec![
            region_entry(BAT_REGION, BAT_OFFSET, bat_len),
            region_entry(METADATA_REGION, METADATA_OFFSET, METADATA_LENGTH),
        ],
    };
    for off in REGION_TABLE_OFFSETS {
        io.write_at(&rt.to_bytes(), off)?;
    }
    let meta = Metadata::build(METADATA_LENGTH as usize, &metadata::standard_items(p));
    io.write_at(&meta.region, METADATA_OFFSET)?;
    let mut end = data_start;
    if p.leave_blocks_allocated {
        let blocks = geo.payload_blocks(p.virtual_size);
        let total = blocks * geo.block_size;
        io.set_len(data_start + total)?;
        io.allocate(data_start, total)?;
        // Write the BAT in 1 MiB pieces so a huge fixed disk needs no huge buffer.
        let per_piece = (MIB / 8) as usize;
        let n = geo.bat_entries(p.virtual_size) as usize;
        let mut piece = vec![0u8; MIB as usize];
        for start in (0..n).step_by(per_piece) {
            piece.fill(0);
            for i in start..(start + per_piece).min(n) {
                if !geo.is_bitmap_index(i as u64) {
                    let b = geo.block_of_index(i as u64);
                    let e = bat::entry(bat::FULLY_PRESENT, data_start + b * geo.block_size);
                    piece[(i - start) * 8..(i - start) * 8 + 8].copy_from_slice(&e.to_le_bytes());
                }
            }
            io.write_at(&piece, BAT_OFFSET + (start as u64) * 8)?;
        }
        end = data_start + total;
    }
    io.set_len(end)?;
    io.sync()
}
