//! The mapped I/O path (`FileMap`, used by `RawFile` and VHDX): data written through the
//! mapping is what the file holds after a flush, and every range the kernel cannot fault in
//! (a read-only file, a file shrunk under the mapping, no space for a hole) falls back to the
//! system call, which reports the real error, instead of a SIGBUS killing the process. Where
//! a copy faults, `FileMap::faults` proves the SIGBUS happened and was caught, not avoided.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vireo_block::{BlockBackend, BlockError, FileMap, GuestBuf, RawFile};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    Permissions,
};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const MIB: u64 = 1 << 20;

fn guest() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap()
}

/// Guest buffers for `len` bytes at guest address 0x1000, split in two uneven pieces so a
/// request is more than one slice.
fn bufs(mem: &Mem, len: usize) -> Vec<GuestBuf<'_>> {
    let first = len / 3;
    [(0x1000u64, first), (0x20000, len - first)]
        .iter()
        .flat_map(|&(a, n)| {
            GuestMemory::get_slices(mem, GuestAddress(a), n, Permissions::Write).unwrap()
        })
        .map(Result::unwrap)
        .collect()
}

fn fill(mem: &Mem, len: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let first = len / 3;
    mem.write_slice(&data[..first], GuestAddress(0x1000))
        .unwrap();
    mem.write_slice(&data[first..], GuestAddress(0x20000))
        .unwrap();
    data
}

fn guest_bytes(mem: &Mem, len: usize) -> Vec<u8> {
    let first = len / 3;
    let mut v = vec![0; len];
    mem.read_slice(&mut v[..first], GuestAddress(0x1000))
        .unwrap();
    mem.read_slice(&mut v[first..], GuestAddress(0x20000))
        .unwrap();
    v
}

fn image(dir: &Path, len: u64) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    File::create(&p).unwrap().set_len(len).unwrap();
    p
}

/// Drops the file's clean pages, so a read afterwards comes from the device, not the cache.
fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap();
    // SAFETY: fadvise on a descriptor we own; no memory passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

#[test]
fn writes_through_the_mapping_are_in_the_file_after_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 4 * MIB);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let map = FileMap::new(&file);
    let mem = guest();
    let data = fill(&mem, 12288, 7);
    assert!(map.write(&file, &bufs(&mem, 12288), 3 * MIB + 4096));
    assert!(
        map.mapped_len() as u64 >= 4 * MIB,
        "the copy went through the mapping"
    );
    file.sync_data().unwrap();
    drop_cache(&path);
    let mut back = vec![0; 12288];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut back, 3 * MIB + 4096)
        .unwrap();
    assert_eq!(back, data);

    // The same through the backend's flush, after a 1 MiB write.
    drop((map, file));
    let disk = RawFile::open(&path, false).unwrap();
    let mem = guest();
    let data = fill(&mem, MIB as usize / 8, 9);
    disk.write_vectored_at(&bufs(&mem, data.len()), MIB)
        .unwrap();
    disk.flush().unwrap();
    drop_cache(&path);
    let mut back = vec![0; data.len()];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut back, MIB)
        .unwrap();
    assert_eq!(back, data);
}

#[test]
fn reads_copy_the_file_and_mark_guest_pages_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), MIB);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 5 + 1) as u8).collect();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&pattern, 65536)
        .unwrap();
    let file = File::open(&path).unwrap();
    let map = FileMap::new(&file);
    let mem = guest();
    for r in mem.iter() {
        vm_memory::MmapRegion::bitmap(r).reset();
    }
    assert!(map.read(&file, &bufs(&mem, 8192), 65536));
    assert_eq!(guest_bytes(&mem, 8192), pattern);
    let region = mem.find_region(GuestAddress(0x20000)).unwrap();
    assert!(region.bitmap().dirty_at(0x20000) && region.bitmap().dirty_at(0x1000));
}

#[test]
fn a_read_only_file_is_mapped_read_only_and_refuses_mapped_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), MIB);
    let file = File::open(&path).unwrap();
    let map = FileMap::new(&file);
    let mem = guest();
    fill(&mem, 4096, 1);
    assert!(
        !map.write(&file, &bufs(&mem, 4096), 0),
        "no writes through a read-only open"
    );
    assert!(map.read(&file, &bufs(&mem, 4096), 0));
    assert!(guest_bytes(&mem, 4096).iter().all(|&b| b == 0));
    let ro = RawFile::open(&path, true).unwrap();
    assert!(matches!(
        ro.write_vectored_at(&bufs(&mem, 4096), 0),
        Err(BlockError::ReadOnly)
    ));
}

