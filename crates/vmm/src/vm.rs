//! Building a VM from a [`VmConfig`] and running it to its end.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vireo_block::BlockBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootInfo, BootSpec};
use crate::config::VmConfig;
use crate::console::{self, InputSource};
use crate::devices::bus::lock;
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::poweroff::{PowerOff, POWEROFF_LEN, POWEROFF_PORT};
use crate::devices::serial::{SerialDevice, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::Bus;
use crate::dirty::{DirtyBitmap, DirtyTracker, Slot};
use crate::error::{Result, VmmError};
use crate::exit::{ExitState, VmExit};
use crate::lifecycle::RunControl;
use crate::memory::GuestRam;
use crate::reset::{VcpuBootState, VmBootState};
use crate::vcpu::{self, VcpuContext};
use crate::virtio_mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::GuestMemory;

/// First virtio-mmio window; devices follow at 4 KiB steps inside the MMIO hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// First GSI for virtio devices (0 PIT, 1 keyboard, 4 COM1 are taken).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// IOAPIC pins 5..=23.
pub const MAX_VIRTIO_DEVICES: usize = 19;
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// How long stopping waits for vCPU threads before giving up on them.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The termination signal received (0: none).
static TERMINATE: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(sig, Ordering::SeqCst);
}

/// The SIGTERM/SIGINT that stopped the VM, if one did.
pub fn termination_signal() -> Option<i32> {
    match TERMINATE.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Makes SIGTERM and SIGINT stop a running VM cleanly (vCPUs stopped, disks flushed) instead of
/// killing the process. For the `vireo run` process; libraries embedding a VM may skip it.
pub fn install_termination_handlers() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .map_err(|e| VmmError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    Ok(())
}

/// Where each virtio device sits, as listed on the kernel command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioPlacement {
    pub base: u64,
    pub irq: u32,
}

/// `virtio_mmio.device=` entry for a device window.
pub fn virtio_cmdline_entry(p: VirtioPlacement) -> String {
    format!("virtio_mmio.device=4K@{:#x}:{}", p.base, p.irq)
}

/// Placement of the `i`-th virtio device.
pub fn virtio_placement(i: usize) -> VirtioPlacement {
    VirtioPlacement {
        base: VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
        irq: VIRTIO_FIRST_IRQ + i as u32,
    }
}

mod apply;
pub mod converge;
pub mod hotplug;
mod incoming;
mod live_save;
mod mapped_run;
mod migrate;
mod pause_reset;
pub mod postcopy;
mod rounds;
mod state;
pub use apply::{AfterApply, ApplyOptions, ApplyReport};
pub use live_save::{AfterSave, LiveSaveOptions, SaveReport};
pub use migrate::{
    HandoffHead, Handover, MigrateError, MigrateOutOptions, MigrateShared, MigrateStats,
};
pub use postcopy::{PostcopyIncoming, PostcopyOutcome, PostcopyPolicy, PostcopyServed};
pub use state::{RestoreFrom, MEMORY_FILE, STATE_FILE, SUMS_FILE, WORKING_SET_FILE};

/// The parts of a VM other threads may use while it runs.
struct Shared {
    vm_fd: VmFd,
    /// A lazy restore still filling `ram` (`state/lazy.rs`); declared before `ram` so it is
    /// dropped (its threads joined) while the mappings still exist.
    lazy: Mutex<Option<crate::state::lazy::LazyRestore>>,
    ram: GuestRam,
    dirty: DirtyTracker,
    exit: Arc<ExitState>,
    /// vCPU parking for pause, resume and reset.
    control: Arc<RunControl>,
    /// pthread ids of the running vCPU threads, for kicks; emptied before they are joined.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
    /// One pause, resume or reset at a time.
    lifecycle: Mutex<()>,
    /// How to load the guest again on reset.
    reload: Reload,
    /// The irqchip and PIT at boot; `Err` (why) when they could not be read.
    boot_state: std::result::Result<VmBootState, String>,
    /// Disk slots for hot add and remove (`vm/hotplug.rs`).
    disk_slots: hotplug::DiskSlots,
    /// The snapshot whose changes the dirty log is tracking for an in-place apply
    /// (`vm/apply.rs`); `None` when the log is off or holds anything else.
    tracking: Mutex<Option<apply::Tracked>>,
    /// A migration's pre-copy left the dirty log on through its pause (`vm/migrate.rs`):
    /// stopping it registers every memory slot anew, which took up to ~40 ms of the guest's
    /// gap here. The VM is stopped once it runs elsewhere; a resume here stops the log first.
    /// Cleared by anything that starts the log again.
    log_left_on: std::sync::atomic::AtomicBool,
}

