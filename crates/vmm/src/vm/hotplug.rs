//! Hot add and remove of virtio-blk disks on a running VM (docs/vmm.md, "Disk hot-plug").
//!
//! Virtio-mmio has no hot-plug signal, so the slots are made at boot: `VmConfig::disk_slots`
//! windows for disks, listed on the kernel command line right after the boot disks (before the
//! NICs). A slot without a disk holds [`EmptySlot`], which answers DeviceID 0: the virtio-mmio
//! placeholder a driver must ignore (virtio 1.2 §4.2.2). Attaching builds a transport for the
//! new device and puts it into the slot's register window; detaching quiesces the device at a
//! request boundary (as a VM pause does), resets it, flushes the disk, and puts the
//! placeholder back. The guest finds out by probing the slots again (the probe's `RESCAN`).
//!
//! Locking: every attach and detach holds the VM's `lifecycle` lock (so it never interleaves
//! with pause, resume or reset), then the slot table, then one transport's lock. The bus only
//! ever takes a transport's lock, so a vCPU touching the window waits for the swap at most.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::IoEventAddress;
use vireo_block::BlockBackend;
use vireo_virtio::{ActivateError, QueueHandle, VirtioDevice, VirtioInterrupt};
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioPlacement, VmHandle};
use crate::devices::bus::lock;
use crate::virtio_mmio::{MmioTransport, QUEUE_NOTIFY};
use crate::GuestMemory;

/// The most disk slots a VM may reserve (the IOAPIC pins left after the NICs bound it too).
pub const MAX_DISK_SLOTS: usize = 16;
/// How long a detach waits for the disk's thread to finish the request it is executing.
const DETACH_QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a disk could not be attached or detached. The VM is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error("the VM is not running (it has stopped or is stopping)")]
    NotRunning,
    #[error("all {0} disk slots are in use; remove a disk first (slots are reserved at boot)")]
    NoFreeSlot(usize),
    #[error("there is no disk slot {slot} (the VM has {slots})")]
    NoSuchSlot { slot: usize, slots: usize },
    #[error("disk slot {0} is empty")]
    EmptySlot(usize),
    #[error("the disk in slot {slot} did not reach a request boundary: {source}")]
    Quiesce {
        slot: usize,
        #[source]
        source: vireo_virtio::PauseError,
    },
    #[error("setting up disk slot {slot}: {what}: {source}")]
    Setup {
        slot: usize,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The device an empty slot holds: DeviceID 0, no queues, no features.
pub struct EmptySlot;

impl VirtioDevice for EmptySlot {
    fn device_type(&self) -> u32 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[]
    }
    fn features(&self) -> u64 {
        0
    }
    fn ack_features(&mut self, _acked: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemory,
        _interrupt: Arc<dyn VirtioInterrupt>,
        _queues: Vec<QueueHandle>,
    ) -> Result<(), ActivateError> {
        // A driver never gets here (FEATURES_OK needs VERSION_1, which is not offered).
        Err(ActivateError::QueueCount { want: 0, got: 0 })
    }
    fn reset(&mut self) {}
    fn save_state(
        &self,
    ) -> Result<vireo_virtio::state::DeviceState, vireo_virtio::state::StateError> {
        Ok(vireo_virtio::state::DeviceState::Empty)
    }
    fn restore_state(
        &mut self,
        state: &vireo_virtio::state::DeviceState,
    ) -> Result<(), vireo_virtio::state::StateError> {
        match state {
            vireo_virtio::state::DeviceState::Empty => Ok(()),
            other => Err(vireo_virtio::state::StateError::WrongDevice {
                saved: other.kind(),
                device: "empty slot",
            }),
        }
    }
}

/// One disk slot: where it is, its interrupt, and the disk in it (if any).
pub(crate) struct DiskSlot {
    /// Index into the VM's transports (and virtio placements).
    pub transport: usize,
    pub place: VirtioPlacement,
    /// A clone of the slot's irqfd, for the transport of each disk put in.
    irq: EventFd,
    /// The disk's backend, flushed at detach and when the VM stops.
    pub backend: Option<Arc<dyn BlockBackend>>,
}

