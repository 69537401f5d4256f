//! The thread serving a virtio-blk queue: wakes on the driver's kick, executes every available
//! request, then interrupts the driver if (per EVENT_IDX) it asked to be told.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vireo_block::BlockBackend;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::request::RequestContext;
use super::BlockCounters;
use crate::chain::ChainBuffers;
use crate::queue::{notify_if_needed, serve_queue};
use crate::worker::{drain, EventLoop, Worker};
use crate::{GuestMemory, QueueHandle, VirtioInterrupt};

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;

pub(crate) struct BlockWorker {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: Queue,
    kick: EventFd,
    backend: Arc<dyn BlockBackend>,
    counters: Arc<BlockCounters>,
    serial: Option<String>,
}

impl BlockWorker {
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        handle: QueueHandle,
        event_idx: bool,
        backend: Arc<dyn BlockBackend>,
        counters: Arc<BlockCounters>,
        serial: Option<String>,
    ) -> Self {
        let QueueHandle { mut queue, kick } = handle;
        queue.set_event_idx(event_idx);
        BlockWorker {
            mem,
            interrupt,
            queue,
            kick,
            backend,
            counters,
            serial,
        }
    }

    /// Registers the fds (so setup errors reach `activate`) and starts the thread.
    pub fn start(self) -> std::io::Result<Worker> {
        let stop = Worker::stop_fd()?;
        let events = EventLoop::new()?;
        events.add(self.kick.as_raw_fd(), TOKEN_KICK)?;
        events.add(stop.as_raw_fd(), TOKEN_STOP)?;
        Worker::spawn("virtio-blk".into(), &stop, move || self.run(events))
    }

    fn run(mut self, events: EventLoop) {
        let mut buf = Vec::new();
        // A driver may have queued requests before the device was activated.
        self.serve(&mut buf);
        let mut ready = Vec::new();
        loop {
            if let Err(e) = events.wait(&mut ready) {
                tracing::error!("virtio-blk: epoll failed, device stops: {e}");
                return;
            }
            if ready.contains(&TOKEN_STOP) {
                return;
            }
            drain(&self.kick);
            self.serve(&mut buf);
        }
    }

    fn serve(&mut self, buf: &mut Vec<u8>) {
        let mem = &self.mem;
        let mut ctx = RequestContext {
            mem,
            backend: &*self.backend,
            counters: &self.counters,
            serial: self.serial.as_deref(),
            buf,
        };
        let used = serve_queue(&mut self.queue, mem, |chain| {
            match ChainBuffers::collect(mem, chain) {
                Ok(buffers) => ctx.execute(&buffers),
                Err(e) => {
                    // Without trustworthy buffers there is nowhere safe to put a status; the
                    // chain is returned unused so the driver does not lose it.
                    tracing::warn!("virtio-blk: malformed request: {e}");
                    ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                    0
                }
            }
        });
        notify_if_needed(&mut self.queue, mem, &*self.interrupt, 0, used);
    }
}
