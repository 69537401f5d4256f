//! The thread behind a virtio-net device. Transmit: every chain the guest queues is one frame
//! behind a header. Receive: frames move from the port into rx buffers while the guest has
//! buffers; once it has none, the port's fd leaves the epoll set (the frame in hand waits, the
//! port queues or pushes back) until the guest kicks the rx queue with new buffers.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vireo_netport::{FramePort, PortError, MAX_FRAME};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{NetCounters, NET_HDR_LEN};
use crate::chain::ChainBuffers;
use crate::queue::{notify_if_needed, serve_queue};
use crate::worker::{drain, EventLoop, Worker};
use crate::{GuestMemory, QueueHandle, VirtioInterrupt};

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

const TOKEN_RX_KICK: u64 = 0;
const TOKEN_TX_KICK: u64 = 1;
const TOKEN_PORT: u64 = 2;
const TOKEN_STOP: u64 = 3;

/// Shortest frame worth sending: an Ethernet header.
const MIN_FRAME: usize = 14;

/// The header put before every received frame: no checksum or GSO information, one buffer.
const RX_HEADER: [u8; NET_HDR_LEN] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];

pub(crate) struct NetWorker {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    rx_kick: EventFd,
    tx: Queue,
    tx_kick: EventFd,
    port: Arc<dyn FramePort>,
    counters: Arc<NetCounters>,
    /// Length of a frame received from the port, sitting in `frame`, that no rx buffer has
    /// taken yet.
    pending: Option<usize>,
    frame: Vec<u8>,
    /// Whether the port's fd is in the epoll set.
    port_watched: bool,
    /// Set after a port error that may repeat forever (closed fd, deleted interface).
    port_failed: bool,
}

