//! The thread serving one virtio-blk queue (a multiqueue disk has one such thread per queue,
//! sharing only the backend and the counters): wakes on the driver's kick, executes every available
//! request, then interrupts the driver if (per EVENT_IDX) it asked to be told. After a batch it
//! polls the ring for a short adaptive window with notifications off ([`PollWindow`]), so a
//! driver that queues its next request quickly does not pay a VM exit to kick.
//!
//! Without QoS the requests found in one look at the ring run as a batch: their reads and
//! writes go to the backend together (small reads through io_uring on a raw file, writes one by
//! one meanwhile, [`Batcher`]), straight between the file and guest memory. Each request's used
//! entry is published as soon as it is finished, so a driver polling the used ring refills its
//! queue while the batch still runs; the interrupt (if asked for) comes once, after the batch.
//! A batch is finished before the worker looks at pause requests again, so a parked worker has
//! nothing in flight. With QoS requests run one by one, each admitted by the gate.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_block::{Batcher, BlockBackend};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::gate::Gate;
use super::qos::QosConfig;
use super::request::RequestContext;
use super::BlockCounters;
use crate::chain::ChainBuffers;
use crate::pause::{Park, PauseCtl};
use crate::poll::PollWindow;
use crate::queue::{add_used_logged, serve_in_batches, spin_for_avail, QueueRing};
use crate::queue::{notify_if_needed, poll_avail, serve_queue_gated, Served};
use crate::state::ParkedReport;
use crate::worker::{drain, EventLoop, Worker};
use crate::{GuestMemory, QueueHandle, VirtioInterrupt};

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_PAUSE: u64 = 2;

pub(crate) struct BlockWorker {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: Queue,
    /// This queue's number (for the interrupt and the thread's name).
    index: u16,
    kick: EventFd,
    backend: Arc<dyn BlockBackend>,
    counters: Arc<BlockCounters>,
    serial: Option<String>,
    /// Storage QoS; `None` when the disk has none.
    gate: Option<Gate>,
    pause: Arc<PauseCtl>,
    poll: PollWindow,
    /// Runs a pass's reads and writes together; `None` when `VIREO_BLK_BATCH=0` (then they run
    /// one at a time, as with QoS).
    batcher: Option<Batcher>,
    /// Most chains taken from the ring into one batch ([`STREAM_BATCH`], or the env override).
    batch_max: usize,
}

/// Most requests the io_uring batcher has room for (a queue's size, up to this).
const MAX_BATCH: usize = 64;

/// Most requests taken from the ring into one batch unless `VIREO_BLK_BATCH_MAX` (1 to
/// [`MAX_BATCH`]) says otherwise, for comparisons. Page-cache reads complete inside a batch's
/// one `io_uring_enter`, so none of a QD 32 batch reaches the used ring before the last is
/// done; smaller batches hand completions back sooner so the driver can refill meanwhile. On
/// this shared 2-core host that lost: `randread 4K 32` at load ~15, three alternating rounds,
/// batches of 64 ran 64–101 k IOPS, batches of 8 26–38 k (docs/datapath.md). It may differ on
/// an idle host, where the vCPU and the worker have a core each; not measured.
const STREAM_BATCH: usize = 64;

/// The disk a worker serves: its backend and what the device keeps across activations.
pub(crate) struct Disk {
    pub backend: Arc<dyn BlockBackend>,
    pub counters: Arc<BlockCounters>,
    pub serial: Option<String>,
    pub qos: QosConfig,
}

