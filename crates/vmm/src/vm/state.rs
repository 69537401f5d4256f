//! Save and restore of a whole VM (docs/vm-state.md): [`VmHandle::save_state`] /
//! [`VmHandle::save`] on a paused VM, [`Vm::restore`] into a new one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{lock, Prefilled, Shared, Vm, VmHandle};
use crate::config::VmConfig;
use crate::exit::ExitState;
use crate::lifecycle::{Job, JobTicket, ParkError};
use crate::memory::GuestRam;
use crate::state::checksums::MemorySums;
use crate::state::working_set::WorkingSet;
use crate::state::{
    self, trace, ClockState, I8042State, Identity, IrqchipState, MachineState, PowerOffState,
    SerialState, StateError, VmState,
};

/// How long the parked vCPUs get to hand over their state.
const VCPU_SAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// File names inside a save directory.
pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "memory.bin";
/// The pages the guest wrote while a live save ran (a hint for the restore, `working_set.rs`).
pub const WORKING_SET_FILE: &str = "working-set.bin";
/// The page checksums of `memory.bin` (`state/checksums.rs`).
pub const SUMS_FILE: &str = "memory.crc";

impl VmHandle {
    /// The complete state of the paused VM (everything but memory). `identity` and `spec`
    /// are the owner's and are carried as given.
    pub fn save_state(
        &self,
        identity: Identity,
        spec: Option<String>,
    ) -> Result<VmState, StateError> {
        // Held throughout, so no resume or reset runs while the state is read.
        let _op = lock(&self.0.lifecycle);
        self.save_state_locked(identity, spec)
    }

    pub(super) fn save_state_locked(
        &self,
        identity: Identity,
        spec: Option<String>,
    ) -> Result<VmState, StateError> {
        let saving = self.start_save()?;
        self.finish_save(saving, identity, spec)
    }

    /// The first half of [`VmHandle::save_state_locked`]: the parked vCPUs start saving
    /// their state on their threads while the caller goes on (the switch-over sends its last
    /// pages meanwhile, without a thread of its own to wait for them).
    pub(super) fn start_save(&self) -> Result<JobTicket, StateError> {
        self.check_paused()?;
        Ok(self.0.control.start_job(Job::Save))
    }

    /// The second half: the vCPUs' states, and the rest of the VM's read here.
    pub(super) fn finish_save(
        &self,
        saving: JobTicket,
        identity: Identity,
        spec: Option<String>,
    ) -> Result<VmState, StateError> {
        let s = &self.0;
        let results = match s.control.wait_job(saving, VCPU_SAVE_TIMEOUT) {
            Ok(r) => r,
            Err(ParkError::Released) => return Err(StateError::NotRunning),
            Err(ParkError::Timeout { parked, alive }) => {
                return Err(StateError::Vcpus(format!(
                    "only {parked} of {alive} answered in time"
                )))
            }
        };
        if !results.errors.is_empty() {
            return Err(StateError::Vcpus(results.errors.join("; ")));
        }
        let mut vcpus = results.saved;
        vcpus.sort_by_key(|v| v.id);
        if vcpus.len() != s.reload.vcpus {
            // A VM paused before `run` has no vCPU threads to ask.
            return Err(StateError::Vcpus(format!(
                "{} of {} vCPUs are running; a VM that never ran has no state to save",
                vcpus.len(),
                s.reload.vcpus
            )));
        }
        let mut virtio = Vec::with_capacity(s.transports.len());
        for (index, t) in s.transports.iter().enumerate() {
            let t = lock(t);
            let kind = crate::virtio_mmio::device_name(t.device_type());
            virtio.push(t.save_state().map_err(|source| StateError::Device {
                index,
                kind,
                source,
            })?);
        }
        let serial = lock(&s.serial).registers();
        Ok(VmState {
            identity,
            spec,
            machine: MachineState {
                memory_bytes: s.ram.size,
                vcpus: s.reload.vcpus as u32,
                kernel: s.reload.kernel.clone(),
                initrd: s.reload.initrd.clone(),
                cmdline: s.reload.cmdline.clone(),
                devices: virtio.iter().map(|t| t.device_type).collect(),
            },
            clock: ClockState::capture(&s.vm_fd)?,
            irqchip: IrqchipState::capture(&s.vm_fd)?,
            pit: state::Blob(
                s.vm_fd
                    .get_pit2()
                    .map_err(|e| StateError::Kvm(format!("KVM_GET_PIT2: {e}")))?,
            ),
            vcpus,
            serial: SerialState {
                baud_divisor_low: serial.baud_divisor_low,
                baud_divisor_high: serial.baud_divisor_high,
                interrupt_enable: serial.interrupt_enable,
                interrupt_identification: serial.interrupt_identification,
                line_control: serial.line_control,
                line_status: serial.line_status,
                modem_control: serial.modem_control,
                modem_status: serial.modem_status,
                scratch: serial.scratch,
                rx_fifo: serial.in_buffer,
            },
            i8042: I8042State {},
            poweroff: PowerOffState {},
            virtio,
            // Set by the save that writes the memory file and its table.
            memory_sums: None,
        })
    }

