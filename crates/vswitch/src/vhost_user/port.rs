//! [`VhostUserPort`]: a guest's virtqueues as a [`FramePort`]. `recv` takes the next frame the
//! guest transmitted (its TX ring), `send` fills the next receive buffer it posted (its RX
//! ring). Both run on the switch thread.
//!
//! Notifications (each one a VM exit for the guest): while the switch drains the TX ring the
//! driver's kicks are off (VRING_USED_F_NO_NOTIFY, or with EVENT_IDX `avail_event` parked one
//! behind the next entry the switch will take, an index the driver cannot cross: virtio-queue's
//! `disable_notification` does nothing under EVENT_IDX); when the ring runs dry the switch can keep
//! looking for a window of `VIREO_VHU_POLL_US` µs before it turns kicks back on, so a guest that
//! keeps sending rarely kicks. Polling is off by default ([`POLL_US_DEFAULT`]): on the 2-core
//! project machine, with both probe vCPUs spinning, the spinning switch thread cost more frames/s
//! than the kicks it saved (docs/SPECIFICATION.md, guestio). RX kicks are turned off for good
//! (`backend.rs`): the switch never waits for receive buffers (a full ring drops the frame), so
//! telling it about new ones is of no use.
//!
//! Multiqueue (`VIRTIO_NET_F_MQ`): `recv` takes from every started TX ring in turn, one frame
//! each, so no queue starves another; `send` puts a frame in the RX ring of its flow
//! (`spread.rs`) among the started ones, so a connection's frames stay in order. A ring the VMM
//! disabled (`SET_VRING_ENABLE 0`, the guest lowered its pair count) or never started counts
//! as absent.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use vireo_netport::{FramePort, Offloads, PortError, VNET_HDR_LEN};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::NetBackend;
use super::rx::{self, RxError};
use super::spread::flow_hash;
use super::{GuestMemoryMmap, Vring, MAX_QUEUE_PAIRS, NET_HDR_LEN};

/// State shared by the daemon's threads (which set it up) and the switch thread (which moves
/// frames).
pub(crate) struct Shared {
    name: String,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    rings: RwLock<Option<Vec<Vring>>>,
    /// Readable while the guest may have transmitted frames not yet taken.
    ready: EventFd,
    /// The TX ring's kicks are off (the switch is draining or polling it).
    tx_quiet: AtomicBool,
    /// The driver accepted VIRTIO_NET_F_MRG_RXBUF: a frame may span several receive chains.
    pub(crate) mergeable: AtomicBool,
    /// The features the driver accepted (offloads it takes on receive).
    pub(crate) acked: AtomicU64,
    /// The queue pair whose TX ring `recv` looks at first next time (round robin).
    next_tx_pair: AtomicUsize,
}

impl Shared {
    pub(crate) fn set_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
    }

    pub(crate) fn attach_rings(&self, vrings: &[Vring]) {
        if self
            .rings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return;
        }
        *self.rings.write().unwrap_or_else(|p| p.into_inner()) = Some(vrings.to_vec());
    }

    pub(crate) fn detach_rings(&self) {
        *self.rings.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.tx_quiet.store(false, Ordering::SeqCst);
    }

    pub(crate) fn wake(&self) -> std::io::Result<()> {
        self.ready.write(1)
    }

    pub(crate) fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Turns the driver's kicks for `ring` off until [`wake_kicks`]: the VRING_USED_F_NO_NOTIFY
