//! A virtio-net NIC whose data path lives in another process: the vhost-user-net frontend.
//! The guest sees an ordinary virtio-mmio net device (this side answers features and the MAC
//! in config space); on activation the guest RAM (a memfd), the queue addresses, the
//! transport's kick eventfds (KVM ioeventfds) and per-queue call eventfds go to the backend
//! over its Unix socket, so frames never pass through the VMM. Calls are relayed to the
//! transport's interrupt because virtio-mmio's interrupt status register must say "used ring".
//!
//! Not covered: dirty logging of backend writes (live migration would need LOG_ALL) and
//! reconnecting to a restarted backend.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vireo_virtio::{ActivateError, QueueHandle, VirtioDevice, VirtioInterrupt};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::GuestMemory;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 2;

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
                let mut events = vec![EpollEvent::default(); NUM_QUEUES + 1];
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
    queue_sizes: [u16; NUM_QUEUES],
    relay: Option<CallRelay>,
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
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64).map_err(|source| {
            VhostUserNetError::Connect {
                path: socket.to_path_buf(),
                source,
            }
        })?;
        frontend.set_owner().map_err(negotiate(socket))?;
        let backend_features = frontend.get_features().map_err(negotiate(socket))?;
        if backend_features & vireo_virtio::VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserNetError::NotModern {
                path: socket.to_path_buf(),
            });
        }
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            // We use none of the optional protocol features; negotiating the set (even empty)
            // is what lets us start and stop rings with SET_VRING_ENABLE.
            frontend
                .get_protocol_features()
                .map_err(negotiate(socket))?;
            frontend
                .set_protocol_features(VhostUserProtocolFeatures::empty())
                .map_err(negotiate(socket))?;
        }
        Ok(VhostUserNet {
            path: socket.to_path_buf(),
            frontend,
            mac,
            backend_features,
            acked: 0,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            relay: None,
        })
    }

    fn protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn start(
        &mut self,
        mem: &GuestMemory,
        queues: &[QueueHandle],
        calls: &[EventFd],
    ) -> Result<(), vhost::Error> {
        let mut features = self.acked & self.backend_features;
        if self.protocol_features() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend.set_features(features)?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend.set_mem_table(&regions)?;
        let host = |gpa: u64| -> Result<u64, vhost::Error> {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        for (i, (q, call)) in queues.iter().zip(calls).enumerate() {
            let q = &q.queue;
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
            self.frontend.set_vring_base(i, 0)?;
            self.frontend.set_vring_call(i, call)?;
            self.frontend.set_vring_kick(i, &queues[i].kick)?;
            if self.protocol_features() {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserNet {
    fn device_type(&self) -> u32 {
        vireo_virtio::device_type::NET
    }

    fn maps_guest_memory(&self) -> bool {
        true
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        (self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            | VIRTIO_NET_F_MAC
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked = acked & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: only the MAC is offered.
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.mac.get(o + i).copied())
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
        if self.relay.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                want: NUM_QUEUES,
                got: queues.len(),
            });
        }
        let calls = (0..NUM_QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        self.start(&mem, &queues, &calls).map_err(|e| {
            ActivateError::Worker(std::io::Error::other(format!(
                "vhost-user backend {}: {e}",
                self.path.display()
            )))
        })?;
        self.relay = Some(CallRelay::start(calls, interrupt)?);
        Ok(())
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops a ring: once answered, the backend no longer touches it.
        for i in 0..NUM_QUEUES {
            let _ = self.frontend.get_vring_base(i);
        }
        if let Some(r) = self.relay.take() {
            r.stop();
        }
    }

    /// Not yet (docs/vm-state.md): the rings live in the backend, and saving them means
    /// GET_VRING_BASE on save and SET_VRING_BASE on restore.
    fn save_state(&self) -> Result<vireo_virtio::DeviceState, vireo_virtio::StateError> {
        Err(vireo_virtio::StateError::Unsupported(
            "a vhost-user NIC's rings are served by its backend; saving them is not built yet",
        ))
    }
}
