//! The probe ELF as a PVH loader sees it: 64-bit static executable at 1 MiB, a PT_NOTE with the
//! XEN_ELFNOTE_PHYS32_ENTRY note pointing at the 32-bit entry, everything below 8 MiB.

use vireo_probe_image::probe_elf;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

#[test]
fn probe_elf_is_a_pvh_image_below_8_mib() {
    let elf = std::fs::read(probe_elf()).expect("the build script produced the probe ELF");
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "ELFCLASS64");
    assert_eq!(u16_at(&elf, 16), 2, "ET_EXEC");
    assert_eq!(u16_at(&elf, 18), 62, "EM_X86_64");
    let entry = u64_at(&elf, 24);
    let (phoff, phentsize, phnum) = (
        u64_at(&elf, 32) as usize,
        u16_at(&elf, 54) as usize,
        u16_at(&elf, 56),
    );
    let mut pvh_entry = None;
    let mut loads = 0;
    for i in 0..phnum as usize {
        let ph = &elf[phoff + i * phentsize..];
        let (kind, offset, paddr, filesz, memsz) = (
            u32_at(ph, 0),
            u64_at(ph, 8) as usize,
            u64_at(ph, 24),
            u64_at(ph, 32) as usize,
            u64_at(ph, 40),
        );
        match kind {
            PT_LOAD => {
                loads += 1;
                assert!(
                    paddr >= 0x10_0000 && paddr + memsz <= 0x80_0000,
                    "segment {paddr:#x}+{memsz:#x}"
                );
            }
            PT_NOTE => {
                let mut notes = &elf[offset..offset + filesz];
                while notes.len() >= 12 {
                    let (namesz, descsz, ty) = (
                        u32_at(notes, 0) as usize,
                        u32_at(notes, 4) as usize,
                        u32_at(notes, 8),
                    );
                    let name_end = 12 + namesz.next_multiple_of(4);
                    if ty == 18 && &notes[12..12 + namesz] == b"Xen\0" {
                        pvh_entry = Some(u32_at(notes, name_end));
                    }
                    notes = &notes[(name_end + descsz.next_multiple_of(4)).min(notes.len())..];
                }
            }
            _ => {}
        }
    }
    assert!(loads >= 1);
    let pvh_entry = pvh_entry.expect("XEN_ELFNOTE_PHYS32_ENTRY note");
    assert_eq!(pvh_entry as u64, entry);
    assert_eq!(pvh_entry, 0x10_0000);
}