/// flag, or with EVENT_IDX `avail_event = next_avail - 1`. The driver kicks when an index it
/// publishes passes `avail_event`; every index it can still publish lies after `next_avail`, so
/// it would have to go round the whole 16-bit index space (65,535 entries not taken) to cross
/// it. The ring lock is held from the `ready` check to the write, so nothing is written into a
/// ring that GET_VRING_BASE stopped (a pause or save has already read guest memory by then).
pub(crate) fn quiet_kicks(ring: &Vring, mem: &GuestMemoryMmap) {
    let mut state = ring.get_mut();
    let q = state.get_queue_mut();
    if !q.ready() {
        return;
    }
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(mem);
        return;
    }
    // `avail_event` is the used ring's last word, after the flags, idx and `size` elements.
    let at = GuestAddress(q.used_ring() + 4 + 8 * u64::from(q.size()));
    // Already behind the driver's index (it crossed it, which is why it kicked): it cannot
    // kick again before publishing ~65,536 more entries, so leave the word alone. Writing only
    // when it matters keeps an idle ring's page clean for the dirty log, and leaves the rings
    // of a restored, paused VM exactly as saved.
    let driver = q.avail_idx(mem, std::sync::atomic::Ordering::Acquire);
    let event = mem.load::<u16>(at, std::sync::atomic::Ordering::Acquire);
    if let (Ok(idx), Ok(event)) = (driver, event) {
        if (idx.0.wrapping_sub(u16::from_le(event)) as i16) > 0 {
            return;
        }
    }
    let _ = mem.store(
        q.next_avail().wrapping_sub(1).to_le(),
        at,
        std::sync::atomic::Ordering::Release,
    );
}

/// Turns the driver's kicks back on (`avail_event = next_avail` under EVENT_IDX), under the
/// ring lock like [`quiet_kicks`]. The caller looks at the ring once more afterwards.
fn wake_kicks(ring: &Vring, mem: &GuestMemoryMmap) {
    let mut state = ring.get_mut();
    let q = state.get_queue_mut();
    if q.ready() {
        let _ = q.enable_notification(mem);
    }
}

/// How long the switch keeps polling a drained TX ring before it asks for kicks again
/// (overridden by `VIREO_VHU_POLL_US`, at most 10 ms).
pub const POLL_US_DEFAULT: u64 = 0;

