//! Loader layout tests: where the kernel, command line, boot information and initrd land for
//! each image format (real Linux cannot boot on KVM-PVM, so the layout is checked here).

use std::path::Path;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use super::*;
use crate::memory::GuestRam;
use crate::test_images;

fn write(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn read_cstr(mem: &GuestMemory, addr: u64) -> String {
    let mut out = Vec::new();
    for i in 0..CMDLINE_MAX as u64 {
        let b: u8 = mem.read_obj(GuestAddress(addr + i)).unwrap();
        if b == 0 {
            break;
        }
        out.push(b);
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn pvh_elf_gets_start_info_memmap_cmdline_and_initrd_module() {
    let dir = tempfile::tempdir().unwrap();
    let code = test_images::hello_poweroff(0);
    let kernel = write(dir.path(), "k.elf", &test_images::pvh_elf(&code));
    let initrd = write(dir.path(), "initrd", &[0x5a; 10_000]);
    let ram = GuestRam::new(64 << 20).unwrap();
    let info = load(
        &ram.memory,
        &BootSpec {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5",
            ram_size: 64 << 20,
        },
    )
    .unwrap();
    assert_eq!(
        info.entry,
        BootEntry::Pvh {
            entry: test_images::LOAD_ADDR,
            start_info: PVH_INFO_ADDR
        }
    );
    let mut loaded = vec![0u8; code.len()];
    ram.memory
        .read_slice(&mut loaded, GuestAddress(test_images::LOAD_ADDR))
        .unwrap();
    assert_eq!(loaded, code);

    let si: hvm_start_info = ram.memory.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
    assert_eq!(si.magic, 0x336e_c578);
    assert!(si.version >= 1);
    assert_eq!(
        read_cstr(&ram.memory, si.cmdline_paddr),
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
    );
    let n = si.memmap_entries as usize;
    let entries: Vec<hvm_memmap_table_entry> = (0..n)
        .map(|i| {
            ram.memory
                .read_obj(GuestAddress(si.memmap_paddr + 24 * i as u64))
                .unwrap()
        })
        .collect();
    let last = entries.last().unwrap();
    assert_eq!((last.addr + last.size, last.type_), (64 << 20, E820_RAM));

    let (addr, size) = info.initrd.unwrap();
    assert_eq!(size, 10_000);
    assert_eq!(addr % 4096, 0);
    assert!(addr >= info.kernel_end && addr + size <= 64 << 20);
    assert_eq!(si.nr_modules, 1);
    let m: linux_loader::loader::elf::start_info::hvm_modlist_entry =
        ram.memory.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
    assert_eq!((m.paddr, m.size), (addr, size));
    let b: u8 = ram.memory.read_obj(GuestAddress(addr + 9_999)).unwrap();
    assert_eq!(b, 0x5a);
}

#[test]
fn bzimage_gets_zero_page_e820_cmdline_and_initrd_under_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let payload = vec![0x90u8; 64 * 1024];
    // A kernel that accepts initrds only below 32 MiB, in a 128 MiB guest.
    let kernel = write(
        dir.path(),
        "bzImage",
        &test_images::bzimage(&payload, (32 << 20) - 1, 4 << 20),
    );
    let initrd = write(dir.path(), "initrd", &vec![0xa5; 3 << 20]);
    let ram = GuestRam::new(128 << 20).unwrap();
    let info = load(
        &ram.memory,
        &BootSpec {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0 panic=1",
            ram_size: 128 << 20,
        },
    )
    .unwrap();
    assert_eq!(
        info.entry,
        BootEntry::Linux64 {
            entry: 0x10_0000 + 0x200,
            boot_params: ZERO_PAGE_ADDR
        }
    );
    assert_eq!(info.kernel_end, 0x10_0000 + payload.len() as u64);
    let bp: boot_params = ram.memory.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    let hdr = bp.hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!(hdr.type_of_loader, 0xff);
    assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_ADDR);
    assert_eq!({ hdr.cmdline_size }, "console=ttyS0 panic=1".len() as u32);
    assert_eq!(
        read_cstr(&ram.memory, CMDLINE_ADDR),
        "console=ttyS0 panic=1"
    );
    let (rd_addr, rd_size) = ({ hdr.ramdisk_image } as u64, { hdr.ramdisk_size } as u64);
    assert_eq!(Some((rd_addr, rd_size)), info.initrd);
    assert_eq!(rd_size, 3 << 20);
    assert_eq!(rd_addr % 4096, 0);
    assert!(
        rd_addr + rd_size <= 32 << 20,
        "initrd above initrd_addr_max"
    );
    assert!(rd_addr >= info.kernel_end, "initrd overlaps the kernel");

    let n = bp.e820_entries as usize;
    let e820: Vec<_> = bp.e820_table[..n]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect();
    assert_eq!(
        e820,
        vec![
            (0, EBDA_START, E820_RAM),
            (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
            (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
        ]
    );
    // Long-mode tables are in place: PML4[0] -> PDPT, first PD entry maps 0 with a 2 MiB page.
    let pml4: u64 = ram.memory.read_obj(GuestAddress(PML4_ADDR)).unwrap();
    assert_eq!(pml4, PDPT_ADDR | 3);
    let pd0: u64 = ram.memory.read_obj(GuestAddress(PD_ADDR)).unwrap();
    assert_eq!(pd0, 0x83);
}

#[test]
fn initrd_that_does_not_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write(
        dir.path(),
        "bzImage",
        &test_images::bzimage(&[0; 4096], 0x37ff_ffff, 1 << 20),
    );
    let initrd = write(dir.path(), "initrd", &vec![0; 20 << 20]);
    let ram = GuestRam::new(16 << 20).unwrap();
    let err = load(
        &ram.memory,
        &BootSpec {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "",
            ram_size: 16 << 20,
        },
    )
    .unwrap_err();
    assert!(matches!(err, VmmError::InitrdTooLarge { .. }), "{err}");
}

#[test]
fn initrd_stays_clear_of_the_decompressing_kernel() {
    // 16 MiB guest, kernel at 1 MiB needing 12 MiB to decompress: a 4 MiB initrd would have
    // to overlap it (only 3 MiB are left), so it is refused rather than placed at 12 MiB.
    let dir = tempfile::tempdir().unwrap();
    let kernel = write(
        dir.path(),
        "bzImage",
        &test_images::bzimage(&[0; 4096], 0x37ff_ffff, 12 << 20),
    );
    let spec = |initrd: &Path| {
        let ram = GuestRam::new(16 << 20).unwrap();
        load(
            &ram.memory,
            &BootSpec {
                kernel: &kernel,
                initrd: Some(initrd),
                cmdline: "",
                ram_size: 16 << 20,
            },
        )
    };
    let big = write(dir.path(), "big", &vec![0; 4 << 20]);
    assert!(matches!(spec(&big), Err(VmmError::InitrdTooLarge { .. })));
    let small = write(dir.path(), "small", &vec![0; 2 << 20]);
    let (addr, _) = spec(&small).unwrap().initrd.unwrap();
    assert!(addr >= (1 << 20) + (12 << 20), "initrd at {addr:#x}");
}

#[test]
fn garbage_missing_and_oversized_kernels_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ram = GuestRam::new(16 << 20).unwrap();
    let spec = |k: &'static str| (dir.path().join(k), k);
    let try_load = |p: &Path| {
        load(
            &ram.memory,
            &BootSpec {
                kernel: p,
                initrd: None,
                cmdline: "",
                ram_size: 16 << 20,
            },
        )
    };
    let (missing, _) = spec("missing");
    assert!(matches!(
        try_load(&missing),
        Err(VmmError::KernelOpen { .. })
    ));
    let garbage = write(dir.path(), "garbage", b"this is not a kernel at all");
    assert!(matches!(
        try_load(&garbage),
        Err(VmmError::KernelFormat { .. })
    ));
    let empty = write(dir.path(), "empty", b"");
    assert!(matches!(
        try_load(&empty),
        Err(VmmError::KernelFormat { .. })
    ));
    // Truncated ELF: valid magic, header cut short.
    let elf = test_images::pvh_elf(&[0xf4]);
    let trunc = write(dir.path(), "trunc.elf", &elf[..40]);
    assert!(matches!(
        try_load(&trunc),
        Err(VmmError::KernelFormat { .. })
    ));
    // A segment far beyond guest RAM.
    let mut far = elf.clone();
    far[64 + 24..64 + 32].copy_from_slice(&(1u64 << 40).to_le_bytes()); // p_paddr
    let far = write(dir.path(), "far.elf", &far);
    assert!(matches!(try_load(&far), Err(VmmError::KernelFormat { .. })));
    assert!(matches!(
        try_load(dir.path()),
        Err(VmmError::KernelFormat { .. })
    ));
}

#[test]
fn elf_without_pvh_note_boots_through_the_64_bit_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let mut elf = test_images::pvh_elf(&[0xf4]);
    // Turn the PT_NOTE into PT_NULL: a plain vmlinux-style image.
    elf[64 + 56..64 + 60].copy_from_slice(&0u32.to_le_bytes());
    let kernel = write(dir.path(), "vmlinux", &elf);
    let ram = GuestRam::new(32 << 20).unwrap();
    let info = load(
        &ram.memory,
        &BootSpec {
            kernel: &kernel,
            initrd: None,
            cmdline: "x=1",
            ram_size: 32 << 20,
        },
    )
    .unwrap();
    assert_eq!(
        info.entry,
        BootEntry::Linux64 {
            entry: test_images::LOAD_ADDR,
            boot_params: ZERO_PAGE_ADDR
        }
    );
    let bp: boot_params = ram.memory.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    assert_eq!({ bp.hdr.cmd_line_ptr } as u64, CMDLINE_ADDR);
    assert_eq!(bp.e820_entries, 3);
}