/// What `Vm::new` loaded into guest RAM, to do it again on reset.
struct Reload {
    kernel: std::path::PathBuf,
    initrd: Option<std::path::PathBuf>,
    cmdline: String,
    vcpus: usize,
}

/// A cloneable handle to a VM for other threads: dirty tracking, guest memory, stop, and
/// pause, resume and reset (`vm/pause_reset.rs`).
#[derive(Clone)]
pub struct VmHandle(Arc<Shared>);

impl VmHandle {
    /// Starts dirty logging (KVM's, the VMM's own writes, and devices' back ends: `dirty.rs`).
    pub fn start_dirty_log(&self) -> Result<()> {
        *lock(&self.0.tracking) = None;
        self.0.log_left_on.store(false, Ordering::SeqCst);
        self.0.dirty.start(&self.0.vm_fd, &self.0.ram.memory)
    }
    /// Whether the dirty log is on (e.g. left on by a migration until a resume here).
    pub fn dirty_logging(&self) -> bool {
        self.0.dirty.is_logging()
    }
    /// [`VmHandle::start_dirty_log`] in `mode` (`dirty.rs`, "Manual protection").
    pub fn start_dirty_log_in(&self, mode: crate::dirty::LogMode) -> Result<()> {
        *lock(&self.0.tracking) = None;
        self.0.log_left_on.store(false, Ordering::SeqCst);
        self.0
            .dirty
            .start_with(&self.0.vm_fd, &self.0.ram.memory, mode)
    }
    /// Manual protection: protects the pages of `[gpa, gpa + len)` in `dirty` (`None`: all)
    /// and clears them in KVM's log (`DirtyTracker::clear_region`).
    pub fn clear_dirty_region(
        &self,
        dirty: Option<&DirtyBitmap>,
        gpa: u64,
        len: u64,
    ) -> Result<()> {
        self.0.dirty.clear_region(&self.0.vm_fd, dirty, gpa, len)
    }
    pub fn stop_dirty_log(&self) -> Result<()> {
        *lock(&self.0.tracking) = None;
        self.0.dirty.stop(&self.0.vm_fd)
    }
    /// Pages written by the guest or the VMM since logging started or the last fetch.
    pub fn fetch_and_clear_dirty(&self) -> Result<DirtyBitmap> {
        self.0
            .dirty
            .fetch_and_clear(&self.0.vm_fd, &self.0.ram.memory)
    }
    pub fn memory(&self) -> &GuestMemory {
        &self.0.ram.memory
    }
    /// The file behind guest RAM, as a vhost-user back end maps it (tests write through a
    /// mapping of their own as one would).
    pub fn ram_file(&self) -> &std::fs::File {
        &self.0.ram.memfd
    }
    /// What backs guest RAM (after any fallback from what the config asked for).
    pub fn ram_kind(&self) -> crate::memory::RamKind {
        self.0.ram.kind
    }
    /// How KVM maps guest RAM right now (leaf entries per page size); `None` where the kernel
    /// has no stats file. For tests and benchmarks: whether 2 MiB mappings came back after
    /// something dropped them.
    pub fn kvm_page_stats(&self) -> Option<crate::kvm_stats::KvmPageStats> {
        crate::kvm_stats::read_pages(&crate::kvm_stats::open(&self.0.vm_fd)?)
    }
    /// Asks the VM to stop; [`Vm::run`] returns [`VmExit::Stopped`]. Works while paused too.
    pub fn request_stop(&self) {
        self.0.exit.set(VmExit::Stopped);
    }

