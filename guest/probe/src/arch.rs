//! Thin wrappers over port I/O, MMIO and a few x86 instructions usable at CPL3 with IOPL=3.

use core::arch::asm;

#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: IOPL=3 lets CPL3 use port I/O; the probe only touches ports it owns (COM1, PIT,
    // the debug-exit port), which have no memory side effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: see `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects; CR4.TSD is clear so CPL3 may use it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID (the plain instruction; unlike rdtscp it is available under KVM-PVM).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// A 32-bit MMIO register read (one VM exit).
#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: callers pass addresses of device registers inside the identity-mapped 4 GiB.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

#[inline(always)]
pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: see `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

#[inline(always)]
pub fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: see `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Powers the VM off through the debug-exit port and never returns.
pub fn power_off(status: u8) -> ! {
    outb(0xf4, status);
    loop {
        core::hint::spin_loop();
    }
}