impl DiskSlot {
    pub fn new(
        transport: usize,
        place: VirtioPlacement,
        irq: &EventFd,
        backend: Option<Arc<dyn BlockBackend>>,
    ) -> std::io::Result<Self> {
        Ok(DiskSlot {
            transport,
            place,
            irq: irq.try_clone()?,
            backend,
        })
    }
}

/// The VM's disk slots, in command-line (slot) order.
#[derive(Default)]
pub(crate) struct DiskSlots(pub Mutex<Vec<DiskSlot>>);

impl DiskSlots {
    /// Flushes every attached disk (the VM has stopped).
    pub fn flush_all(&self) {
        for s in lock(&self.0).iter() {
            if let Some(b) = &s.backend {
                if let Err(e) = b.flush() {
                    tracing::warn!("flushing disk {}: {e}", b.id());
                }
            }
        }
    }
}

/// A disk slot as callers (the worker, VM state capture) see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSlotInfo {
    /// 0-based among the disk slots.
    pub slot: usize,
    pub base: u64,
    pub irq: u32,
    /// The attached disk's backend id (`BlockBackend::id`), `None` for an empty slot.
    pub disk: Option<String>,
}

/// Where an attached disk went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The disk slot it occupies.
    pub slot: usize,
    /// Its position among the attached disks in slot order: the guest's disk index after a
    /// rescan (the probe numbers disks that way).
    pub index: usize,
}

/// Moves the disks (the leading block devices of `devices`) first, then `slots - disks`
/// empty slots, then the rest. Returns the devices and how many disk slots lead them.
pub(crate) fn with_empty_slots(
    mut devices: Vec<crate::VirtioSlot>,
    slots: usize,
) -> (Vec<crate::VirtioSlot>, usize) {
    // A restore hands in its slots already laid out (`arrange_saved_slots`): empty ones
    // count as slots too.
    let disks = devices
        .iter()
        .take_while(|d| matches!(d.device.device_type(), vireo_virtio::device_type::BLOCK | 0))
        .count();
    let empty = slots.min(MAX_DISK_SLOTS).saturating_sub(disks);
    let tail = devices.split_off(disks);
    devices.extend((0..empty).map(|_| crate::VirtioSlot {
        device: Box::new(EmptySlot),
        flush_on_exit: None,
    }));
    devices.extend(tail);
    (devices, disks + empty)
}

/// For an incoming migration, whose skeleton is built before the device state arrives: puts
/// the config's disks (slot order) into the slots the source has them in (`layout`: `true`
/// where a slot holds a disk), as [`arrange_saved_slots`] does from a saved state.
pub fn arrange_disk_slots(
    devices: Vec<crate::VirtioSlot>,
    layout: &[bool],
    slots: usize,
) -> Result<Vec<crate::VirtioSlot>, crate::StateError> {
    use vireo_virtio::device_type::BLOCK;
    let types: Vec<u32> = layout.iter().map(|&d| if d { BLOCK } else { 0 }).collect();
    arrange_saved_slots(devices, &types, slots)
}

/// For a restore: puts the config's disks into the slots they were in when the VM was saved
/// (`saved`: the saved VM's device types, 0 for an empty slot), so a VM whose hot-added or
/// removed disks left gaps comes back with the same layout. The config's disks are the saved
/// disks in slot order (the owner's spec at save time). Configs without disk slots pass as
/// they are.
pub(crate) fn arrange_saved_slots(
    mut devices: Vec<crate::VirtioSlot>,
    saved: &[u32],
    slots: usize,
) -> Result<Vec<crate::VirtioSlot>, crate::StateError> {
    use vireo_virtio::device_type::BLOCK;
    if slots == 0 {
        return Ok(devices);
    }
    let disks = devices
        .iter()
        .take_while(|d| d.device.device_type() == BLOCK)
        .count();
    let count = slots.min(MAX_DISK_SLOTS).max(disks);
    let rest = devices.split_off(disks);
    let layout = saved.get(..count).unwrap_or(saved);
    let saved_disks = layout.iter().filter(|&&t| t == BLOCK).count();
    if layout.len() != count || saved_disks != disks || layout.iter().any(|&t| t != BLOCK && t != 0)
    {
        return Err(crate::StateError::Mismatch(format!(
            "saved with {saved_disks} disk(s) in {} slot(s), this VM has {disks} disk(s) in {count}",
            layout.iter().filter(|&&t| t == BLOCK || t == 0).count()
        )));
    }
    let mut disks = devices.into_iter();
    let mut out: Vec<crate::VirtioSlot> = layout
        .iter()
        .map(|&t| match t {
            BLOCK => disks.next().expect("counted above"),
            _ => crate::VirtioSlot {
                device: Box::new(EmptySlot),
                flush_on_exit: None,
            },
        })
        .collect();
    out.extend(rest);
    Ok(out)
}

