//! bzImage kernels (Linux boot protocol ≥ 2.06) and the zero page shared with plain vmlinux ELF
//! boot: setup header, e820 map, command line and initrd fields.

use std::fs::File;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::GuestAddress;

use super::layout::{low_ram_end, memory_map, CMDLINE_ADDR, HIMEM_START, ZERO_PAGE_ADDR};
use super::{load_initrd, write_cmdline, BootEntry, BootInfo, BootSpec};
use crate::error::{Result, VmmError};
use crate::GuestMemory;

const BOOT_FLAG: u16 = 0xaa55;
const HDR_MAGIC: u32 = 0x5372_6448;
const LOADER_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Default `initrd_addr_max` for protocols that do not state one.
const DEFAULT_INITRD_ADDR_MAX: u32 = 0x37ff_ffff;
/// Offset of the 64-bit entry point (startup_64) in the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Oldest boot protocol with a 64-bit entry and `cmdline_size` (Linux 2.6.22).
const MIN_PROTOCOL: u16 = 0x0206;

pub(super) fn load(
    mem: &GuestMemory,
    file: &mut File,
    path: &str,
    spec: &BootSpec,
    cmdline: &Cmdline,
) -> Result<BootInfo> {
    let loaded = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        VmmError::KernelFormat {
            path: path.to_string(),
            reason: format!("{e}"),
        }
    })?;
    let hdr = loaded.setup_header.ok_or_else(|| VmmError::KernelFormat {
        path: path.to_string(),
        reason: "bzImage without setup header".into(),
    })?;
    let version = hdr.version;
    if version < MIN_PROTOCOL {
        return Err(VmmError::KernelFormat {
            path: path.to_string(),
            reason: format!(
                "boot protocol {version:#x} is too old (need {MIN_PROTOCOL:#x}, Linux 2.6.22+)"
            ),
        });
    }
    let initrd = match spec.initrd {
        Some(p) => {
            let addr_max = match hdr.initrd_addr_max {
                0 => DEFAULT_INITRD_ADDR_MAX,
                n => n,
            };
            let limit = low_ram_end(spec.ram_size).min(u64::from(addr_max) + 1);
            // The kernel decompresses in place and needs `init_size` bytes from its load
            // address; an initrd inside that range would be overwritten.
            let kernel_extent = loaded
                .kernel_end
                .max(loaded.kernel_load.0 + u64::from(hdr.init_size));
            Some(load_initrd(mem, p, kernel_extent, limit)?)
        }
        None => None,
    };
    let zero_page = write_boot_params(mem, hdr, spec.ram_size, cmdline, initrd)?;
    super::paging::write_long_mode_tables(mem)?;
    Ok(BootInfo {
        entry: BootEntry::Linux64 {
            entry: loaded.kernel_load.0 + STARTUP_64_OFFSET,
            boot_params: zero_page,
        },
        kernel_start: loaded.kernel_load.0,
        kernel_end: loaded.kernel_end,
        initrd,
    })
}

/// Fills and writes the zero page from `hdr` (the image's setup header, or a default one for a
/// vmlinux); returns its address.
pub(super) fn write_boot_params(
    mem: &GuestMemory,
    hdr: setup_header,
    ram_size: u64,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
) -> Result<u64> {
    let cmdline_len = write_cmdline(mem, cmdline)?;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = memory_map(ram_size);
    if map.len() > params.e820_table.len() {
        return Err(VmmError::BootSetup("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&bp, mem)
        .map_err(|e| VmmError::BootSetup(format!("zero page: {e}")))?;
    Ok(ZERO_PAGE_ADDR)
}
