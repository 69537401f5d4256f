use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::LockKind;
use crate::{check_range, BlockBackend, BlockError};

/// A disk backed by a plain file (or block device) whose bytes are the disk's bytes.
///
/// Uses positioned I/O (`pread`/`pwrite`), so any number of threads can issue requests at once
/// without a lock.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: AtomicU64,
    read_only: bool,
    id: String,
}

impl RawFile {
    /// Opens `path`; with `read_only` the file is opened O_RDONLY and writes are refused.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
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
        Ok(RawFile {
            file,
            size: AtomicU64::new(size),
            read_only,
            id,
        })
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
        self.file.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
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
}
