//! What a virtio-blk device tells the driver: feature bits and the config-space layout
//! (virtio 1.2 §5.2.4, `struct virtio_blk_config`).

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes the sector numbers in requests and `capacity` count in, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Largest discard / write-zeroes segment, in sectors (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Segments one discard / write-zeroes request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// Feature bits for a disk; a read-only disk offers RO and nothing that modifies data. MQ
/// only with more than one queue, so a one-queue disk offers what it always did (a saved
/// state's accepted features stay a subset of the offer).
pub(crate) fn features(read_only: bool, topology: bool, multiqueue: bool) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let mut f = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_INDIRECT_DESC
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_BLK_F_SEG_MAX)
        | bit(VIRTIO_BLK_F_BLK_SIZE)
        | bit(VIRTIO_BLK_F_FLUSH);
    if read_only {
        f |= bit(VIRTIO_BLK_F_RO);
    } else {
        f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
    }
    if topology {
        f |= bit(VIRTIO_BLK_F_TOPOLOGY);
    }
    if multiqueue {
        f |= bit(VIRTIO_BLK_F_MQ);
    }
    f
}

/// Size of the config space we expose (through `write_zeroes_may_unmap` and its padding).
pub(crate) const CONFIG_LEN: usize = 60;

/// The config space for a disk of `size` bytes, laid out as `struct virtio_blk_config`.
pub(crate) fn config_space(
    size: u64,
    seg_max: u32,
    logical: u32,
    physical: u32,
    num_queues: u16,
) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &(size / SECTOR_SIZE).to_le_bytes()); // capacity
    put(12, &seg_max.to_le_bytes()); // seg_max
    put(20, &logical.to_le_bytes()); // blk_size
                                     // topology: physical_block_exp = log2(physical / logical).
    let exp = (physical / logical.max(1)).max(1).trailing_zeros() as u8;
    put(24, &[exp]);
    put(26, &1u16.to_le_bytes()); // min_io_size, in logical blocks
    put(34, &num_queues.to_le_bytes()); // num_queues
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
    put(44, &(logical / SECTOR_SIZE as u32).max(1).to_le_bytes()); // discard_sector_alignment
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_matches_virtio_blk_config() {
        let c = config_space(1 << 30, 126, 4096, 4096, 3);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[24], 0);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 3);
        let c = config_space(512, 1, 512, 4096, 1);
        assert_eq!(c[24], 3);
    }

    #[test]
    fn read_only_disks_offer_no_writing_features() {
        let ro = features(true, false, false);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            ro & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        assert_ne!(features(false, false, false) & VIRTIO_F_VERSION_1, 0);
    }

    #[test]
    fn multiqueue_is_offered_only_with_more_than_one_queue() {
        assert_eq!(features(false, false, false) & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(features(false, false, true) & (1 << VIRTIO_BLK_F_MQ), 0);
    }
}
