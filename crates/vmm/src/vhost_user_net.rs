//! A virtio-net NIC whose data path lives in another process: the vhost-user-net frontend.
//! The guest sees an ordinary virtio-mmio net device (this side answers features and the MAC
//! in config space); on activation the guest RAM (a memfd), the queue addresses, the
//! transport's kick eventfds (KVM ioeventfds) and per-queue call eventfds go to the backend
//! over its Unix socket, so frames never pass through the VMM. Calls are relayed to the
//! transport's interrupt because virtio-mmio's interrupt status register must say "used ring".
//!
//! Pause and save (docs/vm-state.md): `pause` sends GET_VRING_BASE per ring, which makes the
//! backend stop the ring at a frame boundary and answer the next available entry it would
//! take; the used index is what the backend last published in guest memory. `resume` starts
//! the rings again from there (SET_VRING_NUM/ADDR/BASE/CALL/KICK), and a restored device is
//! activated with the saved positions the same way, so no frame the guest queued is lost or
//! sent twice. Frames the switch has for a paused VM are dropped, as by a NIC that is down.
//! An in-place apply (`vm/apply.rs`) resets the device in its pause and loads the saved state
//! into it: the same session, restarted at the save's positions like a restored device.
//!
//! Dirty log (live save, migration; docs/vm-state.md "The NIC's dirty log"): the backend
//! writes received frames and used rings into guest RAM behind KVM's back, so while dirty
//! logging is on it marks those pages in the VM's shared log. We negotiate
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD` at connect; `start_dirty_log` sends the log memfd with
//! `SET_LOG_BASE` and sets `VHOST_F_LOG_ALL` (a driver activating the device meanwhile gets
//! both after its `SET_MEM_TABLE`); `stop_dirty_log` clears `LOG_ALL` and sends the memory
//! table again, which detaches the log from backends (vhost-user-backend's among them) that
//! keep logging regardless of `LOG_ALL`. A backend without both features makes
//! `start_dirty_log` fail, and so the live save or migration, rather than lose its writes.
//! The used rings are logged by guest-physical address through the same log (the backend
//! marks every page it writes), so `VHOST_VRING_F_LOG` is not used.
//!
//! Multiqueue, asked for with [`VhostUserNet::connect_with_pairs`] (`vireo run --net
//! vhost-user=SOCKET,queues=N`): with a backend that offers `VIRTIO_NET_F_MQ` and
//! `VHOST_USER_PROTOCOL_F_MQ` the NIC has up to N pairs (at most the backend's GET_QUEUE_NUM
//! / 2 and [`MAX_QUEUE_PAIRS`]); the guest sees MQ, `CTRL_VQ` and `max_virtqueue_pairs`, and
//! the control queue (the last queue) is served here (`ctrl.rs`): pair 0 runs until the
//! driver asks for more with `VQ_PAIRS_SET`. The pair count in use is part of the saved
//! state. One pair is the default because the queue count is part of the machine: a VM saved
//! with a two-queue NIC must find two queues when it is restored.
//!
//! Post-copy (docs/migration.md, "Post-copy with a vhost-user NIC"): with
//! `VHOST_USER_PROTOCOL_F_PAGEFAULT` negotiated, `postcopy_listen` asks the backend for a
//! userfaultfd (POSTCOPY_ADVISE), puts it in listening mode and sends the memory table again:
//! the backend maps guest RAM afresh, registers the mapping and answers where it mapped each
//! region; only after our ack does it use that mapping. The VMM's post-copy fault thread then
//! serves the backend's faults as it serves the vCPUs'. `postcopy_end` (POSTCOPY_END) once
//! every page is here.
//!
//! Not covered: reconnecting to a restarted backend.