fn poll_window() -> Duration {
    static WINDOW: OnceLock<Duration> = OnceLock::new();
    *WINDOW.get_or_init(|| {
        let us = std::env::var("VIREO_VHU_POLL_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(POLL_US_DEFAULT)
            .min(10_000);
        Duration::from_micros(us)
    })
}

/// Tells the guest about used buffers unless it asked not to be told: through EVENT_IDX, or
/// (which virtio-queue leaves to the device) the avail ring's NO_INTERRUPT flag, which polling
/// drivers set so that every frame does not cost an interrupt.
fn notify(ring: &Vring, mem: &GuestMemoryMmap) {
    let (event_idx, avail) = {
        let state = ring.get_ref();
        (
            state.get_queue().event_idx_enabled(),
            state.get_queue().avail_ring(),
        )
    };
    if !event_idx {
        let flags: u16 = mem.read_obj(GuestAddress(avail)).unwrap_or(0);
        if u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT != 0 {
            return;
        }
    }
    if ring.needs_notification().unwrap_or(true) {
        let _ = ring.signal_used_queue();
    }
}

/// A switch port whose other side is a VM's virtio-net device over vhost-user.
pub struct VhostUserPort {
    shared: Arc<Shared>,
}

impl VhostUserPort {
    /// A port named `name` and the backend the vhost-user daemon serves for it.
    pub fn new(name: &str) -> std::io::Result<(Arc<VhostUserPort>, NetBackend)> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            mem: Mutex::new(None),
            rings: RwLock::new(None),
            ready: EventFd::new(EFD_NONBLOCK)?,
            tx_quiet: AtomicBool::new(false),
            mergeable: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            next_tx_pair: AtomicUsize::new(0),
        });
        Ok((
            Arc::new(VhostUserPort {
                shared: shared.clone(),
            }),
            NetBackend::new(shared)?,
        ))
    }

    /// Whether a guest driver has started the rings.
    pub fn connected(&self) -> bool {
        self.shared
            .rings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Forgets the guest's rings and memory (its session ended); frames sent meanwhile are
    /// refused.
    pub(crate) fn disconnect(&self) {
        self.shared.detach_rings();
        *self.shared.mem.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A backend for the next session of this port.
    pub(crate) fn backend(&self) -> std::io::Result<NetBackend> {
        NetBackend::new(self.shared.clone())
    }

    /// Turns the driver's kicks on or off ([`quiet_kicks`]) on every TX ring.
    fn tx_notifications(&self, on: bool) {
        let rings = self.shared.rings.read().unwrap_or_else(|p| p.into_inner());
        let (Some(rings), Some(mem)) = (rings.as_ref(), self.shared.memory()) else {
            return;
        };
        let mem = mem.memory();
        for ring in rings.iter().skip(1).step_by(2) {
            if on {
                wake_kicks(ring, &mem);
            } else {
                quiet_kicks(ring, &mem);
            }
        }
    }

    /// Takes one frame from the guest's TX rings, starting at the pair after the one that gave
    /// the last; `hdr` gets the first 10 bytes of its virtio_net_hdr_v1 (the offload request;
    /// `num_buffers` means nothing on transmit).
    fn take(
        &self,
        hdr: &mut [u8; VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        let rings = self.shared.rings.read().unwrap_or_else(|p| p.into_inner());
        let (Some(rings), Some(mem)) = (rings.as_ref(), self.shared.memory()) else {
            return Ok(None);
        };
        let mem = mem.memory();
        let pairs = (rings.len() / 2).min(MAX_QUEUE_PAIRS);
        let first = self.shared.next_tx_pair.load(Ordering::Relaxed);
        for k in 0..pairs {
            let pair = (first + k) % pairs;
            if let Some(got) = Self::take_from(&rings[2 * pair + 1], &mem, hdr, buf).transpose() {
                self.shared
                    .next_tx_pair
                    .store((pair + 1) % pairs, Ordering::Relaxed);
                return got.map(Some);
            }
        }
        Ok(None)
    }

    /// [`VhostUserPort::take`] from one TX ring.
    fn take_from(
        ring: &Vring,
        mem: &GuestMemoryMmap,
        hdr: &mut [u8; VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        let mut state = ring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(None);
        }
        let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
            return Ok(None);
        };
        let head = chain.head_index();
        let mut raw = [0u8; NET_HDR_LEN];
        let mut skip = NET_HDR_LEN;
        let mut len = 0usize;
        let mut result = Ok(());
        for desc in chain {
            if desc.is_write_only() {
                break;
            }
            let mut addr = desc.addr();
            let mut n = desc.len() as usize;
            let s = skip.min(n);
            if s > 0 {
                // The header may be split over descriptors like any other bytes.
                let at = NET_HDR_LEN - skip;
                if let Err(e) = mem.read_slice(&mut raw[at..at + s], addr) {
                    result = Err(PortError::Io(std::io::Error::other(e.to_string())));
                    break;
                }
            }
            skip -= s;
            n -= s;
            addr = GuestAddress(addr.0 + s as u64);
            if n == 0 {
                continue;
            }
            if len + n > buf.len() {
                result = Err(PortError::TooLong {
                    len: len + n,
                    cap: buf.len(),
                });
                break;
            }
            if let Err(e) = mem.read_slice(&mut buf[len..len + n], addr) {
                result = Err(PortError::Io(std::io::Error::other(e.to_string())));
                break;
            }
            len += n;
        }
        // A bad chain is consumed anyway, as a NIC drops a bad frame, so the ring moves on.
        let _ = state.add_used(head, 0);
        drop(state);
        notify(ring, mem);
        hdr.copy_from_slice(&raw[..VNET_HDR_LEN]);
        result.map(|()| Some(len))
    }

    /// Puts one frame with header `hdr` in the next receive buffer of its flow's RX ring.
    fn put(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), PortError> {
        let rings = self.shared.rings.read().unwrap_or_else(|p| p.into_inner());
        let (Some(rings), Some(mem)) = (rings.as_ref(), self.shared.memory()) else {
            return Err(PortError::Disconnected);
        };
        let Some(ring) = rx_ring_for(rings, frame) else {
            return Err(PortError::Disconnected);
        };
        let mem = mem.memory();
        let mut state = ring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Err(PortError::Disconnected);
        }
        let mergeable = self.shared.mergeable.load(Ordering::Relaxed);
        let r = rx::fill(state.get_queue_mut(), &*mem, hdr, frame, mergeable);
        drop(state);
        match r {
            Ok(_) => {
                notify(ring, &mem);
                Ok(())
            }
            // Nothing consumed: no need to tell the guest anything.
            Err(RxError::Full) => Err(PortError::Full),
            Err(RxError::TooLong { cap }) => {
                notify(ring, &mem);
                Err(PortError::TooLong {
                    len: frame.len() + NET_HDR_LEN,
                    cap,
                })
            }
            Err(RxError::BadBuffer) => {
                notify(ring, &mem);
                Err(PortError::Io(std::io::Error::other(
                    "receive buffer outside guest memory",
                )))
            }
        }
    }
}

