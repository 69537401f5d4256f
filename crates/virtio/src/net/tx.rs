//! Transmit path: every chain the driver queues is one frame behind a virtio-net header.

use std::sync::atomic::Ordering;

use vireo_netport::{FramePort, MAX_FRAME};
use virtio_queue::Queue;

use super::{NetCounters, NET_HDR_LEN};
use crate::chain::ChainBuffers;
use crate::queue::serve_queue;
use crate::GuestMemory;

/// Shortest frame worth sending: an Ethernet header.
const MIN_FRAME: usize = 14;

pub(crate) struct TxPath {
    pub queue: Queue,
    frame: Vec<u8>,
}

impl TxPath {
    pub fn new(queue: Queue) -> Self {
        TxPath {
            queue,
            frame: vec![0; MAX_FRAME],
        }
    }

    /// Sends every queued frame; returns how many chains went to the used ring.
    pub fn transmit(
        &mut self,
        mem: &GuestMemory,
        port: &dyn FramePort,
        counters: &NetCounters,
    ) -> usize {
        let frame = &mut self.frame;
        serve_queue(&mut self.queue, mem, |chain| {
            match ChainBuffers::collect(mem, chain) {
                Ok(buffers) => send_one(mem, &buffers, port, counters, frame),
                Err(e) => {
                    tracing::debug!("virtio-net: malformed tx chain: {e}");
                    counters.tx_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
            0
        })
    }
}

/// Sends the frame in one tx chain (after its header) to the port.
fn send_one(
    mem: &GuestMemory,
    buffers: &ChainBuffers,
    port: &dyn FramePort,
    counters: &NetCounters,
    frame: &mut [u8],
) {
    let total = buffers.readable_len();
    let len = total.saturating_sub(NET_HDR_LEN as u64);
    if total < (NET_HDR_LEN + MIN_FRAME) as u64 || len > frame.len() as u64 {
        tracing::debug!("virtio-net: dropping tx chain of {total} bytes");
        counters.tx_drops.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let frame = &mut frame[..len as usize];
    if let Err(e) = buffers.read_at(mem, NET_HDR_LEN as u64, frame) {
        tracing::debug!("virtio-net: unreadable tx chain: {e}");
        counters.tx_drops.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match port.send(frame) {
        Ok(()) => {
            counters.tx_frames.fetch_add(1, Ordering::Relaxed);
            counters.tx_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Err(e) => {
            tracing::debug!("virtio-net: port {} refused a frame: {e}", port.name());
            counters.tx_drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}
