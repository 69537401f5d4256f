use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::iov::{total_len, transfer, Dir};
use crate::mapped::{mapped_io_enabled, FileMap};
use crate::{check_range, BlockBackend, BlockError, GuestBuf, LockKind};

/// A disk backed by a plain file (or block device) whose bytes are the disk's bytes.
///
/// Uses positioned I/O (`pread`/`pwrite`, and `preadv`/`pwritev` straight on guest memory), so
/// any number of threads can issue requests at once without a lock. The file goes through the
/// page cache (no O_DIRECT), like QEMU's `cache=writeback`, its fastest mode here. Guest
/// reads and writes of a regular file are copies through a shared mapping of it when the
/// kernel can fault the range in first ([`FileMap`], docs/datapath.md "Mapped I/O"), and
/// `preadv`/`pwritev` otherwise.
#[derive(Debug)]
pub struct RawFile {
    /// Declared before `file`: unmapped while the descriptor is still open.
    map: Option<FileMap>,
    file: File,
    size: AtomicU64,
    read_only: bool,
    id: String,
}

impl RawFile {
    /// Opens `path`; with `read_only` the file is opened O_RDONLY and writes are refused.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file, path, read_only)
    }

    /// [`RawFile::open`] on a file opened elsewhere (one handed over with its lock, see
    /// [`crate::handover`]). Its lock is taken again: on the same open file that is a no-op
    /// that proves the lock is there, on another one it is the usual open's lock.
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, BlockError> {
        // Two VMs (or a VM and a tool) writing one image corrupt it: writers are exclusive.
        let kind = if read_only {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        crate::lock(&file, path, kind)?;
        let meta = file.metadata()?;
        let size = if meta.file_type().is_file() {
            meta.len()
        } else {
            // Block devices report length 0 in metadata; seek to the end instead.
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0))?
        };
        // A stable id: device and inode numbers survive renames, unlike the path.
        let id = format!("raw-{:x}-{:x}", meta.dev(), meta.ino());
        // Block devices stay on preadv/pwritev: their length is not in metadata, which the
        // mapping relies on to never reach past the end.
        let map = (meta.file_type().is_file() && mapped_io_enabled()).then(|| FileMap::new(&file));
        Ok(RawFile {
            map,
            file,
            size: AtomicU64::new(size),
            read_only,
            id,
        })
    }
}

