//! VHD (v1, Virtual PC / Hyper-V 2008 "conectix") images: read fixed, dynamic and differencing
//! disks; create and write fixed and dynamic ones. Used for import/export (`vireo disk convert`)
//! and as a [`BlockBackend`] so an old image can be attached directly.
//!
//! VHD has no journal: a dynamic disk grows by (1) writing the footer at the new end of file,
//! (2) writing the new block's sector bitmap over the old footer, (3) pointing the BAT entry at
//! the block. A crash between any two steps leaves a file that opens (readers fall back to the
//! footer copy at offset 0) with at worst an unreferenced block.

mod error;
pub mod format;
mod locator;
mod resize;

use parking_lot::Mutex;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vireo_block::{check_range, BlockBackend, BlockError};

use crate::newfile::NewFile;

pub use error::VhdError;
pub use format::DiskType;
use format::{DynamicHeader, Footer, ParentLocator, NO_OFFSET, SECTOR, UNALLOCATED};

/// Deepest differencing chain we follow; deeper means a loop or a broken chain.
pub const MAX_CHAIN_DEPTH: usize = 64;
/// Largest BAT we load into memory (16 Mi entries = 32 TiB at 2 MiB blocks, beyond VHD's limit).
const MAX_BAT_ENTRIES: u64 = 16 << 20;
/// Data blocks start on this boundary so 4 KiB guest I/O maps to whole host pages.
const DATA_ALIGN: u64 = 4096;

/// What to create.
#[derive(Clone, Debug)]
pub struct VhdCreateOptions {
    /// Virtual size in bytes; a multiple of 512, at most 2040 GiB.
    pub size: u64,
    /// `Fixed` or `Dynamic` (differencing VHDs are read-only here).
    pub disk_type: DiskType,
    /// Dynamic disks only; power of two, 512 B – 256 MiB. `None` = 2 MiB, the common default.
    pub block_size: Option<u32>,
}

/// Facts about an open VHD, for `vireo disk info`.
#[derive(Clone, Debug)]
pub struct VhdInfo {
    pub disk_type: DiskType,
    pub virtual_size: u64,
    pub block_size: Option<u32>,
    pub allocated_blocks: u64,
    pub total_blocks: u64,
    pub creator_app: String,
    pub unique_id: String,
    pub parent: Option<PathBuf>,
    pub file_size: u64,
}

struct Sparse {
    header: DynamicHeader,
    /// Sector offsets of each block's bitmap, `UNALLOCATED` for holes. Atomics so lookups take no
    /// lock; only allocation (under `next_free`) stores.
    bat: Vec<AtomicU32>,
    block_size: u64,
    bitmap_size: u64,
    parent: Option<(Box<Vhd>, PathBuf)>,
    /// File offset where the next block goes; the footer lives there. Held while allocating.
    next_free: Mutex<u64>,
}

enum Layout {
    Fixed,
    Sparse(Sparse),
}

/// An open VHD image.
pub struct Vhd {
    file: File,
    path: PathBuf,
    footer: Mutex<Footer>,
    size: AtomicU64,
    read_only: bool,
    layout: Layout,
}

impl std::fmt::Debug for Vhd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhd").field("path", &self.path).finish()
    }
}

/// True if `path` ends with a VHD footer or starts with a dynamic disk's footer copy.
pub fn is_vhd(file: &File) -> std::io::Result<bool> {
    let len = file.metadata()?.len();
    if len < SECTOR {
        return Ok(false);
    }
    let mut cookie = [0u8; 8];
    for at in [len - SECTOR, 0] {
        file.read_exact_at(&mut cookie, at)?;
        if &cookie == format::FOOTER_COOKIE {
            return Ok(true);
        }
    }
    Ok(false)
}

impl Vhd {
    /// Opens `path`. Differencing disks are always opened read-only, with their parents.
    pub fn open(path: &Path, read_only: bool) -> Result<Vhd, VhdError> {
        let mut visited = HashSet::new();
        Self::open_chain(path, None, read_only, 0, &mut visited)
    }

