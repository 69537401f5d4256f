//! What a virtio device's state is made of, for save/restore (docs/vm-state.md). The transport
//! saves its own registers and each queue's driver-set configuration; the device adds what only
//! it knows: the features it accepted, where its worker stands in each ring (`next_avail`,
//! `next_used`, which the worker keeps in its own copy of the queue) and, for a NIC, a frame it
//! had taken from the port but not yet delivered.
//!
//! These are plain data with serde; the version of the file they sit in is the VMM's.

use serde::{Deserialize, Serialize};
use vireo_netport::VNET_HDR_LEN;
use virtio_queue::{Queue, QueueT};

/// One split virtqueue: the configuration the driver wrote plus the device's ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill (what it last published as `used.idx`).
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use: `used_event`/`avail_event` decide interrupts and kicks.
    pub event_idx: bool,
}

impl QueueState {
    pub fn of(q: &Queue) -> QueueState {
        QueueState {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        }
    }

    /// A queue in this state; `Err` for a state no driver could have set up (a corrupt file).
    pub fn to_queue(&self) -> Result<Queue, StateError> {
        let bad = |e: virtio_queue::Error| StateError::Invalid(format!("queue {self:?}: {e}"));
        let mut q = Queue::new(self.max_size).map_err(bad)?;
        q.try_set_size(self.size).map_err(bad)?;
        q.try_set_desc_table_address(vm_memory::GuestAddress(self.desc_table))
            .map_err(bad)?;
        q.try_set_avail_ring_address(vm_memory::GuestAddress(self.avail_ring))
            .map_err(bad)?;
        q.try_set_used_ring_address(vm_memory::GuestAddress(self.used_ring))
            .map_err(bad)?;
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        q.set_ready(self.ready);
        Ok(q)
    }
}

/// Where an active device's worker stood in its rings when it parked (queue order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPositions {
    /// `(next_avail, next_used)` per queue.
    pub queues: Vec<(u16, u16)>,
}

/// What a worker reports when it parks for a pause; read by `save_state`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ParkedReport {
    pub rings: RingPositions,
    /// virtio-net: a received Ethernet frame no rx buffer has taken yet, behind its
    /// virtio-net header.
    pub rx_frame: Option<([u8; VNET_HDR_LEN], Vec<u8>)>,
}

impl ParkedReport {
    pub fn of_queues(
        queues: &[&Queue],
        rx_frame: Option<([u8; VNET_HDR_LEN], Vec<u8>)>,
    ) -> ParkedReport {
        ParkedReport {
            rings: RingPositions {
                queues: queues
                    .iter()
                    .map(|q| (q.next_avail(), q.next_used()))
                    .collect(),
            },
            rx_frame,
        }
    }
}

/// virtio-blk beyond the transport: the accepted features and, when active, the ring positions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub acked_features: u64,
    pub rings: Option<RingPositions>,
    /// Request queues the device offered (VIRTIO_BLK_F_MQ). Added without a format version
    /// bump: a state written before multiqueue has no such field and had one queue.
    #[serde(default = "one_queue")]
    pub num_queues: u16,
}

fn one_queue() -> u16 {
    1
}

/// virtio-net beyond the transport.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub acked_features: u64,
    pub mac: [u8; 6],
    pub link_up: bool,
    pub rings: Option<RingPositions>,
    /// An Ethernet frame taken from the port that no rx buffer had room for yet: it is
    /// delivered after restore instead of being lost.
    pub rx_frame: Option<Vec<u8>>,
    /// The virtio-net header (partial checksum, GSO) `rx_frame` came with from an offload
    /// port. Added without a format version bump: a state from before offloads has none,
    /// and its frame was plain.
    #[serde(default)]
    pub rx_frame_vnet_hdr: [u8; VNET_HDR_LEN],
    /// Queue pairs the driver had in use (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`) on a multiqueue
    /// NIC; 0 in states from before multiqueue and from NICs without it, which means one.
    #[serde(default)]
    pub queue_pairs: u16,
}

