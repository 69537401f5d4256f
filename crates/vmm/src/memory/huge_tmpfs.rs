//! Guest RAM in 2 MiB pages, without asking the host to change a setting.
//!
//! Why: KVM (shadow paging under KVM-PVM here) maps guest RAM with 2 MiB entries only where the
//! guest's page tables use 2 MiB pages *and* the VMM's own mapping of that RAM is a 2 MiB host
//! mapping. A memfd lives on the kernel's internal tmpfs, whose huge pages follow
//! `transparent_hugepage/shmem_enabled` — `never` on many hosts, this one included — so each
//! guest page is a 4 KiB host page, and a guest whose RAM arrived from elsewhere (a migration)
//! pays one KVM fault per 4 KiB on its first touch of each page instead of one per 2 MiB
//! (docs/migration-performance.md, "The guest after the resume").
//!
//! A tmpfs mount's `huge=` option overrides that setting for the files on it. So the RAM file
//! is made on a tmpfs of its own, `huge=within_size`, created with the new mount API
//! (`fsopen`/`fsconfig`/`fsmount`): the mount is attached to no directory and lives exactly as
//! long as the file, so nothing appears on the host and nothing is left behind. It needs
//! CAP_SYS_ADMIN; without it the caller falls back to a memfd.
//!
//! The file is an ordinary shmem file, as a memfd is: `pread`/`pwrite`, hole punching,
//! userfaultfd and passing it to vhost-user back ends all work the same. It is named
//! `vireo-guest-ram` (then unlinked), so it shows in `/proc/<pid>/maps` as
//! `/vireo-guest-ram (deleted)` where a memfd shows `/memfd:vireo-guest-ram (deleted)`.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

const NAME: &CStr = c"vireo-guest-ram";
/// Above the guest's size in the tmpfs' limit. tmpfs charges a page to the limit before it
/// knows whether another thread filled the same page first, and takes the charge back after:
/// a lazy restore's threads (fault server, readahead, working set) filling the last pages of a
/// full file at once failed with ENOMEM (`UFFDIO_COPY`) when the limit was exactly the size.
/// Each racing fill holds at most one charge of up to 2 MiB, so this is room for 32. The limit
/// reserves nothing; the file never holds more than its size.
const RACE_HEADROOM: u64 = 64 << 20;

fn fd_from(r: libc::c_long, what: &str) -> io::Result<OwnedFd> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    // SAFETY: a descriptor the kernel just returned to us and nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as libc::c_int) })
}

fn set(fs: &OwnedFd, key: &CStr, value: &CStr) -> io::Result<()> {
    // SAFETY: plain syscall; key and value are NUL-terminated strings that outlive it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("tmpfs option {key:?}={value:?}: {e}"),
        ));
    }
    Ok(())
}

/// A `size`-byte file on a private tmpfs that backs it with 2 MiB pages where it can.
pub fn create(size: u64) -> io::Result<File> {
    // SAFETY: plain syscall with a NUL-terminated file system name.
    let fs = fd_from(
        unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) },
        "fsopen(tmpfs)",
    )?;
    set(&fs, c"huge", c"within_size")?;
    // The file system holds this one file: its limit is the guest's size (tmpfs' default,
    // half the host's RAM, would refuse a larger guest's pages) plus room for racing fills.
    let limit =
        std::ffi::CString::new((size + RACE_HEADROOM).to_string()).expect("digits contain no NUL");
    set(&fs, c"size", &limit)?;
    // SAFETY: plain syscall; no pointers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("creating the tmpfs: {e}")));
    }
    // SAFETY: plain syscall; no pointers.
    let mnt = fd_from(
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            )
        },
        "fsmount",
    )?;
    // SAFETY: plain syscall; the name is NUL-terminated.
    let fd = fd_from(
        unsafe {
            libc::openat(
                mnt.as_raw_fd(),
                NAME.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o600,
            )
        }
        .into(),
        "creating the RAM file",
    )?;
    // SAFETY: plain syscall; the name is NUL-terminated. Unlinked at once: the open file
    // keeps it (and the mount) alive, and its end frees both.
    if unsafe { libc::unlinkat(mnt.as_raw_fd(), NAME.as_ptr(), 0) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("unlinking the RAM file: {e}"),
        ));
    }
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn huge_pages_of_this_process_shmem() -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
        let line = smaps.lines().find(|l| l.starts_with("ShmemPmdMapped:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// The file, or `None` (recorded as a skip) where this process may not mount.
    fn create_or_skip(size: u64) -> Option<File> {
        match create(size) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                vireo_testkit::skip_env("CAP_SYS_ADMIN (root) to create a private tmpfs");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn writes_land_in_2mib_pages_and_read_back() {
        let Some(file) = create_or_skip(32 << 20) else {
            return;
        };
        assert_eq!(file.metadata().unwrap().len(), 32 << 20);
        let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&data, 4 << 20).unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 4 << 20).unwrap();
        assert_eq!(back, data);
        // Mapped and touched, the region is one PMD mapping: what KVM needs to map it whole.
        let before = huge_pages_of_this_process_shmem().unwrap_or(0);
        let ram = crate::memory::GuestRam::with_backing(32 << 20, crate::memory::RamBacking::Huge)
            .unwrap();
        ram.memfd.write_all_at(&data, 4 << 20).unwrap();
        let host = crate::memory::regions(&ram.memory)[0].2;
        assert_eq!(host % (2 << 20), 0, "mapping not 2 MiB-aligned: {host:#x}");
        // SAFETY: reads one byte inside the live mapping of guest RAM.
        let byte = unsafe { std::ptr::read_volatile((host + (4 << 20) + 7) as *const u8) };
        assert_eq!(byte, 7);
        let after = huge_pages_of_this_process_shmem().unwrap_or(0);
        assert!(
            after >= before + 2048,
            "no 2 MiB mapping appeared ({before} -> {after} KiB ShmemPmdMapped)"
        );
    }

    #[test]
    fn the_size_limit_is_the_guest_size_and_the_headroom() {
        let Some(file) = create_or_skip(4 << 20) else {
            return;
        };
        file.write_all_at(&[1u8; 4096], (4 << 20) - 4096).unwrap();
        // Past the end grows the file, which the tmpfs refuses once it is full.
        let past = vec![1u8; (RACE_HEADROOM + (4 << 20)) as usize];
        assert!(file.write_all_at(&past, 4 << 20).is_err());
    }
}
