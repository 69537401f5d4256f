//! Time from the TSC. The frequency comes from, in order: the hypervisor timing leaf
//! 0x40000010 (kHz), CPUID leaf 0x15 (crystal ratio), a 10 ms calibration against PIT channel 2
//! (ports 0x42/0x43/0x61, usable at CPL3 with IOPL=3), CPUID leaf 0x16 (base MHz), else 2 GHz.
//! It is determined lazily, on the first command that needs wall-clock time, so boot stays fast.

use crate::arch::{cpuid, inb, outb, rdtsc};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    HypervisorLeaf,
    Cpuid15,
    Pit,
    Cpuid16,
    Guess,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::HypervisorLeaf => "cpuid40000010",
            Source::Cpuid15 => "cpuid15",
            Source::Pit => "pit",
            Source::Cpuid16 => "cpuid16",
            Source::Guess => "guess",
        }
    }
}

pub struct Clock {
    khz: u64,
    source: Source,
}

impl Clock {
    pub fn calibrate() -> Self {
        if let Some(khz) = hypervisor_leaf_khz() {
            return Clock {
                khz,
                source: Source::HypervisorLeaf,
            };
        }
        if let Some(khz) = cpuid15_khz() {
            return Clock {
                khz,
                source: Source::Cpuid15,
            };
        }
        if let Some(khz) = pit_khz() {
            return Clock {
                khz,
                source: Source::Pit,
            };
        }
        let (max, ..) = cpuid(0, 0);
        if max >= 0x16 {
            let mhz = cpuid(0x16, 0).0 as u64 & 0xffff;
            if mhz != 0 {
                return Clock {
                    khz: mhz * 1000,
                    source: Source::Cpuid16,
                };
            }
        }
        Clock {
            khz: 2_000_000,
            source: Source::Guess,
        }
    }

    pub fn khz(&self) -> u64 {
        self.khz
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// A TSC value `ms` milliseconds from now.
    pub fn deadline_ms(&self, ms: u64) -> u64 {
        rdtsc().saturating_add(ms.saturating_mul(self.khz))
    }
}

fn hypervisor_leaf_khz() -> Option<u64> {
    let (_, _, ecx, _) = cpuid(1, 0);
    if ecx & (1 << 31) == 0 {
        return None; // no hypervisor
    }
    let (max, ..) = cpuid(0x4000_0000, 0);
    if !(0x4000_0010..0x4001_0000).contains(&max) {
        return None;
    }
    let khz = cpuid(0x4000_0010, 0).0 as u64;
    (khz != 0).then_some(khz)
}

fn cpuid15_khz() -> Option<u64> {
    let (max, ..) = cpuid(0, 0);
    if max < 0x15 {
        return None;
    }
    let (den, num, crystal_hz, _) = cpuid(0x15, 0);
    if den == 0 || num == 0 || crystal_hz == 0 {
        return None;
    }
    Some(crystal_hz as u64 * num as u64 / den as u64 / 1000)
}

/// Times ~10 ms of PIT channel 0 (1.193182 MHz) by reading its count back; None without a PIT.
/// Channel 0 is used rather than channel 2 because its gate is always on: QEMU hands port 0x61
/// (channel 2's gate) to a PC-speaker device that microvm does not have. IF stays 0, so the
/// IRQ 0 that channel 0 raises is never delivered.
fn pit_khz() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const TARGET_TICKS: u64 = PIT_HZ / 100; // 10 ms
    outb(0x43, 0x34); // channel 0, lobyte/hibyte, mode 2 (rate generator), binary
    outb(0x40, 0); // reload 0 = 65536: one period is ~55 ms, longer than the measurement
    outb(0x40, 0);
    let sample = || {
        let before = rdtsc();
        outb(0x43, 0x00); // latch channel 0
        let after = rdtsc();
        let lo = inb(0x40) as u16;
        let hi = inb(0x40) as u16;
        (before / 2 + after / 2, hi << 8 | lo)
    };
    let (t0, c0) = sample();
    // Each sample is three VM exits (~75 us here); 10 ms takes ~130 of them. Give up after many
    // more than that: the count is not moving, so there is no PIT.
    for _ in 0..5_000 {
        let (t1, c1) = sample();
        let ticks = c0.wrapping_sub(c1) as u64;
        if (TARGET_TICKS..60_000).contains(&ticks) {
            let khz = (t1 - t0) * PIT_HZ / ticks / 1000;
            return (100_000..20_000_000).contains(&khz).then_some(khz);
        }
    }
    None
}