    /// The exit reason, once there is one.
    pub fn exited(&self) -> bool {
        self.0.exit.is_set()
    }
}

/// A built VM, ready to run.
pub struct Vm {
    shared: Arc<Shared>,
    vcpus: Vec<(VcpuFd, std::result::Result<VcpuBootState, String>)>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    flush_on_exit: Vec<Arc<dyn BlockBackend>>,
    input: Option<InputSource>,
    /// Removed when the VM is dropped.
    _console_socket: Option<console::SocketFile>,
    boot: BootInfo,
    placements: Vec<VirtioPlacement>,
    /// vCPU threads [`Vm::start_vcpus`] started before [`Vm::run`].
    started: Vec<std::thread::JoinHandle<()>>,
}

fn open_kvm() -> Result<Kvm> {
    let kvm = Kvm::new().map_err(VmmError::KvmOpen)?;
    let api = kvm.get_api_version();
    if api != 12 {
        return Err(VmmError::KvmApiVersion(api));
    }
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory"),
        (Cap::ImmediateExit, "immediate exit"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::KvmCap(name));
        }
    }
    Ok(kvm)
}

/// The most vCPUs KVM on this host supports (without creating a VM).
pub fn max_vcpus() -> Result<usize> {
    Ok(open_kvm()?.get_max_vcpus())
}

/// Guest RAM a restore is filling while the VM is built ([`Vm::build`]), and the exit state
/// the fill reports a bad page to (the VM does not exist yet when the fill starts).
pub(crate) struct Prefilled {
    pub ram: GuestRam,
    pub exit: Arc<ExitState>,
}

impl Vm {
    /// Creates the VM, loads the kernel and wires every device. Nothing runs yet.
    pub fn new(config: VmConfig) -> Result<Vm> {
        Vm::build(config, None)
    }