impl RawFile {
    /// The mapping, when there is one and the request lies inside the disk (the system call
    /// path reports an out-of-range request).
    fn mapped_in_range(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Option<&FileMap> {
        let len = total_len(bufs)?;
        check_range(offset, len, self.size()).ok()?;
        self.map.as_ref()
    }
}

impl BlockBackend for RawFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        self.file.write_all_at(buf, offset)?;
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        if self
            .mapped_in_range(bufs, offset)
            .is_some_and(|map| map.read(&self.file, bufs, offset))
        {
            return Ok(());
        }
        transfer(self.file.as_raw_fd(), Dir::Read, bufs, offset, self.size())
    }

    fn write_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        if self
            .mapped_in_range(bufs, offset)
            .is_some_and(|map| map.write(&self.file, bufs, offset))
        {
            return Ok(());
        }
        transfer(self.file.as_raw_fd(), Dir::Write, bufs, offset, self.size())
    }

    fn dup_locked_file(&self) -> Option<std::io::Result<File>> {
        Some(self.file.try_clone())
    }

    fn vectored_fd(&self) -> Option<std::os::unix::io::RawFd> {
        // A mapped copy of a cached page (~0.5 µs) beats a share of one io_uring submission,
        // so batches run request by request through `read_vectored_at` then.
        self.map.is_none().then(|| self.file.as_raw_fd())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()?;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size())?;
        // SAFETY: fallocate on a file descriptor we own, with in-range arguments checked above.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // Filesystems without hole punching: zeroes give the same guest-visible result.
        self.write_zeroes(offset, len)
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let set = || {
            self.file.set_len(new_size)?;
            self.size.store(new_size, Ordering::Release);
            Ok(())
        };
        match &self.map {
            // The file may shrink: no page of the mapping may be left past its end.
            Some(map) => map.unmapped_while(set),
            None => set(),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn id(&self) -> String {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(len: u64) -> (tempfile::NamedTempFile, RawFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        let d = RawFile::open(f.path(), false).unwrap();
        (f, d)
    }

    #[test]
    fn write_read_roundtrip_and_discard_zeroes() {
        let (_f, d) = disk(1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        d.write_at(&data, 4096).unwrap();
        d.flush().unwrap();
        let mut back = vec![0; 8192];
        d.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
        d.discard(4096, 4096).unwrap();
        d.read_at(&mut back, 4096).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..], &data[4096..]);
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let (f, d) = disk(4096);
        let mut buf = [0u8; 512];
        assert!(matches!(
            d.read_at(&mut buf, 4000),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read_at(&mut buf, u64::MAX),
            Err(BlockError::OutOfRange { .. })
        ));
        drop(d); // a reader may not open beside a writer
        let ro = RawFile::open(f.path(), true).unwrap();
        assert!(matches!(ro.write_at(&buf, 0), Err(BlockError::ReadOnly)));
        assert!(ro.read_only());
    }

    #[test]
    fn resize_changes_size_and_file() {
        let (f, d) = disk(4096);
        d.resize(1 << 16).unwrap();
        assert_eq!(d.size(), 1 << 16);
        assert_eq!(f.as_file().metadata().unwrap().len(), 1 << 16);
    }

    #[test]
    fn one_writer_or_many_readers() {
        let (f, writer) = disk(1 << 20);
        // A second writer and a reader are both refused while the writer has it open.
        for ro in [false, true] {
            match RawFile::open(f.path(), ro) {
                Err(e @ BlockError::Locked { .. }) => {
                    assert!(e.to_string().contains("in use by another process") || ro)
                }
                other => panic!("second open (read-only {ro}) was not refused: {other:?}"),
            }
        }
        drop(writer);
        let r1 = RawFile::open(f.path(), true).unwrap();
        let _r2 = RawFile::open(f.path(), true).unwrap();
        assert!(matches!(
            RawFile::open(f.path(), false),
            Err(BlockError::Locked { .. })
        ));
        drop((r1, _r2));
        RawFile::open(f.path(), false).unwrap();
    }

    /// Guest memory of two adjacent regions with dirty bitmaps, as the VMM maps it.
    fn guest() -> vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap> {
        use vm_memory::GuestAddress;
        vm_memory::GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    /// A write and a read through `preadv`/`pwritev` on scattered guest buffers (one straddling
    /// the region boundary) move the same bytes as `read_at`/`write_at`, mark the pages read
    /// into dirty, and refuse a range past the end without touching anything.
    #[test]
    fn vectored_io_moves_scattered_guest_buffers_and_marks_them_dirty() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{
            Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions,
        };
        let (_f, d) = disk(1 << 20);
        let mem = guest();
        let pieces = [(0x100u64, 700usize), (0xf000, 0x2000), (0x1a000, 1860)];
        let total: usize = pieces.iter().map(|p| p.1).sum();
        assert_eq!(total % 512, 0);
        type Mem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
        fn slices<'m>(mem: &'m Mem, pieces: &[(u64, usize)]) -> Vec<GuestBuf<'m>> {
            let mut v = Vec::new();
            for &(a, n) in pieces {
                for s in
                    GuestMemory::get_slices(mem, GuestAddress(a), n, Permissions::Write).unwrap()
                {
                    v.push(s.unwrap());
                }
            }
            v
        }
        let data: Vec<u8> = (0..total as u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut at = 0;
        for &(a, n) in &pieces {
            mem.write_slice(&data[at..at + n], GuestAddress(a)).unwrap();
            at += n;
        }
        let bufs = slices(&mem, &pieces);
        assert_eq!(bufs.len(), 4, "the middle piece spans two regions");
        d.write_vectored_at(&bufs, 8192).unwrap();
        let mut back = vec![0; total];
        d.read_at(&mut back, 8192).unwrap();
        assert_eq!(back, data);

        // Read a different disk range back into the same buffers; compare to read_at.
        let other: Vec<u8> = (0..total as u32).map(|i| (i * 3) as u8).collect();
        d.write_at(&other, 65536).unwrap();
        for region in mem.iter() {
            vm_memory::MmapRegion::bitmap(region).reset();
        }
        d.read_vectored_at(&bufs, 65536).unwrap();
        let mut got = Vec::new();
        for &(a, n) in &pieces {
            let mut p = vec![0; n];
            mem.read_slice(&mut p, GuestAddress(a)).unwrap();
            got.extend(p);
            let region = mem.find_region(GuestAddress(a)).unwrap();
            assert!(region
                .bitmap()
                .dirty_at((a - region.start_addr().0) as usize));
        }
        assert_eq!(got, other);

        // The fallback (what backends without a vectored path use) agrees.
        let mem2 = guest();
        let bufs2 = slices(&mem2, &pieces);
        crate::read_vectored_by_copy(&d, &bufs2, 65536).unwrap();
        for &(a, n) in &pieces {
            let (mut p, mut q) = (vec![0; n], vec![0; n]);
            mem.read_slice(&mut p, GuestAddress(a)).unwrap();
            mem2.read_slice(&mut q, GuestAddress(a)).unwrap();
            assert_eq!(p, q);
        }

        // Past the end: refused, nothing written into guest memory.
        mem.write_slice(&vec![0xaa; 700], GuestAddress(0x100))
            .unwrap();
        assert!(matches!(
            d.read_vectored_at(&bufs, (1 << 20) - 512),
            Err(BlockError::OutOfRange { .. })
        ));
        let mut p = vec![0; 700];
        mem.read_slice(&mut p, GuestAddress(0x100)).unwrap();
        assert!(p.iter().all(|&b| b == 0xaa));
    }
}
