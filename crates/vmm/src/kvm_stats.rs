//! KVM's per-VM statistics (the binary stats file of `KVM_GET_STATS_FD`, Linux 5.14+): read to
//! see how KVM maps guest RAM — `pages_4k` / `pages_2m` / `pages_1g` count the leaf entries of
//! each size KVM holds right now. Whether guest RAM is mapped 2 MiB at a time (which decides
//! how many faults a guest pays after its mappings are dropped) is otherwise invisible.
//!
//! The file: a header, then `num_desc` descriptors (fixed part + a `name_size`-byte name), then
//! the values (u64 each, at the descriptor's offset from `data_offset`). Read with `pread`, so
//! one descriptor serves any number of reads.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VmFd;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;

/// How KVM maps guest RAM at one moment: leaf entries of each page size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmPageStats {
    pub pages_4k: u64,
    pub pages_2m: u64,
    pub pages_1g: u64,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Opens the VM's stats file; `None` on a kernel without one.
pub(crate) fn open(vm: &VmFd) -> Option<File> {
    // SAFETY: an ioctl without arguments on a VM descriptor we own; the result is checked.
    let fd = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_STATS_FD, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor the kernel just returned to us and nobody else owns.
    Some(unsafe { File::from_raw_fd(fd) })
}

/// The page-size counters from a stats file; `None` if it cannot be read or has none of them.
pub(crate) fn read_pages(stats: &File) -> Option<KvmPageStats> {
    let mut header = [0u8; HEADER_LEN];
    stats.read_exact_at(&mut header, 0).ok()?;
    let name_size = le32(&header, 4)? as usize;
    let num_desc = le32(&header, 8)? as usize;
    let desc_offset = le32(&header, 16)? as u64;
    let data_offset = le32(&header, 20)? as u64;
    let desc_len = DESC_FIXED_LEN + name_size;
    let mut descs = vec![0u8; desc_len.checked_mul(num_desc)?];
    stats.read_exact_at(&mut descs, desc_offset).ok()?;
    let mut out = KvmPageStats::default();
    let mut found = false;
    for d in descs.chunks_exact(desc_len) {
        let name = &d[DESC_FIXED_LEN..];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        let slot = match name {
            b"pages_4k" => &mut out.pages_4k,
            b"pages_2m" => &mut out.pages_2m,
            b"pages_1g" => &mut out.pages_1g,
            _ => continue,
        };
        let offset = le32(d, 8)? as u64;
        let mut value = [0u8; 8];
        stats.read_exact_at(&mut value, data_offset + offset).ok()?;
        *slot = u64::from_le_bytes(value);
        found = true;
    }
    found.then_some(out)
}