impl VmHandle {
    /// The disk slots and what each holds.
    pub fn disk_slots(&self) -> Vec<DiskSlotInfo> {
        lock(&self.0.disk_slots.0)
            .iter()
            .enumerate()
            .map(|(i, s)| DiskSlotInfo {
                slot: i,
                base: s.place.base,
                irq: s.place.irq,
                disk: s.backend.as_ref().map(|b| b.id()),
            })
            .collect()
    }

    /// Puts `device` (a virtio-blk over `backend`) into the first free disk slot. The guest
    /// sees it when it probes the slot again. Works while the VM runs or is paused.
    pub fn attach_disk(
        &self,
        device: vireo_virtio::Block,
        backend: Arc<dyn BlockBackend>,
    ) -> Result<Attached, HotplugError> {
        let _op = lock(&self.0.lifecycle);
        if self.0.exit.is_set() {
            return Err(HotplugError::NotRunning);
        }
        let mut slots = lock(&self.0.disk_slots.0);
        let Some(n) = slots.iter().position(|s| s.backend.is_none()) else {
            return Err(HotplugError::NoFreeSlot(slots.len()));
        };
        let slot = &mut slots[n];
        let setup = |what, source| HotplugError::Setup {
            slot: n,
            what,
            source,
        };
        let irq = slot.irq.try_clone().map_err(|e| setup("irqfd", e))?;
        let transport = MmioTransport::new(Box::new(device), self.0.ram.memory.clone(), irq)
            .map_err(|e| setup("transport", e))?;
        let notify = IoEventAddress::Mmio(slot.place.base + QUEUE_NOTIFY);
        for (q, kick) in transport.kick_fds().iter().enumerate() {
            if let Err(e) = self.0.vm_fd.register_ioevent(kick, &notify, q as u32) {
                for k in &transport.kick_fds()[..q] {
                    let _ = self.0.vm_fd.unregister_ioevent(k, &notify, q as u32);
                }
                return Err(setup("KVM_IOEVENTFD", std::io::Error::from(e)));
            }
        }
        *lock(&self.0.transports[slot.transport]) = transport;
        tracing::info!(
            "disk {} attached in slot {n} at {:#x}, GSI {}",
            backend.id(),
            slot.place.base,
            slot.place.irq
        );
        slot.backend = Some(backend);
        let index = slots[..n].iter().filter(|s| s.backend.is_some()).count();
        Ok(Attached { slot: n, index })
    }

