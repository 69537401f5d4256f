//! `AddDisk` and `RemoveDisk` on worker.sock: hot add and remove of virtio-blk disks
//! (the VMM's `VmHandle::attach_disk`/`detach_disk`, docs/vmm.md "Disk hot-plug").
//!
//! The worker keeps, per VM disk slot, which disk (serial, path) is in it. Three lists follow
//! the slots in order and change together under the one `slots` lock: the VMM's slots, the
//! meter's disks (`Metrics` answers per disk in slot order) and the control socket's disks. A
//! disk's position among the filled slots is its index everywhere: in the guest after a rescan,
//! in `Metrics`, on control.sock, and in vireod's spec.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vireo_api::{DiskFormat, DiskSpec};
use vireo_block::BlockBackend;
use vireo_vhdx::convert::Format;
use vireo_virtio::block::QosConfig;
use vireo_vmm::VmHandle;

use crate::control::{ControlDisk, ControlDisks};
use crate::error::WorkerError;
use crate::image::{self, DiskArg};
use crate::metrics::{Meter, MeteredDisk};
use crate::move_storage::MovableBackend;

/// One disk of a spec, opened and wrapped: the device, its backend, and what the meter and
/// the control socket keep of it.
pub struct BuiltDisk {
    pub block: vireo_virtio::Block,
    /// `movable`, as the device and the exit flush see it.
    pub backend: Arc<dyn BlockBackend>,
    /// The switchable layer a storage move acts on (`move_storage`).
    pub movable: Arc<MovableBackend>,
    pub metered: MeteredDisk,
    pub control: ControlDisk,
}

/// How `d` is opened.
pub fn disk_arg(d: &DiskSpec) -> DiskArg {
    DiskArg {
        path: d.path.clone(),
        read_only: d.read_only,
        format: d.format.map(|f| match f {
            DiskFormat::Raw => Format::Raw,
            DiskFormat::Vhd => Format::Vhd,
            DiskFormat::Vhdx => Format::Vhdx,
        }),
        queues: d.queues,
    }
}

/// Opens `d` (format by content unless given) and builds its virtio-blk device with its
/// serial, storage QoS and request queues (`d.queues`, else one per vCPU of a VM with
/// `vcpus`). Boot disks and hot-added ones go through here alike.
pub fn build_disk(d: &DiskSpec, vcpus: u32) -> Result<BuiltDisk, WorkerError> {
    build_disk_from(d, vcpus, None)
}

/// [`build_disk`] from `held`, the disk's file already open and locked, when given
/// ([`image::open_from`]).
pub fn build_disk_from(
    d: &DiskSpec,
    vcpus: u32,
    held: Option<std::fs::File>,
) -> Result<BuiltDisk, WorkerError> {
    let arg = disk_arg(d);
    let image::OpenedDisk { backend, image } = image::open_from(&arg, held)?;
    Ok(wrap_disk(d, backend, image, vcpus))
}

/// The request queues `d` gets in a VM with `vcpus`: what it asks for, else one per vCPU.
pub fn disk_queues(d: &DiskSpec, vcpus: u32) -> u16 {
    d.queues
        .unwrap_or_else(|| u16::try_from(vcpus).unwrap_or(u16::MAX))
        .clamp(1, image::MAX_DISK_QUEUES)
}

/// Builds `d`'s device over an opened `backend` (or, for an incoming migration, over a
/// placeholder the real disk replaces at the handoff).
pub fn wrap_disk(
    d: &DiskSpec,
    backend: Arc<dyn BlockBackend>,
    image: image::Image,
    vcpus: u32,
) -> BuiltDisk {
    let movable = Arc::new(MovableBackend::new(backend, d.path.clone(), image.clone()));
    let backend: Arc<dyn BlockBackend> = movable.clone();
    let mut block = vireo_virtio::Block::new(backend.clone())
        .with_queues(disk_queues(d, vcpus))
        .with_qos(QosConfig {
            max_iops: d.max_iops,
            min_iops: d.min_iops,
        });
    if let Some(serial) = &d.serial {
        block = block.with_serial(serial.clone());
    }
    if d.max_iops.is_some() || d.min_iops.is_some() {
        tracing::info!(
            "disk {}: storage QoS max_iops={:?} min_iops={:?} (8 KiB-normalized)",
            d.path.display(),
            d.max_iops,
            d.min_iops
        );
    }
    let metered = MeteredDisk {
        path: d.path.clone(),
        serial: d.serial.clone(),
        counters: block.counters(),
    };
    let control = ControlDisk {
        path: d.path.clone(),
        read_only: d.read_only,
        size: backend.size(),
        image,
        resizer: Some(block.resizer()),
    };
    BuiltDisk {
        block,
        backend,
        movable,
        metered,
        control,
    }
}

/// The disk in a slot, as the worker names it.
#[derive(Clone)]
pub struct SlotDisk {
    pub serial: Option<String>,
    pub path: PathBuf,
    pub movable: Arc<MovableBackend>,
}

/// What `AddDisk`/`RemoveDisk` act on.
pub struct Hotplug {
    vm: VmHandle,
    /// One entry per VM disk slot, in slot order.
    slots: Mutex<Vec<Option<SlotDisk>>>,
    control: ControlDisks,
    /// The VM's vCPUs: a hot-added disk gets one queue per vCPU unless it asks otherwise.
    vcpus: u32,
}

/// The same file, however it was named (falls back to the path as given).
fn same_file(a: &Path, b: &Path) -> bool {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    real(a) == real(b)
}

