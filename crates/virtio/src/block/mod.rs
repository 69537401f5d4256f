//! virtio-blk over any [`BlockBackend`]: one or more request queues (VIRTIO_BLK_F_MQ), each
//! served by its own worker thread.
//!
//! Sharing: every queue's worker holds the same `Arc<dyn BlockBackend>` and `BlockCounters`;
//! backends are `Send + Sync` and lock internally (`vireo_block`'s contract: VHDX and VHD
//! allocate blocks under their allocation lock and re-check the BAT entry there, so two queues
//! writing one new block at once allocate it once). Workers share nothing else: each has its
//! own ring, io_uring batcher, poll window and pause control, so no lock sits between queues.

mod config;
mod gate;
pub mod qos;
mod request;
mod worker;

pub use config::{MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
pub use qos::QosConfig;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vireo_block::{BlockBackend, BlockError};
use virtio_queue::QueueT;

use crate::notifier::ConfigNotifier;
use crate::pause::PauseCtl;
use crate::state::{BlockState, DeviceState, RingPositions, StateError};
use crate::worker::Worker;
use crate::{
    device_type, ActivateError, GuestMemory, PauseError, QueueHandle, VirtioDevice, VirtioInterrupt,
};

/// Queue size offered when the caller does not choose one.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Most request queues a disk offers: each is a host thread, and more than the host has
/// cores only makes them take turns.
pub const MAX_QUEUES: u16 = 16;

/// Running totals of what the device did, for metering and tests.
#[derive(Debug, Default)]
pub struct BlockCounters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    /// Requests that ended with a status other than OK.
    pub errors: AtomicU64,
    /// Successful requests in IOs normalized to 8 KiB ([`qos::cost`]).
    pub normalized_ios: AtomicU64,
    /// Nanoseconds requests were held back by the `max_iops` limiter.
    pub throttled_ns: AtomicU64,
    /// "Minimum IOPS not met" episodes ([`qos::MinIopsMonitor`]).
    pub min_iops_alerts: AtomicU64,
    /// An episode is going on.
    pub min_iops_alert_active: AtomicBool,
}

/// A point-in-time copy of [`BlockCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub errors: u64,
    pub normalized_ios: u64,
    pub throttled_ns: u64,
    pub min_iops_alerts: u64,
    pub min_iops_alert_active: bool,
}

impl BlockCounters {
    pub fn snapshot(&self) -> BlockStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            reads: get(&self.reads),
            read_bytes: get(&self.read_bytes),
            writes: get(&self.writes),
            write_bytes: get(&self.write_bytes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            errors: get(&self.errors),
            normalized_ios: get(&self.normalized_ios),
            throttled_ns: get(&self.throttled_ns),
            min_iops_alerts: get(&self.min_iops_alerts),
            min_iops_alert_active: self.min_iops_alert_active.load(Ordering::Relaxed),
        }
    }
}

/// A virtio-blk device.
pub struct Block {
    backend: Arc<dyn BlockBackend>,
    /// One entry per request queue (all the same size).
    queue_sizes: Vec<u16>,
    /// Queues asked for with [`Block::with_queues`]; QoS may hold the device to one.
    wanted_queues: u16,
    acked_features: u64,
    counters: Arc<BlockCounters>,
    notifier: ConfigNotifier,
    /// Per queue while active, in queue order.
    queues: Option<Vec<ActiveQueue>>,
    /// What VIRTIO_BLK_T_GET_ID answers instead of the backend's own id (a VM spec's serial).
    serial: Option<String>,
    /// Storage QoS; off (the default) costs nothing per request.
    qos: QosConfig,
    /// Loaded from a save: the next activation starts the workers parked, so nothing is
    /// served for a VM restored paused until it resumes.
    restored: bool,
}

/// Resizes a disk while its device is owned by the transport, telling the driver.
///
/// Why this is all it takes: the device caches nothing about the size. `capacity` in config
/// space and every request's range check read `backend.size()` afresh, so once the backend has
/// changed size, requests inside a grown area work and requests past a shrunk end fail with
/// IOERR. What is left is telling the driver: the transport's interrupt (published in the
/// shared [`ConfigNotifier`] while the device is active) bumps ConfigGeneration and raises a
/// config-change interrupt. While the device is inactive the driver reads the new capacity
/// when it next initialises it.
#[derive(Clone)]
pub struct BlockResizer {
    backend: Arc<dyn BlockBackend>,
    notifier: ConfigNotifier,
}

impl BlockResizer {
    /// Changes the disk's size and raises a config-change interrupt so the driver re-reads
    /// `capacity`.
    pub fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        self.backend.resize(new_size)?;
        self.notifier.notify()?;
        Ok(())
    }

    /// Tells the driver the capacity changed underneath (a live merge onto a larger parent).
    pub fn size_changed(&self) -> std::io::Result<()> {
        self.notifier.notify()
    }

    /// The disk's current size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.size()
    }
}