mod ctrl;

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vireo_virtio::state::{NetState, RingPositions};
use vireo_virtio::{
    ActivateError, DeviceState, DirtyLog, DirtyLogError, ForeignFaults, ForeignMaps, PauseError,
    QueueHandle, StateError, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMemory;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const QUEUE_SIZE: u16 = 256;
/// Queue pairs offered at most, whatever the backend has.
pub const MAX_QUEUE_PAIRS: u16 = 4;

#[derive(Debug, thiserror::Error)]
pub enum VhostUserNetError {
    #[error("connecting to vhost-user backend {path}: {source}")]
    Connect { path: PathBuf, source: vhost::Error },
    #[error("vhost-user negotiation with {path}: {source}")]
    Negotiate { path: PathBuf, source: vhost::Error },
    #[error("vhost-user backend {path} does not offer VIRTIO_F_VERSION_1")]
    NotModern { path: PathBuf },
}

/// Relays the backend's call eventfds to the transport's interrupt until stopped.
struct CallRelay {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl CallRelay {
    fn start(
        calls: Vec<EventFd>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<CallRelay> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let stop_token = calls.len() as u64;
        for (i, c) in calls.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                c.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, stop_token),
        )?;
        let thread = std::thread::Builder::new()
            .name("vhost-user-call".into())
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); stop_token as usize + 1];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    for ev in &events[..n] {
                        let i = ev.data() as usize;
                        if i as u64 == stop_token {
                            return;
                        }
                        let _ = calls[i].read();
                        let _ = interrupt.notify_queue(i as u16);
                    }
                }
            })?;
        Ok(CallRelay {
            stop: stop.try_clone()?,
            thread,
        })
    }

    fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}

/// A virtio-net device backed by a vhost-user-net backend on a Unix socket.
pub struct VhostUserNet {
    path: PathBuf,
    frontend: Frontend,
    mac: [u8; 6],
    backend_features: u64,
    acked: u64,
    /// One per data ring, and the control queue last when there is more than one pair.
    queue_sizes: Vec<u16>,
    /// Queue pairs offered to the guest (1 without multiqueue).
    pairs: u16,
    /// Pairs the driver uses (VQ_PAIRS_SET); 1 until it asks for more.
    active_pairs: Arc<AtomicU16>,
    /// Set while the driver has the device active: what a restart of the rings needs.
    active: Option<Active>,
    /// Where the backend stood in each ring when `pause` stopped it; `None` while running.
    parked: Option<RingPositions>,
    /// Why the last `pause` could not learn the ring positions (the backend did not answer).
    unknown: Option<String>,
    /// `VHOST_USER_PROTOCOL_F_LOG_SHMFD` was negotiated.
    log_shmfd: bool,
    /// The VM's shared dirty log (our dup of its memfd, size) while logging is on.
    log: Option<(File, u64)>,
    /// Test-only: accept dirty logging without telling the backend (shows what is lost).
    skip_dirty_log: bool,
    /// Loaded from a save: the next activation sets the backend up but leaves the rings
    /// stopped until `resume`, so nothing writes the RAM of a VM restored paused.
    restored: bool,
    /// `VHOST_USER_PROTOCOL_F_PAGEFAULT` was negotiated: the backend can join post-copy.
    pagefault: bool,
    /// While post-copy listens: where the backend mapped each region (gpa, len, its address),
    /// shared with the fault thread; set by every memory table sent meanwhile.
    postcopy_maps: Option<ForeignMaps>,
}

/// An activation's wiring, kept so that the rings can be stopped and started again.
struct Active {
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The driver's queues (their `next_avail` is updated at each pause) and kick eventfds.
    queues: Vec<QueueHandle>,
    /// Our ends of the backend's call eventfds (the relay holds clones).
    calls: Vec<EventFd>,
    relay: Option<CallRelay>,
    /// Serving the control queue while the rings run.
    ctrl: Option<ctrl::CtrlQueue>,
}

/// `used.idx` as the backend last published it in guest memory (0 if unreadable).
fn used_idx(mem: &GuestMemory, q: &virtio_queue::Queue) -> u16 {
    mem.read_obj::<u16>(GuestAddress(q.used_ring() + 2))
        .map(u16::from_le)
        .unwrap_or(0)
}

fn clone_all(fds: &[EventFd]) -> std::io::Result<Vec<EventFd>> {
    fds.iter().map(EventFd::try_clone).collect()
}

fn negotiate(path: &Path) -> impl Fn(vhost::Error) -> VhostUserNetError + '_ {
    move |source| VhostUserNetError::Negotiate {
        path: path.to_path_buf(),
        source,
    }
}

impl VhostUserNet {
    /// Connects to the backend at `socket` and learns its features; the data path starts when
    /// the guest driver sets DRIVER_OK.
    pub fn connect(socket: &Path, mac: [u8; 6]) -> Result<Self, VhostUserNetError> {
        Self::connect_with_pairs(socket, mac, 1)
    }

