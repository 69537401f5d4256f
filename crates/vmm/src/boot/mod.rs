//! Kernel loading: detects the image format (ELF with or without a PVH note, or bzImage), loads
//! it and its initrd, writes the command line and the boot information the entry protocol wants,
//! and says how the boot vCPU must start.

pub mod bzimage;
pub mod elf_pvh;
pub mod layout;
pub mod mptable;
pub mod paging;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Result, VmmError};
use crate::GuestMemory;
use layout::{CMDLINE_ADDR, CMDLINE_MAX};

/// How the boot vCPU (and, for PVH, every vCPU) starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, at `entry`, with EBX = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode with the low 4 GiB identity-mapped, RSI = `boot_params`.
    Linux64 { entry: u64, boot_params: u64 },
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    /// Full command line, device entries included.
    pub cmdline: &'a str,
    pub ram_size: u64,
}

/// Where things landed, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub entry: BootEntry,
    pub kernel_start: u64,
    pub kernel_end: u64,
    /// `(address, size)` of the initrd in guest memory.
    pub initrd: Option<(u64, u64)>,
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";

/// Loads the kernel described by `spec` into `mem`.
pub fn load(mem: &GuestMemory, spec: &BootSpec) -> Result<BootInfo> {
    let path = spec.kernel.display().to_string();
    let mut file = File::open(spec.kernel).map_err(|source| VmmError::KernelOpen {
        path: path.clone(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| VmmError::KernelOpen {
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(VmmError::KernelFormat {
            path,
            reason: "not a regular file".into(),
        });
    }
    let mut head = [0u8; 0x210];
    let n = read_up_to(&mut file, &mut head).map_err(|source| VmmError::KernelOpen {
        path: path.clone(),
        source,
    })?;
    let cmdline = build_cmdline(spec.cmdline)?;
    if n >= 4 && head[..4] == ELF_MAGIC {
        elf_pvh::load(mem, &mut file, &path, spec, &cmdline)
    } else if n >= BZIMAGE_MAGIC_OFFSET + 4
        && head[BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4] == BZIMAGE_MAGIC
    {
        bzimage::load(mem, &mut file, &path, spec, &cmdline)
    } else {
        Err(VmmError::KernelFormat {
            path,
            reason: "neither an ELF file nor a bzImage (no ELF magic, no 'HdrS' header)".into(),
        })
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn build_cmdline(text: &str) -> Result<Cmdline> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| VmmError::Cmdline(e.to_string()))?;
    if !text.trim().is_empty() {
        cmdline
            .insert_str(text.trim())
            .map_err(|e| VmmError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// Writes the command line at its fixed address; returns its length without the NUL.
fn write_cmdline(mem: &GuestMemory, cmdline: &Cmdline) -> Result<u32> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|e| VmmError::Cmdline(e.to_string()))?;
    let len = cmdline
        .as_cstring()
        .map_err(|e| VmmError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();
    Ok(len as u32)
}

/// Reads the initrd into the highest page-aligned spot below `limit` (exclusive) and above
/// `kernel_end`.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64, limit: u64) -> Result<(u64, u64)> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| VmmError::InitrdOpen {
        path: shown.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| VmmError::InitrdOpen {
            path: shown.clone(),
            source,
        })?
        .len();
    let start = limit
        .checked_sub(size)
        .map(|a| a & !(crate::memory::PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or(VmmError::InitrdTooLarge { size, limit })?;
    // Stream straight into guest memory: no host-side copy of a possibly large file.
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| VmmError::InitrdOpen {
            path: shown,
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((start, size))
}

#[cfg(test)]
mod tests;
