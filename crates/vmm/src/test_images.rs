//! Tiny hand-assembled guests for tests: a PVH ELF wrapping a few bytes of 32-bit code, and a
//! minimal bzImage shell. They prove the loader, the vCPU start state and the legacy devices
//! without depending on the probe build.

/// Guest-physical load address and entry of [`pvh_elf`] images.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Wraps 32-bit `code` in an ELF64 with one PT_LOAD at 1 MiB and a PVH note pointing at it.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let phoff = 64u64;
    let note_off = phoff + 2 * 56;
    let code_off = 0x100u64;
    let mut f = vec![0u8; code_off as usize];
    // ELF header.
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 62); // EM_X86_64
    put32(&mut f, 20, 1);
    put64(&mut f, 24, LOAD_ADDR); // e_entry
    put64(&mut f, 32, phoff);
    put16(&mut f, 52, 64); // e_ehsize
    put16(&mut f, 54, 56); // e_phentsize
    put16(&mut f, 56, 2); // e_phnum
                          // PT_LOAD.
    let p = phoff as usize;
    put32(&mut f, p, 1);
    put32(&mut f, p + 4, 7); // RWX
    put64(&mut f, p + 8, code_off);
    put64(&mut f, p + 16, LOAD_ADDR);
    put64(&mut f, p + 24, LOAD_ADDR);
    put64(&mut f, p + 32, code.len() as u64);
    put64(&mut f, p + 40, code.len() as u64);
    put64(&mut f, p + 48, 0x1000);
    // PT_NOTE.
    let p = p + 56;
    put32(&mut f, p, 4);
    put64(&mut f, p + 8, note_off);
    put64(&mut f, p + 32, 20);
    put64(&mut f, p + 40, 20);
    put64(&mut f, p + 48, 4);
    // The note: namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    let n = note_off as usize;
    put32(&mut f, n, 4);
    put32(&mut f, n + 4, 4);
    put32(&mut f, n + 8, 18);
    f[n + 12..n + 16].copy_from_slice(b"Xen\0");
    put32(&mut f, n + 16, LOAD_ADDR as u32);
    f.extend_from_slice(code);
    f
}

/// Checks EBX points at a PVH start info (magic), prints `OK\n` on COM1 and powers off with
/// `status`; on a bad start info powers off with 0xee instead.
pub fn hello_poweroff(status: u8) -> Vec<u8> {
    vec![
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], 0x336ec578
        0x75, 0x14, // jne bad
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al,'O'; out dx,al
        0xb0, b'K', 0xee, //
        0xb0, b'\n', 0xee, //
        0xb0, status, // mov al, status
        0xe6, 0xf4, // out 0xf4, al
        0xf4, 0xeb, 0xfd, // hlt; jmp $-1
        0xb0, 0xee, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, // bad: mov al,0xee; out 0xf4,al; hlt
    ]
}

/// Echoes every COM1 input byte back until it reads `q`, then powers off with status 7.
pub fn serial_echo() -> Vec<u8> {
    vec![
        0x66, 0xba, 0xfd, 0x03, // loop: mov dx, 0x3fd
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1
        0x74, 0xf7, // jz loop
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0x3c, b'q', // cmp al, 'q'
        0x74, 0x03, // je done
        0xee, // out dx, al
        0xeb, 0xeb, // jmp loop
        0xb0, 0x07, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, // done: mov al,7; out 0xf4,al; hlt
    ]
}

/// Every AP (EDI = "VIRE", ESI != 0) increments a counter at 0x5000; the boot vCPU waits (bounded)
/// until it reaches `aps`, then powers off with the count as status.
pub fn smp_count(aps: u32) -> Vec<u8> {
    let a = aps.to_le_bytes();
    vec![
        0x81, 0xff, 0x45, 0x52, 0x49, 0x56, // cmp edi, 0x56495245
        0x75, 0x0e, // jne bsp
        0x85, 0xf6, // test esi, esi
        0x74, 0x0a, // jz bsp
        0xf0, 0xff, 0x05, 0x00, 0x50, 0x00, 0x00, // lock inc dword [0x5000]
        0xf4, 0xeb, 0xfd, // hlt; jmp $-1
        0xb9, 0x80, 0x84, 0x1e, 0x00, // bsp: mov ecx, 2000000
        0xa1, 0x00, 0x50, 0x00, 0x00, // wait: mov eax, [0x5000]
        0x3d, a[0], a[1], a[2], a[3], // cmp eax, aps
        0x73, 0x03, // jae done
        0x49, // dec ecx
        0x75, 0xf1, // jnz wait
        0xe6, 0xf4, // done: out 0xf4, al
        0xf4, 0xeb, 0xfd, // hlt; jmp $-1
    ]
}

/// Asks the i8042 controller for a CPU reset.
pub fn i8042_reset() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]
}

/// `ud2` with no usable IDT: #UD, #DF, then a triple fault (KVM_EXIT_SHUTDOWN).
pub fn triple_fault() -> Vec<u8> {
    vec![0x0f, 0x0b]
}

/// A minimal bzImage: one setup sector with a protocol-2.15 header and `payload` as the
/// protected-mode kernel, which claims `init_size` bytes once decompressed.
pub fn bzimage(payload: &[u8], initrd_addr_max: u32, init_size: u32) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut f = vec![0u8; (setup_sects as usize + 1) * 512];
    f[0x1f1] = setup_sects;
    put16(&mut f, 0x1fe, 0xaa55);
    f[0x202..0x206].copy_from_slice(b"HdrS");
    put16(&mut f, 0x206, 0x020f);
    f[0x211] = 0x01; // LOADED_HIGH
    put32(&mut f, 0x214, LOAD_ADDR as u32);
    put32(&mut f, 0x22c, initrd_addr_max);
    put32(&mut f, 0x230, 0x20_0000);
    put32(&mut f, 0x238, 2048);
    put32(&mut f, 0x260, init_size);
    f.extend_from_slice(payload);
    f
}

fn put16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