/// Another descriptor truncates the file under a live mapping: the copy faults, the request
/// takes `preadv`, and the guest gets its error (the file ended early), not a SIGBUS.
#[test]
fn a_file_shrunk_by_another_descriptor_falls_back_with_the_real_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 2 * MIB);
    let disk = RawFile::open(&path, false).unwrap();
    let mem = guest();
    let data = fill(&mem, 8192, 3);
    disk.write_vectored_at(&bufs(&mem, 8192), MIB + 8192)
        .unwrap();
    let mut back = vec![0; 8192];
    disk.read_at(&mut back, MIB + 8192).unwrap();
    assert_eq!(back, data);

    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(64 * 1024)
        .unwrap();
    let err = disk
        .read_vectored_at(&bufs(&mem, 8192), MIB + 8192)
        .unwrap_err();
    assert!(
        matches!(&err, BlockError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
        "{err}"
    );
    // The map alone says it cannot serve, for reads and writes.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let map = FileMap::new(&file);
    assert!(
        map.read(&file, &bufs(&mem, 4096), 0),
        "inside the file it still works"
    );
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert_eq!(map.faults(), 0);
    assert!(!map.read(&file, &bufs(&mem, 4096), 32768));
    assert_eq!(map.faults(), 1, "the read copy faulted and was redirected");
    assert!(!map.write(&file, &bufs(&mem, 4096), 32768));
    assert_eq!(map.faults(), 2, "the write copy faulted and was redirected");
    // A range straddling the new end faults part-way; the part before it is still served.
    assert!(!map.read(&file, &bufs(&mem, 8192), 0));
    assert_eq!(map.faults(), 3);
    assert!(map.read(&file, &bufs(&mem, 4096), 0));
    assert_eq!(map.faults(), 3);
    // A write falls back to pwritev, which extends the file as it always did.
    let data = fill(&mem, 8192, 3);
    disk.write_vectored_at(&bufs(&mem, 8192), MIB + 8192)
        .unwrap();
    disk.read_at(&mut back, MIB + 8192).unwrap();
    assert_eq!(back, data);
}

/// Resizing drops the mapping around the truncate; I/O afterwards maps the new size.
#[test]
fn resize_shrinks_and_grows_under_mapped_io() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 4 * MIB);
    let disk = RawFile::open(&path, false).unwrap();
    let mem = guest();
    let data = fill(&mem, 4096, 5);
    disk.write_vectored_at(&bufs(&mem, 4096), 3 * MIB).unwrap();
    disk.resize(MIB).unwrap();
    assert!(matches!(
        disk.read_vectored_at(&bufs(&mem, 4096), 3 * MIB),
        Err(BlockError::OutOfRange { .. })
    ));
    disk.write_vectored_at(&bufs(&mem, 4096), MIB - 4096)
        .unwrap();
    disk.resize(8 * MIB).unwrap();
    disk.read_vectored_at(&bufs(&mem, 4096), 3 * MIB).unwrap();
    assert!(
        guest_bytes(&mem, 4096).iter().all(|&b| b == 0),
        "the shrink dropped the data"
    );
    disk.read_vectored_at(&bufs(&mem, 4096), MIB - 4096)
        .unwrap();
    assert_eq!(guest_bytes(&mem, 4096), data);
    fill(&mem, 4096, 6);
    disk.write_vectored_at(&bufs(&mem, 4096), 8 * MIB - 4096)
        .unwrap();
    let mut back = vec![0; 4096];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut back, 8 * MIB - 4096)
        .unwrap();
    assert_eq!(back, guest_bytes(&mem, 4096));
}

/// A hole punched by a discard under the mapping reads as zeroes, and a later write to it
/// allocates again (the copy's page fault).
#[test]
fn discard_under_the_mapping_then_write_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), MIB);
    let disk = RawFile::open(&path, false).unwrap();
    let mem = guest();
    fill(&mem, 65536, 2);
    disk.write_vectored_at(&bufs(&mem, 65536), 0).unwrap();
    disk.discard(0, 65536).unwrap();
    disk.read_vectored_at(&bufs(&mem, 65536), 0).unwrap();
    assert!(guest_bytes(&mem, 65536).iter().all(|&b| b == 0));
    let data = fill(&mem, 65536, 4);
    disk.write_vectored_at(&bufs(&mem, 65536), 0).unwrap();
    disk.flush().unwrap();
    drop_cache(&path);
    let mut back = vec![0; 65536];
    File::open(&path)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert_eq!(back, data);
}

/// No space for a hole: the copy's page fault raises SIGBUS, which the guarded copy catches,
/// and the request's `pwritev` reports ENOSPC to the caller.
#[test]
fn no_space_for_a_hole_is_an_io_error_not_a_sigbus() {
    if !vireo_testkit::require(vireo_testkit::Need::Root) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = vireo_testkit::tmpfs::Tmpfs::mount(&dir.path().join("small"), "128k") else {
        panic!("mounting a tmpfs as root failed");
    };
    let path = image(fs.path(), 4 * MIB);
    let disk = RawFile::open(&path, false).unwrap();
    let mem = guest();
    fill(&mem, 0x30000, 8);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let map = FileMap::new(&file);
    assert!(
        !map.write(&file, &bufs(&mem, 0x30000), MIB),
        "the copy must fault"
    );
    assert_eq!(map.faults(), 1, "a SIGBUS was caught and redirected");
    let err = disk
        .write_vectored_at(&bufs(&mem, 0x30000), 2 * MIB)
        .unwrap_err();
    assert!(
        matches!(&err, BlockError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC)),
        "{err}"
    );
    // What fit before the space ran out is readable; the disk still works.
    disk.read_vectored_at(&bufs(&mem, 4096), 0).unwrap();
}
