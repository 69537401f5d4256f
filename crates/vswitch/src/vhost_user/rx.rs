//! Filling a guest's receive ring with one frame: `virtio_net_hdr_v1` then the frame, in one
//! descriptor chain, or — with `VIRTIO_NET_F_MRG_RXBUF` negotiated — spread over as many chains
//! as it takes, the first header's `num_buffers` saying how many. Pure ring work on a
//! `virtio_queue::Queue` and guest memory (no locks, no notification), so it is unit-tested on a
//! mock ring; `port.rs` holds the ring lock around it and notifies afterwards.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use vireo_netport::VNET_HDR_LEN;

use super::NET_HDR_LEN;

/// Offset of `num_buffers` (u16 LE) in `virtio_net_hdr_v1`.
const NUM_BUFFERS_AT: usize = 10;
/// Chains one frame may take: a 64 KiB frame in 4 KiB pages needs 17; more means buffers too
/// small to be meant for frames.
const MAX_CHAINS: usize = 64;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RxError {
    /// Not enough receive buffers posted; nothing was consumed.
    Full,
    /// The (first) chain cannot hold the frame and buffers cannot be merged; that chain was
    /// returned empty, as a NIC drops a frame too long for its buffer.
    TooLong { cap: usize },
    /// A descriptor points outside guest memory; its chain was returned empty.
    BadBuffer,
}

/// One popped chain: head, and its device-writable (address, length) pieces.
struct Chain {
    head: u16,
    pieces: Vec<(GuestAddress, usize)>,
    room: usize,
}

fn pop<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Option<Chain> {
    let chain = queue.pop_descriptor_chain(mem)?;
    let head = chain.head_index();
    let pieces: Vec<_> = chain
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr(), d.len() as usize))
        .collect();
    let room = pieces.iter().map(|p| p.1).sum();
    Some(Chain { head, pieces, room })
}

