//! [`VhostUserPort`]: a guest's virtqueues as a [`FramePort`]. `recv` takes the next frame the
//! guest transmitted (its TX ring), `send` fills the next receive buffer it posted (its RX
//! ring). Both run on the switch thread.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, RwLock};

use vhost_user_backend::{VringRwLock, VringT};
use vireo_netport::{FramePort, PortError};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::NetBackend;
use super::{NET_HDR_LEN, RX_QUEUE, TX_QUEUE};

/// State shared by the daemon's threads (which set it up) and the switch thread (which moves
/// frames).
pub(crate) struct Shared {
    name: String,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    rings: RwLock<Option<Vec<VringRwLock>>>,
    /// Readable while the guest may have transmitted frames not yet taken.
    ready: EventFd,
}

impl Shared {
    pub(crate) fn set_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
    }

    pub(crate) fn attach_rings(&self, vrings: &[VringRwLock]) {
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
    }

    pub(crate) fn wake(&self) -> std::io::Result<()> {
        self.ready.write(1)
    }

    fn memory(&self) -> Option<GuestMemoryAtomic<GuestMemoryMmap>> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Tells the guest about used buffers unless it asked not to be told: through EVENT_IDX, or
/// (which virtio-queue leaves to the device) the avail ring's NO_INTERRUPT flag, which polling
/// drivers set so that every frame does not cost an interrupt.
fn notify(ring: &VringRwLock, mem: &GuestMemoryMmap) {
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
        let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
            return Err(PortError::Full);
        };
        let head = chain.head_index();
        // virtio_net_hdr_v1 with no offload and num_buffers = 1, then the frame.
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10] = 1;
        let parts = [&hdr[..], frame];
        let (mut part, mut off) = (0usize, 0usize);
        let mut written = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                continue;
            }
            let mut room = desc.len() as usize;
            let mut addr = desc.addr().0;
            while room > 0 && part < parts.len() {
                let src = &parts[part][off..];
                let n = src.len().min(room);
                if mem.write_slice(&src[..n], GuestAddress(addr)).is_err() {
                    part = usize::MAX; // unusable buffer: give it back empty
                    break;
                }
                room -= n;
                addr += n as u64;
                off += n;
                written += n;
                if off == parts[part].len() {
                    part += 1;
                    off = 0;
                }
            }
            if part >= parts.len() {
                break;
            }
        }
        let complete = part == parts.len();
        let _ = state.add_used(head, if complete { written as u32 } else { 0 });
        drop(state);
        notify(ring, &mem);
        if complete {
            Ok(())
        } else {
            Err(PortError::TooLong {
                len: frame.len() + NET_HDR_LEN,
                cap: written,
            })
        }
    }
}

impl FramePort for VhostUserPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.put(frame)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        if let Some(n) = self.take(buf)? {
            return Ok(Some(n));
        }
        // Clear the wake-up before looking again: a kick that lands after this read makes the
        // fd readable again, so no frame waits unnoticed.
        let _ = self.shared.ready.read();
        self.take(buf)
    }

    fn rx_fd(&self) -> RawFd {
        self.shared.ready.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.shared.name
    }
}
