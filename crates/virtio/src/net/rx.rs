//! Receive path: frames from the port into the driver's rx buffers. A frame that finds no
//! buffer waits in `frame` (the port keeps the rest, pushing back on its sender) until the
//! driver kicks with new buffers. With MRG_RXBUF a frame may fill several buffers. The port's
//! virtio-net header reaches the driver unchanged when it negotiated GUEST_CSUM/GUEST_TSO*
//! (the port was told to hand over only what it took: `FramePort::set_recv_offloads`).

use std::sync::atomic::Ordering;

use vireo_netport::{FramePort, Offloads, PortError, MAX_FRAME, MAX_SUPER_FRAME, VNET_HDR_LEN};
use virtio_queue::{Queue, QueueT};

use super::offload::covers;
use super::{NetCounters, NET_HDR_LEN};
use crate::chain::ChainBuffers;
use crate::GuestMemory;

/// Frames moved per call before returning to the event loop, so a flood on the port cannot
/// starve transmission.
const RX_BUDGET: usize = 256;

/// Byte offset of `num_buffers` in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

pub(crate) struct RxPath {
    pub queue: Queue,
    mergeable: bool,
    /// What the driver takes (GUEST_CSUM, GUEST_TSO4/6).
    offloads: Offloads,
    /// Header then frame, contiguous, so one copy puts both in the guest: the port's header
    /// in the first `VNET_HDR_LEN` bytes, `num_buffers` after it. `pending` is the frame
    /// length of a frame in here that no buffer has taken yet.
    frame: Vec<u8>,
    pending: Option<usize>,
    /// Chains gathered for the current frame (reused to avoid allocating per frame).
    gathered: Vec<(u16, ChainBuffers)>,
}

/// What one call to [`RxPath::receive`] achieved.
pub(crate) struct RxOutcome {
    /// Chains put on the used ring.
    pub used: usize,
    /// The driver has no buffer for the frame in hand: stop watching the port until it kicks.
    pub out_of_buffers: bool,
    /// More frames may be waiting (budget exhausted).
    pub more: bool,
    /// The port failed in a way that may repeat forever: stop watching it.
    pub port_failed: bool,
}

enum Delivery {
    /// The frame went into this many chains.
    Delivered(usize),
    /// The frame is lost (counted); this many malformed chains went back to the driver empty.
    Dropped(usize),
    /// No rx buffer (or not enough for the frame): the frame waits.
    NoBuffer,
}

impl RxPath {
    pub fn new(queue: Queue, mergeable: bool, offloads: Offloads) -> Self {
        let max = if offloads.tso4 || offloads.tso6 {
            MAX_SUPER_FRAME
        } else {
            MAX_FRAME
        };
        RxPath {
            queue,
            mergeable,
            offloads,
            frame: vec![0; NET_HDR_LEN + max],
            pending: None,
            gathered: Vec::new(),
        }
    }

    /// The frame taken from the port that no rx buffer has taken yet, with its header (for
    /// save).
    pub fn pending_frame(&self) -> Option<([u8; VNET_HDR_LEN], &[u8])> {
        self.pending.map(|len| {
            let mut hdr = [0; VNET_HDR_LEN];
            hdr.copy_from_slice(&self.frame[..VNET_HDR_LEN]);
            (hdr, &self.frame[NET_HDR_LEN..NET_HDR_LEN + len])
        })
    }

    /// Holds `frame` behind `hdr` as the next one to deliver (restore of a saved device; the
    /// caller has checked the frame fits `MAX_SUPER_FRAME`, the header the features).
    pub fn set_pending_frame(&mut self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) {
        if self.frame.len() < NET_HDR_LEN + frame.len() {
            self.frame.resize(NET_HDR_LEN + frame.len(), 0);
        }
        self.frame[..VNET_HDR_LEN].copy_from_slice(hdr);
        self.frame[NET_HDR_LEN..NET_HDR_LEN + frame.len()].copy_from_slice(frame);
        self.pending = Some(frame.len());
    }