    /// [`Vhd::open`] on `file`, the already open (and normally already locked) file `path`
    /// names: a disk handed over with its lock (`vireo_block::handover`). The lock is taken
    /// again on it, a no-op when it holds it already.
    pub fn open_file(file: File, path: &Path, read_only: bool) -> Result<Vhd, VhdError> {
        let mut visited = HashSet::new();
        Self::open_chain(path, Some(file), read_only, 0, &mut visited)
    }

    fn open_chain(
        path: &Path,
        file: Option<File>,
        read_only: bool,
        depth: usize,
        visited: &mut HashSet<PathBuf>,
    ) -> Result<Vhd, VhdError> {
        if depth >= MAX_CHAIN_DEPTH {
            return Err(VhdError::ChainTooDeep(MAX_CHAIN_DEPTH, path.to_path_buf()));
        }
        let canonical = path.canonicalize()?;
        if !visited.insert(canonical) {
            return Err(VhdError::ChainTooDeep(depth, path.to_path_buf()));
        }
        let file = match file {
            Some(f) => f,
            None => OpenOptions::new().read(true).write(!read_only).open(path)?,
        };
        // The same image locks as VHDX and raw disks: one writer, or any number of readers.
        let kind = if read_only {
            vireo_block::LockKind::Shared
        } else {
            vireo_block::LockKind::Exclusive
        };
        vireo_block::lock(&file, path, kind)?;
        let len = file.metadata()?.len();
        if len < SECTOR {
            return Err(VhdError::TooSmall { len });
        }
        let footer = read_footer(&file, len)?;
        let size = footer.current_size;
        let layout = match footer.disk_type {
            DiskType::Fixed => {
                if size > len - SECTOR {
                    return Err(VhdError::FixedTruncated {
                        size,
                        available: len - SECTOR,
                    });
                }
                Layout::Fixed
            }
            DiskType::Dynamic | DiskType::Differencing => {
                if footer.disk_type == DiskType::Differencing && !read_only {
                    return Err(VhdError::DifferencingWrite);
                }
                Layout::Sparse(open_sparse(&file, len, path, &footer, depth, visited)?)
            }
        };
        Ok(Vhd {
            file,
            path: path.to_path_buf(),
            footer: Mutex::new(footer),
            size: AtomicU64::new(size),
            read_only,
            layout,
        })
    }

    /// Creates a new image at `path` (which must not exist) and opens it read-write. The file
    /// is built under a temporary name and appears at `path` only once complete ([`NewFile`]).
    pub fn create(path: &Path, opts: &VhdCreateOptions) -> Result<Vhd, VhdError> {
        let new = NewFile::begin(path)?;
        Self::write_file(new.temp_path(), opts)?;
        new.commit()?;
        Self::open(path, false)
    }