    /// Takes the disk out of disk slot `slot`: its thread finishes the request it is executing
    /// and stops, the disk is flushed and let go, and the slot answers DeviceID 0 again.
    /// Requests the guest queued but the device had not started are dropped unanswered: the
    /// guest must stop using a disk before it is removed. Returns the disk's backend (flushed).
    pub fn detach_disk(&self, slot: usize) -> Result<Arc<dyn BlockBackend>, HotplugError> {
        let _op = lock(&self.0.lifecycle);
        if self.0.exit.is_set() {
            return Err(HotplugError::NotRunning);
        }
        let mut slots = lock(&self.0.disk_slots.0);
        let count = slots.len();
        let s = slots
            .get_mut(slot)
            .ok_or(HotplugError::NoSuchSlot { slot, slots: count })?;
        if s.backend.is_none() {
            return Err(HotplugError::EmptySlot(slot));
        }
        let irq = s.irq.try_clone().map_err(|source| HotplugError::Setup {
            slot,
            what: "irqfd",
            source,
        })?;
        let empty = MmioTransport::new(Box::new(EmptySlot), self.0.ram.memory.clone(), irq)
            .map_err(|source| HotplugError::Setup {
                slot,
                what: "transport",
                source,
            })?;
        let mut t = lock(&self.0.transports[s.transport]);
        // A paused VM's devices are parked already; pausing again returns at once.
        t.pause(DETACH_QUIESCE_TIMEOUT).map_err(|source| {
            if !self.0.control.paused() {
                t.resume();
            }
            HotplugError::Quiesce { slot, source }
        })?;
        t.reset();
        let notify = IoEventAddress::Mmio(s.place.base + QUEUE_NOTIFY);
        for (q, kick) in t.kick_fds().iter().enumerate() {
            if let Err(e) = self.0.vm_fd.unregister_ioevent(kick, &notify, q as u32) {
                tracing::warn!("slot {slot}: unregistering queue {q}'s ioeventfd: {e}");
            }
        }
        let old = std::mem::replace(&mut *t, empty);
        drop(t);
        drop(old);
        let backend = s.backend.take().expect("checked above");
        if let Err(e) = backend.flush() {
            tracing::warn!("flushing detached disk {}: {e}", backend.id());
        }
        tracing::info!("disk {} detached from slot {slot}", backend.id());
        Ok(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VirtioSlot;

    fn disk() -> VirtioSlot {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let raw = vireo_block::RawFile::open(&p, false).unwrap();
        VirtioSlot::block(Arc::new(raw))
    }

    #[test]
    fn empty_slots_go_after_the_disks_and_before_the_nics() {
        let nic = || VirtioSlot {
            device: Box::new(EmptyNic),
            flush_on_exit: None,
        };
        let types = |d: &[VirtioSlot]| d.iter().map(|s| s.device.device_type()).collect::<Vec<_>>();
        let (d, n) = with_empty_slots(vec![disk(), disk(), nic()], 5);
        assert_eq!((types(&d), n), (vec![2, 2, 0, 0, 0, 1], 5));
        let (d, n) = with_empty_slots(vec![disk(), nic()], 0);
        assert_eq!((types(&d), n), (vec![2, 1], 1));
        let (d, n) = with_empty_slots(vec![disk(), disk(), disk()], 2);
        assert_eq!((types(&d), n), (vec![2, 2, 2], 3));
        let (d, n) = with_empty_slots(vec![], 100);
        assert_eq!((d.len(), n), (MAX_DISK_SLOTS, MAX_DISK_SLOTS));
    }

    #[test]
    fn an_empty_slot_is_a_virtio_mmio_placeholder() {
        use crate::devices::BusDevice;
        let mem = GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(EmptySlot), mem, irq).unwrap();
        let read = |t: &mut MmioTransport, at: u64| {
            let mut b = [0u8; 4];
            t.read(at, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(read(&mut t, 0x000), 0x7472_6976, "magic \"virt\"");
        assert_eq!(read(&mut t, 0x004), 2, "version 2");
        assert_eq!(read(&mut t, 0x008), 0, "DeviceID 0: nothing here");
        assert!(t.kick_fds().is_empty());
        // A driver that tries anyway gets nowhere: no features, no queues, no DRIVER_OK.
        for status in [1, 3, 11, 15] {
            t.write(0x070, &u32::to_le_bytes(status));
        }
        assert_eq!(read(&mut t, 0x070) & 4, 0);
        assert_eq!(read(&mut t, 0x034), 0, "QueueNumMax");
    }

    /// A stand-in NIC (type 1) for the ordering test.
    struct EmptyNic;
    impl VirtioDevice for EmptyNic {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[]
        }
        fn features(&self) -> u64 {
            0
        }
        fn ack_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemory,
            _: Arc<dyn VirtioInterrupt>,
            _: Vec<QueueHandle>,
        ) -> Result<(), ActivateError> {
            Ok(())
        }
        fn reset(&mut self) {}
    }
}
