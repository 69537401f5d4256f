//! Identity page tables and a flat GDT for entering a kernel directly in 64-bit mode.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{GDT_ADDR, IDENTITY_MAP_GIB, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR};
use crate::error::{Result, VmmError};
use crate::GuestMemory;

/// GDT entries: null, null, 64-bit code (selector 0x10), data (0x18), TSS placeholder (0x20).
pub const GDT: [u64; 4] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // code: present, DPL0, exec/read, accessed, L=1, G=1
    0x00cf_9300_0000_ffff, // data: present, DPL0, read/write, accessed, D/B=1, G=1
];

/// Writes the GDT, an empty IDT and page tables mapping the low 4 GiB with 2 MiB pages.
pub fn write_long_mode_tables(mem: &GuestMemory) -> Result<()> {
    let err = |e: vm_memory::GuestMemoryError| VmmError::BootSetup(format!("page tables: {e}"));
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR)).map_err(err)?;
    // PML4[0] -> PDPT; PDPT[g] -> PD g; each PD maps 1 GiB with 512 2-MiB pages.
    mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    for g in 0..IDENTITY_MAP_GIB {
        let pd = PD_ADDR + g * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPT_ADDR + 8 * g))
            .map_err(err)?;
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            mem.write_obj(phys | 0x83, GuestAddress(pd + 8 * i))
                .map_err(err)?;
        }
    }
    Ok(())
}