impl Block {
    /// A device over `backend` with the default queue size.
    pub fn new(backend: Arc<dyn BlockBackend>) -> Self {
        Self::with_queue_size(backend, DEFAULT_QUEUE_SIZE)
    }

    /// A device over `backend` whose queue holds up to `queue_size` entries (a power of two,
    /// at least 4; other values are rounded down to one, clamped to 4..=32768).
    pub fn with_queue_size(backend: Arc<dyn BlockBackend>, queue_size: u16) -> Self {
        let size = queue_size.clamp(4, 32768);
        let size = 1u16 << (15 - size.leading_zeros() as u16);
        Block {
            backend,
            queue_sizes: vec![size],
            wanted_queues: 1,
            acked_features: 0,
            counters: Arc::default(),
            notifier: ConfigNotifier::default(),
            queues: None,
            serial: None,
            qos: QosConfig::default(),
            restored: false,
        }
    }

    /// Offers `queues` request queues (VIRTIO_BLK_F_MQ when more than one), each with its own
    /// worker thread; clamped to 1..=[`MAX_QUEUES`]. A disk with storage QoS keeps one queue:
    /// its limiter and monitor count the disk's requests in one place.
    pub fn with_queues(mut self, queues: u16) -> Self {
        self.wanted_queues = queues.clamp(1, MAX_QUEUES);
        self.shape_queues();
        self
    }

    /// The number of request queues the device offers.
    pub fn num_queues(&self) -> u16 {
        self.queue_sizes.len() as u16
    }

    fn shape_queues(&mut self) {
        let n = if self.qos.is_off() {
            self.wanted_queues
        } else {
            1
        };
        let size = self.queue_sizes[0];
        self.queue_sizes = vec![size; usize::from(n)];
    }

    /// The device id the guest reads (VIRTIO_BLK_T_GET_ID, `/sys/block/*/serial`) instead of
    /// the backend's own; the guest gets at most 20 bytes of it.
    pub fn with_serial(mut self, serial: impl Into<String>) -> Self {
        self.serial = Some(serial.into());
        self
    }

    /// Storage QoS for the disk: `max_iops` delays requests beyond the limit (never fails
    /// them; only this disk's thread waits), `min_iops` raises alerts when it is not met
    /// (see [`qos`]). Both count IOs normalized to 8 KiB; zero means "none".
    pub fn with_qos(mut self, qos: QosConfig) -> Self {
        self.qos = QosConfig {
            max_iops: qos.max_iops.filter(|&n| n > 0),
            min_iops: qos.min_iops.filter(|&n| n > 0),
        };
        self.shape_queues();
        self
    }

    /// A handle that resizes the disk and notifies the driver, usable after the device has
    /// been handed to the transport.
    pub fn resizer(&self) -> BlockResizer {
        BlockResizer {
            backend: self.backend.clone(),
            notifier: self.notifier.clone(),
        }
    }

