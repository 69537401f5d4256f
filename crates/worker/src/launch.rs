//! One worker's life: read `spec.json`, build the VM, serve its sockets, run it, and record why
//! it ended in `exit.json`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use vireo_api::worker::{InheritedDisk, WorkerExitReason, WorkerLaunch};
use vireo_api::{VmSpec, SPEC_VERSION};
use vireo_vmm::vhost_user_net::VhostUserNet;
use vireo_vmm::{ConsoleConfig, RamBacking, RestoreFrom, VirtioSlot, Vm, VmConfig, VmExit};

use crate::console::Console;
use crate::control::{ControlDisk, ControlServer};
use crate::error::WorkerError;
use crate::hotplug::{self, Hotplug};
use crate::metrics::{Meter, MeteredDisk};
use crate::migrate::handoff::PendingDisk;
use crate::migrate::incoming;
use crate::move_storage::MovableBackend;
use crate::{files, server};
use crate::{CONSOLE_SOCKET, CONTROL_SOCKET, EXIT_FILE, SPEC_FILE, WORKER_SOCKET};

/// The process exit status for a reason: 0 when the VM ended as a VM may (powered off, reset,
/// turned off), 1 when it could not start or a vCPU failed.
pub fn exit_status(reason: &WorkerExitReason) -> u8 {
    match reason {
        WorkerExitReason::PoweredOff { .. }
        | WorkerExitReason::Reset
        | WorkerExitReason::TurnedOff => 0,
        WorkerExitReason::Saved { .. } | WorkerExitReason::MigratedAway { .. } => 0,
        WorkerExitReason::StartFailed { .. }
        | WorkerExitReason::VcpuFailed { .. }
        | WorkerExitReason::MigrationLost { .. } => 1,
    }
}

/// Runs the VM of `dir` to its end and records the reason in `exit.json`; returns the reason.
/// `Err` only when even `exit.json` could not be written.
pub fn run(dir: &Path) -> std::io::Result<WorkerExitReason> {
    // Absolute, so the paths the worker reports (Status' console socket) do not depend on
    // the directory it was started in.
    let dir = &std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    // A record from an earlier run of this VM must not be taken for this one's.
    let _ = std::fs::remove_file(dir.join(EXIT_FILE));
    let sockets = [WORKER_SOCKET, CONSOLE_SOCKET, CONTROL_SOCKET].map(|s| dir.join(s));
    // Where an incoming migration's timeline begins: the worker's own start-up is part of it.
    let launched = std::time::Instant::now();
    let reason = match start(dir, launched) {
        Ok(running) => running.run(),
        Err(e) => {
            tracing::error!("the VM could not be started: {e}");
            WorkerExitReason::StartFailed {
                message: e.to_string(),
            }
        }
    };
    for s in &sockets {
        files::remove_socket(s);
    }
    files::write_exit(dir, reason.clone())?;
    tracing::info!("worker exiting: {reason:?}");
    Ok(reason)
}

/// The longest the worker waits, once the VM has ended, for the console output thread to pass
/// on the guest's last output (it has a few bytes to move; this only bounds a stuck thread).
const CONSOLE_DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A built VM with its sockets served, not yet running.
struct Running {
    vm: Vm,
    state: Arc<server::State>,
    control: ControlServer,
    /// Receive the VM from a migration source before it runs.
    incoming: Option<incoming::Incoming>,
}