    /// [`Vm::new`], or with `filled` the guest RAM a restore has already started filling
    /// (registered with its userfaultfd, so that filling overlaps building the VM) and the
    /// exit state its fill errors go to. The loader then writes into a scratch RAM of the
    /// same size instead: its entry point and boot state are still needed (the vCPUs' boot
    /// state, which a reset puts back), but its bytes would land on the restored memory.
    pub(crate) fn build(config: VmConfig, filled: Option<Prefilled>) -> Result<Vm> {
        // Cheap checks first, so bad input gets its own message even without KVM.
        if config.vcpus == 0 {
            return Err(VmmError::NoVcpus);
        }
        crate::memory::check_size(config.memory)?;
        let kvm = open_kvm()?;
        let max = kvm.get_max_vcpus();
        tracing::debug!("KVM: API 12, up to {max} vCPUs (KVM_CAP_MAX_VCPUS)");
        if config.vcpus > max {
            return Err(VmmError::VcpuCount {
                asked: config.vcpus,
                max,
            });
        }
        let (devices, disk_slot_count) =
            hotplug::with_empty_slots(config.devices, config.disk_slots);
        if devices.len() > MAX_VIRTIO_DEVICES {
            return Err(VmmError::TooManyDevices(devices.len(), MAX_VIRTIO_DEVICES));
        }
        let (ram, scratch, exit) = match filled {
            Some(Prefilled { ram, exit }) if ram.size == config.memory => {
                let scratch = GuestRam::new(config.memory)?;
                (ram, Some(scratch), exit)
            }
            Some(Prefilled { ram, .. }) => {
                return Err(VmmError::MemoryAlloc(format!(
                    "restored RAM holds {} bytes, the VM has {}",
                    ram.size, config.memory
                )))
            }
            None => (
                GuestRam::with_backing(config.memory, config.ram_backing)?,
                None,
                Arc::new(ExitState::default()),
            ),
        };
        let load_into = scratch.as_ref().unwrap_or(&ram);
        crate::state::trace::mark("  guest RAM allocated");
        let vm_fd = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(VmmError::kvm("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(VmmError::kvm("KVM_CREATE_PIT2"))?;

        let slots: Vec<Slot> = crate::memory::regions(&ram.memory)
            .into_iter()
            .enumerate()
            .map(|(i, (guest_addr, size, host_addr))| Slot {
                slot: i as u32,
                guest_addr,
                size,
                host_addr,
            })
            .collect();
        for slot in &slots {
            tracing::debug!(
                "memory slot {}: guest {:#x}..{:#x} ({} MiB)",
                slot.slot,
                slot.guest_addr,
                slot.guest_addr + slot.size,
                slot.size >> 20
            );
        }
        tracing::info!(
            "guest memory: {} MiB ({}) in {} slot(s), MMIO hole {:#x}..{:#x}",
            ram.size >> 20,
            ram.kind,
            slots.len(),
            crate::memory::MMIO_HOLE_START,
            crate::memory::MMIO_HOLE_END
        );
        crate::state::trace::mark("  KVM VM, irqchip, PIT created");
        let mut dirty = DirtyTracker::new(slots);
        dirty.set_slots(&vm_fd, false)?;
        crate::state::trace::mark("  memory slots set");

        let mut mmio = Bus::default();
        let mut transports = Vec::new();
        let mut flush_on_exit = Vec::new();
        let mut placements = Vec::new();
        let mut disk_slots = Vec::new();
        let mut cmdline = config.cmdline.trim().to_string();
        for (i, slot) in devices.into_iter().enumerate() {
            let place = virtio_placement(i);
            let irq = EventFd::new(libc::EFD_NONBLOCK)?;
            vm_fd
                .register_irqfd(&irq, place.irq)
                .map_err(VmmError::kvm("KVM_IRQFD"))?;
            tracing::info!(
                "virtio-mmio device {i}: {} at {:#x}, GSI {}",
                crate::virtio_mmio::device_name(slot.device.device_type()),
                place.base,
                place.irq
            );
            let irq_clone = irq.try_clone()?;
            let transport = MmioTransport::new(slot.device, ram.memory.clone(), irq)?;
            for (q, kick) in transport.kick_fds().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        kick,
                        &IoEventAddress::Mmio(place.base + QUEUE_NOTIFY),
                        q as u32,
                    )
                    .map_err(VmmError::kvm("KVM_IOEVENTFD"))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(place.base, MMIO_WINDOW, transport.clone())
                .map_err(|e| VmmError::BootSetup(e.to_string()))?;
            transports.push(transport);
            if i < disk_slot_count {
                // Disk slots flush their disk themselves (it may be detached before the end).
                disk_slots.push(hotplug::DiskSlot::new(
                    i,
                    place,
                    &irq_clone,
                    slot.flush_on_exit,
                )?);
            } else {
                flush_on_exit.extend(slot.flush_on_exit);
            }
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&virtio_cmdline_entry(place));
            placements.push(place);
        }

        dirty.set_devices(transports.clone());
        crate::state::trace::mark("  devices wired");

        let boot = boot::load(
            &load_into.memory,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                ram_size: ram.size,
            },
        )?;

        match boot.entry {
            boot::BootEntry::Pvh { entry, start_info } => tracing::info!(
                "kernel {} loaded at {:#x}..{:#x}: PVH entry {entry:#x}, start info at \
                 {start_info:#x}",
                config.kernel.display(),
                boot.kernel_start,
                boot.kernel_end
            ),
            boot::BootEntry::Linux64 { entry, boot_params } => tracing::info!(
                "kernel {} loaded at {:#x}..{:#x}: 64-bit entry {entry:#x}, boot_params at \
                 {boot_params:#x}",
                config.kernel.display(),
                boot.kernel_start,
                boot.kernel_end
            ),
        }
        if let Some((at, size)) = boot.initrd {
            tracing::info!("initrd: {size} bytes at {at:#x}");
        }
        tracing::debug!("kernel command line: {cmdline}");
        boot::mptable::write(&load_into.memory, config.vcpus)?;
        drop(scratch);