impl Hotplug {
    /// `boot` are the spec's disks, in the filled slots in order (the first slots at a boot;
    /// a restored VM has them where they were at save time, gaps included).
    pub fn new(
        vm: VmHandle,
        boot: &[DiskSpec],
        movable: Vec<Arc<MovableBackend>>,
        control: ControlDisks,
        vcpus: u32,
    ) -> Self {
        let mut disks = boot.iter().zip(movable);
        let slots = vm
            .disk_slots()
            .iter()
            .map(|slot| {
                slot.disk.as_ref()?;
                disks.next().map(|(d, movable)| SlotDisk {
                    serial: d.serial.clone(),
                    path: d.path.clone(),
                    movable,
                })
            })
            .collect();
        Hotplug {
            vm,
            slots: Mutex::new(slots),
            control,
            vcpus,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<SlotDisk>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds hot add and remove off while the guard lives (a save keeps the layout fixed).
    pub fn hold(&self) -> impl Drop + '_ {
        self.slots()
    }

    /// The filled slots' disks, in slot order (a disk's position here is its index).
    pub fn disks(&self) -> Vec<SlotDisk> {
        self.slots().iter().flatten().cloned().collect()
    }

    /// Holds hot add and remove off and gives the slots to change (a checkpoint retargets
    /// disks under it with [`Self::retarget_held`]).
    pub fn hold_slots(&self) -> std::sync::MutexGuard<'_, Vec<Option<SlotDisk>>> {
        self.slots()
    }

    /// After a storage move switched the disk at `index` to `path`: every list that names
    /// the disk by path (slots, meter, control socket) names the new file. `image` is what
    /// the control socket's live merge and resize act on from now on.
    pub fn retarget(&self, index: usize, path: &Path, image: image::Image, meter: &Meter) {
        let mut slots = self.slots();
        self.retarget_held(&mut slots, index, path, image, meter);
    }

    /// [`Self::retarget`] with the slots already held.
    pub fn retarget_held(
        &self,
        slots: &mut [Option<SlotDisk>],
        index: usize,
        path: &Path,
        image: image::Image,
        meter: &Meter,
    ) {
        if let Some(s) = slots.iter_mut().flatten().nth(index) {
            s.path = path.to_path_buf();
        }
        if let Some(m) = meter
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(index)
        {
            m.path = path.to_path_buf();
        }
        self.control.retarget(index, path.to_path_buf(), image);
    }

    /// A storage move starts: refused while a live merge runs, and live merges are refused
    /// until [`Self::end_move`] (a move must not copy a chain that changes shape).
    pub fn begin_move(&self) -> Result<(), String> {
        self.control.begin_move()
    }

    pub fn end_move(&self) {
        self.control.end_move()
    }

    /// Opens `d` and attaches it into the first free slot; returns its index. Nothing changes
    /// on an error (the message names the path or serial).
    pub fn add(&self, d: &DiskSpec, meter: &Meter) -> Result<u32, String> {
        let mut slots = self.slots();
        let shown = d.path.display();
        for s in slots.iter().flatten() {
            if same_file(&s.path, &d.path) {
                return Err(format!(
                    "disk {shown} is already attached to this VM{}",
                    s.serial
                        .as_ref()
                        .map(|s| format!(" (serial {s})"))
                        .unwrap_or_default()
                ));
            }
            if d.serial.is_some() && s.serial == d.serial {
                return Err(format!(
                    "serial {} is already used by disk {} of this VM",
                    d.serial.as_deref().unwrap_or_default(),
                    s.path.display()
                ));
            }
        }
        if !slots.iter().any(Option::is_none) {
            return Err(format!(
                "all {} disk slots of this VM are in use; remove a disk first",
                slots.len()
            ));
        }
        self.control.check_idle()?;
        let built = build_disk(d, self.vcpus).map_err(|e| e.to_string())?;
        let at = self
            .vm
            .attach_disk(built.block, built.backend)
            .map_err(|e| format!("attaching disk {shown}: {e}"))?;
        slots[at.slot] = Some(SlotDisk {
            serial: d.serial.clone(),
            path: d.path.clone(),
            movable: built.movable,
        });
        meter
            .disks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(at.index, built.metered);
        self.control.insert(at.index, built.control);
        tracing::info!(
            "disk {shown} hot-added in slot {} (disk index {})",
            at.slot,
            at.index
        );
        Ok(at.index as u32)
    }

    /// Detaches the disk with `serial`: flushed, closed, its slot empty again.
    pub fn remove(&self, serial: &str, meter: &Meter) -> Result<(), String> {
        let mut slots = self.slots();
        let Some(slot) = slots.iter().position(|s| {
            s.as_ref()
                .is_some_and(|s| s.serial.as_deref() == Some(serial))
        }) else {
            return Err(format!("this VM has no disk with serial {serial}"));
        };
        let index = slots[..slot].iter().flatten().count();
        self.control.check_idle()?;
        let backend = self
            .vm
            .detach_disk(slot)
            .map_err(|e| format!("removing disk {serial}: {e}"))?;
        let gone = slots[slot].take();
        {
            let mut metered = meter.disks.lock().unwrap_or_else(|p| p.into_inner());
            if index < metered.len() {
                metered.remove(index);
            }
        }
        self.control.remove(index);
        // The last reference: the file closes (and its lock goes) here.
        drop(backend);
        tracing::info!(
            "disk {} (serial {serial}) hot-removed from slot {slot}",
            gone.map(|g| g.path.display().to_string())
                .unwrap_or_default()
        );
        Ok(())
    }
}
