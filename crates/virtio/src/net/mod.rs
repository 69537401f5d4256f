//! virtio-net over any [`FramePort`]: receive queue 0, transmit queue 1, one worker thread.
//! Every frame sits behind a 12-byte header (VERSION_1 always carries `num_buffers`, which
//! MRG_RXBUF makes meaningful). On a port with offloads (a TAP opened with `IFF_VNET_HDR`) the
//! device offers checksum and TSO offloads and passes the header's first 10 bytes (the legacy
//! `virtio_net_hdr`) between driver and port unchanged; otherwise, or when the driver declines
//! them, the header is zero and frames are plain (`offload.rs`).

mod offload;
mod rx;
mod tx;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vireo_netport::{FramePort, MAX_SUPER_FRAME, VNET_HDR_LEN};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};

use crate::notifier::ConfigNotifier;
use crate::state::{DeviceState, NetState, StateError};
use crate::worker::Worker;
use crate::{
    device_type, ActivateError, GuestMemory, PauseError, QueueHandle, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Queue size offered for each queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1` (with `num_buffers`): the header size of every VERSION_1 device.
pub const NET_HDR_LEN: usize = 12;

/// Running totals for metering; frames are counted without the virtio-net header.
#[derive(Debug, Default)]
pub struct NetCounters {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the port that did not reach the guest (too long for its buffers, port
    /// errors, or pending when the device was reset).
    pub rx_drops: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the guest sent that did not reach the port (malformed, too long, port full).
    pub tx_drops: AtomicU64,
}

/// A point-in-time copy of [`NetCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_drops: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_drops: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_frames: get(&self.rx_frames),
            rx_bytes: get(&self.rx_bytes),
            rx_drops: get(&self.rx_drops),
            tx_frames: get(&self.tx_frames),
            tx_bytes: get(&self.tx_bytes),
            tx_drops: get(&self.tx_drops),
        }
    }
}

/// A virtio-net device.
pub struct Net {
    port: Arc<dyn FramePort>,
    mac: [u8; 6],
    queue_sizes: [u16; 2],
    acked_features: u64,
    counters: Arc<NetCounters>,
    link_up: Arc<AtomicBool>,
    notifier: ConfigNotifier,
    worker: Option<Worker>,
    /// A frame from a restored state, handed to the worker on activation.
    restored_rx_frame: Option<([u8; VNET_HDR_LEN], Vec<u8>)>,
    /// Loaded from a save: the next activation starts the worker parked, so nothing moves
    /// between the port and the RAM of a VM restored paused until it resumes.
    restored: bool,
}

/// Sets a NIC's link state (the config space's LINK_UP bit) while the transport owns it.
#[derive(Clone)]
pub struct LinkControl {
    up: Arc<AtomicBool>,
    notifier: ConfigNotifier,
}

impl LinkControl {
    /// Changes the link state and raises a config-change interrupt if it changed. Frames
    /// still flow while the link is down; the driver decides what to do with the carrier.
    pub fn set_up(&self, up: bool) -> std::io::Result<()> {
        if self.up.swap(up, Ordering::AcqRel) != up {
            self.notifier.notify()?;
        }
        Ok(())
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

impl Net {
    /// A NIC with address `mac` whose frames go to and come from `port`.
    pub fn new(port: Arc<dyn FramePort>, mac: [u8; 6]) -> Self {
        Net {
            port,
            mac,
            queue_sizes: [DEFAULT_QUEUE_SIZE; 2],
            acked_features: 0,
            counters: Arc::default(),
            link_up: Arc::new(AtomicBool::new(true)),
            notifier: ConfigNotifier::default(),
            worker: None,
            restored_rx_frame: None,
            restored: false,
        }
    }

    /// A handle for the link state, usable after the device has been handed to the transport.
    pub fn link_control(&self) -> LinkControl {
        LinkControl {
            up: self.link_up.clone(),
            notifier: self.notifier.clone(),
        }
    }

    /// The device's counters (shared; they keep counting across resets).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn config_space(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        let status = if self.link_up.load(Ordering::Acquire) {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | offload::offered(self.port.offloads())
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked_features = acked & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for VERSION_1 drivers (they use a control queue, not offered).
        tracing::debug!(
            "virtio-net: ignoring {}-byte config write at {offset}",
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
        let [rx, tx]: [QueueHandle; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<QueueHandle>| ActivateError::QueueCount {
                    want: 2,
                    got: q.len(),
                })?;
        let offloads = offload::Negotiated::from_acked(self.acked_features);
        // Before the worker reads anything: a driver that declined GUEST_CSUM/TSO must get
        // frames the host finished (the TAP's kernel does it when told).
        self.port
            .set_recv_offloads(offloads.rx)
            .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))?;
        self.notifier.set(Some(interrupt.clone()));
        let worker = worker::NetWorker::new(
            mem,
            interrupt,
            rx,
            tx,
            worker::Negotiated {
                event_idx: crate::has_event_idx(self.acked_features),
                mergeable_rx: self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
                offloads,
            },
            self.port.clone(),
            self.counters.clone(),
        );
        let worker = match self.restored_rx_frame.take() {
            Some((hdr, frame)) => worker.with_pending_frame(&hdr, &frame),
            None => worker,
        };
        self.worker = Some(worker.start(std::mem::take(&mut self.restored))?);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.notifier.set(None);
        self.acked_features = 0;
        self.restored = false;
    }

