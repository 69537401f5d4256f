//! One descriptor chain seen as two byte streams: what the driver gave the device to read, then
//! what it gave the device to write. Devices address requests by offset in these streams, so
//! they work whatever way the driver split its buffers into descriptors.

use std::ops::Deref;

use vireo_block::GuestBuf;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory as GuestMemoryT, Permissions};

use crate::GuestMemory;

/// Why a chain cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    #[error("device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("access of {len} bytes at {offset} runs past the {avail}-byte buffer")]
    PastEnd { offset: u64, len: usize, avail: u64 },
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
}

/// The descriptors of one chain, checked against guest memory.
#[derive(Debug, Default)]
pub(crate) struct ChainBuffers {
    readable: Vec<(GuestAddress, u32)>,
    writable: Vec<(GuestAddress, u32)>,
    readable_len: u64,
    writable_len: u64,
}

impl ChainBuffers {
    /// Walks `chain` (the iterator already bounds its length by the queue size and follows
    /// indirect tables), refusing descriptors outside guest memory or out of order.
    pub fn collect<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: GuestMemoryT,
    {
        let mut out = ChainBuffers::default();
        for desc in chain {
            if desc.len() == 0 {
                continue;
            }
            let access = if desc.is_write_only() {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if !mem.check_range(desc.addr(), desc.len() as usize, access) {
                return Err(ChainError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            if desc.is_write_only() {
                out.writable.push((desc.addr(), desc.len()));
                out.writable_len += u64::from(desc.len());
            } else {
                if !out.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                out.readable.push((desc.addr(), desc.len()));
                out.readable_len += u64::from(desc.len());
            }
        }
        Ok(out)
    }

    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Copies `buf.len()` bytes from offset `offset` of the readable stream.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let mut done = 0;
        for_each_piece(
            &self.readable,
            self.readable_len,
            offset,
            buf.len(),
            |addr, len| {
                mem.read_slice(&mut buf[done..done + len], addr)
                    .map_err(|_| ChainError::Memory(addr.0))?;
                done += len;
                Ok(())
            },
        )
    }

    /// Copies `buf` to offset `offset` of the writable stream. Guest memory's dirty bitmap
    /// records the pages written.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> Result<(), ChainError> {
        let mut done = 0;
        for_each_piece(
            &self.writable,
            self.writable_len,
            offset,
            buf.len(),
            |addr, len| {
                mem.write_slice(&buf[done..done + len], addr)
                    .map_err(|_| ChainError::Memory(addr.0))?;
                done += len;
                Ok(())
            },
        )
    }
}

impl ChainBuffers {
    /// The guest memory holding `len` bytes from `offset` of the readable stream, as slices a
    /// backend can `pwritev` from without a copy.
    pub fn readable_bufs<'m>(
        &self,
        mem: &'m GuestMemory,
        offset: u64,
        len: u64,
    ) -> Result<Vec<GuestBuf<'m>>, ChainError> {
        bufs_of(
            mem,
            &self.readable,
            self.readable_len,
            offset,
            len,
            Permissions::Read,
        )
    }

    /// The guest memory of `len` bytes from `offset` of the writable stream, as slices a
    /// backend can `preadv` into; whoever writes through them marks the pages dirty.
    pub fn writable_bufs<'m>(
        &self,
        mem: &'m GuestMemory,
        offset: u64,
        len: u64,
    ) -> Result<Vec<GuestBuf<'m>>, ChainError> {
        bufs_of(
            mem,
            &self.writable,
            self.writable_len,
            offset,
            len,
            Permissions::Write,
        )
    }
}