impl BlockWorker {
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        handle: QueueHandle,
        index: u16,
        event_idx: bool,
        disk: Disk,
        pause: Arc<PauseCtl>,
    ) -> Self {
        let QueueHandle { mut queue, kick } = handle;
        queue.set_event_idx(event_idx);
        let queue_size = queue.size().min(MAX_BATCH as u16);
        let Disk {
            backend,
            counters,
            serial,
            qos,
        } = disk;
        let label = serial.clone().unwrap_or_else(|| backend.id());
        BlockWorker {
            pause,
            gate: Gate::new(qos, label),
            mem,
            interrupt,
            queue,
            index,
            kick,
            backend,
            counters,
            serial,
            poll: PollWindow::for_block(),
            batcher: batching_enabled().then(|| Batcher::new(u32::from(queue_size))),
            batch_max: batch_max(),
        }
    }

    /// Registers the fds (so setup errors reach `activate`) and starts the thread.
    pub fn start(self) -> std::io::Result<Worker> {
        let stop = Worker::stop_fd()?;
        let events = EventLoop::new()?;
        events.add(self.kick.as_raw_fd(), TOKEN_KICK)?;
        events.add(stop.as_raw_fd(), TOKEN_STOP)?;
        events.add(self.pause.wake_fd(), TOKEN_PAUSE)?;
        let pause = self.pause.clone();
        Ok(
            Worker::spawn(format!("virtio-blk-q{}", self.index), &stop, move || {
                self.run(events)
            })?
            .with_pause(pause),
        )
    }

    fn run(mut self, events: EventLoop) {
        // A driver may have queued requests before the device was activated; a worker asked
        // to park from the start (a restored device) leaves them for the resume.
        let mut last = if self.pause.requested() {
            Pass::default()
        } else {
            self.serve()
        };
        let mut ready = Vec::new();
        loop {
            // The top of the loop is a request boundary: nothing taken from the ring is
            // unfinished here, and the used entries of the last pass are published.
            let queue = &self.queue;
            let parked = match self.pause.poll(|| ParkedReport::of_queues(&[queue], None)) {
                Park::Run => false,
                Park::Parked => {
                    if let Some(g) = self.gate.as_mut() {
                        g.pause(&self.counters);
                    }
                    last = Pass::default();
                    true
                }
                Park::Resumed => {
                    drain(&self.kick);
                    last = self.serve();
                    false
                }
            };
            // Poll only after a pass that used chains (an idle guest or a bad ring never makes
            // the thread spin) and not while QoS holds a request (its timer brings it back).
            let mut polled = last.polled.unwrap_or(Duration::ZERO);
            let mut found = false;
            if !parked
                && last.used > 0
                && !last.held
                && last.polled.is_none()
                && !self.poll.window().is_zero()
            {
                let start = Instant::now();
                let window = self.poll.window();
                let pause = &*self.pause;
                found = poll_avail(&mut self.queue, &self.mem, || {
                    start.elapsed() < window && !pause.requested()
                });
                polled = start.elapsed();
            }
            // A held request or a measurement window brings the thread back without a kick;
            // a parked thread waits for its resume (or stop) alone; polled work only checks
            // for a stop or pause without waiting.
            // A batched pass that stopped for a pause request which is gone again (a pause
            // that timed out) left kicks suppressed: serve again rather than wait for one.
            let retry = !parked && last.held && self.gate.is_none();
            let timeout = match (&self.gate, parked) {
                _ if found || retry => 0,
                (Some(g), false) => g.timeout_ms(),
                _ => -1,
            };
            let slept_from = Instant::now();
            if let Err(e) = events.wait_timeout(&mut ready, timeout) {
                tracing::error!("virtio-blk: epoll failed, device stops: {e}");
                return;
            }
            if ready.contains(&TOKEN_STOP) {
                return;
            }
            if ready.contains(&TOKEN_PAUSE) {
                // Decided at the top of the loop; a kick that came too is served on resume.
                continue;
            }
            if parked {
                // Cannot happen from a paused guest, but never serve while parked.
                drain(&self.kick);
                continue;
            }
            if !found && !retry {
                let kicked = ready.contains(&TOKEN_KICK);
                self.poll.slept(polled, slept_from.elapsed(), kicked);
            }
            drain(&self.kick);
            last = self.serve();
        }
    }

    fn serve(&mut self) -> Pass {
        if self.gate.is_none() && self.batcher.is_some() {
            return self.serve_batched();
        }
        let mem = &self.mem;
        let gate = &mut self.gate;
        let counters = &*self.counters;
        if let Some(g) = gate.as_mut() {
            g.serve_started(counters);
        }
        let mut ctx = RequestContext {
            mem,
            backend: &*self.backend,
            counters,
            serial: self.serial.as_deref(),
        };
        let pause = &*self.pause;
        let (used, held) = serve_queue_gated(&mut self.queue, mem, |chain| {
            // A pause stops the pass between two requests; the chain goes back untouched and
            // is served on resume.
            if pause.requested() {
                return Served::Defer;
            }
            let buffers = match ChainBuffers::collect(mem, chain) {
                Ok(buffers) => buffers,
                Err(e) => {
                    // Without trustworthy buffers there is nowhere safe to put a status; the
                    // chain is returned unused so the driver does not lose it.
                    tracing::warn!("virtio-blk: malformed request: {e}");
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    return Served::Used(0);
                }
            };
            let Some(g) = gate.as_mut() else {
                return Served::Used(ctx.execute(&buffers));
            };
            let cost = ctx.cost(&buffers);
            if !g.admit(cost, counters) {
                return Served::Defer;
            }
            let len = ctx.execute(&buffers);
            g.completed(cost, counters);
            Served::Used(len)
        });
        notify_if_needed(&mut self.queue, mem, &*self.interrupt, self.index, used);
        if let Some(g) = gate.as_mut() {
            g.serve_ended(held, counters);
        }
        Pass {
            used,
            held,
            polled: None,
        }
    }
}