    /// [`VhostUserNet::connect`] with up to `want_pairs` queue pairs (module docs); fewer if
    /// the backend has fewer, one if it has no multiqueue.
    pub fn connect_with_pairs(
        socket: &Path,
        mac: [u8; 6],
        want_pairs: u16,
    ) -> Result<Self, VhostUserNetError> {
        let max_queues = 2 * u64::from(MAX_QUEUE_PAIRS);
        let mut frontend =
            Frontend::connect(socket, max_queues).map_err(|source| VhostUserNetError::Connect {
                path: socket.to_path_buf(),
                source,
            })?;
        frontend.set_owner().map_err(negotiate(socket))?;
        let backend_features = frontend.get_features().map_err(negotiate(socket))?;
        if backend_features & vireo_virtio::VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserNetError::NotModern {
                path: socket.to_path_buf(),
            });
        }
        let mut log_shmfd = false;
        let mut pagefault = false;
        let mut pairs = 1;
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            // Negotiating the set (even empty) is what lets us start and stop rings with
            // SET_VRING_ENABLE; the optional ones we use are LOG_SHMFD (dirty log), PAGEFAULT
            // (post-copy) and, when more than one pair is asked for, MQ (GET_QUEUE_NUM).
            let offered = frontend
                .get_protocol_features()
                .map_err(negotiate(socket))?;
            let mut wanted =
                VhostUserProtocolFeatures::LOG_SHMFD | VhostUserProtocolFeatures::PAGEFAULT;
            if want_pairs > 1 {
                wanted |= VhostUserProtocolFeatures::MQ;
            }
            let ours = offered & wanted;
            frontend
                .set_protocol_features(ours)
                .map_err(negotiate(socket))?;
            log_shmfd = ours.contains(VhostUserProtocolFeatures::LOG_SHMFD);
            pagefault = ours.contains(VhostUserProtocolFeatures::PAGEFAULT);
            if ours.contains(VhostUserProtocolFeatures::MQ)
                && backend_features & VIRTIO_NET_F_MQ != 0
            {
                let rings = frontend.get_queue_num().map_err(negotiate(socket))?;
                let most = u64::from(want_pairs.min(MAX_QUEUE_PAIRS));
                pairs = (rings / 2).clamp(1, most) as u16;
            }
        }
        if pairs < want_pairs {
            tracing::warn!(
                "vhost-user backend {} gives {pairs} of the {want_pairs} queue pairs asked for",
                socket.display()
            );
        }
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * usize::from(pairs)];
        if pairs > 1 {
            queue_sizes.push(QUEUE_SIZE);
        }
        Ok(VhostUserNet {
            path: socket.to_path_buf(),
            frontend,
            mac,
            backend_features,
            acked: 0,
            queue_sizes,
            pairs,
            active_pairs: Arc::new(AtomicU16::new(1)),
            active: None,
            parked: None,
            unknown: None,
            log_shmfd,
            log: None,
            skip_dirty_log: false,
            restored: false,
            pagefault,
            postcopy_maps: None,
        })
    }

    /// Test-only: dirty logging "starts" without the backend being told, so its writes are
    /// missed. Only for tests that show what the dirty log protects against.
    #[doc(hidden)]
    pub fn without_dirty_log_for_tests(mut self) -> Self {
        self.skip_dirty_log = true;
        self
    }

    /// Whether the backend can log its writes (LOG_SHMFD and LOG_ALL both offered).
    fn can_log(&self) -> bool {
        self.log_shmfd && self.backend_features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// The features the backend runs with: the driver's, plus LOG_ALL while logging.
    fn backend_run_features(&self) -> u64 {
        let mut features = self.acked & self.backend_features;
        if self.protocol_features() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        if self.log.is_some() {
            features |= VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        features
    }

    /// Hands the backend the shared log (SET_LOG_BASE, after the memory table it covers).
    fn send_log_base(&self) -> Result<(), vhost::Error> {
        let Some((file, size)) = &self.log else {
            return Ok(());
        };
        self.frontend.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: *size,
                mmap_offset: 0,
                mmap_handle: file.as_raw_fd(),
            }),
        )
    }

    /// Waits until the backend has acted on every message sent before: SET_FEATURES and
    /// SET_MEM_TABLE get no reply without REPLY_ACK, but the backend handles messages in order,
    /// so the reply to GET_FEATURES comes after them (QEMU does the same for LOG_ALL).
    fn barrier(&self) -> Result<(), vhost::Error> {
        self.frontend.get_features().map(|_| ())
    }

    /// Sends the memory table. While post-copy listens the backend answers where it mapped
    /// each region (registered with its userfaultfd); the fault thread learns that before our
    /// ack lets the backend use the mapping.
    fn mem_table(&self, mem: &GuestMemory) -> Result<(), vhost::Error> {
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()?;
        let bases = self.frontend.set_mem_table(&regions)?;
        if let (Some(maps), Some(bases)) = (&self.postcopy_maps, bases) {
            *maps.lock().unwrap_or_else(|p| p.into_inner()) = regions
                .iter()
                .zip(bases)
                .map(|(r, base)| (r.guest_phys_addr, r.memory_size, base))
                .collect();
            self.frontend
                .clone()
                .postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE)?;
        }
        Ok(())
    }

    /// Data rings the driver may use: every pair's with MQ accepted, else the first pair's.
    fn data_rings(&self) -> usize {
        if self.acked & VIRTIO_NET_F_MQ != 0 {
            2 * usize::from(self.pairs)
        } else {
            2
        }
    }

    /// The control queue's index, if the driver accepted one: after the data rings.
    fn ctrl_index(&self) -> Option<usize> {
        (self.acked & ctrl::VIRTIO_NET_F_CTRL_VQ != 0).then(|| self.data_rings())
    }

    /// Starts serving the control queue (if any) from where the driver's queue stands.
    fn start_ctrl(&self, a: &Active) -> std::io::Result<Option<ctrl::CtrlQueue>> {
        let Some(i) = self.ctrl_index() else {
            return Ok(None);
        };
        let Some(qh) = a.queues.get(i).filter(|qh| qh.queue.ready()) else {
            return Ok(None);
        };
        let mut queue = virtio_queue::Queue::try_from(qh.queue.state())
            .map_err(|e| std::io::Error::other(format!("control queue: {e}")))?;
        queue.set_event_idx(self.acked & vireo_virtio::VIRTIO_RING_F_EVENT_IDX != 0);
        let context = ctrl::CtrlContext {
            mem: a.mem.clone(),
            interrupt: a.interrupt.clone(),
            frontend: self.frontend.clone(),
            index: i as u16,
            max_pairs: self.pairs,
            active_pairs: self.active_pairs.clone(),
        };
        ctrl::CtrlQueue::start(context, queue, qh.kick.try_clone()?).map(Some)
    }

    /// Stops the control queue's thread and keeps the position it reached.
    fn stop_ctrl(&self, a: &mut Active) {
        let (Some(c), Some(i)) = (a.ctrl.take(), self.ctrl_index()) else {
            return;
        };
        if let (Some(q), Some(qh)) = (c.stop(), a.queues.get_mut(i)) {
            qh.queue.set_next_avail(q.next_avail());
            qh.queue.set_next_used(q.next_used());
        }
    }

    fn protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Hands the backend the memory table and starts every ready ring.
    fn start(
        &mut self,
        mem: &GuestMemory,
        queues: &[QueueHandle],
        calls: &[EventFd],
    ) -> Result<(), vhost::Error> {
        self.prepare(mem)?;
        self.start_rings(mem, queues, calls)
    }

    /// Features, memory table and (while logging) the log: all but the rings.
    fn prepare(&mut self, mem: &GuestMemory) -> Result<(), vhost::Error> {
        self.frontend.set_features(self.backend_run_features())?;
        self.mem_table(mem)?;
        // SET_LOG_BASE has a reply: the backend logs before any ring starts.
        self.send_log_base()
    }

    /// Starts every ready ring at its queue's `next_avail` (0 for a fresh driver, the saved or
    /// paused position otherwise; the backend reads `used.idx` from guest memory on
    /// SET_VRING_ADDR). Then kicks each ring once: frames the driver queued before a stop were
    /// announced by a kick the stopped ring never acted on, and a spurious kick costs nothing.
    fn start_rings(
        &mut self,
        mem: &GuestMemory,
        queues: &[QueueHandle],
        calls: &[EventFd],
    ) -> Result<(), vhost::Error> {
        let host = |gpa: u64| -> Result<u64, vhost::Error> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        let data_rings = self.data_rings();
        let enabled_rings = 2 * usize::from(self.active_pairs.load(Ordering::Acquire));
        for (i, (qh, call)) in queues.iter().zip(calls).enumerate().take(data_rings) {
            let q = &qh.queue;
            if !q.ready() {
                continue;
            }
            self.frontend.set_vring_num(i, q.size())?;
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_addr(i, &cfg)?;
            self.frontend.set_vring_base(i, q.next_avail())?;
            self.frontend.set_vring_call(i, call)?;
            self.frontend.set_vring_kick(i, &qh.kick)?;
            if self.protocol_features() {
                self.frontend.set_vring_enable(i, i < enabled_rings)?;
            }
        }
        // SET_VRING_ENABLE has no reply: until the backend acts on it, a frame for the guest
        // finds the ring off and is dropped. Once this returns the NIC takes frames again.
        // Not while post-copy listens: the backend reads `used.idx` on SET_VRING_ADDR, that
        // page may still be on the source, and the source sends pages only once the VM runs
        // here, after this resume: waiting would hold the switch-over until the fault limit.
        if self.postcopy_maps.is_none() {
            self.barrier()?;
        }
        for qh in queues.iter().take(data_rings).filter(|qh| qh.queue.ready()) {
            let _ = qh.kick.write(1);
        }
        Ok(())
    }

    fn backend_error(&self, e: impl std::fmt::Display) -> String {
        format!("vhost-user backend {}: {e}", self.path.display())
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        vireo_virtio::device_type::NET
    }

    fn maps_guest_memory(&self) -> bool {
        true
    }

    fn can_postcopy(&self) -> bool {
        self.pagefault
    }

    /// See the module docs. A driver that has not activated the NIC yet gets the listening
    /// backend's mapping with its first memory table.
    fn postcopy_listen(&mut self) -> Result<Option<ForeignFaults>, StateError> {
        let path = self.path.clone();
        let fail = move |what: &str, e: vhost::Error| {
            StateError::Invalid(format!(
                "vhost-user backend {}: post-copy {what}: {e}",
                path.display()
            ))
        };
        if !self.pagefault {
            return Err(StateError::Invalid(self.backend_error(
                "it does not offer VHOST_USER_PROTOCOL_F_PAGEFAULT, so it cannot wait for pages \
                 still on the source; migrate with --postcopy never",
            )));
        }
        let uffd = self
            .frontend
            .postcopy_advise()
            .map_err(|e| fail("advise", e))?;
        self.frontend
            .postcopy_listen()
            .map_err(|e| fail("listen", e))?;
        let maps = Arc::new(Mutex::new(Vec::new()));
        self.postcopy_maps = Some(maps.clone());
        if let Some(a) = &self.active {
            let mem = a.mem.clone();
            self.mem_table(&mem)
                .and_then(|()| self.barrier())
                .map_err(|e| fail("memory table", e))?;
        }
        Ok(Some(ForeignFaults { uffd, maps }))
    }

    fn postcopy_end(&mut self) {
        if self.postcopy_maps.take().is_some() {
            if let Err(e) = self.frontend.postcopy_end() {
                tracing::warn!("ending post-copy: {}", self.backend_error(e));
            }
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        // PROTOCOL_FEATURES and LOG_ALL are between us and the backend, not for the guest.
        // MQ goes with the control queue that is ours (a driver offered MQ without CTRL_VQ
        // refuses the device), and only when the backend has more than one pair.
        let mut f = (self.backend_features
            & !(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                | VhostUserVirtioFeatures::LOG_ALL.bits()
                | VIRTIO_NET_F_MQ))
            | VIRTIO_NET_F_MAC;
        if self.pairs > 1 {
            f |= VIRTIO_NET_F_MQ | ctrl::VIRTIO_NET_F_CTRL_VQ;
        }
        f
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked = acked & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: the MAC, status (STATUS not offered: 0) and
        // max_virtqueue_pairs (meaningful with MQ).
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[8..].copy_from_slice(&self.pairs.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| config.get(o + i).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueHandle>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                want: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        let calls = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        let path = self.path.clone();
        let fail = move |e: vhost::Error| {
            ActivateError::Worker(std::io::Error::other(format!(
                "vhost-user backend {}: {e}",
                path.display()
            )))
        };
        if std::mem::take(&mut self.restored) {
            // A restored VM is paused: the rings start at `resume`. Started here, the backend
            // would act on the kick that starts them (e.g. move `avail_event`) before the VM's
            // pause stops them again, and the paused VM's RAM would no longer be the save's.
            self.prepare(&mem).map_err(fail)?;
            let positions = queues
                .iter()
                .map(|qh| (qh.queue.next_avail(), used_idx(&mem, &qh.queue)))
                .collect();
            self.parked = Some(RingPositions { queues: positions });
            self.active = Some(Active {
                mem,
                interrupt,
                queues,
                calls,
                relay: None,
                ctrl: None,
            });
            return Ok(());
        }
        // A driver starts with one pair (virtio 1.2, 5.1.6.5.5).
        self.active_pairs.store(1, Ordering::Release);
        self.start(&mem, &queues, &calls).map_err(fail)?;
        let relay = CallRelay::start(clone_all(&calls)?, interrupt.clone())?;
        self.parked = None;
        let mut active = Active {
            mem,
            interrupt,
            queues,
            calls,
            relay: Some(relay),
            ctrl: None,
        };
        active.ctrl = self.start_ctrl(&active)?;
        self.active = Some(active);
        Ok(())
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops a ring: once answered, the backend no longer touches it.
        for i in 0..2 * usize::from(self.pairs) {
            let _ = self.frontend.get_vring_base(i);
        }
        if let Some(mut a) = self.active.take() {
            if let Some(r) = a.relay.take() {
                r.stop();
            }
            if let Some(c) = a.ctrl.take() {
                c.stop();
            }
        }
        self.active_pairs.store(1, Ordering::Release);
        self.parked = None;
        self.unknown = None;
        self.restored = false;
    }

    /// Stops every ready ring in the backend (GET_VRING_BASE: it finishes the frame in hand
    /// and touches the ring no more) and records where each stands. Interrupts the backend
    /// raised before the stop are delivered before this returns, so the transport's interrupt
    /// status is final.
    fn pause(&mut self, _timeout: std::time::Duration) -> Result<(), PauseError> {
        if self.parked.is_some() {
            return Ok(());
        }
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        let mut positions = Vec::with_capacity(a.queues.len());
        self.unknown = None;
        self.stop_ctrl(&mut a);
        let data_rings = self.data_rings();
        for i in 0..a.queues.len() {
            if i < data_rings && a.queues[i].queue.ready() && self.unknown.is_none() {
                match self.frontend.get_vring_base(i) {
                    Ok(next_avail) => a.queues[i].queue.set_next_avail(next_avail as u16),
                    // A backend that is gone touches the rings no more either: the pause
                    // holds (a NIC must not keep the VM from pausing), only a save is refused.
                    Err(e) => self.unknown = Some(self.backend_error(e)),
                }
            }
            let q = &a.queues[i].queue;
            positions.push((q.next_avail(), used_idx(&a.mem, q)));
        }
        if let Some(r) = a.relay.take() {
            r.stop();
        }
        for (i, c) in a.calls.iter().enumerate() {
            if c.read().is_ok() {
                let _ = a.interrupt.notify_queue(i as u16);
            }
        }
        self.active = Some(a);
        self.parked = Some(RingPositions { queues: positions });
        Ok(())
    }

    /// Starts the rings again where `pause` stopped them.
    fn resume(&mut self) {
        self.unknown = None;
        if self.parked.take().is_none() {
            return;
        }
        let Some(mut a) = self.active.take() else {
            return;
        };
        if let Err(e) = self.start_rings(&a.mem, &a.queues, &a.calls) {
            // The NIC stays stopped (the guest sees a dead link, nothing worse); say why.
            tracing::error!("resuming NIC: {}", self.backend_error(e));
        }
        if a.relay.is_none() {
            match clone_all(&a.calls).and_then(|c| CallRelay::start(c, a.interrupt.clone())) {
                Ok(r) => a.relay = Some(r),
                Err(e) => tracing::error!("resuming NIC interrupts: {}", self.backend_error(e)),
            }
        }
        if a.ctrl.is_none() {
            match self.start_ctrl(&a) {
                Ok(c) => a.ctrl = c,
                Err(e) => tracing::error!("resuming NIC control queue: {}", self.backend_error(e)),
            }
        }
        self.active = Some(a);
    }

    /// Hands the backend the VM's log (module docs). Not active yet: the log goes with the
    /// memory table when the driver activates the device (the backend cannot write before).
    fn start_dirty_log(&mut self, log: DirtyLog<'_>) -> Result<(), DirtyLogError> {
        if !self.can_log() {
            return Err(DirtyLogError(format!(
                "vhost-user backend {} cannot log the guest memory it writes (it does not offer \
                 VHOST_USER_PROTOCOL_F_LOG_SHMFD and VHOST_F_LOG_ALL); pause the VM before \
                 saving it, or use a backend that offers them",
                self.path.display()
            )));
        }
        let file =
            log.fd.try_clone_to_owned().map(File::from).map_err(|e| {
                DirtyLogError(self.backend_error(format!("duplicating the log: {e}")))
            })?;
        if self.skip_dirty_log {
            return Ok(());
        }
        self.log = Some((file, log.size));
        if self.active.is_some() {
            // Logging before this returns: the first copy pass may come right after.
            let sent = self
                .send_log_base()
                .and_then(|()| self.frontend.set_features(self.backend_run_features()))
                .and_then(|()| self.barrier());
            if let Err(e) = sent {
                self.log = None;
                return Err(DirtyLogError(
                    self.backend_error(format!("starting its dirty log: {e}")),
                ));
            }
        }
        Ok(())
    }

    /// Ends the backend's logging: LOG_ALL off, and a fresh memory table without a log.
    fn stop_dirty_log(&mut self) {
        if self.log.take().is_none() {
            return;
        }
        let Some(a) = &self.active else {
            return;
        };
        let sent = self
            .frontend
            .set_features(self.backend_run_features())
            .and_then(|()| self.mem_table(&a.mem))
            .and_then(|()| self.barrier());
        if let Err(e) = sent {
            tracing::warn!("stopping the NIC's dirty log: {}", self.backend_error(e));
        }
    }

    /// Features, MAC and, when active, the ring positions `pause` collected from the backend.
    fn save_state(&self) -> Result<DeviceState, StateError> {
        let rings = match (&self.active, &self.parked) {
            (None, _) => None,
            (Some(_), Some(p)) => Some(p.clone()),
            (Some(_), None) => return Err(StateError::NotPaused),
        };
        if let (Some(_), Some(e)) = (&rings, &self.unknown) {
            return Err(StateError::Invalid(format!(
                "the NIC's ring positions are unknown ({e}); restart the switch port's backend and try again"
            )));
        }
        Ok(DeviceState::Net(NetState {
            acked_features: self.acked,
            mac: self.mac,
            link_up: true,
            rings,
            rx_frame: None,
            rx_frame_vnet_hdr: Default::default(),
            queue_pairs: self.active_pairs.load(Ordering::Acquire),
        }))
    }

    /// The MAC, the features and the pair count must be this NIC's; a held frame cannot be
    /// handed to a backend.
    fn check_restore(&self, state: &DeviceState) -> Result<(), StateError> {
        let DeviceState::Net(n) = state else {
            return Err(StateError::WrongDevice {
                saved: state.kind(),
                device: "net",
            });
        };
        if n.mac != self.mac {
            return Err(StateError::Invalid(format!(
                "saved MAC {:02x?} differs from this NIC's {:02x?}",
                n.mac, self.mac
            )));
        }
        if n.acked_features & !self.features() != 0 {
            return Err(StateError::Invalid(format!(
                "saved features {:#x} include some backend {} does not offer ({:#x})",
                n.acked_features,
                self.path.display(),
                self.features()
            )));
        }
        if n.rx_frame.is_some() {
            return Err(StateError::Invalid(
                "the saved NIC held a received frame, which a vhost-user backend cannot take"
                    .into(),
            ));
        }
        if n.queue_pairs > self.pairs {
            return Err(StateError::Invalid(format!(
                "the saved NIC used {} queue pairs, backend {} has {}",
                n.queue_pairs,
                self.path.display(),
                self.pairs
            )));
        }
        Ok(())
    }

    /// Takes the accepted features; the transport then activates the device with queues at
    /// the saved positions, which `start_rings` hands to the backend with SET_VRING_BASE.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), StateError> {
        self.check_restore(state)?;
        let DeviceState::Net(n) = state else {
            return Ok(());
        };
        self.acked = n.acked_features;
        self.active_pairs
            .store(n.queue_pairs.max(1), Ordering::Release);
        self.restored = n.rings.is_some();
        Ok(())
    }
}