impl NetWorker {
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        rx: QueueHandle,
        tx: QueueHandle,
        event_idx: bool,
        port: Arc<dyn FramePort>,
        counters: Arc<NetCounters>,
    ) -> Self {
        let QueueHandle {
            queue: mut rxq,
            kick: rx_kick,
        } = rx;
        let QueueHandle {
            queue: mut txq,
            kick: tx_kick,
        } = tx;
        rxq.set_event_idx(event_idx);
        txq.set_event_idx(event_idx);
        NetWorker {
            mem,
            interrupt,
            rx: rxq,
            rx_kick,
            tx: txq,
            tx_kick,
            port,
            counters,
            pending: None,
            frame: vec![0; MAX_FRAME],
            port_watched: false,
            port_failed: false,
        }
    }

    /// Registers the fds (so setup errors reach `activate`) and starts the thread.
    pub fn start(mut self) -> std::io::Result<Worker> {
        let stop = Worker::stop_fd()?;
        let events = EventLoop::new()?;
        events.add(self.rx_kick.as_raw_fd(), TOKEN_RX_KICK)?;
        events.add(self.tx_kick.as_raw_fd(), TOKEN_TX_KICK)?;
        events.add(self.port.rx_fd(), TOKEN_PORT)?;
        events.add(stop.as_raw_fd(), TOKEN_STOP)?;
        self.port_watched = true;
        Worker::spawn(
            format!("virtio-net-{}", self.port.name()),
            &stop,
            move || self.run(events),
        )
    }

    fn run(mut self, events: EventLoop) {
        // The driver may have queued frames before activation.
        self.transmit();
        self.receive(&events);
        let mut ready = Vec::new();
        loop {
            if let Err(e) = events.wait(&mut ready) {
                tracing::error!("virtio-net: epoll failed, device stops: {e}");
                break;
            }
            if ready.contains(&TOKEN_STOP) {
                break;
            }
            if ready.contains(&TOKEN_TX_KICK) {
                drain(&self.tx_kick);
                self.transmit();
            }
            if ready.contains(&TOKEN_RX_KICK) || ready.contains(&TOKEN_PORT) {
                drain(&self.rx_kick);
                self.receive(&events);
            }
        }
        if self.pending.take().is_some() {
            self.counters.rx_drops.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn transmit(&mut self) {
        let mem = &self.mem;
        let port = &*self.port;
        let counters = &*self.counters;
        let frame = &mut self.frame;
        let used = serve_queue(&mut self.tx, mem, |chain| {
            match ChainBuffers::collect(mem, chain) {
                Ok(buffers) => send_one(mem, &buffers, port, counters, frame),
                Err(e) => {
                    tracing::debug!("virtio-net: malformed tx chain: {e}");
                    counters.tx_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
            0
        });
        notify_if_needed(&mut self.tx, mem, &*self.interrupt, TX_QUEUE, used);
    }

    /// Moves frames from the port into rx buffers until one side runs out.
    fn receive(&mut self, events: &EventLoop) {
        let mut used = 0;
        let out_of_buffers = loop {
            let len = match self.pending {
                Some(len) => len,
                None => match self.next_frame() {
                    Some(len) => len,
                    None => break false,
                },
            };
            self.pending = Some(len);
            match self.deliver(len) {
                Delivery::Delivered => {
                    used += 1;
                    self.pending = None;
                }
                Delivery::Dropped => self.pending = None,
                Delivery::Returned => {
                    used += 1;
                    self.pending = None;
                }
                Delivery::NoBuffer => break true,
            }
        };
        if !out_of_buffers {
            // Buffers remain: the driver need not kick when adding more (without EVENT_IDX this
            // sets NO_NOTIFY; with it, avail_event simply stays behind). Running out re-enables.
            if let Err(e) = self.rx.disable_notification(&self.mem) {
                tracing::warn!("virtio-net: cannot disable rx notifications: {e}");
            }
        }
        notify_if_needed(&mut self.rx, &self.mem, &*self.interrupt, RX_QUEUE, used);
        // Watch the port only while frames can go somewhere, so a full guest does not make the
        // worker spin on a readable fd.
        let want_port = !out_of_buffers && !self.port_failed;
        if want_port != self.port_watched {
            let result = if want_port {
                events.add(self.port.rx_fd(), TOKEN_PORT)
            } else {
                events.remove(self.port.rx_fd())
            };
            match result {
                Ok(()) => self.port_watched = want_port,
                Err(e) => tracing::error!("virtio-net: cannot (un)watch port: {e}"),
            }
        }
    }

    /// Takes the next frame from the port into `self.frame`, counting the ones that cannot be
    /// taken; `None` when the port has nothing (or has failed).
    fn next_frame(&mut self) -> Option<usize> {
        loop {
            match self.port.recv(&mut self.frame) {
                Ok(Some(len)) => return Some(len),
                Ok(None) => return None,
                Err(PortError::TooLong { .. }) => {
                    self.counters.rx_drops.fetch_add(1, Ordering::Relaxed);
                }
                Err(PortError::Full) => return None,
                Err(e) => {
                    tracing::error!("virtio-net: port {} failed: {e}", self.port.name());
                    self.port_failed = true;
                    return None;
                }
            }
        }
    }

    /// Puts the frame in `self.frame[..len]` into the next rx chain.
    fn deliver(&mut self, len: usize) -> Delivery {
        let mem = &self.mem;
        let mut retried = false;
        let chain = loop {
            let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                // Ask for a kick when buffers arrive; if some arrived meanwhile, go on (once:
                // a ring that claims chains it cannot yield is broken, not busy).
                match self.rx.enable_notification(mem) {
                    Ok(true) if !retried => {
                        retried = true;
                        continue;
                    }
                    Ok(true) => return Delivery::NoBuffer,
                    Ok(false) => return Delivery::NoBuffer,
                    Err(e) => {
                        tracing::warn!("virtio-net: rx queue unusable: {e}");
                        return Delivery::NoBuffer;
                    }
                }
            };
            if chain.head_index() < self.rx.size() {
                break chain;
            }
            // A head past the queue can be neither used nor returned: skip it.
            tracing::warn!("virtio-net: rx head {} out of range", chain.head_index());
        };
        let head = chain.head_index();
        let written = match ChainBuffers::collect(mem, chain) {
            Ok(buffers) if buffers.writable_len() < (NET_HDR_LEN + len) as u64 => {
                // Too small for this frame: drop the frame, keep the buffer for the next one.
                self.counters.rx_drops.fetch_add(1, Ordering::Relaxed);
                self.rx.set_next_avail(self.rx.next_avail().wrapping_sub(1));
                return Delivery::Dropped;
            }
            Ok(buffers) => buffers
                .write_at(mem, 0, &RX_HEADER)
                .and_then(|()| buffers.write_at(mem, NET_HDR_LEN as u64, &self.frame[..len]))
                .map(|()| (NET_HDR_LEN + len) as u32),
            Err(e) => Err(e),
        };
        let written = match written {
            Ok(n) => n,
            Err(e) => {
                // The chain is unusable; return it empty so the driver can recycle it.
                tracing::debug!("virtio-net: malformed rx chain: {e}");
                self.counters.rx_drops.fetch_add(1, Ordering::Relaxed);
                if self.rx.add_used(mem, head, 0).is_ok() {
                    return Delivery::Returned;
                }
                return Delivery::Dropped;
            }
        };
        if let Err(e) = self.rx.add_used(mem, head, written) {
            tracing::warn!("virtio-net: cannot return rx chain {head}: {e}");
            self.counters.rx_drops.fetch_add(1, Ordering::Relaxed);
            return Delivery::Dropped;
        }
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.counters
            .rx_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Delivery::Delivered
    }
}

enum Delivery {
    /// The frame is in the guest.
    Delivered,
    /// The frame is lost (counted); no chain was used.
    Dropped,
    /// The frame is lost (counted) and a malformed chain went back to the driver empty.
    Returned,
    /// No rx buffer: the frame waits.
    NoBuffer,
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