    /// Writes a complete, synced new image at `at` (created here; must not exist).
    pub(crate) fn write_file(at: &Path, opts: &VhdCreateOptions) -> Result<(), VhdError> {
        let size = opts.size;
        if size == 0 || !size.is_multiple_of(SECTOR) || size > format::MAX_SIZE {
            return Err(VhdError::BadSize(size));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(at)?;
        let result = match opts.disk_type {
            DiskType::Fixed => {
                let footer = Footer::new(size, DiskType::Fixed, NO_OFFSET);
                // All space taken now, as a fixed disk promises (not a sparse file).
                file.set_len(size + SECTOR)
                    .and_then(|_| crate::fileio::allocate_zeroed(&file, 0, size))
                    .and_then(|_| file.write_all_at(&footer.to_bytes(), size))
            }
            DiskType::Dynamic => create_dynamic(&file, size, opts.block_size),
            DiskType::Differencing => Err(std::io::Error::other(
                "creating differencing VHDs is not supported; use VHDX",
            )),
        };
        let result = result.and_then(|_| file.sync_all());
        drop(file);
        if let Err(e) = result {
            let _ = std::fs::remove_file(at);
            return Err(e.into());
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn disk_type(&self) -> DiskType {
        self.footer.lock().disk_type
    }

    pub fn info(&self) -> Result<VhdInfo, VhdError> {
        let footer = self.footer.lock().clone();
        let (block_size, allocated, total, parent) = match &self.layout {
            Layout::Fixed => (None, 0, 0, None),
            Layout::Sparse(s) => (
                Some(s.block_size as u32),
                s.bat
                    .iter()
                    .filter(|e| e.load(Ordering::Acquire) != UNALLOCATED)
                    .count() as u64,
                s.bat.len() as u64,
                s.parent.as_ref().map(|(_, p)| p.clone()),
            ),
        };
        Ok(VhdInfo {
            disk_type: footer.disk_type,
            virtual_size: self.size(),
            block_size,
            allocated_blocks: allocated,
            total_blocks: total,
            creator_app: String::from_utf8_lossy(&footer.creator_app).into_owned(),
            unique_id: format::format_id(&footer.unique_id),
            parent,
            file_size: self.file.metadata()?.len(),
        })
    }

    /// Virtual byte ranges `(offset, length)` that may hold data (allocated here or in a
    /// parent), sorted and merged. Everything outside reads as zeroes. Fixed disks report their
    /// whole size.
    pub fn allocated_ranges(&self) -> Vec<(u64, u64)> {
        let size = self.size();
        let mut ranges = Vec::new();
        match &self.layout {
            Layout::Fixed => ranges.push((0, size)),
            Layout::Sparse(s) => {
                for (i, e) in s.bat.iter().enumerate() {
                    if e.load(Ordering::Acquire) != UNALLOCATED {
                        let start = i as u64 * s.block_size;
                        ranges.push((start, (start + s.block_size).min(size)));
                    }
                }
                if let Some((parent, _)) = &s.parent {
                    ranges.extend(
                        parent
                            .allocated_ranges()
                            .into_iter()
                            .map(|(a, len)| (a.min(size), (a + len).min(size))),
                    );
                }
            }
        }
        merge_ranges(ranges)
            .into_iter()
            .map(|(a, b)| (a, b - a))
            .collect()
    }

    fn read_sparse(&self, s: &Sparse, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = (pos / s.block_size) as usize;
            let within = pos % s.block_size;
            let n = ((s.block_size - within) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            let entry = s.bat[index].load(Ordering::Acquire);
            if entry == UNALLOCATED {
                match &s.parent {
                    Some((parent, _)) => parent.read_into(chunk, pos)?,
                    None => chunk.fill(0),
                }
            } else {
                let block = entry as u64 * SECTOR;
                let data = block + s.bitmap_size;
                match &s.parent {
                    None => read_or_zero(&self.file, chunk, data + within)?,
                    Some((parent, _)) => {
                        self.read_differencing(s, parent, block, chunk, pos, within)?
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Sector by sector per the bitmap: set bits come from this file, clear bits from the parent.
    fn read_differencing(
        &self,
        s: &Sparse,
        parent: &Vhd,
        block: u64,
        chunk: &mut [u8],
        pos: u64,
        within: u64,
    ) -> Result<(), VhdError> {
        let first = within / SECTOR;
        let last = (within + chunk.len() as u64 - 1) / SECTOR;
        let mut bitmap = vec![0u8; ((last / 8) - (first / 8) + 1) as usize];
        read_or_zero(&self.file, &mut bitmap, block + first / 8)?;
        let bit = |sector: u64| {
            let i = (sector / 8 - first / 8) as usize;
            bitmap[i] & (0x80 >> (sector % 8)) != 0
        };
        let mut start = 0usize;
        while start < chunk.len() {
            let sector = (within + start as u64) / SECTOR;
            let here = bit(sector);
            let mut end_sector = sector + 1;
            while end_sector <= last && bit(end_sector) == here {
                end_sector += 1;
            }
            let end = ((end_sector * SECTOR - within) as usize).min(chunk.len());
            let part = &mut chunk[start..end];
            if here {
                read_or_zero(
                    &self.file,
                    part,
                    block + s.bitmap_size + within + start as u64,
                )?;
            } else {
                parent.read_into(part, pos + start as u64)?;
            }
            start = end;
        }
        Ok(())
    }

    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
        // A parent smaller than its child reads as zeroes past its end.
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        let buf = &mut buf[..inside];
        if buf.is_empty() {
            return Ok(());
        }
        match &self.layout {
            Layout::Fixed => read_or_zero(&self.file, buf, offset),
            Layout::Sparse(s) => self.read_sparse(s, buf, offset),
        }
    }

    /// Allocates block `index` (if another thread has not) and returns its sector offset.
    fn allocate(&self, s: &Sparse, index: usize) -> Result<u32, VhdError> {
        let mut next = s.next_free.lock();
        let entry = s.bat[index].load(Ordering::Acquire);
        if entry != UNALLOCATED {
            return Ok(entry);
        }
        let bitmap_at = (*next + s.bitmap_size).next_multiple_of(DATA_ALIGN) - s.bitmap_size;
        let end = bitmap_at + s.bitmap_size + s.block_size;
        let sector = u32::try_from(bitmap_at / SECTOR)
            .map_err(|_| VhdError::Unsupported("VHD file would exceed 2 TiB of sectors"))?;
        let footer = self.footer.lock().to_bytes();
        // Footer first, so the file always ends with one; then the bitmap over the old footer
        // (all sectors "present": the block's unwritten parts are holes that read as zeroes).
        self.file.write_all_at(&footer, end)?;
        self.file
            .write_all_at(&vec![0xff; s.bitmap_size as usize], bitmap_at)?;
        self.file.write_all_at(
            &sector.to_be_bytes(),
            s.header.table_offset + 4 * index as u64,
        )?;
        s.bat[index].store(sector, Ordering::Release);
        *next = end;
        Ok(sector)
    }

    fn write_sparse(&self, s: &Sparse, buf: &[u8], offset: u64) -> Result<(), VhdError> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let index = (pos / s.block_size) as usize;
            let within = pos % s.block_size;
            let n = ((s.block_size - within) as usize).min(buf.len() - done);
            let chunk = &buf[done..done + n];
            let mut entry = s.bat[index].load(Ordering::Acquire);
            if entry == UNALLOCATED {
                if chunk.iter().all(|&b| b == 0) {
                    done += n;
                    continue; // unallocated already reads as zeroes
                }
                entry = self.allocate(s, index)?;
            }
            let data = entry as u64 * SECTOR + s.bitmap_size;
            self.file.write_all_at(chunk, data + within)?;
            done += n;
        }
        Ok(())
    }
}

impl BlockBackend for Vhd {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size())?;
        Ok(self.read_into(buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        match &self.layout {
            Layout::Fixed => self.file.write_all_at(buf, offset)?,
            Layout::Sparse(s) => self.write_sparse(s, buf, offset)?,
        }
        Ok(())
    }

    fn dup_locked_file(&self) -> Option<std::io::Result<File>> {
        Some(self.file.try_clone())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            // write_sparse skips all-zero chunks of unallocated blocks, so holes stay holes.
            self.write_at(&zeroes[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Refuses to shrink over data (see [`Vhd::resize_to`]): a running guest's disk is never
    /// cut short behind its back.
    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(self.resize_to(new_size, false)?)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        let id = self.footer.lock().unique_id;
        format!("vhd-{}", &format::format_id(&id)[..8])
    }
}

fn read_footer(file: &File, len: u64) -> Result<Footer, VhdError> {
    let mut b = [0u8; 512];
    file.read_exact_at(&mut b, len - SECTOR)?;
    match Footer::parse(&b) {
        Ok(f) => Ok(f),
        Err(end_err) => {
            // Dynamic disks keep a copy at offset 0; a crash while growing can leave the end
            // without a footer.
            file.read_exact_at(&mut b, 0)?;
            match Footer::parse(&b) {
                Ok(f) if f.disk_type != DiskType::Fixed => Ok(f),
                _ => Err(end_err),
            }
        }
    }
}

fn open_sparse(
    file: &File,
    len: u64,
    path: &Path,
    footer: &Footer,
    depth: usize,
    visited: &mut HashSet<PathBuf>,
) -> Result<Sparse, VhdError> {
    let at = footer.data_offset;
    if !at.is_multiple_of(SECTOR) || at.checked_add(1024).is_none_or(|end| end > len) {
        return Err(VhdError::HeaderOffset(at));
    }
    let mut hb = [0u8; 1024];
    file.read_exact_at(&mut hb, at)?;
    let header = DynamicHeader::parse(&hb)?;
    let block_size = header.block_size as u64;
    let needed = footer.current_size.div_ceil(block_size);
    if (header.max_table_entries as u64) < needed || needed > MAX_BAT_ENTRIES {
        return Err(VhdError::BatTooSmall {
            entries: header.max_table_entries,
            needed,
        });
    }
    let bat_len = needed * 4;
    let bat_at = header.table_offset;
    let bat_end = bat_at.checked_add(bat_len);
    if bat_end.is_none_or(|end| end > len) || overlaps(bat_at, bat_len, at, 1024) || bat_at < SECTOR
    {
        return Err(VhdError::BatOutside {
            offset: bat_at,
            len: bat_len,
        });
    }
    let mut raw = vec![0u8; bat_len as usize];
    file.read_exact_at(&mut raw, bat_at)?;
    // Each block is preceded by a bitmap of one bit per sector, padded to whole sectors.
    let bitmap_size = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
    let mut next_free = (bat_at + header.max_table_entries as u64 * 4).next_multiple_of(SECTOR);
    let mut bat = Vec::with_capacity(needed as usize);
    for (index, e) in raw.chunks_exact(4).enumerate() {
        let sector = u32::from_be_bytes(e.try_into().unwrap());
        if sector != UNALLOCATED {
            let start = sector as u64 * SECTOR;
            let span = bitmap_size + block_size;
            if start >= len
                || overlaps(start, span, 0, SECTOR)
                || overlaps(start, span, at, 1024)
                || overlaps(start, span, bat_at, bat_len)
            {
                return Err(VhdError::BlockOutside { index, sector });
            }
            next_free = next_free.max(start + span);
        }
        bat.push(AtomicU32::new(sector));
    }
    let parent = if footer.disk_type == DiskType::Differencing {
        Some(open_parent(file, len, path, &header, depth, visited)?)
    } else {
        None
    };
    Ok(Sparse {
        header,
        bat,
        block_size,
        bitmap_size,
        parent,
        next_free: Mutex::new(next_free),
    })
}

fn open_parent(
    file: &File,
    len: u64,
    path: &Path,
    header: &DynamicHeader,
    depth: usize,
    visited: &mut HashSet<PathBuf>,
) -> Result<(Box<Vhd>, PathBuf), VhdError> {
    let candidates = locator::parent_candidates(file, len, path, header)?;
    for candidate in &candidates {
        if !candidate.is_file() {
            continue;
        }
        let parent = Vhd::open_chain(candidate, None, true, depth + 1, visited)?;
        let found = parent.footer.lock().unique_id;
        if found != header.parent_unique_id {
            return Err(VhdError::ParentMismatch {
                child: path.to_path_buf(),
                parent: candidate.clone(),
                expected: format::format_id(&header.parent_unique_id),
                found: format::format_id(&found),
            });
        }
        return Ok((Box::new(parent), candidate.clone()));
    }
    Err(VhdError::ParentMissing {
        child: path.to_path_buf(),
        tried: if candidates.is_empty() {
            "no parent locators".into()
        } else {
            candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

fn create_dynamic(file: &File, size: u64, block_size: Option<u32>) -> std::io::Result<()> {
    let block_size = block_size.unwrap_or(format::DEFAULT_BLOCK_SIZE);
    if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
        return Err(std::io::Error::other(VhdError::BlockSize(block_size)));
    }
    let entries = size.div_ceil(block_size as u64);
    if entries > MAX_BAT_ENTRIES {
        return Err(std::io::Error::other(VhdError::BlockSize(block_size)));
    }
    let header_at = SECTOR;
    let bat_at = header_at + 1024;
    let bat_bytes = (entries * 4).next_multiple_of(SECTOR);
    let footer = Footer::new(size, DiskType::Dynamic, header_at);
    let header = DynamicHeader {
        table_offset: bat_at,
        max_table_entries: entries as u32,
        block_size,
        parent_unique_id: [0; 16],
        parent_timestamp: 0,
        parent_name: String::new(),
        locators: vec![ParentLocator::default(); 8],
    };
    let fb = footer.to_bytes();
    file.write_all_at(&fb, 0)?;
    file.write_all_at(&header.to_bytes(), header_at)?;
    file.write_all_at(&vec![0xff; bat_bytes as usize], bat_at)?;
    file.write_all_at(&fb, bat_at + bat_bytes)?;
    Ok(())
}

/// Reads `buf` at `offset`; bytes past the end of the file read as zeroes (a dynamic block's
/// unwritten tail may lie beyond a truncated file).
fn read_or_zero(file: &File, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(a, b)| a < b);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}