    /// Writes guest RAM to `path`. The VM must be paused (and stays so while this runs).
    /// A raw dump: its checksums are returned, not written (a save writes `memory.crc`).
    pub fn save_memory(&self, path: &Path) -> Result<MemorySums, StateError> {
        let _op = lock(&self.0.lifecycle);
        self.check_paused()?;
        self.wait_restored();
        state::file::write_memory(path, &self.0.ram)
    }

    /// Saves the paused VM into `dir` (created if missing): memory, then the state file, whose
    /// presence marks the save complete. The VM stays paused; no resume can come in between.
    /// [`VmHandle::save_live`] with the VM already paused (one pass over memory).
    pub fn save(
        &self,
        dir: &Path,
        identity: Identity,
        spec: Option<String>,
    ) -> Result<(), StateError> {
        {
            let _op = lock(&self.0.lifecycle);
            self.check_paused()?;
        }
        self.save_live(
            dir,
            identity,
            spec,
            &super::LiveSaveOptions {
                then: super::AfterSave::StayPaused,
                ..Default::default()
            },
        )
        .map(|_| ())
    }

    fn check_paused(&self) -> Result<(), StateError> {
        if self.0.exit.is_set() {
            return Err(StateError::NotRunning);
        }
        if !self.0.control.paused() {
            return Err(StateError::NotPaused);
        }
        Ok(())
    }
}

/// What [`Vm::restore`] reads: a save directory, or a state and a memory file.
pub struct RestoreFrom {
    pub state: VmState,
    pub memory: PathBuf,
    /// Read all of memory before the VM runs instead of faulting it in lazily (the default
    /// is lazy; a VM with a vhost-user device is always restored eagerly).
    pub eager: bool,
    /// The save's working set, fetched before everything else on a lazy restore (a missing
    /// or unusable file only makes those pages fault in).
    pub working_set: Option<PathBuf>,
    /// The page checksums every read of `memory` is checked against; `None` only for a save
    /// written before they existed (`VmState::memory_sums` unset), which is restored unchecked.
    pub sums: Option<Arc<MemorySums>>,
}

impl RestoreFrom {
    /// Reads and checks `dir`'s state file and the memory checksum table it names (the
    /// memory file itself is read, and checked, by the restore). A save that should have a
    /// table and has none, or a table of another save, is refused here.
    pub fn dir(dir: &Path) -> Result<RestoreFrom, StateError> {
        let state = state::read_state(&dir.join(STATE_FILE))?;
        let sums = match state.memory_sums {
            Some(expected) => Some(Arc::new(MemorySums::read(
                &dir.join(SUMS_FILE),
                state.machine.memory_bytes,
                expected,
            )?)),
            None => {
                tracing::warn!(
                    "{}: saved before memory checksums existed; memory.bin is restored unchecked",
                    dir.display()
                );
                None
            }
        };
        Ok(RestoreFrom {
            state,
            memory: dir.join(MEMORY_FILE),
            eager: false,
            working_set: Some(dir.join(WORKING_SET_FILE)),
            sums,
        })
    }
}