/// Slices of guest memory covering `len` bytes from `offset` of a stream of segments; a
/// segment spanning two memory regions yields one slice per region.
fn bufs_of<'m>(
    mem: &'m GuestMemory,
    segments: &[(GuestAddress, u32)],
    total: u64,
    offset: u64,
    len: u64,
    access: Permissions,
) -> Result<Vec<GuestBuf<'m>>, ChainError> {
    let len = usize::try_from(len).map_err(|_| ChainError::PastEnd {
        offset,
        len: usize::MAX,
        avail: total,
    })?;
    let mut out = Vec::with_capacity(segments.len());
    for_each_piece(segments, total, offset, len, |addr, n| {
        let slices = mem
            .get_slices(addr, n, access)
            .map_err(|_| ChainError::Memory(addr.0))?;
        for slice in slices {
            out.push(slice.map_err(|_| ChainError::Memory(addr.0))?);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` on the guest ranges covering `len` bytes from `offset` of a stream of segments.
fn for_each_piece(
    segments: &[(GuestAddress, u32)],
    total: u64,
    offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    if offset.checked_add(len as u64).is_none_or(|end| end > total) {
        return Err(ChainError::PastEnd {
            offset,
            len,
            avail: total,
        });
    }
    let mut skip = offset;
    let mut left = len;
    for &(addr, seg_len) in segments {
        if left == 0 {
            break;
        }
        let seg_len = u64::from(seg_len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(left as u64) as usize;
        // Cannot overflow: collect() checked addr..addr+seg_len lies in guest memory.
        f(GuestAddress(addr.0 + skip), n)?;
        skip = 0;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_requested_range_across_segments() {
        let segs = [
            (GuestAddress(0x1000), 4),
            (GuestAddress(0x2000), 8),
            (GuestAddress(0x3000), 2),
        ];
        let mut got = Vec::new();
        for_each_piece(&segs, 14, 2, 11, |a, n| {
            got.push((a.0, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(0x1002, 2), (0x2000, 8), (0x3000, 1)]);
        assert!(for_each_piece(&segs, 14, 10, 5, |_, _| Ok(())).is_err());
        assert!(for_each_piece(&segs, 14, u64::MAX, 1, |_, _| Ok(())).is_err());
        assert!(for_each_piece(&segs, 14, 14, 0, |_, _| Ok(())).is_ok());
    }

    use proptest::prelude::*;

    /// Two adjacent 64 KiB regions, so segments can straddle a region boundary.
    fn two_regions() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .unwrap()
    }

    proptest! {
        /// The slices handed to a backend cover exactly the bytes `read_at` copies and
        /// `write_at` stores, for any split into segments, any window and across regions.
        #[test]
        fn guest_bufs_are_the_bytes_read_at_and_write_at_see(
            segs in proptest::collection::vec((0u64..0x1f000, 1u32..0x1000), 1..6),
            window in (0u64..0x6000, 0u64..0x6000),
            fill in any::<u8>(),
        ) {
            let mem = two_regions();
            let pattern: Vec<u8> = (0..0x20000u32).map(|i| (i.wrapping_mul(7) as u8) ^ fill).collect();
            mem.write_slice(&pattern, GuestAddress(0)).unwrap();
            let segments: Vec<(GuestAddress, u32)> =
                segs.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            let total: u64 = segs.iter().map(|s| u64::from(s.1)).sum();
            let chain = ChainBuffers {
                readable: segments.clone(),
                writable: segments,
                readable_len: total,
                writable_len: total,
            };
            let (offset, len) = window;
            let bufs = chain.readable_bufs(&mem, offset, len);
            let mut want = vec![0u8; len as usize];
            let copied = chain.read_at(&mem, offset, &mut want);
            prop_assert_eq!(bufs.is_ok(), copied.is_ok());
            let Ok(bufs) = bufs else { return Ok(()) };
            let mut got = Vec::new();
            for b in &bufs {
                // No slice crosses a region: each is one mapping's contiguous memory.
                let mut piece = vec![0u8; b.len()];
                b.read_slice(&mut piece, 0).unwrap();
                got.extend(piece);
            }
            prop_assert_eq!(&got, &want);
            // Writing through the writable slices lands where write_at would put the bytes.
            let wbufs = chain.writable_bufs(&mem, offset, len).unwrap();
            let mut n = 0u8;
            for b in &wbufs {
                let data: Vec<u8> = (0..b.len()).map(|_| { n = n.wrapping_add(1); n }).collect();
                b.write_slice(&data, 0).unwrap();
            }
            let expected: Vec<u8> = (1..=len).map(|i| i as u8).collect();
            let mut back = vec![0u8; len as usize];
            chain.read_at(&mem, offset, &mut back).unwrap();
            // Overlapping segments may alias; only compare when the window's pieces are disjoint.
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for_each_piece(&chain.readable, total, offset, len as usize, |a, l| {
                ranges.push((a.0, l as u64));
                Ok(())
            }).unwrap();
            ranges.sort_unstable();
            if ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0) {
                prop_assert_eq!(back, expected);
            }
        }
    }
}
