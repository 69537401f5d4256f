//! The thread behind a virtio-net device: one epoll loop over the rx and tx kicks, the port's
//! receive fd and the stop fd. The port's fd is watched only while the driver has rx buffers,
//! so a guest that stops taking frames does not make the worker spin.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vireo_netport::{FramePort, VNET_HDR_LEN};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::offload;
use super::rx::RxPath;
use super::tx::TxPath;
use super::NetCounters;
use crate::pause::{Park, PauseCtl};
use crate::queue::notify_if_needed;
use crate::state::ParkedReport;
use crate::worker::{drain, EventLoop, Worker};
use crate::{GuestMemory, QueueHandle, VirtioInterrupt};

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

const TOKEN_RX_KICK: u64 = 0;
const TOKEN_TX_KICK: u64 = 1;
const TOKEN_PORT: u64 = 2;
const TOKEN_STOP: u64 = 3;
const TOKEN_PAUSE: u64 = 4;

pub(crate) struct NetWorker {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: RxPath,
    rx_kick: EventFd,
    tx: TxPath,
    tx_kick: EventFd,
    port: Arc<dyn FramePort>,
    counters: Arc<NetCounters>,
    /// Whether the port's fd is in the epoll set.
    port_watched: bool,
    /// Set after a port error that may repeat forever (closed fd, deleted interface).
    port_failed: bool,
}

/// Features the driver accepted that change how the worker behaves.
pub(crate) struct Negotiated {
    pub event_idx: bool,
    pub mergeable_rx: bool,
    pub offloads: offload::Negotiated,
}

impl NetWorker {
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        rx: QueueHandle,
        tx: QueueHandle,
        negotiated: Negotiated,
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
        rxq.set_event_idx(negotiated.event_idx);
        txq.set_event_idx(negotiated.event_idx);
        NetWorker {
            mem,
            interrupt,
            rx: RxPath::new(rxq, negotiated.mergeable_rx, negotiated.offloads.rx),
            rx_kick,
            tx: TxPath::new(txq, negotiated.offloads.tx),
            tx_kick,
            port,
            counters,
            port_watched: false,
            port_failed: false,
        }
    }

    /// Starts with `frame` behind `hdr` in hand, as the saved device had it (restore).
    pub fn with_pending_frame(mut self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Self {
        self.rx.set_pending_frame(hdr, frame);
        self
    }

    /// Registers the fds (so setup errors reach `activate`) and starts the thread; `parked`:
    /// it serves nothing until the first resume (a device restored into a paused VM).
    pub fn start(mut self, parked: bool) -> std::io::Result<Worker> {
        let stop = Worker::stop_fd()?;
        let events = EventLoop::new()?;
        events.add(self.rx_kick.as_raw_fd(), TOKEN_RX_KICK)?;
        events.add(self.tx_kick.as_raw_fd(), TOKEN_TX_KICK)?;
        events.add(self.port.rx_fd(), TOKEN_PORT)?;
        events.add(stop.as_raw_fd(), TOKEN_STOP)?;
        let pause = Arc::new(if parked {
            PauseCtl::parked_from_start()?
        } else {
            PauseCtl::new()?
        });
        events.add(pause.wake_fd(), TOKEN_PAUSE)?;
        self.port_watched = true;
        let ctl = pause.clone();
        Ok(Worker::spawn(
            format!("virtio-net-{}", self.port.name()),
            &stop,
            move || self.run(events, &ctl),
        )?
        .with_pause(pause))
    }

    fn run(mut self, events: EventLoop, pause: &PauseCtl) {
        // The driver may have queued frames before activation. A worker asked to park from
        // the start leaves them (and the port) for the resume.
        if !pause.requested() {
            self.transmit();
            self.receive(&events);
        }
        let mut ready = Vec::new();
        loop {
            // The top of the loop is a pass boundary: every chain taken is used and published.
            let (rx, tx) = (&self.rx, &self.tx.queue);
            let parked = match pause.poll(|| {
                let pending = rx.pending_frame().map(|(hdr, f)| (hdr, f.to_vec()));
                ParkedReport::of_queues(&[&rx.queue, tx], pending)
            }) {
                Park::Run => false,
                Park::Parked => {
                    // Frames wait in the port meanwhile (or are dropped by it, as a port does
                    // when nobody reads).
                    self.watch_port(&events, false);
                    true
                }
                Park::Resumed => {
                    drain(&self.tx_kick);
                    drain(&self.rx_kick);
                    self.transmit();
                    self.receive(&events);
                    false
                }
            };
            if let Err(e) = events.wait(&mut ready) {
                tracing::error!("virtio-net: epoll failed, device stops: {e}");
                break;
            }
            if ready.contains(&TOKEN_STOP) {
                break;
            }
            if ready.contains(&TOKEN_PAUSE) {
                continue;
            }
            if parked {
                // Cannot come from a paused guest; served on resume.
                drain(&self.tx_kick);
                drain(&self.rx_kick);
                continue;
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
        self.rx.discard_pending(&self.counters);
    }

    fn transmit(&mut self) {
        let used = self.tx.transmit(&self.mem, &*self.port, &self.counters);
        notify_if_needed(
            &mut self.tx.queue,
            &self.mem,
            &*self.interrupt,
            TX_QUEUE,
            used,
        );
    }

    fn receive(&mut self, events: &EventLoop) {
        let outcome = self.rx.receive(&self.mem, &*self.port, &self.counters);
        notify_if_needed(
            &mut self.rx.queue,
            &self.mem,
            &*self.interrupt,
            RX_QUEUE,
            outcome.used,
        );
        self.port_failed |= outcome.port_failed;
        // Watch the port only while frames can go somewhere. When the budget ran out the fd
        // stays watched, and being level-triggered brings us straight back after other work.
        let want_port = !outcome.out_of_buffers && !self.port_failed;
        self.watch_port(events, want_port);
    }

    fn watch_port(&mut self, events: &EventLoop, want_port: bool) {
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
}
