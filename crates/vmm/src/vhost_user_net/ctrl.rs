//! The control queue of a multiqueue vhost-user NIC. The backend (a switch port) has the data
//! rings only; the queue-pair count is the device's, so the VMM serves the driver's
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` itself and turns the backend's rings on and off with
//! `SET_VRING_ENABLE`. Every other command is answered `VIRTIO_NET_ERR` (none is offered).
//!
//! One thread per activation, stopped by pause and reset; it owns a copy of the queue and
//! hands it back when stopped, so the device's saved position is the one it reached.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vireo_virtio::VirtioInterrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMemory;

pub(super) const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

/// Enables the rings of the first `n` of `max` pairs in the backend and disables the rest, and
/// returns once the backend has acted on it: SET_VRING_ENABLE gets no reply without REPLY_ACK,
/// but the backend handles messages in order, so the reply to GET_FEATURES comes after them.
/// The guest is told OK only then, so no frame lands in a pair it has just turned off.
pub(super) fn set_pairs(frontend: &mut Frontend, max: u16, n: u16) -> Result<(), vhost::Error> {
    for ring in 0..2 * usize::from(max) {
        frontend.set_vring_enable(ring, ring < 2 * usize::from(n))?;
    }
    frontend.get_features().map(|_| ())
}

/// What the control thread needs besides the queue.
pub(super) struct CtrlContext {
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub frontend: Frontend,
    /// The queue's index on the transport (for its interrupt).
    pub index: u16,
    /// Pairs the device offers (`max_virtqueue_pairs`).
    pub max_pairs: u16,
    /// Pairs in use; the device restarts the rings from it after a pause.
    pub active_pairs: Arc<AtomicU16>,
}

pub(super) struct CtrlQueue {
    stop: EventFd,
    thread: JoinHandle<Queue>,
}

impl CtrlQueue {
    pub fn start(mut ctx: CtrlContext, mut queue: Queue, kick: EventFd) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 1),
        )?;
        let stop_t = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("vhost-user-ctrl".into())
            .spawn(move || {
                // Commands the driver queued before a pause were announced by a kick that
                // thread never saw: look once before waiting.
                serve(&mut ctx, &mut queue);
                let mut events = [EpollEvent::default(); 2];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return queue,
                    };
                    if events[..n].iter().any(|e| e.data() == 1) {
                        let _ = stop_t.read();
                        return queue;
                    }
                    let _ = kick.read();
                    serve(&mut ctx, &mut queue);
                }
            })?;
        Ok(CtrlQueue { stop, thread })
    }

    /// Stops the thread after the command in hand and returns the queue where it stands.
    pub fn stop(self) -> Option<Queue> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

/// Answers every command in the ring.
fn serve(ctx: &mut CtrlContext, queue: &mut Queue) {
    let mut used = 0;
    while let Some(chain) = queue.pop_descriptor_chain(&ctx.mem) {
        let head = chain.head_index();
        let mut command = Vec::with_capacity(4);
        let mut ack_at = None;
        for desc in chain {
            if desc.is_write_only() {
                ack_at.get_or_insert(desc.addr());
                continue;
            }
            // Class, command and at most a u16 of data matter here.
            let take = (desc.len() as usize).min(4usize.saturating_sub(command.len()));
            let mut buf = vec![0u8; take];
            if ctx.mem.read_slice(&mut buf, desc.addr()).is_ok() {
                command.extend_from_slice(&buf);
            }
        }
        let status = execute(ctx, &command);
        let written = match ack_at {
            Some(at) if ctx.mem.write_obj(status, at).is_ok() => 1,
            _ => 0,
        };
        if let Err(e) = queue.add_used(&ctx.mem, head, written) {
            tracing::warn!("vhost-user NIC control queue: {e}");
        }
        used += 1;
    }
    // Under EVENT_IDX this asks for the next command's kick (avail_event = next_avail).
    let _ = queue.enable_notification(&ctx.mem);
    if used > 0 && queue.needs_notification(&ctx.mem).unwrap_or(true) {
        let _ = ctx.interrupt.notify_queue(ctx.index);
    }
}

fn execute(ctx: &mut CtrlContext, command: &[u8]) -> u8 {
    let [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, lo, hi] = *command else {
        tracing::debug!("vhost-user NIC: control command {command:02x?} not supported");
        return VIRTIO_NET_ERR;
    };
    let n = u16::from_le_bytes([lo, hi]);
    if n == 0 || n > ctx.max_pairs {
        return VIRTIO_NET_ERR;
    }
    match set_pairs(&mut ctx.frontend, ctx.max_pairs, n) {
        Ok(()) => {
            ctx.active_pairs.store(n, Ordering::Release);
            VIRTIO_NET_OK
        }
        Err(e) => {
            tracing::warn!("vhost-user NIC: setting {n} queue pairs: {e}");
            VIRTIO_NET_ERR
        }
    }
}
