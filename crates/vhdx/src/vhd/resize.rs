//! Changing a VHD's virtual size: fixed disks move their footer (new space allocated for real),
//! dynamic disks rewrite both footer copies within their BAT's capacity. A shrink drops the
//! blocks past the new end so a later grow reads zeroes there, never the discarded data.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::format::{self, SECTOR, UNALLOCATED};
use super::{read_or_zero, Layout, Sparse, Vhd, VhdError};
use crate::fileio::allocate_zeroed;

impl Vhd {
    /// Changes the virtual size. Shrinking is refused with [`VhdError::ShrinkOverData`] when
    /// data lies past the new end (an allocated block, or non-zero bytes in the block the new
    /// end cuts), unless `force`, which discards it.
    pub fn resize_to(&self, new_size: u64, force: bool) -> Result<(), VhdError> {
        if self.read_only {
            return Err(VhdError::ReadOnly);
        }
        if new_size == 0 || !new_size.is_multiple_of(SECTOR) || new_size > format::MAX_SIZE {
            return Err(VhdError::BadSize(new_size));
        }
        let mut footer = self.footer.lock();
        let old = footer.current_size;
        if new_size < old && !force {
            if let Some(data_at) = self.first_data_in(new_size, old)? {
                return Err(VhdError::ShrinkOverData { new_size, data_at });
            }
        }
        let mut new_footer = footer.clone();
        new_footer.current_size = new_size;
        new_footer.geometry = format::chs_geometry(new_size / SECTOR);
        let bytes = new_footer.to_bytes();
        if new_size < old {
            // No new I/O lands in the doomed range from here on.
            self.size.store(new_size, Ordering::Release);
        }
        match &self.layout {
            Layout::Fixed => {
                // The new footer first: at every instant the file ends with a valid footer.
                self.file.write_all_at(&bytes, new_size)?;
                if new_size > old {
                    allocate_zeroed(&self.file, old + SECTOR, new_size - old - SECTOR)?;
                    // The old footer becomes disk data, which must read as zeroes.
                    self.file.write_all_at(&[0u8; SECTOR as usize], old)?;
                } else {
                    self.file.set_len(new_size + SECTOR)?;
                }
            }
            Layout::Sparse(s) => {
                if new_size.div_ceil(s.block_size) > s.bat.len() as u64 {
                    return Err(VhdError::Unsupported(
                        "growing this VHD beyond its BAT capacity; convert it to VHDX",
                    ));
                }
                let next = s.next_free.lock();
                if new_size < old {
                    self.drop_past(s, new_size)?;
                }
                self.file.write_all_at(&bytes, *next)?;
                self.file.write_all_at(&bytes, 0)?;
            }
        }
        *footer = new_footer;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// The first offset in `from..to` holding data (see [`Vhd::resize_to`]).
    fn first_data_in(&self, from: u64, to: u64) -> Result<Option<u64>, VhdError> {
        match &self.layout {
            Layout::Fixed => self.first_nonzero(from, to, from),
            Layout::Sparse(s) => {
                let bs = s.block_size;
                for index in from / bs..to.div_ceil(bs) {
                    let entry = s.bat[index as usize].load(Ordering::Acquire);
                    if entry == UNALLOCATED {
                        continue;
                    }
                    let start = index * bs;
                    if start >= from {
                        return Ok(Some(start));
                    }
                    let data = entry as u64 * SECTOR + s.bitmap_size;
                    let end = ((index + 1) * bs).min(to);
                    if let Some(at) =
                        self.first_nonzero(data + from - start, data + end - start, from)?
                    {
                        return Ok(Some(at));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Virtual offset (`base` stands for file offset `start`) of the first non-zero byte of
    /// the file range `start..end`.
    fn first_nonzero(&self, start: u64, end: u64, base: u64) -> Result<Option<u64>, VhdError> {
        let mut buf = vec![0u8; (end - start).min(1 << 20) as usize];
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            read_or_zero(&self.file, &mut buf[..n], pos)?;
            if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                return Ok(Some(base + pos - start + i as u64));
            }
            pos += n as u64;
        }
        Ok(None)
    }

    /// Unallocates the blocks wholly past `new_size` and zeroes the tail of the block it cuts,
    /// so growing again shows zeroes. Their file space stays (VHD has no free list).
    fn drop_past(&self, s: &Sparse, new_size: u64) -> Result<(), VhdError> {
        let bs = s.block_size;
        let keep = new_size.div_ceil(bs) as usize;
        if keep < s.bat.len() {
            let gone = vec![0xffu8; (s.bat.len() - keep) * 4];
            self.file
                .write_all_at(&gone, s.header.table_offset + 4 * keep as u64)?;
            for e in &s.bat[keep..] {
                e.store(UNALLOCATED, Ordering::Release);
            }
        }
        let cut = new_size % bs;
        let entry = s.bat[keep - 1].load(Ordering::Acquire);
        if cut != 0 && entry != UNALLOCATED {
            let data = entry as u64 * SECTOR + s.bitmap_size;
            let zeroes = vec![0u8; (bs - cut) as usize];
            self.file.write_all_at(&zeroes, data + cut)?;
        }
        Ok(())
    }
}
