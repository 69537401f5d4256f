//! Save and restore of a virtio-mmio transport and the device behind it (docs/vm-state.md).

use std::sync::atomic::Ordering;

use vireo_virtio::state::QueueState;
use vireo_virtio::StateError;
use virtio_queue::QueueT;

use super::MmioTransport;
use crate::state::TransportState;

impl MmioTransport {
    /// The transport's registers, its queues with the device's ring positions, and the
    /// device's own state. The VM must be paused (an active device's worker parked).
    pub fn save_state(&self) -> Result<TransportState, StateError> {
        let device = self.device.save_state()?;
        let mut queues: Vec<QueueState> = self.queues.iter().map(QueueState::of).collect();
        // The transport's queues are the driver's configuration; where the device stands in
        // each ring is known only to its worker, which reported it when it parked.
        if self.active {
            let rings = device
                .rings()
                .ok_or_else(|| StateError::Invalid("active device reported no rings".into()))?;
            if rings.queues.len() != queues.len() {
                return Err(StateError::Invalid(format!(
                    "device reported {} rings for {} queues",
                    rings.queues.len(),
                    queues.len()
                )));
            }
            for (q, &(next_avail, next_used)) in queues.iter_mut().zip(&rings.queues) {
                q.next_avail = next_avail;
                q.next_used = next_used;
            }
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            active: self.active,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status.load(Ordering::SeqCst),
            config_generation: self.interrupt.config_generation.load(Ordering::SeqCst),
            queues,
            device,
        })
    }

    /// Loads `state` into this transport, which must be fresh (never activated): registers,
    /// queues, the device's state, then activation of a device that was active, its queues
    /// starting at the saved ring positions. On an error the transport is reset.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), StateError> {
        if self.active {
            return Err(StateError::Invalid(
                "the transport is already active".into(),
            ));
        }
        if state.device_type != self.device.device_type() {
            return Err(StateError::Invalid(format!(
                "saved device type {}, this window has type {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(StateError::Invalid(format!(
                "{} saved queues, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (saved, q) in state.queues.iter().zip(&self.queues) {
            if saved.max_size != q.max_size() {
                return Err(StateError::Invalid(format!(
                    "queue of at most {} entries saved, the device offers {}",
                    saved.max_size,
                    q.max_size()
                )));
            }
            queues.push(saved.to_queue()?);
        }
        let offered = self.device.features();
        if state.driver_features & !offered != 0 && state.status & super::status::FEATURES_OK != 0 {
            return Err(StateError::Invalid(format!(
                "driver features {:#x} include some the device does not offer ({offered:#x})",
                state.driver_features
            )));
        }
        self.device.restore_state(&state.device)?;
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        self.interrupt
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        if state.active {
            self.activate();
            if !self.active {
                self.reset();
                return Err(StateError::Invalid(
                    "the device could not be activated with the saved queues".into(),
                ));
            }
        }
        Ok(())
    }
}