/// The started RX ring `frame`'s flow hashes to. Pair 0 alone (the common case, and every
/// driver without multiqueue) needs no hash.
fn rx_ring_for<'a>(rings: &'a [Vring], frame: &[u8]) -> Option<&'a Vring> {
    let mut active: [Option<&Vring>; MAX_QUEUE_PAIRS] = [None; MAX_QUEUE_PAIRS];
    let mut n = 0;
    for ring in rings.iter().step_by(2).take(MAX_QUEUE_PAIRS) {
        let state = ring.get_ref();
        if state.get_queue().ready() && state.is_enabled() {
            active[n] = Some(ring);
            n += 1;
        }
    }
    match n {
        0 => None,
        1 => active[0],
        _ => active[flow_hash(frame) as usize % n],
    }
}

impl FramePort for VhostUserPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.put(&[0; VNET_HDR_LEN], frame)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        // A caller that cannot carry the header must not get a frame whose checksum or
        // segmentation is still to be done: such a frame is consumed and refused. The switch
        // uses `recv_vnet`.
        let mut hdr = [0u8; VNET_HDR_LEN];
        match self.recv_vnet(&mut hdr, buf)? {
            Some(n) if hdr[0] & 1 == 0 && hdr[1] == 0 => Ok(Some(n)),
            Some(_) => Err(PortError::Io(std::io::Error::other(
                "the guest sent an offloaded frame (partial checksum or TSO) to a plain receive",
            ))),
            None => Ok(None),
        }
    }

    fn offloads(&self) -> Offloads {
        let acked = self.shared.acked.load(Ordering::Relaxed);
        let has = |bit: u32| acked & (1 << bit) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        Offloads {
            csum,
            // TSO without GUEST_CSUM is not a valid negotiation (virtio 1.2, 5.1.3.1).
            tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: csum && has(VIRTIO_NET_F_GUEST_TSO6),
        }
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), PortError> {
        self.put(hdr, frame)
    }

    fn recv_vnet(
        &self,
        hdr: &mut [u8; VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        // Kicks off while draining. `ready` stays readable until the exit below, so the
        // switch comes back for frames published meanwhile without a kick.
        if !self.shared.tx_quiet.swap(true, Ordering::SeqCst) {
            self.tx_notifications(false);
        }
        if let Some(n) = self.take(hdr, buf)? {
            return Ok(Some(n));
        }
        let window = poll_window();
        if !window.is_zero() {
            let until = Instant::now() + window;
            while Instant::now() < until {
                if let Some(n) = self.take(hdr, buf)? {
                    return Ok(Some(n));
                }
                std::hint::spin_loop();
            }
        }
        // Kicks back on, then clear the wake-up and look once more: a frame published before
        // the kicks were on is found here, one published after kicks and makes the fd readable.
        self.shared.tx_quiet.store(false, Ordering::SeqCst);
        self.tx_notifications(true);
        let _ = self.shared.ready.read();
        let got = self.take(hdr, buf)?;
        if got.is_some() {
            // More may follow that were published without a kick: keep the fd readable.
            let _ = self.shared.wake();
        }
        Ok(got)
    }

    fn rx_fd(&self) -> RawFd {
        self.shared.ready.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.shared.name
    }
}
