//! The complete state of a paused VM, in one versioned format (docs/vm-state.md): every vCPU,
//! the in-kernel interrupt controllers and PIT, kvmclock, the legacy devices, every virtio-mmio
//! transport with its device, the machine's shape, and the caller's description and identity.
//! Guest memory is not in here; it goes to its own file ([`file`]).
//!
//! [`VmHandle::save_state`](crate::VmHandle::save_state) captures it from a paused VM and
//! [`Vm::restore`](crate::Vm::restore) builds a new VM from it.

pub mod checksums;
pub mod file;
pub mod kvm_blob;
pub mod lazy;
mod readahead;
pub mod trace;
pub mod vcpu;
pub mod working_set;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

pub use file::{read_state, write_state, STATE_VERSION};
pub use kvm_blob::Blob;
pub use vcpu::VcpuState;
pub use vireo_virtio::state::{DeviceState, QueueState};

/// Why a state could not be captured, stored, loaded or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the VM is not paused; pause it before saving its state")]
    NotPaused,
    #[error("the VM is not running (it has stopped or is stopping)")]
    NotRunning,
    #[error("{0}")]
    Kvm(String),
    #[error("vCPUs did not hand over their state: {0}")]
    Vcpus(String),
    #[error("virtio device {index} ({kind}): {source}")]
    Device {
        index: usize,
        kind: &'static str,
        #[source]
        source: vireo_virtio::StateError,
    },
    #[error("{path}: not a Vireo state file (bad magic)")]
    BadMagic { path: String },
    #[error(
        "{path}: state format version {found} is not supported (this Vireo reads versions \
         {oldest} to {newest}); use the Vireo that saved it"
    )]
    UnsupportedVersion {
        path: String,
        found: u32,
        oldest: u32,
        newest: u32,
    },
    #[error("{path}: truncated ({what})")]
    Truncated { path: String, what: String },
    #[error("{path}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the file is corrupt")]
    Checksum {
        path: String,
        stored: u32,
        computed: u32,
    },
    /// Guest memory read from a save failed its checksum (`checksums.rs`).
    #[error("{path}: {why}")]
    Corrupt { path: String, why: String },
    #[error("{path}: cannot decode the state: {why}")]
    Decode { path: String, why: String },
    #[error("the saved state does not fit this VM: {0}")]
    Mismatch(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("building the VM to restore into: {0}")]
    Vm(#[from] crate::VmmError),
    /// A checkpoint's own step (the worker's disk swap) failed; the VM resumed as before.
    #[error("{0}")]
    Checkpoint(String),
}

/// Who the VM is, as its owner (the daemon) named it; carried through save and restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub id: Option<String>,
    pub name: Option<String>,
}

/// The shape of the machine, checked against the VM a state is restored into.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub kernel: std::path::PathBuf,
    pub initrd: Option<std::path::PathBuf>,
    /// The command line as loaded (virtio-mmio entries included).
    pub cmdline: String,
    /// Virtio device types in window order.
    pub devices: Vec<u32>,
}

/// The PIC pair and the IOAPIC (KVM_GET_IRQCHIP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: Blob<kvm_irqchip>,
    pub pic_slave: Blob<kvm_irqchip>,
    pub ioapic: Blob<kvm_irqchip>,
}

/// kvmclock (KVM_GET_CLOCK) and the host's wall clock when it was read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    pub clock: Blob<kvm_clock_data>,
    /// Host CLOCK_REALTIME in ns at capture; restore moves the guest's clocks on by the
    /// difference (docs/vm-state.md, "Time").
    pub host_realtime_ns: u64,
}

/// COM1's registers and receive FIFO (vm-superio's 16550).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub rx_fifo: Vec<u8>,
}

/// The i8042 controller as Vireo models it: only the reset line, so nothing to carry. Kept as
/// an explicit (empty) entry so a future keyboard model adds fields here, not a new section.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// The power-off port has no state either (a write ends the VM).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerOffState {}

