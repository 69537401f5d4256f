//! [`VhostUserPort`]: a guest's virtqueues as a [`FramePort`]. `recv` takes the next frame the
//! guest transmitted (its TX ring), `send` fills the next receive buffer it posted (its RX
//! ring). Both run on the switch thread.
//!
//! Notifications (each one a VM exit for the guest): while the switch drains the TX ring the
//! driver's kicks are off (VRING_USED_F_NO_NOTIFY); when the ring runs dry the switch can keep
//! looking for a window of `VIREO_VHU_POLL_US` µs before it turns kicks back on, so a guest that
//! keeps sending rarely kicks. Polling is off by default ([`POLL_US_DEFAULT`]): on the 2-core
//! project machine, with both probe vCPUs spinning, the spinning switch thread cost more frames/s
//! than the kicks it saved (docs/SPECIFICATION.md, guestio). RX kicks are turned off for good
//! (`backend.rs`): the switch never waits for receive buffers (a full ring drops the frame), so
//! telling it about new ones is of no use.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use vhost_user_backend::VringT;
use vireo_netport::{FramePort, PortError};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::NetBackend;
use super::rx::{self, RxError};
use super::{GuestMemoryMmap, Vring, NET_HDR_LEN, RX_QUEUE, TX_QUEUE};

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

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

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

    /// Turns the driver's TX kicks on or off (VRING_USED_F_NO_NOTIFY, or `avail_event` with
    /// EVENT_IDX: virtio-queue does both).
    fn tx_notifications(&self, on: bool) {
        let rings = self.shared.rings.read().unwrap_or_else(|p| p.into_inner());
        let Some(ring) = rings.as_ref().and_then(|r| r.get(TX_QUEUE)) else {
            return;
        };
        if !ring.get_ref().get_queue().ready() {
            return;
        }
        let _ = if on {
            ring.enable_notification().map(|_| ())
        } else {
            ring.disable_notification()
        };
    }

    /// Takes one frame from the guest's TX ring.
    fn take(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        let rings = self.shared.rings.read().unwrap_or_else(|p| p.into_inner());
        let (Some(rings), Some(mem)) = (rings.as_ref(), self.shared.memory()) else {
            return Ok(None);
        };
        let Some(ring) = rings.get(TX_QUEUE) else {
            return Ok(None);
        };
        let mem = mem.memory();
        let mut state = ring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(None);
        }
        let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
            return Ok(None);
        };
        let head = chain.head_index();
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
        notify(ring, &mem);
        result.map(|()| Some(len))
    }

    /// Puts one frame in the guest's next receive buffer.
    fn put(&self, frame: &[u8]) -> Result<(), PortError> {
        let rings = self.shared.rings.read().unwrap_or_else(|p| p.into_inner());
        let (Some(rings), Some(mem)) = (rings.as_ref(), self.shared.memory()) else {
            return Err(PortError::Disconnected);
        };
        let Some(ring) = rings.get(RX_QUEUE) else {
            return Err(PortError::Disconnected);
        };
        let mem = mem.memory();
        let mut state = ring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Err(PortError::Disconnected);
        }
        let mergeable = self.shared.mergeable.load(Ordering::Relaxed);
        let r = rx::fill(state.get_queue_mut(), &*mem, frame, mergeable);
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

impl FramePort for VhostUserPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.put(frame)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        // Kicks off while draining. `ready` stays readable until the exit below, so the
        // switch comes back for frames published meanwhile without a kick.
        if !self.shared.tx_quiet.swap(true, Ordering::SeqCst) {
            self.tx_notifications(false);
        }
        if let Some(n) = self.take(buf)? {
            return Ok(Some(n));
        }
        let window = poll_window();
        if !window.is_zero() {
            let until = Instant::now() + window;
            while Instant::now() < until {
                if let Some(n) = self.take(buf)? {
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
        let got = self.take(buf)?;
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