fn read_launch(dir: &Path) -> Result<WorkerLaunch, WorkerError> {
    let path = dir.join(SPEC_FILE);
    let text = std::fs::read(&path).map_err(|source| WorkerError::SpecRead {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| WorkerError::SpecJson { path, source })
}

/// For an incoming migration: `spec`'s disks as placeholders (the source still holds the
/// images; they are opened at the handoff, `migrate/incoming.rs`).
fn pending_disks(spec: &VmSpec) -> (OpenDisks, Vec<Arc<PendingDisk>>) {
    let (mut slots, mut control, mut metered, mut movable, mut pending) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for d in &spec.disks {
        let p = Arc::new(PendingDisk::new(d.read_only));
        let built = hotplug::wrap_disk(d, p.clone(), crate::image::Image::Raw, spec.vcpus);
        pending.push(p);
        metered.push(built.metered);
        movable.push(built.movable);
        control.push(built.control);
        slots.push(VirtioSlot {
            device: Box::new(built.block),
            flush_on_exit: Some(built.backend),
        });
    }
    ((slots, control, metered, movable), pending)
}

/// The disks of `spec` as virtio slots (with their storage QoS), what the control socket needs
/// of them, and their counters for metering.
/// Disks named in `inherited` are opened from their inherited locked files (after checking each
/// is the file its path names), the others by path.
fn open_disks(spec: &VmSpec, inherited: &[InheritedDisk]) -> Result<OpenDisks, WorkerError> {
    let mut held = claim_inherited(spec, inherited)?;
    let mut slots = Vec::new();
    let mut control = Vec::new();
    let mut metered = Vec::new();
    let mut movable = Vec::new();
    for d in &spec.disks {
        let built = hotplug::build_disk_from(d, spec.vcpus, held.remove(&d.path))?;
        metered.push(built.metered);
        movable.push(built.movable);
        control.push(built.control);
        slots.push(VirtioSlot {
            device: Box::new(built.block),
            flush_on_exit: Some(built.backend),
        });
    }
    Ok((slots, control, metered, movable))
}

/// Takes every inherited disk file as this process's own, keyed by its spec path. Each
/// descriptor and each path may be named once, and only for a disk of the spec: anything else
/// would be a descriptor closed twice or a lock held for nothing.
fn claim_inherited(
    spec: &VmSpec,
    inherited: &[InheritedDisk],
) -> Result<HashMap<PathBuf, std::fs::File>, WorkerError> {
    let mut fds = HashSet::new();
    let mut held = HashMap::new();
    for i in inherited {
        let Some(disk) = spec.disks.iter().find(|d| d.path == i.path) else {
            return Err(WorkerError::InheritedSpec(format!(
                "descriptor {} for {}, which is not one of the VM's disks",
                i.fd,
                i.path.display()
            )));
        };
        if !fds.insert(i.fd) || held.contains_key(&i.path) {
            return Err(WorkerError::InheritedSpec(format!(
                "descriptor {} for {} twice",
                i.fd,
                i.path.display()
            )));
        }
        let file = vireo_block::handover::claim_inherited(i.fd, &i.path, disk.read_only)?;
        tracing::info!(
            "disk {}: opened from its inherited locked file (descriptor {})",
            i.path.display(),
            i.fd
        );
        held.insert(i.path.clone(), file);
    }
    Ok(held)
}

type OpenDisks = (
    Vec<VirtioSlot>,
    Vec<ControlDisk>,
    Vec<MeteredDisk>,
    Vec<Arc<MovableBackend>>,
);

/// The queue pairs a NIC asks its backend for: the spec's count, one when it names none (the
/// count is part of the machine the guest saw, so a VM saved with one pair restores with one).
fn nic_queue_pairs(nic: &vireo_api::NicSpec) -> u16 {
    nic.queues.unwrap_or(1)
}

/// The queue pairs a connected NIC has: two queues each, plus a control queue with more than
/// one pair.
fn device_pairs(device: &VhostUserNet) -> u16 {
    use vireo_virtio::VirtioDevice;
    (device.queue_max_sizes().len() / 2) as u16
}

/// One virtio-net NIC per `spec.nics` entry, each the vhost-user frontend of its port on its
/// switch (`nic_sockets[i]`, served by the switch process), with the NIC's stored MAC.
fn connect_nics(spec: &VmSpec, sockets: &[PathBuf]) -> Result<Vec<VirtioSlot>, WorkerError> {
    if spec.nics.len() != sockets.len() {
        return Err(WorkerError::NicSockets {
            nics: spec.nics.len(),
            sockets: sockets.len(),
        });
    }
    let mut slots = Vec::new();
    for (i, (nic, socket)) in spec.nics.iter().zip(sockets).enumerate() {
        let name = nic.name.clone().unwrap_or_else(|| format!("nics[{i}]"));
        // vireod stores every NIC with its MAC; a hand-written launch without one gets a fixed
        // locally administered address rather than none.
        let mac = nic.mac.map_or([0x02, 0, 0, 0, 0, i as u8 + 1], |m| m.0);
        let pairs = nic_queue_pairs(nic);
        let device = VhostUserNet::connect_with_pairs(socket, mac, pairs).map_err(|source| {
            WorkerError::Nic {
                name: name.clone(),
                socket: socket.clone(),
                source,
            }
        })?;
        // Fewer pairs than the spec says would be another machine than the one saved or
        // migrated with this spec, so it is refused rather than run.
        let got = device_pairs(&device);
        if got < pairs {
            return Err(WorkerError::NicPairs {
                name,
                socket: socket.clone(),
                asked: pairs,
                got,
            });
        }
        tracing::info!(
            "NIC {name} ({}) on {}, {got} queue pair(s)",
            nic.switch,
            socket.display()
        );
        slots.push(VirtioSlot {
            device: Box::new(device),
            flush_on_exit: None,
        });
    }
    Ok(slots)
}

/// What backs the VM's RAM: `VIREO_GUEST_RAM`, kept off the hugetlb pool under `auto` when
/// the source may switch this incoming VM to post-copy.
fn ram_backing(
    incoming: Option<&vireo_api::worker::IncomingMigration>,
) -> Result<RamBacking, WorkerError> {
    let asked = RamBacking::from_env().map_err(WorkerError::GuestRam)?;
    Ok(match incoming {
        Some(m) if m.postcopy != vireo_api::worker::PostcopyMode::Never => asked.for_userfaultfd(),
        _ => asked,
    })
}

fn start(dir: &Path, launched: std::time::Instant) -> Result<Running, WorkerError> {
    let launch = read_launch(dir)?;
    let spec = launch.spec;
    if spec.version != SPEC_VERSION {
        return Err(WorkerError::SpecVersion {
            found: spec.version,
        });
    }
    tracing::info!("starting VM {} ({})", spec.name, launch.vm_id);
    if launch.incoming.is_some() && launch.restore_from.is_some() {
        return Err(WorkerError::Incoming(
            "a launch cannot both restore and receive a migration; give one of them".into(),
        ));
    }
    if launch.incoming.is_some() && !launch.inherited_disks.is_empty() {
        return Err(WorkerError::Incoming(
            "a launch receiving a migration opens its disks at the handoff; it cannot inherit \
             them"
                .into(),
        ));
    }
    vireo_vmm::install_termination_handlers()?;
    let ((mut devices, control_disks, metered, movable), pending) = match &launch.incoming {
        None => (open_disks(&spec, &launch.inherited_disks)?, Vec::new()),
        Some(_) => pending_disks(&spec),
    };
    if let Some(m) = launch
        .incoming
        .as_ref()
        .filter(|m| !m.disk_slots.is_empty())
    {
        // The source's hot removals left gaps: the device state arrives for that layout.
        devices = vireo_vmm::arrange_disk_slots(
            devices,
            &m.disk_slots,
            vireo_api::worker::WORKER_DISK_SLOTS,
        )
        .map_err(|e| WorkerError::Incoming(format!("the source's disk slots: {e}")))?;
    }
    devices.extend(connect_nics(&spec, &launch.nic_sockets)?);
    let console_path = dir.join(CONSOLE_SOCKET);
    let ring_bytes = spec.console_ring_bytes as usize;
    let (console, vmm_end) = Console::start(files::bind_private(&console_path)?, ring_bytes)
        .map_err(WorkerError::Thread)?;
    let config = VmConfig {
        kernel: spec.kernel.clone(),
        initrd: spec.initrd.clone(),
        cmdline: spec.cmdline.clone(),
        memory: spec.memory_bytes,
        vcpus: spec.vcpus as usize,
        devices,
        disk_slots: vireo_api::worker::WORKER_DISK_SLOTS,
        console: ConsoleConfig::Stream(vmm_end),
        ram_backing: ram_backing(launch.incoming.as_ref())?,
    };
    let vm = match &launch.restore_from {
        None => Vm::new(config)?,
        Some(from) => {
            let restore = |source| WorkerError::Restore {
                dir: from.clone(),
                source,
            };
            // Fault injection (`crates/cli/tests/e2e/migrate_faults_real_modes.rs`): a test
            // strikes while the worker restores, its disks open and locked.
            crate::fault_hooks::hold("VIREO_TEST_RESTORE_HOLD_MS", "restore");
            let saved = RestoreFrom::dir(from).map_err(restore)?;
            let vm = Vm::restore(config, &saved).map_err(restore)?;
            tracing::info!("VM restored from {}", from.display());
            // Restored paused; resumed before `run` starts its vCPUs, they simply run.
            vm.handle().resume().map_err(|e| {
                restore(vireo_vmm::StateError::Kvm(format!("resuming the VM: {e}")))
            })?;
            vm
        }
    };
    let control_path: PathBuf = dir.join(CONTROL_SOCKET);
    let control = ControlServer::start(&control_path, control_disks)?;
    std::fs::set_permissions(
        &control_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(|source| WorkerError::Socket {
        path: control_path.clone(),
        source,
    })?;
    control.attach_vm(vm.handle());
    let state = Arc::new(server::State {
        vm_id: launch.vm_id,
        vm_dir: dir.to_path_buf(),
        spec_json: serde_json::to_string(&spec).unwrap_or_default(),
        spec_name: spec.name.clone(),
        saved_to: std::sync::Mutex::new(None),
        console,
        console_socket: console_path,
        shutdown_line: spec.shutdown_line.clone(),
        vm: vm.handle(),
        started_at: AtomicI64::new(0),
        ring_bytes,
        meter: Meter::new(metered, spec.memory_bytes),
        hotplug: Hotplug::new(
            vm.handle(),
            &spec.disks,
            movable,
            control.disks(),
            spec.vcpus,
        ),
        mover: crate::move_storage::Mover::default(),
        migration: crate::migrate::Migration::default(),
        checkpointing: std::sync::atomic::AtomicBool::new(false),
    });
    // Listening before worker.sock answers, so `MigrateStatus` shows the address at once.
    let incoming = match &launch.incoming {
        None => None,
        Some(m) => Some(
            incoming::listen(m, &state.migration, pending, spec.disks.clone(), launched)
                .map_err(WorkerError::Incoming)?,
        ),
    };
    server::start(
        files::bind_private(&dir.join(WORKER_SOCKET))?,
        state.clone(),
    )
    .map_err(WorkerError::Thread)?;
    Ok(Running {
        vm,
        state,
        control,
        incoming,
    })
}

impl Running {
    fn run(mut self) -> WorkerExitReason {
        // A post-copy still placing pages lives until the VM has stopped.
        let mut _postcopy = None;
        if let Some(inc) = self.incoming.take() {
            match incoming::receive(&mut self.vm, &self.state, inc) {
                Ok(pc) => _postcopy = pc,
                Err(why) => {
                    tracing::error!("incoming migration failed: {why}; nothing ran here");
                    self.control.shutdown();
                    return WorkerExitReason::StartFailed {
                        message: format!("incoming migration: {why}"),
                    };
                }
            }
        }
        self.state
            .started_at
            .store(crate::unix_millis(), Ordering::SeqCst);
        let _ = self.state.meter.started.set(std::time::Instant::now());
        let exit = self.vm.run();
        let migrated_away = self.state.migration.migrated_to().is_some();
        if migrated_away {
            self.state.migration.mark("VM stopped");
        }
        // A save (worker.sock's or control.sock's) stopped the VM: the state is complete.
        let saved = self
            .state
            .saved_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .or_else(|| self.control.saved_to());
        // The guest can write no more: what it wrote last reaches the console client before
        // the process ends (vireo vm console waits for the probe's OK to POWEROFF).
        self.state.console.finish(CONSOLE_DRAIN_LIMIT);
        // Cancels running merges and lets go of the disks before the process ends.
        self.control.shutdown();
        if migrated_away {
            self.state.migration.mark("worker done");
            if let Some(line) = self.state.migration.timeline_line() {
                tracing::info!("migration timeline (source worker, to its end): {line}");
            }
        }
        let migrated = self.state.migration.migrated_to();
        if let Some(message) = self.state.migration.lost() {
            return WorkerExitReason::MigrationLost { message };
        }
        match exit {
            Ok(VmExit::Stopped) if migrated.is_some() => {
                let (to, downtime_ms) = migrated.unwrap_or_default();
                // The VM stops before the migration thread marks itself completed: the exit
                // is the proof that it did.
                let mut last = self.state.migration.progress();
                last.state = vireo_api::worker::MigrateState::Completed;
                last.downtime_ms = Some(downtime_ms);
                WorkerExitReason::MigratedAway {
                    to,
                    downtime_ms,
                    progress: Some(Box::new(last)),
                }
            }
            Ok(VmExit::Stopped) if saved.is_some() => WorkerExitReason::Saved {
                dir: saved.unwrap_or_default(),
            },
            Ok(VmExit::PowerOff(status)) => WorkerExitReason::PoweredOff { status },
            Ok(VmExit::Reset) => WorkerExitReason::Reset,
            Ok(VmExit::Stopped) => WorkerExitReason::TurnedOff,
            Ok(VmExit::Error(message)) => WorkerExitReason::VcpuFailed { message },
            // Vm::run fails only before any vCPU started.
            Err(e) => WorkerExitReason::StartFailed {
                message: e.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_vswitch::vhost_user::VhostUserServer;

    fn spec_with_nic(queues: Option<u16>) -> VmSpec {
        let mut spec: VmSpec = serde_json::from_value(serde_json::json!({
            "version": SPEC_VERSION, "name": "w", "vcpus": 1, "memory_bytes": 33554432u64,
            "kernel": "/k",
            "nics": [{"switch": "lan", "name": "nic0", "mac": "02:00:00:00:00:01"}]
        }))
        .unwrap();
        spec.nics[0].queues = queues;
        spec
    }

    /// Queues of the NIC the worker builds for `queues` against a real switch port.
    fn nic_queues(queues: Option<u16>) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("p.sock");
        let (_port, _server) = VhostUserServer::listen(&socket, "vm").unwrap();
        let slots = connect_nics(&spec_with_nic(queues), &[socket]).unwrap();
        slots[0].device.queue_max_sizes().len()
    }

    #[test]
    fn the_nic_has_the_queue_pairs_its_spec_names() {
        assert_eq!(nic_queues(None), 2, "no count: one pair, no control queue");
        assert_eq!(nic_queues(Some(1)), 2);
        assert_eq!(nic_queues(Some(2)), 5, "two pairs and the control queue");
        assert_eq!(nic_queues(Some(4)), 9);
    }
}