    /// The worker finishes the pass it is in (the transmit or receive batch it took, used
    /// entries published), stops watching the port and parks: frames arriving meanwhile stay
    /// in the port (a TAP or socket queue, which drops what it cannot hold) and nothing is
    /// written into guest memory until [`Net::resume`].
    fn pause(&mut self, timeout: std::time::Duration) -> Result<(), PauseError> {
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
        let (rings, rx_frame) = match &self.worker {
            Some(w) => {
                let report = w.parked_report().ok_or(StateError::NotPaused)?;
                (Some(report.rings), report.rx_frame)
            }
            None => (None, None),
        };
        let (rx_frame_vnet_hdr, rx_frame) = match rx_frame {
            Some((hdr, frame)) => (hdr, Some(frame)),
            None => ([0; VNET_HDR_LEN], None),
        };
        Ok(DeviceState::Net(NetState {
            acked_features: self.acked_features,
            mac: self.mac,
            link_up: self.link_up.load(Ordering::Acquire),
            rings,
            rx_frame,
            rx_frame_vnet_hdr,
            queue_pairs: 0,
        }))
    }

    /// The MAC, the features and a pending frame must fit this NIC; asked before an
    /// in-place apply pauses the VM, so a refusal leaves it running.
    fn check_restore(&self, state: &DeviceState) -> Result<(), StateError> {
        let DeviceState::Net(s) = state else {
            return Err(StateError::WrongDevice {
                saved: state.kind(),
                device: "net",
            });
        };
        // The driver keeps the MAC it read; a different one would silently split the two.
        if s.mac != self.mac {
            return Err(StateError::Invalid(format!(
                "saved MAC {:02x?} differs from this NIC's {:02x?}",
                s.mac, self.mac
            )));
        }
        let extra = s.acked_features & !self.features();
        if extra != 0 {
            return Err(StateError::Invalid(format!(
                "features {extra:#x} were accepted but this NIC does not offer them"
            )));
        }
        if s.rx_frame
            .as_ref()
            .is_some_and(|f| f.len() > MAX_SUPER_FRAME)
        {
            return Err(StateError::Invalid("a pending frame is too long".into()));
        }
        let rx_offloads = offload::Negotiated::from_acked(s.acked_features).rx;
        if !offload::covers(rx_offloads, &s.rx_frame_vnet_hdr) {
            return Err(StateError::Invalid(format!(
                "the pending frame's header {:02x?} asks for offloads the driver did not accept",
                s.rx_frame_vnet_hdr
            )));
        }
        Ok(())
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.check_restore(state)?;
        let DeviceState::Net(s) = state else {
            return Ok(());
        };
        if self.worker.is_some() {
            return Err(StateError::Invalid("the device is active".into()));
        }
        self.acked_features = s.acked_features;
        self.link_up.store(s.link_up, Ordering::Release);
        self.restored_rx_frame = s.rx_frame.clone().map(|f| (s.rx_frame_vnet_hdr, f));
        self.restored = s.rings.is_some();
        Ok(())
    }
}