    /// Drops the frame in hand (the device is going away).
    pub fn discard_pending(&mut self, counters: &NetCounters) {
        if self.pending.take().is_some() {
            counters.rx_drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Moves frames from `port` into rx buffers until one side runs out or the budget is spent.
    pub fn receive(
        &mut self,
        mem: &GuestMemory,
        port: &dyn FramePort,
        counters: &NetCounters,
    ) -> RxOutcome {
        let mut out = RxOutcome {
            used: 0,
            out_of_buffers: false,
            more: false,
            port_failed: false,
        };
        for _ in 0..RX_BUDGET {
            let len = match self.pending {
                Some(len) => len,
                None => match self.next_frame(port, counters) {
                    Ok(Some(len)) => len,
                    Ok(None) => return self.finish(mem, out),
                    Err(()) => {
                        out.port_failed = true;
                        return self.finish(mem, out);
                    }
                },
            };
            self.pending = Some(len);
            match self.deliver(mem, len, counters) {
                Delivery::Delivered(n) => {
                    out.used += n;
                    self.pending = None;
                }
                Delivery::Dropped(n) => {
                    out.used += n;
                    self.pending = None;
                }
                Delivery::NoBuffer => {
                    out.out_of_buffers = true;
                    return out;
                }
            }
        }
        out.more = true;
        out
    }

    /// The port is drained and buffers remain: the driver need not kick when adding more
    /// (without EVENT_IDX this sets NO_NOTIFY; with it, avail_event simply stays behind).
    /// Running out of buffers re-enables kicks.
    fn finish(&mut self, mem: &GuestMemory, out: RxOutcome) -> RxOutcome {
        if let Err(e) = self.queue.disable_notification(mem) {
            tracing::warn!("virtio-net: cannot disable rx notifications: {e}");
        }
        out
    }

    /// Takes the next frame from the port into `self.frame` (after the header room), counting
    /// the ones that cannot be taken. `Err` when the port failed.
    fn next_frame(
        &mut self,
        port: &dyn FramePort,
        counters: &NetCounters,
    ) -> Result<Option<usize>, ()> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        loop {
            match port.recv_vnet(&mut hdr, &mut self.frame[NET_HDR_LEN..]) {
                Ok(Some(_)) if !covers(self.offloads, &hdr) => {
                    // Queued by the port before it was told what this driver takes (a driver
                    // that reset and declined offloads): the driver could not finish it.
                    tracing::debug!("virtio-net: dropping an rx frame with header {hdr:02x?}");
                    counters.rx_drops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(len)) => {
                    if !self.offloads.csum {
                        // DATA_VALID and the rest mean something only to a GUEST_CSUM driver.
                        hdr = [0; VNET_HDR_LEN];
                    }
                    self.frame[..VNET_HDR_LEN].copy_from_slice(&hdr);
                    return Ok(Some(len));
                }
                Ok(None) | Err(PortError::Full) => return Ok(None),
                Err(PortError::TooLong { .. }) => {
                    counters.rx_drops.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!("virtio-net: port {} failed: {e}", port.name());
                    return Err(());
                }
            }
        }
    }

    /// Puts the header and frame (`len` bytes) into the next rx chain(s).
    fn deliver(&mut self, mem: &GuestMemory, len: usize, counters: &NetCounters) -> Delivery {
        let need = (NET_HDR_LEN + len) as u64;
        let max_chains = if self.mergeable {
            usize::from(self.queue.size())
        } else {
            1
        };
        self.gathered.clear();
        let mut popped: u16 = 0;
        let mut have = 0u64;
        let mut retried = false;
        while have < need {
            if self.gathered.len() == max_chains {
                // Even this many buffers cannot hold the frame: drop it, keep the buffers.
                self.rewind(popped);
                counters.rx_drops.fetch_add(1, Ordering::Relaxed);
                return Delivery::Dropped(0);
            }
            let Some(chain) = self.queue.pop_descriptor_chain(mem) else {
                // Ask for a kick when buffers arrive; if some arrived meanwhile, look once more
                // (a ring that claims chains it cannot yield is broken, not busy).
                match self.queue.enable_notification(mem) {
                    Ok(true) if !retried => {
                        retried = true;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("virtio-net: rx queue unusable: {e}"),
                }
                self.rewind(popped);
                return Delivery::NoBuffer;
            };
            let head = chain.head_index();
            if head >= self.queue.size() {
                // Can be neither used nor returned: skip it. At the front of the ring it is
                // consumed for good; behind gathered chains it is rewound with them.
                tracing::warn!("virtio-net: rx head {head} out of range");
                if !self.gathered.is_empty() {
                    popped += 1;
                }
                continue;
            }
            popped += 1;
            match ChainBuffers::collect(mem, chain) {
                Ok(buffers) => {
                    have += buffers.writable_len();
                    self.gathered.push((head, buffers));
                }
                Err(e) => {
                    // Unusable chain: hand it and the ones gathered before it back empty, since
                    // the ring cannot be rewound past a used chain; the frame is lost.
                    tracing::debug!("virtio-net: malformed rx chain: {e}");
                    counters.rx_drops.fetch_add(1, Ordering::Relaxed);
                    let mut returned = usize::from(self.queue.add_used(mem, head, 0).is_ok());
                    for (h, _) in std::mem::take(&mut self.gathered) {
                        returned += usize::from(self.queue.add_used(mem, h, 0).is_ok());
                    }
                    return Delivery::Dropped(returned);
                }
            }
        }

        let count = self.gathered.len();
        let header = &mut self.frame[..NET_HDR_LEN];
        // At most the queue size (≤ 32768) chains, so this fits.
        header[NUM_BUFFERS_OFFSET..].copy_from_slice(&(count as u16).to_le_bytes());
        let payload = &self.frame[..NET_HDR_LEN + len];
        let mut offset = 0usize;
        let mut ok = true;
        for (head, buffers) in &self.gathered {
            let n = (buffers.writable_len() as usize).min(payload.len() - offset);
            let written = if ok {
                match buffers.write_at(mem, 0, &payload[offset..offset + n]) {
                    Ok(()) => n,
                    Err(e) => {
                        tracing::debug!("virtio-net: rx write failed: {e}");
                        ok = false;
                        0
                    }
                }
            } else {
                0
            };
            offset += written;
            // Cannot exceed u32: at most one frame plus header.
            if let Err(e) = self.queue.add_used(mem, *head, written as u32) {
                tracing::warn!("virtio-net: cannot return rx chain {head}: {e}");
                ok = false;
            }
        }
        if !ok {
            counters.rx_drops.fetch_add(1, Ordering::Relaxed);
            return Delivery::Dropped(count);
        }
        counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        counters.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Delivery::Delivered(count)
    }

    /// Makes the last `popped` chains available again, as if never taken.
    fn rewind(&mut self, popped: u16) {
        self.queue
            .set_next_avail(self.queue.next_avail().wrapping_sub(popped));
        self.gathered.clear();
    }
}