        let (out, input, console_socket) = console::open(config.console)?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(VmmError::kvm("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        let mut pio = Bus::default();
        let bus_err = |e: crate::devices::bus::Overlap| VmmError::BootSetup(e.to_string());
        pio.insert(COM1_BASE, COM1_LEN, serial.clone())
            .map_err(bus_err)?;
        pio.insert(
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )
        .map_err(bus_err)?;
        pio.insert(
            POWEROFF_PORT,
            POWEROFF_LEN,
            Arc::new(Mutex::new(PowerOff::new(exit.clone()))),
        )
        .map_err(bus_err)?;

        crate::state::trace::mark("  kernel loaded, COM1 wired");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus);
        for i in 0..config.vcpus {
            let vcpu = vm_fd
                .create_vcpu(i as u64)
                .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
            vcpu::configure(&vcpu, i as u32, config.vcpus as u32, boot.entry, &cpuid)?;
            // Read back rather than rebuilt on reset: KVM filled in what configure left alone.
            let boot_state = VcpuBootState::capture(&vcpu).map_err(|e| e.to_string());
            if let Err(e) = &boot_state {
                tracing::warn!("vCPU {i}: boot state not captured, reset will fail: {e}");
            }
            vcpus.push((vcpu, boot_state));
        }
        crate::state::trace::mark("  vCPUs created");
        let boot_state = VmBootState::capture(&vm_fd).map_err(|e| e.to_string());
        if let Err(e) = &boot_state {
            tracing::warn!("irqchip/PIT boot state not captured, reset will fail: {e}");
        }

        Ok(Vm {
            shared: Arc::new(Shared {
                vm_fd,
                lazy: Mutex::default(),
                ram,
                dirty,
                exit,
                control: Arc::default(),
                vcpu_threads: Mutex::default(),
                transports,
                serial,
                lifecycle: Mutex::default(),
                reload: Reload {
                    kernel: config.kernel.clone(),
                    initrd: config.initrd.clone(),
                    cmdline,
                    vcpus: config.vcpus,
                },
                boot_state,
                disk_slots: hotplug::DiskSlots(Mutex::new(disk_slots)),
                tracking: Mutex::default(),
                log_left_on: Default::default(),
            }),
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            flush_on_exit,
            input: Some(input),
            _console_socket: console_socket,
            boot,
            placements,
            started: Vec::new(),
        })
    }

    pub fn handle(&self) -> VmHandle {
        VmHandle(self.shared.clone())
    }

    pub fn boot_info(&self) -> BootInfo {
        self.boot
    }

    pub fn virtio_placements(&self) -> &[VirtioPlacement] {
        &self.placements
    }

    /// Starts the vCPU threads now rather than in [`Vm::run`]. While the VM is paused (an
    /// incoming migration once its state is applied) they park at once, so its resume only
    /// wakes them: started by `run` after the resume, their spawn and first steps added
    /// ~0.9 ms to the guest's switch-over gap (measured with `vireo-bench migrate`). Does
    /// nothing when the console holds the guest until a client connects (`run` decides then).
    pub fn start_vcpus(&mut self) -> Result<()> {
        if self
            .input
            .as_ref()
            .is_some_and(console::InputSource::holds_guest)
        {
            return Ok(());
        }
        vcpu::install_kick_handler()?;
        // The console's input thread too: started by `run` after the resume, its start (a
        // stack mapped, the mmap lock taken for writing) came as the resumed vCPU took its
        // first faults on guest memory, which read-lock it.
        if let Some(input) = self.input.take() {
            console::start_input(input, self.shared.serial.clone(), self.shared.exit.clone())?;
        }
        let started = self.spawn_vcpus();
        self.started.extend(started);
        Ok(())
    }