/// One virtio-mmio window: transport registers, queues (with ring positions) and the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    /// The driver activated the device (DRIVER_OK with FEATURES_OK).
    pub active: bool,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueState>,
    pub device: DeviceState,
}

/// Everything about a paused VM except its memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub identity: Identity,
    /// The owner's full description of the VM (the daemon's VmSpec as JSON), carried as given.
    pub spec: Option<String>,
    pub machine: MachineState,
    pub clock: ClockState,
    pub irqchip: IrqchipState,
    pub pit: Blob<kvm_pit_state2>,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialState,
    pub i8042: I8042State,
    pub poweroff: PowerOffState,
    pub virtio: Vec<TransportState>,
    /// The trailer of the save's memory checksum table (`memory.crc`, `checksums.rs`), which
    /// must be beside `memory.bin` and match. `None`: a save written before the table existed
    /// (restored unchecked, with a warning) or a state sent over a migration stream.
    /// Added without a version bump: older readers ignore it, and its absence reads as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_sums: Option<u32>,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |e| StateError::Kvm(format!("{what}: {e}"))
}

/// Host CLOCK_REALTIME in ns.
pub(crate) fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl IrqchipState {
    pub fn capture(vm: &VmFd) -> Result<IrqchipState, StateError> {
        let get = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map(|()| Blob(chip))
                .map_err(kvm_err("KVM_GET_IRQCHIP"))
        };
        Ok(IrqchipState {
            pic_master: get(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            // The id inside the blob decides which chip KVM sets; a swapped file must not
            // load the IOAPIC into the PIC.
            if chip.0.chip_id != id {
                return Err(StateError::Mismatch(format!(
                    "irqchip entry for chip {id} holds chip {}",
                    chip.0.chip_id
                )));
            }
            vm.set_irqchip(&chip.0)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

impl ClockState {
    pub fn capture(vm: &VmFd) -> Result<ClockState, StateError> {
        Ok(ClockState {
            clock: Blob(vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?),
            host_realtime_ns: realtime_ns(),
        })
    }

    /// How long the VM was down, by the host's wall clock (0 if that went backwards).
    pub fn down_ns(&self) -> u64 {
        realtime_ns().saturating_sub(self.host_realtime_ns)
    }

    /// Sets kvmclock to the saved value plus `down_ns`.
    pub fn restore(&self, vm: &VmFd, down_ns: u64) -> Result<(), StateError> {
        let data = kvm_clock_data {
            clock: self.clock.0.clock.wrapping_add(down_ns),
            // Only the value is set; KVM ignores the TSC/realtime pair on SET unless asked.
            flags: 0,
            ..Default::default()
        };
        vm.set_clock(&data).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}

impl VmState {
    /// Checks that this state can be loaded into a VM of `machine`'s shape.
    pub fn check_fits(
        &self,
        memory_bytes: u64,
        vcpus: usize,
        devices: &[u32],
    ) -> Result<(), StateError> {
        let m = &self.machine;
        if m.memory_bytes != memory_bytes {
            return Err(StateError::Mismatch(format!(
                "saved with {} MiB of memory, this VM has {} MiB",
                m.memory_bytes >> 20,
                memory_bytes >> 20
            )));
        }
        if m.vcpus as usize != vcpus || self.vcpus.len() != vcpus {
            return Err(StateError::Mismatch(format!(
                "saved with {} vCPUs ({} vCPU states), this VM has {vcpus}",
                m.vcpus,
                self.vcpus.len()
            )));
        }
        let saved: Vec<u32> = self.virtio.iter().map(|t| t.device_type).collect();
        if m.devices != devices || saved != devices {
            let names = |d: &[u32]| {
                d.iter()
                    .map(|&t| crate::virtio_mmio::device_name(t))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return Err(StateError::Mismatch(format!(
                "saved with virtio devices [{}], this VM has [{}]",
                names(&m.devices),
                names(devices)
            )));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return Err(StateError::Mismatch(format!(
                    "vCPU state {i} is for vCPU {}",
                    v.id
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
