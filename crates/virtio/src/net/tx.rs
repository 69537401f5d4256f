//! Transmit path: every chain the driver queues is one frame behind a virtio-net header. With
//! checksum/TSO offloads negotiated the header goes to the port with the frame, unchanged;
//! without, it is ignored and the frame goes out plain.

use std::sync::atomic::Ordering;

use vireo_netport::{FramePort, Offloads, MAX_FRAME, MAX_SUPER_FRAME, VNET_HDR_LEN};
use virtio_queue::Queue;

use super::offload::{covers, Negotiated};
use super::{NetCounters, NET_HDR_LEN};
use crate::chain::ChainBuffers;
use crate::queue::serve_queue;
use crate::GuestMemory;

/// Shortest frame worth sending: an Ethernet header.
const MIN_FRAME: usize = 14;

pub(crate) struct TxPath {
    pub queue: Queue,
    frame: Vec<u8>,
    /// What the driver may ask of the port (CSUM, HOST_TSO4/6).
    offloads: Offloads,
}

impl TxPath {
    pub fn new(queue: Queue, offloads: Offloads) -> Self {
        // A TSO driver hands over up to 64 KiB at once; others a frame.
        let max = if offloads.tso4 || offloads.tso6 {
            MAX_SUPER_FRAME
        } else {
            MAX_FRAME
        };
        TxPath {
            queue,
            frame: vec![0; max],
            offloads,
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
        let offloads = self.offloads;
        serve_queue(&mut self.queue, mem, |chain| {
            match ChainBuffers::collect(mem, chain) {
                Ok(buffers) => send_one(mem, &buffers, port, counters, frame, offloads),
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
    offloads: Offloads,
) {
    let drop = |why: &dyn std::fmt::Display| {
        tracing::debug!("virtio-net: dropping a tx chain: {why}");
        counters.tx_drops.fetch_add(1, Ordering::Relaxed);
    };
    let total = buffers.readable_len();
    let len = total.saturating_sub(NET_HDR_LEN as u64);
    if total < (NET_HDR_LEN + MIN_FRAME) as u64 || len > frame.len() as u64 {
        return drop(&format_args!("{total} bytes"));
    }
    let frame = &mut frame[..len as usize];
    let mut hdr = [0u8; VNET_HDR_LEN];
    let read = buffers
        .read_at(mem, 0, &mut hdr)
        .and_then(|()| buffers.read_at(mem, NET_HDR_LEN as u64, frame));
    if let Err(e) = read {
        return drop(&e);
    }
    let sent = if Negotiated::any(offloads) {
        // The port (a TAP, the kernel behind it) checks the header against the frame; here
        // only that the driver asks for nothing it did not negotiate.
        if !covers(offloads, &hdr) {
            return drop(&format_args!(
                "header {hdr:02x?} asks for offloads not negotiated"
            ));
        }
        port.send_vnet(&hdr, frame)
    } else {
        port.send(frame)
    };
    match sent {
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