impl Vm {
    /// Builds a new VM from `config` (same memory size, vCPU count and devices as the saved
    /// one) and loads the saved memory and state into it. The VM is returned **paused**: run
    /// it, then [`VmHandle::resume`]. Any error leaves nothing running (the half-built VM is
    /// dropped).
    pub fn restore(mut config: VmConfig, from: &RestoreFrom) -> Result<Vm, StateError> {
        let st = &from.state;
        config.devices = super::hotplug::arrange_saved_slots(
            std::mem::take(&mut config.devices),
            &st.machine.devices,
            config.disk_slots,
        )?;
        let devices: Vec<u32> = config
            .devices
            .iter()
            .map(|d| d.device.device_type())
            .collect();
        st.check_fits(config.memory, config.vcpus, &devices)?;
        // A disk's queue count is fixed once its transport exists: take the saved one now.
        for (index, (slot, saved)) in config.devices.iter_mut().zip(&st.virtio).enumerate() {
            let kind = saved.device.kind();
            slot.device
                .adopt_saved_shape(&saved.device)
                .map_err(|source| StateError::Device {
                    index,
                    kind,
                    source,
                })?;
        }
        trace::mark("checked");
        // Another process mapping RAM would not see pages a lazy restore has not filled yet.
        // RAM asked to be on the hugetlb pool, which a lazy fill cannot use (whole 2 MiB
        // pages only; `RamBacking::for_userfaultfd`), is loaded before the VM runs instead.
        let eager = from.eager
            || config.ram_backing == crate::memory::RamBacking::HugeTlb
            || config.devices.iter().any(|d| d.device.maps_guest_memory());
        let vm = if eager {
            let vm = Vm::new(config)?;
            trace::mark("VM built (Vm::new)");
            state::file::read_memory(&from.memory, &vm.shared.ram, from.sums.as_deref())?;
            vm
        } else {
            // Memory first: its fill (working set, then faults and readahead) runs on other
            // threads while this one builds the VM, so the two use both CPUs (measured:
            // docs/vm-state.md, "Restore timing").
            let ram = GuestRam::with_backing(config.memory, config.ram_backing.for_userfaultfd())?;
            let exit = Arc::new(ExitState::default());
            let hot = from
                .working_set
                .as_deref()
                .and_then(|p| WorkingSet::read(p, ram.size))
                .unwrap_or_default();
            let lazy =
                state::file::restore_memory_lazily(&from.memory, &ram, hot, from.sums.clone(), {
                    let exit = exit.clone();
                    Box::new(move |why: String| {
                        tracing::error!("{why}; stopping the restored VM");
                        exit.set(crate::exit::VmExit::Error(why));
                    })
                })?;
            // Keeps the mappings alive if the build fails, so the fill threads stop (below)
            // before the registered range can be unmapped and reused.
            let mapped = ram.memory.clone();
            let vm = match Vm::build(config, Some(Prefilled { ram, exit })) {
                Ok(vm) => vm,
                Err(e) => {
                    drop(lazy);
                    drop(mapped);
                    return Err(e.into());
                }
            };
            trace::mark("VM built (Vm::build)");
            *lock(&vm.shared.lazy) = lazy;
            vm
        };
        trace::mark("memory set up");
        // The fill runs from before the build: a page that failed its checksum (or could not
        // be read) may already have stopped the VM, and is then this call's error.
        let fill_failed = |vm: &Vm| match vm.shared.exit.wait(Duration::ZERO) {
            Some(crate::exit::VmExit::Error(why)) => Some(StateError::Corrupt {
                path: from.memory.display().to_string(),
                why,
            }),
            _ => None,
        };
        if let Some(e) = fill_failed(&vm) {
            return Err(e);
        }
        if let Err(e) = vm.apply_state(st) {
            return Err(fill_failed(&vm).unwrap_or(e));
        }
        tracing::info!(
            "VM restored: {} vCPUs, {} MiB, {} virtio devices, down for {} ms",
            st.vcpus.len(),
            st.machine.memory_bytes >> 20,
            st.virtio.len(),
            st.clock.down_ns() / 1_000_000
        );
        Ok(vm)
    }

