//! virtio-blk over any [`BlockBackend`]: one request queue served by one worker thread.

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

use crate::notifier::ConfigNotifier;
use crate::pause::PauseCtl;
use crate::state::{BlockState, DeviceState, StateError};
use crate::worker::Worker;
use crate::{
    device_type, ActivateError, GuestMemory, PauseError, QueueHandle, VirtioDevice, VirtioInterrupt,
};

/// Queue size offered when the caller does not choose one.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

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
    queue_sizes: [u16; 1],
    acked_features: u64,
    counters: Arc<BlockCounters>,
    notifier: ConfigNotifier,
    worker: Option<Worker>,
    /// What VIRTIO_BLK_T_GET_ID answers instead of the backend's own id (a VM spec's serial).
    serial: Option<String>,
    /// Storage QoS; off (the default) costs nothing per request.
    qos: QosConfig,
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
            queue_sizes: [size],
            acked_features: 0,
            counters: Arc::default(),
            notifier: ConfigNotifier::default(),
            worker: None,
            serial: None,
            qos: QosConfig::default(),
        }
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
        config::features(self.backend.read_only(), self.topology())
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
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let [queue]: [QueueHandle; 1] =
            queues
                .try_into()
                .map_err(|q: Vec<QueueHandle>| ActivateError::QueueCount {
                    want: 1,
                    got: q.len(),
                })?;
        let event_idx = crate::has_event_idx(self.acked_features);
        self.notifier.set(Some(interrupt.clone()));
        let worker = worker::BlockWorker::new(
            mem,
            interrupt,
            queue,
            event_idx,
            worker::Disk {
                backend: self.backend.clone(),
                counters: self.counters.clone(),
                serial: self.serial.clone(),
                qos: self.qos,
            },
            Arc::new(PauseCtl::new()?),
        );
        self.worker = Some(worker.start()?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.notifier.set(None);
        self.acked_features = 0;
    }

    /// The worker executes requests one at a time, so "in flight" is the one it is executing:
    /// it finishes it, publishes the used entries of the pass (and interrupts the driver if
    /// asked), puts back what it had not started, and parks. Requests waiting in the ring
    /// (held by `max_iops` or not yet reached) stay there untouched until [`Block::resume`].
    fn pause(&mut self, timeout: Duration) -> Result<(), PauseError> {
        match &self.worker {
            Some(w) if !w.pause(timeout) => Err(PauseError::Timeout(timeout)),
            _ => Ok(()),
        }
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    fn save_state(&self) -> Result<DeviceState, StateError> {
        let rings = match &self.worker {
            Some(w) => Some(w.parked_report().ok_or(StateError::NotPaused)?.rings),
            None => None,
        };
        Ok(DeviceState::Block(BlockState {
            acked_features: self.acked_features,
            rings,
        }))
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let DeviceState::Block(s) = state else {
            return Err(StateError::WrongDevice {
                saved: state.kind(),
                device: "block",
            });
        };
        if self.worker.is_some() {
            return Err(StateError::Invalid("the device is active".into()));
        }
        let extra = s.acked_features & !self.features();
        if extra != 0 {
            return Err(StateError::Invalid(format!(
                "features {extra:#x} were accepted but this disk does not offer them \
                 (read-only or sector sizes changed?)"
            )));
        }
        self.acked_features = s.acked_features;
        Ok(())
    }
}