/// A device model's own state, by device type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
    /// An empty hot-plug disk slot (DeviceID 0): nothing to keep, but its window is part of
    /// the machine, so it has an entry like every other.
    Empty,
}

impl DeviceState {
    /// Ring positions of an active device.
    pub fn rings(&self) -> Option<&RingPositions> {
        match self {
            DeviceState::Block(b) => b.rings.as_ref(),
            DeviceState::Net(n) => n.rings.as_ref(),
            DeviceState::Empty => None,
        }
    }
}

/// Why a device's state could not be saved or restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("this device cannot save or restore its state ({0})")]
    Unsupported(&'static str),
    #[error("the device is active but its worker is not parked; pause the VM first")]
    NotPaused,
    #[error("saved state is for a {saved} device, this is a {device} device")]
    WrongDevice {
        saved: &'static str,
        device: &'static str,
    },
    #[error("saved state does not fit this device: {0}")]
    Invalid(String),
}

impl DeviceState {
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Net(_) => "net",
            DeviceState::Empty => "empty slot",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_round_trips_with_its_positions() {
        let s = QueueState {
            max_size: 256,
            size: 128,
            ready: true,
            desc_table: 0x10_0000,
            avail_ring: 0x10_1000,
            used_ring: 0x10_2000,
            next_avail: 65000,
            next_used: 64999,
            event_idx: true,
        };
        let q = s.to_queue().unwrap();
        assert_eq!(QueueState::of(&q), s);
        // An unaligned ring or an impossible size is refused, not loaded.
        let bad = QueueState {
            desc_table: 0x10_0001,
            ..s
        };
        assert!(matches!(bad.to_queue(), Err(StateError::Invalid(_))));
        let bad = QueueState { size: 100, ..s };
        assert!(bad.to_queue().is_err());
        let bad = QueueState { max_size: 0, ..s };
        assert!(bad.to_queue().is_err());
    }

    #[test]
    fn device_states_round_trip_through_serde() {
        let states = [
            DeviceState::Block(BlockState {
                acked_features: 1 << 32 | 1 << 29,
                rings: Some(RingPositions {
                    queues: vec![(7, 7), (3, 1)],
                }),
                num_queues: 2,
            }),
            DeviceState::Net(NetState {
                acked_features: 1 << 32,
                mac: [2, 0, 0, 0, 0, 9],
                link_up: false,
                rings: Some(RingPositions {
                    queues: vec![(3, 2), (9, 9)],
                }),
                rx_frame: Some(vec![0; 12 + 60]),
                rx_frame_vnet_hdr: [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0],
                queue_pairs: 2,
            }),
        ];
        for s in states {
            let text = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<DeviceState>(&text).unwrap(), s);
        }
    }

    #[test]
    fn a_net_state_from_before_offloads_reads_with_a_plain_header() {
        let old = r#"{"type":"net","acked_features":4294967296,"mac":[2,0,0,0,0,9],
            "link_up":true,"rings":{"queues":[[1,1],[0,0]]},"rx_frame":[1,2,3]}"#;
        let DeviceState::Net(n) = serde_json::from_str::<DeviceState>(old).unwrap() else {
            panic!("not a net state");
        };
        assert_eq!(n.rx_frame.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(n.rx_frame_vnet_hdr, [0; VNET_HDR_LEN]);
    }

    #[test]
    fn a_block_state_from_before_multiqueue_reads_as_one_queue() {
        let old = r#"{"type":"block","acked_features":4294967296,"rings":{"queues":[[4,4]]}}"#;
        let DeviceState::Block(b) = serde_json::from_str::<DeviceState>(old).unwrap() else {
            panic!("not a block state");
        };
        assert_eq!(b.num_queues, 1);
        assert_eq!(b.rings.unwrap().queues, vec![(4, 4)]);
    }
}