    /// Loads `st` (everything but memory) into this VM, built and never run: vCPUs,
    /// irqchip, PIT, clock, COM1, every virtio transport and device. The VM is left
    /// **paused**. Restore uses it after loading memory; an incoming migration after the last
    /// page arrived. `st` must fit the VM (checked: memory size, vCPUs, device types).
    pub fn apply_state(&self, st: &VmState) -> Result<(), StateError> {
        let s = &self.shared;
        let devices: Vec<u32> = s.transports.iter().map(|t| lock(t).device_type()).collect();
        st.check_fits(s.ram.size, self.vcpus.len(), &devices)?;
        // How long the VM was down: its clocks move on by that much (docs/vm-state.md, Time).
        let down_ns = st.clock.down_ns();
        for ((fd, _), saved) in self.vcpus.iter().zip(&st.vcpus) {
            let refused = saved.restore(fd, down_ns)?;
            if !refused.is_empty() {
                tracing::warn!(
                    "vCPU {}: KVM refused to load MSRs {refused:#x?}; they keep their reset value",
                    saved.id
                );
            }
        }
        trace::mark("vCPU state loaded");
        load_machine(s, st, down_ns)?;
        trace::mark("irqchip, PIT, clock loaded");
        load_devices(s, st)?;
        trace::mark("devices loaded");
        // Devices were activated above; park them until the caller resumes.
        self.handle()
            .pause()
            .map_err(|e| StateError::Kvm(format!("pausing the restored VM: {e}")))?;
        trace::mark("restored, paused");
        Ok(())
    }
}

/// Loads the VM-wide state (irqchip, PIT, kvmclock, COM1) of `st` into a VM whose vCPUs are
/// not running (never run, or parked).
pub(super) fn load_machine(s: &Shared, st: &VmState, down_ns: u64) -> Result<(), StateError> {
    st.irqchip.restore(&s.vm_fd)?;
    s.vm_fd
        .set_pit2(&st.pit.0)
        .map_err(|e| StateError::Kvm(format!("KVM_SET_PIT2: {e}")))?;
    st.clock.restore(&s.vm_fd, down_ns)?;
    let serial = &st.serial;
    lock(&s.serial)
        .load_registers(&vm_superio::SerialState {
            baud_divisor_low: serial.baud_divisor_low,
            baud_divisor_high: serial.baud_divisor_high,
            interrupt_enable: serial.interrupt_enable,
            interrupt_identification: serial.interrupt_identification,
            line_control: serial.line_control,
            line_status: serial.line_status,
            modem_control: serial.modem_control,
            modem_status: serial.modem_status,
            scratch: serial.scratch,
            in_buffer: serial.rx_fifo.clone(),
        })
        .map_err(|e| StateError::Mismatch(format!("COM1: {e}")))
}

/// Loads every virtio transport and device from `st`; each transport must be fresh (never
/// activated, or reset). Devices that were active come back activated, their workers parked.
pub(super) fn load_devices(s: &Shared, st: &VmState) -> Result<(), StateError> {
    for (index, (t, saved)) in s.transports.iter().zip(&st.virtio).enumerate() {
        let mut t = lock(t);
        let kind = crate::virtio_mmio::device_name(t.device_type());
        t.restore_state(saved)
            .map_err(|source| StateError::Device {
                index,
                kind,
                source,
            })?;
    }
    Ok(())
}