    /// Spawns a thread for each vCPU not started yet; a failure ends the VM
    /// ([`VmExit::Error`]).
    fn spawn_vcpus(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        let exit = self.shared.exit.clone();
        let control = self.shared.control.clone();
        let mut threads = Vec::new();
        for (i, (fd, boot)) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: exit.clone(),
                control: control.clone(),
                boot,
            };
            // Counted in before it runs, so a pause never returns while it is about to start.
            control.vcpu_started();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run(fd, i, ctx));
            match t {
                Ok(t) => {
                    lock(&self.shared.vcpu_threads).push(t.as_pthread_t());
                    threads.push(t);
                }
                Err(e) => {
                    control.vcpu_ended();
                    exit.set(VmExit::Error(format!("cannot start vCPU {i} thread: {e}")));
                    break;
                }
            }
        }
        threads
    }

    /// Runs the VM until the guest powers off or resets, a vCPU fails, the host asks it to stop
    /// (SIGTERM/SIGINT with [`install_termination_handlers`], or [`VmHandle::request_stop`]).
    /// Returns once every vCPU has stopped, devices are quiesced and disks flushed.
    pub fn run(mut self) -> Result<VmExit> {
        vcpu::install_kick_handler()?;
        let exit = self.shared.exit.clone();
        let mut held = false;
        if let Some(mut input) = self.input.take() {
            let stop = || termination_signal().is_some() || exit.is_set();
            held = !console::wait_for_client(&mut input, stop)?;
            console::start_input(input, self.shared.serial.clone(), exit.clone())?;
        }
        if held && !exit.is_set() {
            exit.set(VmExit::Stopped);
        }
        if held {
            tracing::info!("stopped while waiting for a console client; no vCPU ran");
        }
        let mut threads = std::mem::take(&mut self.started);
        if !held {
            threads.extend(self.spawn_vcpus());
        }
        let control = self.shared.control.clone();
        let reason = loop {
            if let Some(r) = exit.wait(Duration::from_millis(50)) {
                break r;
            }
            if termination_signal().is_some() {
                exit.set(VmExit::Stopped);
            }
        };
        tracing::info!("VM stopping: {reason:?}");
        // Parked vCPUs leave their park and see the exit; no pause or reset waits any more.
        control.release();
        lock(&self.shared.vcpu_threads).clear();
        stop_vcpus(threads);
        // A reset or pause still going on holds this until it has given up.
        let _op = lock(&self.shared.lifecycle);
        for t in &self.shared.transports {
            lock(t).reset();
        }
        self.shared.disk_slots.flush_all();
        for b in &self.flush_on_exit {
            if let Err(e) = b.flush() {
                tracing::warn!("flushing disk {}: {e}", b.id());
            }
        }
        lock(&self.shared.serial).flush_output();
        tracing::debug!("VM stopped: vCPUs joined, devices reset, disks flushed");
        Ok(reason)
    }
}

/// Kicks every vCPU thread out of KVM_RUN until all have returned (bounded).
fn stop_vcpus(threads: Vec<std::thread::JoinHandle<()>>) {
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    let mut pending = threads;
    while !pending.is_empty() {
        pending.retain(|t| {
            if t.is_finished() {
                return false;
            }
            // SAFETY: the thread handle is alive (not joined), so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
            true
        });
        if pending.iter().all(|t| t.is_finished()) {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!("{} vCPU thread(s) did not stop in time", pending.len());
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in pending {
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MMIO_HOLE_END, MMIO_HOLE_START};

    #[test]
    fn virtio_devices_get_distinct_page_aligned_windows_and_irqs_in_the_hole() {
        let all: Vec<_> = (0..MAX_VIRTIO_DEVICES).map(virtio_placement).collect();
        for (i, p) in all.iter().enumerate() {
            assert_eq!(p.base % 4096, 0);
            assert!(p.base >= MMIO_HOLE_START && p.base + MMIO_WINDOW <= 0xfec0_0000);
            assert!(p.base + MMIO_WINDOW <= MMIO_HOLE_END);
            assert!(
                (5..=23).contains(&p.irq),
                "IOAPIC pin, not PIT/keyboard/COM1"
            );
            assert_ne!(p.irq, COM1_IRQ);
            for q in &all[i + 1..] {
                assert!(p.base + MMIO_WINDOW <= q.base);
                assert_ne!(p.irq, q.irq);
            }
        }
        assert_eq!(
            virtio_cmdline_entry(virtio_placement(1)),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
