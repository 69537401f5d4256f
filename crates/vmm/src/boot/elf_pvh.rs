//! ELF kernels: with a PVH note they are entered in 32-bit mode with an `hvm_start_info`
//! (the probe, PVH-capable vmlinux); without one, through the Linux 64-bit boot protocol at the
//! ELF entry point with a zero page.

use std::fs::File;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use super::layout::{
    low_ram_end, memory_map, CMDLINE_ADDR, HIMEM_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR,
    PVH_MEMMAP_MAX,
};
use super::{bzimage, load_initrd, write_cmdline, BootEntry, BootInfo, BootSpec};
use crate::error::{Result, VmmError};
use crate::GuestMemory;

const PVH_MAGIC: u32 = 0x336e_c578;
/// Module list goes right after the memory map table.
const PVH_MODLIST_ADDR: u64 = PVH_MEMMAP_ADDR + (PVH_MEMMAP_MAX * 24) as u64;
/// Highest initrd end for PVH guests: Linux PVH copes with any low address; stay below 4 GiB.
const PVH_INITRD_LIMIT: u64 = 0xffff_ffff;

pub(super) fn load(
    mem: &GuestMemory,
    file: &mut File,
    path: &str,
    spec: &BootSpec,
    cmdline: &Cmdline,
) -> Result<BootInfo> {
    let loaded = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        VmmError::KernelFormat {
            path: path.to_string(),
            reason: format!("{e} (is it a 64-bit ELF whose segments fit in guest memory?)"),
        }
    })?;
    let kernel_end = loaded.kernel_end;
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(
            mem,
            p,
            kernel_end,
            low_ram_end(spec.ram_size).min(PVH_INITRD_LIMIT),
        )?),
        None => None,
    };
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_cmdline(mem, cmdline)?;
            write_start_info(mem, spec.ram_size, initrd)?;
            Ok(BootInfo {
                entry: BootEntry::Pvh {
                    entry: entry.0,
                    start_info: PVH_INFO_ADDR,
                },
                kernel_start: loaded.kernel_load.0,
                kernel_end,
                initrd,
            })
        }
        _ => {
            let hdr = linux_loader::loader::bootparam::setup_header::default();
            let zero_page = bzimage::write_boot_params(mem, hdr, spec.ram_size, cmdline, initrd)?;
            super::paging::write_long_mode_tables(mem)?;
            Ok(BootInfo {
                entry: BootEntry::Linux64 {
                    entry: loaded.kernel_load.0,
                    boot_params: zero_page,
                },
                kernel_start: loaded.kernel_load.0,
                kernel_end,
                initrd,
            })
        }
    }
}

fn write_start_info(mem: &GuestMemory, ram_size: u64, initrd: Option<(u64, u64)>) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = memory_map(ram_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if initrd.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| VmmError::BootSetup(format!("PVH start info: {e}")))
}