    /// The device's counters (shared; they keep counting across resets).
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    fn topology(&self) -> bool {
        self.backend.physical_sector_size() > self.backend.logical_sector_size()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        config::features(
            self.backend.read_only(),
            self.topology(),
            self.queue_sizes.len() > 1,
        )
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked_features = acked & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = config::config_space(
            self.backend.size(),
            // Two descriptors of every chain carry the header and the status.
            u32::from(self.queue_sizes[0]) - 2,
            self.backend.logical_sector_size(),
            self.backend.physical_sector_size(),
            self.num_queues(),
        );
        crate::read_config_bytes(&space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio-blk: ignoring {}-byte config write at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueHandle>,
    ) -> Result<(), ActivateError> {
        if self.queues.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                want: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        let event_idx = crate::has_event_idx(self.acked_features);
        self.notifier.set(Some(interrupt.clone()));
        let parked = std::mem::take(&mut self.restored);
        let mut active = Vec::with_capacity(queues.len());
        for (index, handle) in queues.into_iter().enumerate() {
            // A driver without VIRTIO_BLK_F_MQ (or one using fewer queues) leaves the others
            // unready: no thread for them, and their positions stay what the transport set.
            if !handle.queue.ready() {
                active.push(ActiveQueue::Idle((
                    handle.queue.next_avail(),
                    handle.queue.next_used(),
                )));
                continue;
            }
            let worker = worker::BlockWorker::new(
                mem.clone(),
                interrupt.clone(),
                handle,
                index as u16,
                event_idx,
                worker::Disk {
                    backend: self.backend.clone(),
                    counters: self.counters.clone(),
                    serial: self.serial.clone(),
                    qos: self.qos,
                },
                Arc::new(if parked {
                    PauseCtl::parked_from_start()?
                } else {
                    PauseCtl::new()?
                }),
            );
            // On an error the workers started so far stop when `active` is dropped.
            active.push(ActiveQueue::Serving(worker.start()?));
        }
        self.queues = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        for queue in self.queues.take().into_iter().flatten() {
            if let ActiveQueue::Serving(worker) = queue {
                worker.stop();
            }
        }
        self.notifier.set(None);
        self.acked_features = 0;
        self.restored = false;
    }

    /// Each queue's worker finishes the batch it is executing, publishes its used entries (and
    /// interrupts the driver if asked), puts back what it had not started, and parks. Requests
    /// waiting in a ring (held by `max_iops` or not yet reached) stay there untouched until
    /// [`Block::resume`]. All workers are asked first, then waited for, so the queues quiesce
    /// together rather than one after another.
    fn pause(&mut self, timeout: Duration) -> Result<(), PauseError> {
        let workers: Vec<&Worker> = self.workers().collect();
        for w in &workers {
            w.request_pause();
        }
        let deadline = std::time::Instant::now() + timeout;
        for w in &workers {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !w.pause(left) {
                return Err(PauseError::Timeout(timeout));
            }
        }
        Ok(())
    }

    fn resume(&mut self) {
        for w in self.workers() {
            w.resume();
        }
    }

    fn save_state(&self) -> Result<DeviceState, StateError> {
        let rings = match &self.queues {
            Some(queues) => {
                let mut positions = Vec::with_capacity(queues.len());
                for queue in queues {
                    match queue {
                        ActiveQueue::Serving(w) => {
                            let report = w.parked_report().ok_or(StateError::NotPaused)?;
                            positions.extend(report.rings.queues);
                        }
                        ActiveQueue::Idle(at) => positions.push(*at),
                    }
                }
                Some(RingPositions { queues: positions })
            }
            None => None,
        };
        Ok(DeviceState::Block(BlockState {
            acked_features: self.acked_features,
            rings,
            num_queues: self.num_queues(),
        }))
    }

    /// A state saved with another queue count than this device was built with (an older
    /// Vireo's one queue; a spec whose `queues=` or vCPU count changed since): the driver in
    /// the guest set up the saved count, so the device takes it.
    fn adopt_saved_shape(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let DeviceState::Block(s) = state else {
            return Ok(()); // restore_state names the mismatch
        };
        if s.num_queues == self.num_queues() {
            return Ok(());
        }
        if self.queues.is_some() {
            return Err(StateError::Invalid("the device is active".into()));
        }
        if s.num_queues == 0 || s.num_queues > MAX_QUEUES {
            return Err(StateError::Invalid(format!(
                "{} request queues saved; a disk has 1 to {MAX_QUEUES}",
                s.num_queues
            )));
        }
        if s.num_queues > 1 && !self.qos.is_off() {
            return Err(StateError::Invalid(format!(
                "saved with {} request queues, but this disk now has storage QoS, which \
                 runs on one queue; restore without max-iops/min-iops, then set them",
                s.num_queues
            )));
        }
        self.wanted_queues = s.num_queues;
        self.shape_queues();
        Ok(())
    }

    /// The queue count and the features must fit this disk; asked before an in-place apply
    /// pauses the VM (whose transport cannot change shape then), so a refusal leaves it running.
    fn check_restore(&self, state: &DeviceState) -> Result<(), StateError> {
        let DeviceState::Block(s) = state else {
            return Err(StateError::WrongDevice {
                saved: state.kind(),
                device: "block",
            });
        };
        if s.num_queues != self.num_queues() {
            return Err(StateError::Invalid(format!(
                "{} request queues saved, the disk has {}",
                s.num_queues,
                self.num_queues()
            )));
        }
        let extra = s.acked_features & !self.features();
        if extra != 0 {
            return Err(StateError::Invalid(format!(
                "features {extra:#x} were accepted but this disk does not offer them \
                 (read-only or sector sizes changed?)"
            )));
        }
        Ok(())
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.check_restore(state)?;
        let DeviceState::Block(s) = state else {
            return Ok(());
        };
        if self.queues.is_some() {
            return Err(StateError::Invalid("the device is active".into()));
        }
        self.acked_features = s.acked_features;
        self.restored = s.rings.is_some();
        Ok(())
    }
}

/// One request queue of an active device.
enum ActiveQueue {
    Serving(Worker),
    /// Not set up by the driver: `(next_avail, next_used)` as activation found them.
    Idle((u16, u16)),
}

impl Block {
    fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.queues.iter().flatten().filter_map(|q| match q {
            ActiveQueue::Serving(w) => Some(w),
            ActiveQueue::Idle(_) => None,
        })
    }
}
