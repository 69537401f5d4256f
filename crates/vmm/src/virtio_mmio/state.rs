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
        let queues = self.saved_queues(state)?;
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
        if let Err(e) = self.interrupt.reassert() {
            tracing::warn!("virtio-mmio: cannot re-signal the restored interrupt: {e}");
        }
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

    /// Whether `state` fits this transport and its device (a restore's checks, nothing
    /// changed): an in-place apply asks before it pauses the VM.
    pub fn check_state(&self, state: &TransportState) -> Result<(), StateError> {
        self.saved_queues(state)?;
        self.device.check_restore(&state.device)
    }

    /// The saved queues, checked against this transport and its device's features.
    fn saved_queues(&self, state: &TransportState) -> Result<Vec<virtio_queue::Queue>, StateError> {
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
        Ok(queues)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::{reg, status};
    use super::*;
    use crate::devices::BusDevice;
    use crate::GuestMemory;

    const DESC: u64 = 0x1_0000;

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    /// A virtio-blk over a scratch file behind a fresh transport, in its own guest memory.
    fn block(dir: &std::path::Path, mem: &GuestMemory) -> MmioTransport {
        let path = dir.join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let backend = Arc::new(vireo_block::RawFile::open(&path, false).unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        MmioTransport::new(
            Box::new(vireo_virtio::Block::new(backend)),
            mem.clone(),
            irq,
        )
        .unwrap()
    }

    /// What a driver does up to DRIVER_OK, with one 16-entry queue at DESC.
    fn bring_up(t: &mut MmioTransport) {
        let features = vireo_virtio::VIRTIO_F_VERSION_1 | vireo_virtio::VIRTIO_RING_F_EVENT_IDX;
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        wr(t, reg::QUEUE_SEL, 0);
        wr(t, reg::QUEUE_NUM, 16);
        wr(t, reg::QUEUE_DESC_LOW, DESC as u32);
        wr(t, reg::QUEUE_DRIVER_LOW, (DESC + 0x1000) as u32);
        wr(t, reg::QUEUE_DEVICE_LOW, (DESC + 0x2000) as u32);
        wr(t, reg::QUEUE_READY, 1);
        wr(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn an_active_block_transport_round_trips_with_its_ring_positions() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut t = block(dir.path(), &mem);
        bring_up(&mut t);
        assert_eq!(t.status() & status::DRIVER_OK, status::DRIVER_OK);
        // Not paused: the worker has reported nothing, so there is nothing consistent to save.
        assert_eq!(t.save_state().unwrap_err(), StateError::NotPaused);
        t.pause(Duration::from_secs(10)).unwrap();
        let saved = t.save_state().unwrap();
        assert!(saved.active);
        assert_eq!(saved.queues[0].size, 16);
        assert_eq!(saved.queues[0].desc_table, DESC);
        assert!(saved.queues[0].event_idx);
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (0, 0)
        );

        // As if the driver had had 5 requests served: rings and indices agree in memory.
        let mut state = saved.clone();
        state.queues[0].next_avail = 5;
        state.queues[0].next_used = 5;
        state.interrupt_status = 1;
        state.config_generation = 3;
        if let vireo_virtio::DeviceState::Block(b) = &mut state.device {
            b.rings = Some(vireo_virtio::state::RingPositions {
                queues: vec![(5, 5)],
            });
        }
        let mem2 = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem2.write_obj(5u16, GuestAddress(DESC + 0x1000 + 2))
            .unwrap();
        mem2.write_obj(5u16, GuestAddress(DESC + 0x2000 + 2))
            .unwrap();
        let dir2 = tempfile::tempdir().unwrap();
        let mut t2 = block(dir2.path(), &mem2);
        t2.restore_state(&state).unwrap();
        // The driver sees its registers as it left them.
        assert_eq!(rd(&mut t2, reg::STATUS), saved.status);
        assert_eq!(rd(&mut t2, reg::INTERRUPT_STATUS), 1);
        // The unacknowledged interrupt is signalled again: its edge stayed with the source.
        assert_eq!(t2.interrupt.irq.read().unwrap(), 1);
        assert_eq!(rd(&mut t2, reg::CONFIG_GENERATION), 3);
        wr(&mut t2, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t2, reg::QUEUE_READY), 1);
        // The device's worker started at the saved positions and parks there.
        t2.pause(Duration::from_secs(10)).unwrap();
        assert_eq!(t2.save_state().unwrap(), state);
        t2.resume();
        t.resume();
    }

    #[test]
    fn a_state_for_another_device_or_shape_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut t = block(dir.path(), &mem);
        bring_up(&mut t);
        t.pause(Duration::from_secs(10)).unwrap();
        let saved = t.save_state().unwrap();

        let dir2 = tempfile::tempdir().unwrap();
        let mut fresh = block(dir2.path(), &mem);
        let wrong_type = TransportState {
            device_type: vireo_virtio::device_type::NET,
            ..saved.clone()
        };
        assert!(fresh.restore_state(&wrong_type).is_err());
        let mut two_queues = saved.clone();
        two_queues.queues.push(saved.queues[0]);
        assert!(fresh.restore_state(&two_queues).is_err());
        let mut net_device = saved.clone();
        net_device.device = vireo_virtio::DeviceState::Net(Default::default());
        assert!(matches!(
            fresh.restore_state(&net_device),
            Err(StateError::WrongDevice { .. })
        ));
        let mut bad_ring = saved.clone();
        bad_ring.queues[0].used_ring += 1;
        assert!(fresh.restore_state(&bad_ring).is_err());
        // Nothing of the refused states stuck: the window is as new.
        assert_eq!(rd(&mut fresh, reg::STATUS), 0);
        assert!(!fresh.active);
        // Restoring into an active transport is refused too.
        assert!(t.restore_state(&saved).is_err());
    }
}