impl BlockWorker {
    /// A serve pass without QoS: every look at the ring takes what is there (up to
    /// [`STREAM_BATCH`]) and runs it as one batch; a pause request stops the pass between batches
    /// with the rest left in the ring. Notifications are re-enabled at the end, looking once
    /// more for chains that came meanwhile ([`serve_in_batches`]).
    fn serve_batched(&mut self) -> Pass {
        let mem = &self.mem;
        let counters = &*self.counters;
        let pause = &*self.pause;
        let Some(batcher) = self.batcher.as_mut() else {
            return Pass::default();
        };
        let mut ctx = RequestContext {
            mem,
            backend: &*self.backend,
            counters,
            serial: self.serial.as_deref(),
        };
        let mut ring = QueueRing {
            queue: &mut self.queue,
            mem,
        };
        let interrupt = &*self.interrupt;
        let index = self.index;
        let window = self.poll.window();
        let mut notified = 0;
        let mut polled = None;
        // A pause request stops the pass like a deferred chain: notifications stay off and
        // the pause decides what comes next.
        let (used, held) = serve_in_batches(
            &mut ring,
            self.batch_max,
            || pause.requested(),
            |ring, batch| {
                let heads: Vec<u16> = batch.iter().map(|c| c.head_index()).collect();
                let chains: Vec<_> = batch
                    .drain(..)
                    .map(|c| ChainBuffers::collect(mem, c))
                    .collect();
                // Each chain goes to the used ring as soon as it is finished, so a driver
                // polling the used ring refills its queue while the rest of the batch runs.
                let mut used = 0;
                run_batch(&mut ctx, batcher, &chains, |i, len| {
                    if add_used_logged(ring.queue, mem, heads[i], len) {
                        used += 1;
                    }
                });
                used
            },
            // The ring ran dry: interrupt for what is done, then poll with kicks still off, so
            // a driver that queues its next request at once (QD 1) never finds kicks asked
            // for. Polling after re-enabling them instead cost such a guest an exit on about
            // every second request.
            |ring, used| {
                notify_if_needed(ring.queue, mem, interrupt, index, used - notified);
                notified = used;
                if window.is_zero() {
                    return false;
                }
                let start = Instant::now();
                let found = spin_for_avail(ring.queue, mem, || {
                    start.elapsed() < window && !pause.requested()
                });
                if !found {
                    polled = Some(start.elapsed());
                }
                found
            },
        );
        let queue = &mut self.queue;
        notify_if_needed(queue, mem, interrupt, index, used - notified);
        Pass { used, held, polled }
    }
}

/// Runs one batch: reads and writes together through `batcher`, everything else as it comes.
/// `publish(i, len)` hands chain `i`'s used length over as soon as it is known; every chain is
/// published once before this returns.
fn run_batch(
    ctx: &mut RequestContext<'_>,
    batcher: &mut Batcher,
    chains: &[Result<ChainBuffers, crate::chain::ChainError>],
    mut publish: impl FnMut(usize, u32),
) {
    let mut pending = Vec::new();
    let mut owners = Vec::new();
    for (i, chain) in chains.iter().enumerate() {
        let chain = match chain {
            Ok(c) => c,
            Err(e) => {
                // Without trustworthy buffers there is nowhere safe to put a status; the
                // chain is returned unused so the driver does not lose it.
                tracing::warn!("virtio-blk: malformed request: {e}");
                ctx.counters.errors.fetch_add(1, Ordering::Relaxed);
                publish(i, 0);
                continue;
            }
        };
        match ctx.prepare(chain) {
            Ok(io) => {
                pending.push(io);
                owners.push(i);
            }
            Err(len) => publish(i, len),
        }
    }
    if pending.is_empty() {
        return;
    }
    let ops: Vec<_> = pending.iter().map(|p| &p.op).collect();
    let backend = ctx.backend;
    batcher.run_each(backend, &ops, |k, result| {
        let i = owners[k];
        if let Ok(chain) = &chains[i] {
            publish(i, ctx.complete(chain, &pending[k], result));
        }
    });
}

/// Whether reads and writes run in batches: yes unless `VIREO_BLK_BATCH=0` (for comparing).
fn batching_enabled() -> bool {
    std::env::var("VIREO_BLK_BATCH").map_or(true, |v| v.trim() != "0")
}

/// Chains per batch: `VIREO_BLK_BATCH_MAX` (1 to [`MAX_BATCH`]) or [`STREAM_BATCH`].
fn batch_max() -> usize {
    std::env::var("VIREO_BLK_BATCH_MAX")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(STREAM_BATCH, |n| n.clamp(1, MAX_BATCH))
}

/// What one serve pass did: chains used, and whether QoS held one back.
#[derive(Debug, Default, Clone, Copy)]
struct Pass {
    used: usize,
    held: bool,
    /// How long the pass polled the empty ring at its end, when it did (the batched pass
    /// polls itself, with kicks off; the worker loop then does not poll again).
    polled: Option<Duration>,
}
