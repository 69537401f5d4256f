//! The probe guest image and the host-side helpers every test and benchmark uses to drive it.
//!
//! The build script compiles `guest/probe` (a no_std PVH guest, see docs/probe-protocol.md) and
//! [`PROBE_ELF`] is the absolute path of the resulting ELF. [`pattern`] reproduces the probe's
//! disk/memory test pattern on the host, [`console`] speaks the COM1 line protocol over any
//! byte stream ([`net`] adds the NIC's commands), and [`qemu`] boots the probe under QEMU
//! microvm as a peer baseline.
#![forbid(unsafe_code)]

pub mod console;
pub mod net;
pub mod pattern;
pub mod qemu;

pub use console::{ProbeConsole, ProbeError};
pub use net::{parse_udp_flow_frame, tagged_frame, udp_flow_frame};

/// Absolute path of the probe ELF built by this crate's build script.
pub const PROBE_ELF: &str = env!("VIREO_PROBE_ELF");

/// [`PROBE_ELF`] as a path.
pub fn probe_elf() -> &'static std::path::Path {
    std::path::Path::new(PROBE_ELF)
}

/// True when /dev/kvm can be opened for reading and writing.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