/// Puts `hdr` (the offload part of the header: all zero for a plain frame) and `frame` in the
/// receive ring; returns the number of chains used. `used` entries
/// are added (one per chain, with the bytes written into it); the caller notifies.
pub(crate) fn fill<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    vnet: &[u8; VNET_HDR_LEN],
    frame: &[u8],
    mergeable: bool,
) -> Result<u16, RxError> {
    let need = NET_HDR_LEN + frame.len();
    let start = queue.next_avail();
    let mut chains: Vec<Chain> = Vec::new();
    let mut room = 0usize;
    while room < need {
        if !chains.is_empty() && (!mergeable || chains.len() == MAX_CHAINS) {
            break;
        }
        let Some(c) = pop(queue, mem) else { break };
        room += c.room;
        chains.push(c);
    }
    if chains.is_empty() {
        return Err(RxError::Full);
    }
    if room < need {
        if mergeable && chains.len() < MAX_CHAINS {
            // The ring ran out part-way: give every chain back untouched; the frame is dropped
            // (a full ring), as without merging.
            queue.set_next_avail(start);
            return Err(RxError::Full);
        }
        for c in &chains {
            let _ = queue.add_used(mem, c.head, 0);
        }
        return Err(RxError::TooLong { cap: room });
    }
    // virtio_net_hdr_v1: the offload fields, num_buffers = chains used (1 without merging).
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[..VNET_HDR_LEN].copy_from_slice(vnet);
    hdr[NUM_BUFFERS_AT..NUM_BUFFERS_AT + 2].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    let parts = [&hdr[..], frame];
    let (mut part, mut off) = (0usize, 0usize);
    let mut bad = false;
    let count = chains.len() as u16;
    for c in &chains {
        let mut written = 0usize;
        for &(addr, len) in &c.pieces {
            let mut at = addr;
            let mut space = len;
            while space > 0 && part < parts.len() && !bad {
                let src = &parts[part][off..];
                let n = src.len().min(space);
                if mem.write_slice(&src[..n], at).is_err() {
                    bad = true;
                    break;
                }
                space -= n;
                at = GuestAddress(at.0.wrapping_add(n as u64));
                off += n;
                written += n;
                if off == parts[part].len() {
                    part += 1;
                    off = 0;
                }
            }
        }
        let _ = queue.add_used(mem, c.head, if bad { 0 } else { written as u32 });
    }
    if bad {
        Err(RxError::BadBuffer)
    } else {
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const QSIZE: u16 = 64;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const BUF_BASE: u64 = 0x10_0000;

    /// Posts one chain per entry of `chains` (each a list of descriptor lengths), buffers laid
    /// out one after another from 1 MiB. Returns the buffers' (addr, len) per chain.
    fn post(
        q: &MockSplitQueue<GuestMemoryMmap>,
        chains: &[Vec<u32>],
    ) -> Vec<Vec<(GuestAddress, usize)>> {
        let mut descs = Vec::new();
        let mut layout = Vec::new();
        let mut addr = BUF_BASE;
        for chain in chains {
            let mut bufs = Vec::new();
            for (k, &len) in chain.iter().enumerate() {
                let i = descs.len() as u16;
                let last = k + 1 == chain.len();
                let flags = F_WRITE | if last { 0 } else { F_NEXT };
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags,
                    if last { 0 } else { i + 1 },
                )));
                bufs.push((GuestAddress(addr), len as usize));
                addr += u64::from(len);
            }
            layout.push(bufs);
        }
        q.add_desc_chains(&descs, 0).unwrap();
        layout
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn used(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
        let at = GuestAddress(q.used_addr().0 + 4 + 8 * u64::from(i));
        (
            mem.read_obj::<u32>(at).unwrap(),
            mem.read_obj::<u32>(GuestAddress(at.0 + 4)).unwrap(),
        )
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        mem.read_obj::<u16>(GuestAddress(q.used_addr().0 + 2))
            .unwrap()
    }

    /// Reads back what the device wrote: per used entry, `len` bytes across the chain's buffers.
    fn read_back(
        mem: &GuestMemoryMmap,
        layout: &[Vec<(GuestAddress, usize)>],
        chain: usize,
        len: usize,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, cap) in &layout[chain] {
            let n = cap.min(len - out.len());
            let mut b = vec![0u8; n];
            mem.read_slice(&mut b, addr).unwrap();
            out.extend(b);
            if out.len() == len {
                break;
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Random chains of random buffer sizes, random frames: every byte lands in order across
        /// the chains, `num_buffers` counts them, every used length is what was written, and a
        /// frame that does not fit in what is posted consumes nothing.
        #[test]
        fn mergeable_rx_spreads_frames_over_random_chains(
            chains in prop::collection::vec(prop::collection::vec(1u32..700, 1..4), 1..12),
            frames in prop::collection::vec(1usize..4000, 1..6),
            seed in any::<u8>(),
        ) {
            let mem = memory();
            let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
            let layout = post(&q, &chains);
            let mut queue: Queue = q.create_queue().unwrap();
            let mut next_chain = 0usize;
            let mut next_used = 0u16;
            for (n, &len) in frames.iter().enumerate() {
                let frame: Vec<u8> = (0..len).map(|i| (i as u8) ^ seed ^ (n as u8)).collect();
                let before = queue.next_avail();
                let room: usize = chains[next_chain..]
                    .iter()
                    .map(|c| c.iter().sum::<u32>() as usize)
                    .sum();
                match fill(&mut queue, &mem, &[0; VNET_HDR_LEN], &frame, true) {
                    Ok(count) => {
                        let count = count as usize;
                        let mut got = Vec::new();
                        for k in 0..count {
                            let (id, ulen) = used(&mem, &q, next_used + k as u16);
                            let chain = next_chain + k;
                            let head = layout[..chain].iter().map(Vec::len).sum::<usize>();
                            prop_assert_eq!(id as usize, head);
                            got.extend(read_back(&mem, &layout, chain, ulen as usize));
                        }
                        prop_assert_eq!(got.len(), NET_HDR_LEN + len);
                        let nb = u16::from_le_bytes([got[NUM_BUFFERS_AT], got[NUM_BUFFERS_AT + 1]]);
                        prop_assert_eq!(nb as usize, count);
                        prop_assert!(got[..NUM_BUFFERS_AT].iter().all(|&b| b == 0));
                        prop_assert_eq!(&got[NET_HDR_LEN..], &frame[..]);
                        // No more chains than needed: all but the last were filled up.
                        for k in 0..count - 1 {
                            let cap: u32 = chains[next_chain + k].iter().sum();
                            let (_, ulen) = used(&mem, &q, next_used + k as u16);
                            prop_assert_eq!(ulen, cap);
                        }
                        next_chain += count;
                        next_used += count as u16;
                    }
                    Err(e) => {
                        prop_assert_eq!(e, RxError::Full);
                        prop_assert!(room < NET_HDR_LEN + len, "room {} for {}", room, len);
                        prop_assert_eq!(queue.next_avail(), before);
                    }
                }
                prop_assert_eq!(used_idx(&mem, &q), next_used);
            }
        }
    }

    #[test]
    fn without_merging_a_short_chain_drops_the_frame() {
        let mem = memory();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
        post(&q, &[vec![100], vec![2048]]);
        let mut queue: Queue = q.create_queue().unwrap();
        let frame = vec![7u8; 200];
        assert_eq!(
            fill(&mut queue, &mem, &[0; VNET_HDR_LEN], &frame, false),
            Err(RxError::TooLong { cap: 100 })
        );
        assert_eq!(used(&mem, &q, 0), (0, 0));
        assert_eq!(
            fill(&mut queue, &mem, &[0; VNET_HDR_LEN], &frame, false),
            Ok(1)
        );
        assert_eq!(used(&mem, &q, 1), (1, 212));
        assert_eq!(
            fill(&mut queue, &mem, &[0; VNET_HDR_LEN], &frame, false),
            Err(RxError::Full)
        );
    }

    #[test]
    fn the_offload_header_lands_in_front_of_the_frame() {
        let mem = memory();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
        let layout = post(&q, &[vec![6], vec![2048]]);
        let mut queue: Queue = q.create_queue().unwrap();
        // NEEDS_CSUM, GSO_TCPV4, hdr_len 54, gso_size 1448, csum_start 34, csum_offset 16.
        let vnet = [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0];
        let frame: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
        assert_eq!(fill(&mut queue, &mem, &vnet, &frame, true), Ok(2));
        let (_, l0) = used(&mem, &q, 0);
        let (_, l1) = used(&mem, &q, 1);
        let mut got = read_back(&mem, &layout, 0, l0 as usize);
        got.extend(read_back(&mem, &layout, 1, l1 as usize));
        assert_eq!(
            &got[..VNET_HDR_LEN],
            &vnet,
            "split across the first two chains"
        );
        assert_eq!(&got[NUM_BUFFERS_AT..NET_HDR_LEN], &[2, 0]);
        assert_eq!(&got[NET_HDR_LEN..], &frame[..]);
    }

    #[test]
    fn a_buffer_outside_memory_is_returned_empty() {
        let mem = memory();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
        let d = SplitDescriptor::new(8 << 20, 2048, F_WRITE, 0);
        q.add_desc_chains(&[RawDescriptor::from(d)], 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let r = fill(&mut queue, &mem, &[0; VNET_HDR_LEN], &[1u8; 64], true);
        // virtio-queue may refuse the chain itself (then nothing is popped: Full) or hand it
        // over and the write fails; either way nothing is written and nothing panics.
        assert!(
            matches!(r, Err(RxError::BadBuffer) | Err(RxError::Full)),
            "{r:?}"
        );
    }
}
