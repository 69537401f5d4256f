//! One virtual machine on KVM: guest memory (memfd), vCPU threads, boot loaders, legacy devices
//! (serial, i8042 reset, power-off port), the virtio-mmio transport and dirty-page tracking.
//!
//! Build a [`VmConfig`], turn it into a [`Vm`] with [`Vm::new`] (all checks and loading happen
//! there), keep a [`VmHandle`] for other threads, and call [`Vm::run`], which returns the
//! [`VmExit`] once the VM has fully stopped.

pub mod boot;
pub mod config;
mod console;
pub mod cpuid;
pub mod devices;
pub mod dirty;
pub mod error;
pub mod exit;
mod heap_trim;
pub mod kvm_stats;
mod lifecycle;
pub mod memory;
mod reset;
pub mod state;
#[doc(hidden)]
pub mod test_images;
mod thread_priority;
mod uffd;
pub mod vcpu;
pub mod vhost_user_net;
pub mod virtio_mmio;
pub mod vm;

pub use config::{ConsoleConfig, VirtioSlot, VmConfig};
pub use dirty::DirtyBitmap;
pub use error::{LifecycleError, VmmError};
pub use exit::VmExit;
pub use memory::{RamBacking, RamKind};
pub use state::{StateError, VmState};
pub use vm::hotplug::{arrange_disk_slots, Attached, DiskSlotInfo, HotplugError, MAX_DISK_SLOTS};
pub use vm::{
    install_termination_handlers, max_vcpus, termination_signal, AfterApply, AfterSave,
    ApplyOptions, ApplyReport, HandoffHead, Handover, LiveSaveOptions, MigrateError,
    MigrateOutOptions, MigrateShared, MigrateStats, RestoreFrom, SaveReport, Vm, VmHandle,
    MEMORY_FILE, STATE_FILE, SUMS_FILE, WORKING_SET_FILE,
};
pub use vm::{PostcopyIncoming, PostcopyOutcome, PostcopyPolicy, PostcopyServed};

/// Guest RAM as the VMM and devices see it (the same type `vireo-virtio` uses).
pub type GuestMemory = vireo_virtio::GuestMemory;

/// True when /dev/kvm can be opened read-write (tests use it to skip).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
