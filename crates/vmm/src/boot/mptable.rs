//! Intel MultiProcessor Specification 1.4 tables, so a Linux guest without ACPI finds its
//! application processors, the IOAPIC and how the 24 IOAPIC pins are wired (all ISA bus IRQs,
//! identity-mapped). Placed in the BIOS area at 0xF0000, where Linux scans for `_MP_`; the e820
//! map marks the whole 640K–1M range reserved, so no guest uses it as RAM.

use vm_memory::{Bytes, GuestAddress};

use crate::error::{Result, VmmError};
use crate::GuestMemory;

/// Where the floating pointer goes; the configuration table follows it.
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// End of the BIOS area the tables must fit in.
const MPTABLE_LIMIT: u64 = 0x10_0000;
/// MP tables carry 8-bit APIC ids; the IOAPIC takes the id after the last CPU.
pub const MAX_MP_CPUS: usize = 254;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REV: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// CPUID signature (family 6) and features (FPU, APIC) reported per processor.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The configuration table body (header + entries) for `cpus` processors, checksummed.
fn config_table(cpus: usize) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    let mut count = 0u16;
    for i in 0..cpus {
        let flags = CPU_ENABLED | if i == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, i as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // LINT0 of every CPU carries the PIC (ExtINT), LINT1 NMIs: as the vCPUs' LAPICs are set up.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = 44 + entries.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&(len as u16).to_le_bytes());
    t.push(SPEC_REV);
    t.push(0); // checksum, below
    t.extend_from_slice(b"VIREO   ");
    t.extend_from_slice(b"KVM VM      ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// Writes the floating pointer and configuration table for `cpus` vCPUs. More than
/// [`MAX_MP_CPUS`] cannot be described (8-bit APIC ids); then no table is written.
pub fn write(mem: &GuestMemory, cpus: usize) -> Result<()> {
    if cpus == 0 || cpus > MAX_MP_CPUS {
        tracing::warn!("{cpus} vCPUs do not fit an MP table; guests must rely on other means");
        return Ok(());
    }
    let table_addr = MPTABLE_ADDR + 16;
    let table = config_table(cpus);
    if table_addr + table.len() as u64 > MPTABLE_LIMIT {
        return Err(VmmError::BootSetup(
            "MP table does not fit below 1 MiB".into(),
        ));
    }
    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    let err = |e: vm_memory::GuestMemoryError| VmmError::BootSetup(format!("MP table: {e}"));
    mem.write_slice(&fp, GuestAddress(MPTABLE_ADDR))
        .map_err(err)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::{memory_map, E820_RESERVED};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_describe_every_cpu() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write(&mem, 4).unwrap();
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(MPTABLE_ADDR)).unwrap();
        assert_eq!(&fp[..4], b"_MP_");
        assert_eq!(sum(&fp), 0);
        let table_addr = u32::from_le_bytes(fp[4..8].try_into().unwrap()) as u64;
        let mut head = [0u8; 44];
        mem.read_slice(&mut head, GuestAddress(table_addr)).unwrap();
        assert_eq!(&head[..4], b"PCMP");
        let len = u16::from_le_bytes([head[4], head[5]]) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(sum(&table), 0);
        assert!(table_addr + len as u64 <= MPTABLE_LIMIT);
        // Walk the entries.
        let count = u16::from_le_bytes([head[34], head[35]]) as usize;
        let (mut at, mut cpus, mut bsp, mut ints, mut ioapic) = (44, 0, 0, 0, None);
        for _ in 0..count {
            match table[at] {
                ENTRY_PROCESSOR => {
                    assert_eq!(table[at + 1], cpus as u8, "APIC ids in order");
                    cpus += 1;
                    bsp += usize::from(table[at + 3] & CPU_BSP != 0);
                    at += 20;
                }
                ENTRY_IOAPIC => {
                    ioapic = Some(table[at + 1]);
                    at += 8;
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(table[at + 5], table[at + 7], "identity-mapped pins");
                    ints += 1;
                    at += 8;
                }
                ENTRY_BUS | ENTRY_LOCAL_INTERRUPT => at += 8,
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!(at, len);
        assert_eq!((cpus, bsp, ints, ioapic), (4, 1, 24, Some(4)));
    }

    #[test]
    fn lives_in_reserved_memory_and_fits_for_the_maximum() {
        let map = memory_map(64 << 20);
        assert!(map.iter().any(|e| e.kind == E820_RESERVED
            && e.addr <= MPTABLE_ADDR
            && MPTABLE_ADDR + 16 + config_table(MAX_MP_CPUS).len() as u64 <= e.addr + e.size));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        write(&mem, MAX_MP_CPUS).unwrap();
        write(&mem, MAX_MP_CPUS + 1).unwrap(); // skipped, not an error
    }
}
