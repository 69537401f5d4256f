//! The VMM's vhost-user-net device driven as the virtio-mmio transport would drive it (no VM,
//! no /dev/kvm), against a Vireo switch port's vhost-user backend: features and MAC, frames
//! both ways through rings in real memfd guest RAM, interrupts relayed, a device reset that
//! stops the backend from touching the rings, and re-activation after it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_netport::{channel_pair, FramePort};
use vireo_virtio::{QueueHandle, VirtioDevice, VirtioInterrupt};
use vireo_vmm::memory::GuestRam;
use vireo_vmm::vhost_user_net::VhostUserNet;
use vireo_vmm::GuestMemory;
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{PortConfig, Switch, SwitchConfig};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0x01];
const PEER: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0x02];
const QSIZE: u16 = 16;
const HDR: usize = 12;

#[derive(Default)]
struct Irqs(AtomicU32);

impl VirtioInterrupt for Irqs {
    fn notify_queue(&self, _queue: u16) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn notify_config(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Rings of one activation: queue `q` at `base + q * 0x10000` (descriptors, then avail at
/// +0x1000, used at +0x2000).
fn ring(base: u64, q: u64) -> (u64, u64, u64) {
    let b = base + q * 0x10000;
    (b, b + 0x1000, b + 0x2000)
}

fn queue(base: u64, q: u64) -> (Queue, EventFd) {
    let (d, a, u) = ring(base, q);
    let mut queue = Queue::new(QSIZE).unwrap();
    queue.set_size(QSIZE);
    queue.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
    queue.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
    queue.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
    queue.set_ready(true);
    (queue, EventFd::new(EFD_NONBLOCK).unwrap())
}

/// Posts one buffer as the `n`-th available entry of queue `q`, in descriptor `n % QSIZE`.
fn post(mem: &GuestMemory, base: u64, q: u64, n: u16, buf: u64, len: u32, write: bool) {
    let id = n % QSIZE;
    let (d, a, _) = ring(base, q);
    let d = d + 16 * u64::from(id);
    mem.write_obj(buf, GuestAddress(d)).unwrap();
    mem.write_obj(len, GuestAddress(d + 8)).unwrap();
    mem.write_obj(if write { 2u16 } else { 0 }, GuestAddress(d + 12))
        .unwrap();
    mem.write_obj(id, GuestAddress(a + 4 + 2 * u64::from(n % QSIZE)))
        .unwrap();
    std::sync::atomic::fence(Ordering::SeqCst);
    mem.write_obj(n.wrapping_add(1), GuestAddress(a + 2))
        .unwrap();
}

fn used_idx(mem: &GuestMemory, base: u64, q: u64) -> u16 {
    mem.read_obj(GuestAddress(ring(base, q).2 + 2)).unwrap()
}

fn wait_until(f: impl FnMut() -> bool, secs: u64) -> bool {
    wait_for(f, Duration::from_secs(secs))
}

fn wait_for(mut f: impl FnMut() -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = [dst, src].concat();
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..50u8).map(|i| i ^ tag));
    f
}

/// The guest transmits `f` as the `n`-th TX entry, using descriptor `n % QSIZE`.
fn transmit(mem: &GuestMemory, base: u64, n: u16, f: &[u8], kick: &EventFd) {
    let buf = 0x80_0000 + u64::from(n) * 2048;
    let mut bytes = vec![0u8; HDR];
    bytes.extend_from_slice(f);
    mem.write_slice(&bytes, GuestAddress(buf)).unwrap();
    post(mem, base, 1, n, buf, bytes.len() as u32, false);
    kick.write(1).unwrap();
}

fn received(peer: &dyn FramePort, secs: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 9216];
    let mut got = None;
    wait_until(
        || match peer.recv(&mut buf) {
            Ok(Some(n)) => {
                got = Some(buf[..n].to_vec());
                true
            }
            _ => false,
        },
        secs,
    );
    got
}

fn activate(
    dev: &mut VhostUserNet,
    mem: &GuestMemory,
    base: u64,
    irqs: &Arc<Irqs>,
) -> [EventFd; 2] {
    let (rxq, rxk) = queue(base, 0);
    let (txq, txk) = queue(base, 1);
    let kicks = [rxk.try_clone().unwrap(), txk.try_clone().unwrap()];
    let handles = vec![
        QueueHandle {
            queue: rxq,
            kick: rxk,
        },
        QueueHandle {
            queue: txq,
            kick: txk,
        },
    ];
    let irq: Arc<dyn VirtioInterrupt> = irqs.clone();
    dev.activate(mem.clone(), irq, with_unready_rest(dev, handles))
        .unwrap();
    kicks
}

#[test]
fn vhost_user_net_device_moves_frames_resets_and_restarts() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nic.sock");
    let mut sw = Switch::new(SwitchConfig::private("vmm-vhu")).unwrap();
    let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
    let p_peer = sw.add_port(PortConfig::access("peer", 1)).unwrap();
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
    let (port, server) = VhostUserServer::listen(&socket, "vm").unwrap();
    rt.attach(p_vm, port.clone());
    let (peer_sw, peer) = channel_pair("peer-sw", "peer").unwrap();
    rt.attach(p_peer, Arc::new(peer_sw));

    let mut dev = VhostUserNet::connect(&socket, MAC).unwrap();
    assert_eq!(dev.device_type(), 1);
    let features = dev.features();
    assert_ne!(features & vireo_virtio::VIRTIO_F_VERSION_1, 0);
    assert_ne!(features & (1 << 5), 0, "VIRTIO_NET_F_MAC");
    assert_eq!(
        features & (1 << 30),
        0,
        "a vhost-user bit leaked to the guest"
    );
    dev.ack_features(features);
    let mut mac = [0u8; 6];
    dev.read_config(0, &mut mac);
    assert_eq!(mac, MAC);

    let irqs = Arc::new(Irqs::default());
    let base = 0x10_0000;
    let kicks = activate(&mut dev, &mem, base, &irqs);

    // Guest -> switch.
    let f1 = frame(PEER, MAC, 1);
    transmit(&mem, base, 0, &f1, &kicks[1]);
    assert_eq!(received(&peer, 10).as_deref(), Some(&f1[..]));
    assert!(wait_until(|| used_idx(&mem, base, 1) == 1, 10));

    // Switch -> guest, with the used-ring interrupt relayed to the transport.
    post(&mem, base, 0, 0, 0x90_0000, 2048, true);
    kicks[0].write(1).unwrap();
    let before = irqs.0.load(Ordering::SeqCst);
    let f2 = frame(MAC, PEER, 2);
    peer.send(&f2).unwrap();
    assert!(wait_until(|| used_idx(&mem, base, 0) == 1, 10), "no RX");
    let mut got = vec![0u8; HDR + f2.len()];
    mem.read_slice(&mut got, GuestAddress(0x90_0000)).unwrap();
    assert_eq!(&got[HDR..], &f2[..]);
    assert!(
        wait_until(|| irqs.0.load(Ordering::SeqCst) > before, 10),
        "no interrupt"
    );

    // Reset: once it returns the backend leaves the rings alone.
    dev.reset();
    transmit(&mem, base, 1, &frame(PEER, MAC, 3), &kicks[1]);
    assert!(received(&peer, 1).is_none(), "frame sent after reset");
    assert_eq!(used_idx(&mem, base, 1), 1);

    // The driver sets the device up again (fresh rings) and traffic resumes.
    let base2 = 0x40_0000;
    let kicks2 = activate(&mut dev, &mem, base2, &irqs);
    let f4 = frame(PEER, MAC, 4);
    transmit(&mem, base2, 0, &f4, &kicks2[1]);
    assert_eq!(received(&peer, 10).as_deref(), Some(&f4[..]));

    dev.reset();
    drop(dev);
    assert!(wait_until(|| !port.connected(), 10));
    server.stop().unwrap();
    rt.stop().unwrap();
}

/// `handles` followed by a queue the driver did not set up for each other queue the device
/// has (a multiqueue backend's further pairs and control queue), as the transport passes them.
fn with_unready_rest(dev: &VhostUserNet, mut handles: Vec<QueueHandle>) -> Vec<QueueHandle> {
    while handles.len() < dev.queue_max_sizes().len() {
        handles.push(QueueHandle {
            queue: Queue::new(QSIZE).unwrap(),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        });
    }
    handles
}

/// The rings of `dev` as the transport would build them after a restore: at `base`, starting
/// at the saved positions.
fn activate_at(
    dev: &mut VhostUserNet,
    mem: &GuestMemory,
    base: u64,
    irqs: &Arc<Irqs>,
    next_avail: [u16; 2],
) -> [EventFd; 2] {
    let (mut rxq, rxk) = queue(base, 0);
    let (mut txq, txk) = queue(base, 1);
    rxq.set_next_avail(next_avail[0]);
    txq.set_next_avail(next_avail[1]);
    let kicks = [rxk.try_clone().unwrap(), txk.try_clone().unwrap()];
    let handles = vec![
        QueueHandle {
            queue: rxq,
            kick: rxk,
        },
        QueueHandle {
            queue: txq,
            kick: txk,
        },
    ];
    let irq: Arc<dyn VirtioInterrupt> = irqs.clone();
    dev.activate(mem.clone(), irq, with_unready_rest(dev, handles))
        .unwrap();
    kicks
}

/// Queues a frame on the TX ring without a kick (what a guest has in its ring when it is
/// paused between writing the avail index and the notification, or whose kick the stopped
/// ring ignored).
fn queue_tx(mem: &GuestMemory, base: u64, n: u16, f: &[u8]) {
    let buf = 0x80_0000 + u64::from(n % 64) * 2048;
    let mut bytes = vec![0u8; HDR];
    bytes.extend_from_slice(f);
    mem.write_slice(&bytes, GuestAddress(buf)).unwrap();
    post(mem, base, 1, n, buf, bytes.len() as u32, false);
}

/// The saved positions of the first pair (the only rings these drivers set up; the others
/// stay at 0).
fn rings(state: &vireo_virtio::DeviceState) -> Vec<(u16, u16)> {
    let all = &state
        .rings()
        .expect("an active device saves its rings")
        .queues;
    assert!(all[2..].iter().all(|&p| p == (0, 0)), "{all:?}");
    all[..2].to_vec()
}

#[test]
fn vhost_user_net_pause_stops_the_backend_and_a_restore_continues_the_rings() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nic.sock");
    let mut sw = Switch::new(SwitchConfig::private("vmm-vhu-save")).unwrap();
    let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
    let p_peer = sw.add_port(PortConfig::access("peer", 1)).unwrap();
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
    let (port, server) = VhostUserServer::listen(&socket, "vm").unwrap();
    rt.attach(p_vm, port.clone());
    let (peer_sw, peer) = channel_pair("peer-sw-save", "peer-save").unwrap();
    rt.attach(p_peer, Arc::new(peer_sw));

    let mut dev = VhostUserNet::connect(&socket, MAC).unwrap();
    dev.ack_features(dev.features());
    // Not active: nothing to stop, and the state has no rings.
    dev.pause(Duration::from_secs(5)).unwrap();
    assert!(dev.save_state().unwrap().rings().is_none());
    dev.resume();

    let irqs = Arc::new(Irqs::default());
    let base = 0x10_0000;
    let kicks = activate(&mut dev, &mem, base, &irqs);
    // Running: positions would be stale the moment they are read.
    assert_eq!(
        dev.save_state().unwrap_err(),
        vireo_virtio::StateError::NotPaused
    );
    let f0 = frame(PEER, MAC, 0);
    transmit(&mem, base, 0, &f0, &kicks[1]);
    assert_eq!(received(&peer, 10).as_deref(), Some(&f0[..]));
    assert!(wait_until(|| used_idx(&mem, base, 1) == 1, 10));

    // Paused: the backend answers where it stands and leaves the ring alone, even when kicked.
    dev.pause(Duration::from_secs(5)).unwrap();
    assert_eq!(rings(&dev.save_state().unwrap()), vec![(0, 0), (1, 1)]);
    let f1 = frame(PEER, MAC, 1);
    transmit(&mem, base, 1, &f1, &kicks[1]);
    assert!(received(&peer, 1).is_none(), "a paused NIC transmitted");
    assert_eq!(used_idx(&mem, base, 1), 1);
    // Resumed: the frame queued while paused goes, once.
    dev.resume();
    assert_eq!(received(&peer, 10).as_deref(), Some(&f1[..]));
    assert!(wait_until(|| used_idx(&mem, base, 1) == 2, 10));
    assert!(received(&peer, 1).is_none(), "a frame went twice");
    // RX still works after the restart.
    post(&mem, base, 0, 0, 0x90_0000, 2048, true);
    kicks[0].write(1).unwrap();
    let f2 = frame(MAC, PEER, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(&mem, base, 0) == 0 {
        // The switch may still be learning where MAC is: resend until it lands.
        peer.send(&f2).unwrap();
        assert!(Instant::now() < deadline, "no RX after resume");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut got = vec![0u8; HDR + f2.len()];
    mem.read_slice(&mut got, GuestAddress(0x90_0000)).unwrap();
    assert_eq!(&got[HDR..], &f2[..]);

    // Save with two frames queued in the ring that the backend never took, then the VM's
    // process goes away.
    dev.pause(Duration::from_secs(5)).unwrap();
    let saved = dev.save_state().unwrap();
    assert_eq!(rings(&saved), vec![(1, 1), (2, 2)]);
    let (f3, f4) = (frame(PEER, MAC, 3), frame(PEER, MAC, 4));
    queue_tx(&mem, base, 2, &f3);
    queue_tx(&mem, base, 3, &f4);
    drop(dev);
    assert!(wait_until(|| !port.connected(), 10));
    while peer.recv(&mut [0u8; 2048]).unwrap().is_some() {}

    // A new device (a new VMM) on the same memory restores and starts at the saved positions:
    // the queued frames go in order, nothing before them is replayed.
    let mut dev = VhostUserNet::connect(&socket, MAC).unwrap();
    let mut other = saved.clone();
    if let vireo_virtio::DeviceState::Net(n) = &mut other {
        n.mac = PEER;
    }
    assert!(
        dev.restore_state(&other).is_err(),
        "a foreign MAC was taken"
    );
    assert!(matches!(
        dev.restore_state(&vireo_virtio::DeviceState::Empty),
        Err(vireo_virtio::StateError::WrongDevice { .. })
    ));
    let mut held = saved.clone();
    if let vireo_virtio::DeviceState::Net(n) = &mut held {
        n.rx_frame = Some(vec![0; 60]);
    }
    assert!(
        dev.restore_state(&held).is_err(),
        "a held frame would be lost"
    );
    dev.restore_state(&saved).unwrap();
    let r = rings(&saved);
    let kicks = activate_at(&mut dev, &mem, base, &irqs, [r[0].0, r[1].0]);
    // A restored device comes up parked (its VM is paused): nothing moves before the resume.
    assert!(
        received(&peer, 1).is_none(),
        "a restored, paused NIC transmitted"
    );
    assert_eq!(used_idx(&mem, base, 1), 2);
    dev.resume();
    assert_eq!(received(&peer, 10).as_deref(), Some(&f3[..]));
    assert_eq!(received(&peer, 10).as_deref(), Some(&f4[..]));
    assert!(wait_until(|| used_idx(&mem, base, 1) == 4, 10));
    assert!(received(&peer, 1).is_none(), "a frame was replayed");
    let f5 = frame(PEER, MAC, 5);
    transmit(&mem, base, 4, &f5, &kicks[1]);
    assert_eq!(received(&peer, 10).as_deref(), Some(&f5[..]));

    dev.reset();
    drop(dev);
    assert!(wait_until(|| !port.connected(), 10));
    server.stop().unwrap();
    rt.stop().unwrap();
}

/// A switch that went away must not keep the VM from pausing; only the save, which would need
/// the backend's ring positions, is refused, with a message that says why.
#[test]
fn vhost_user_net_pauses_without_its_backend_but_refuses_to_save() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gone.sock");
    let (_port, server) = VhostUserServer::listen(&socket, "gone").unwrap();
    let mut dev = VhostUserNet::connect(&socket, MAC).unwrap();
    dev.ack_features(dev.features());
    let irqs = Arc::new(Irqs::default());
    activate(&mut dev, &mem, 0x10_0000, &irqs);
    server.stop().unwrap();
    dev.pause(Duration::from_secs(5)).unwrap();
    match dev.save_state() {
        Err(vireo_virtio::StateError::Invalid(m)) => {
            assert!(m.contains("ring positions are unknown"), "{m}")
        }
        other => panic!("saved without the backend: {other:?}"),
    }
    dev.resume();
    dev.reset();
}

/// Pages marked in `log` (taken: the log is cleared), ascending.
fn logged(log: &vireo_vmm::dirty::SharedLog) -> Vec<u64> {
    let words = vireo_vmm::dirty::take_range(log.words(), 0, log.words().len() as u64 * 64);
    vireo_vmm::DirtyBitmap {
        regions: vec![(0, words)],
    }
    .pages()
}

/// The frontend's side of the dirty log (docs/vm-state.md, "The NIC's dirty log"): once
/// logging starts, the pages the switch writes for a received frame are in the VM's log —
/// also after a driver reset and re-activation, which hands the backend a new memory table —
/// and once it stops the backend marks nothing more.
#[test]
fn vhost_user_net_backend_writes_are_in_the_dirty_log_while_it_is_on() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nic.sock");
    let mut sw = Switch::new(SwitchConfig::private("vmm-vhu-log")).unwrap();
    let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
    let p_peer = sw.add_port(PortConfig::access("peer", 1)).unwrap();
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
    let (port, server) = VhostUserServer::listen(&socket, "vm").unwrap();
    rt.attach(p_vm, port.clone());
    let (peer_sw, peer) = channel_pair("log-peer-sw", "log-peer").unwrap();
    rt.attach(p_peer, Arc::new(peer_sw));

    let mut dev = VhostUserNet::connect(&socket, MAC).unwrap();
    assert_eq!(dev.features() & (1 << 26), 0, "LOG_ALL leaked to the guest");
    dev.ack_features(dev.features());
    let irqs = Arc::new(Irqs::default());
    let base = 0x10_0000;
    let log = vireo_vmm::dirty::SharedLog::new(16 << 20).unwrap();
    // Started before the driver activates the device: the log goes with the memory table.
    dev.start_dirty_log(log.as_dirty_log()).unwrap();
    let kicks = activate(&mut dev, &mem, base, &irqs);
    // The port takes frames once the backend handed it the rings (at their first kick).
    assert!(wait_until(|| port.connected(), 10));
    let rx_used = ring(base, 0).2;
    // A frame that reaches the port before the backend has taken the ring's new setup (its
    // messages are served on the backend's own thread; `connected` may still show the last
    // session's rings) is dropped, as a NIC without buffers drops it: send again until the
    // buffer is used. Only one buffer is posted, so a repeat never lands twice.
    let deliver = |n: u16, buf: u64, base: u64, kick: &EventFd| {
        post(&mem, base, 0, n, buf, 2048, true);
        kick.write(1).unwrap();
        let used = (0..100).any(|_| {
            peer.send(&frame(MAC, PEER, n as u8)).unwrap();
            wait_for(
                || used_idx(&mem, base, 0) == n + 1,
                Duration::from_millis(100),
            )
        });
        assert!(used, "frame {n} not received in 10 s of resends");
    };
    deliver(0, 0x90_0000, base, &kicks[0]);
    let pages = logged(&log);
    assert!(
        pages.contains(&0x90_0000),
        "RX buffer not logged: {pages:x?}"
    );
    assert!(
        pages.contains(&rx_used),
        "RX used ring not logged: {pages:x?}"
    );

    // A driver reset and a fresh activation (new SET_MEM_TABLE) keep the log.
    dev.reset();
    let base2 = 0x40_0000;
    let kicks2 = activate(&mut dev, &mem, base2, &irqs);
    assert!(wait_until(|| port.connected(), 10));
    let _ = logged(&log);
    deliver(0, 0xa0_0000, base2, &kicks2[0]);
    let pages = logged(&log);
    assert!(
        pages.contains(&0xa0_0000),
        "after re-activation: {pages:x?}"
    );

    // Stopped: frames still arrive, and nothing is marked. (What the backend wrote before
    // the stop, e.g. the used ring's flags for the last kick, may still land: cleared here.)
    dev.stop_dirty_log();
    let _ = logged(&log);
    deliver(1, 0xb0_0000, base2, &kicks2[0]);
    assert_eq!(logged(&log), Vec::<u64>::new());

    dev.reset();
    drop(dev);
    assert!(wait_until(|| !port.connected(), 10));
    server.stop().unwrap();
    rt.stop().unwrap();
}

/// A vhost-user-net backend that cannot log its writes (no LOG_SHMFD, no LOG_ALL): a
/// third-party backend of that kind. It moves no frames.
struct NoLogBackend {
    /// Ends the daemon's ring thread when the session ends.
    exit: (
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    ),
}

impl vhost_user_backend::VhostUserBackend for NoLogBackend {
    type Bitmap = ();
    type Vring = vhost_user_backend::VringRwLock;
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        vireo_virtio::VIRTIO_F_VERSION_1
            | vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> vhost::vhost_user::message::VhostUserProtocolFeatures {
        vhost::vhost_user::message::VhostUserProtocolFeatures::empty()
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn exit_event(
        &self,
        _thread_index: usize,
    ) -> Option<(
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    )> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }
    fn update_memory(
        &self,
        _mem: vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn handle_event(
        &self,
        _device_event: u16,
        _evset: vmm_sys_util::epoll::EventSet,
        _vrings: &[vhost_user_backend::VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decided (docs/vm-state.md): a backend that cannot log its writes makes dirty logging — and
/// so a live save or migration — fail with a message naming the backend and the way out,
/// rather than copy memory that misses its writes.
#[test]
fn vhost_user_net_refuses_dirty_logging_on_a_backend_that_cannot_log() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nolog.sock");
    let mut listener = vhost::vhost_user::Listener::new(&socket, true).unwrap();
    let daemon_thread = std::thread::spawn(move || {
        let mut daemon = vhost_user_backend::VhostUserDaemon::new(
            "nolog".into(),
            Arc::new(NoLogBackend {
                exit: vmm_sys_util::event::new_event_consumer_and_notifier(
                    vmm_sys_util::event::EventFlag::NONBLOCK,
                )
                .unwrap(),
            }),
            vm_memory::GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new()),
        )
        .unwrap();
        daemon.start(&mut listener).unwrap();
        let _ = daemon.wait();
    });
    let mut dev = VhostUserNet::connect(&socket, MAC).unwrap();
    dev.ack_features(dev.features());
    let irqs = Arc::new(Irqs::default());
    let _kicks = activate(&mut dev, &ram.memory, 0x10_0000, &irqs);
    let log = vireo_vmm::dirty::SharedLog::new(16 << 20).unwrap();
    let e = dev
        .start_dirty_log(log.as_dirty_log())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nolog.sock"), "{e}");
    assert!(e.contains("VHOST_USER_PROTOCOL_F_LOG_SHMFD"), "{e}");
    assert!(e.contains("pause the VM before saving it"), "{e}");
    dev.reset();
    drop(dev);
    daemon_thread.join().unwrap();
}

/// An IPv4/UDP frame from the peer to the guest in flow `flow` (its source port).
fn flow_frame(flow: u16) -> Vec<u8> {
    let mut f = [MAC, PEER].concat();
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![
        0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ];
    let mut acc: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    ip[10..12].copy_from_slice(&(!(acc as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&(1000 + flow).to_be_bytes());
    f.extend_from_slice(&[0x13, 0x88, 0, 26, 0, 0]);
    f.extend_from_slice(&[7; 18]);
    f
}

/// Multiqueue through the VMM's frontend: the guest sees MQ, CTRL_VQ and the backend's pair
/// count; it starts on one pair, turns on a second with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on
/// the control queue (which the VMM answers), then receives on both and sends on the second;
/// the pair count and the control queue's position are in the saved state and hold across a
/// pause.
#[test]
fn a_multiqueue_nic_starts_on_one_pair_and_the_guest_turns_on_a_second() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let mem = ram.memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mq.sock");
    let mut sw = Switch::new(SwitchConfig::private("vmm-vhu-mq")).unwrap();
    let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
    let p_peer = sw.add_port(PortConfig::access("peer", 1)).unwrap();
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
    let (port, server) = VhostUserServer::listen(&socket, "vm").unwrap();
    rt.attach(p_vm, port.clone());
    let (peer_sw, peer) = channel_pair("mq-peer-sw", "mq-peer").unwrap();
    rt.attach(p_peer, Arc::new(peer_sw));

    // One pair unless asked: the queue count is part of a saved machine.
    let single = VhostUserNet::connect(&socket, MAC).unwrap();
    assert_eq!(single.features() & (1 << 22 | 1 << 17), 0);
    assert_eq!(single.queue_max_sizes().len(), 2);
    drop(single);
    assert!(wait_until(|| !port.connected(), 10));
    let mut dev = VhostUserNet::connect_with_pairs(&socket, MAC, 2).unwrap();
    let features = dev.features();
    assert_ne!(features & (1 << 22), 0, "VIRTIO_NET_F_MQ");
    assert_ne!(features & (1 << 17), 0, "VIRTIO_NET_F_CTRL_VQ");
    let mut pairs = [0u8; 2];
    dev.read_config(8, &mut pairs);
    let max_pairs = u16::from_le_bytes(pairs);
    assert_eq!(max_pairs, 2, "max_virtqueue_pairs");
    let nq = dev.queue_max_sizes().len();
    assert_eq!(nq, 2 * usize::from(max_pairs) + 1);
    let ctrl = (nq - 1) as u64;
    dev.ack_features(features);

    // The driver sets up pairs 0 and 1 and the control queue.
    let base = 0x10_0000;
    let irqs = Arc::new(Irqs::default());
    let mut kicks = Vec::new();
    let mut handles = Vec::new();
    for q in 0..nq as u64 {
        let (queue, kick) = if q < 4 || q == ctrl {
            queue(base, q)
        } else {
            (
                Queue::new(QSIZE).unwrap(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            )
        };
        kicks.push(kick.try_clone().unwrap());
        handles.push(QueueHandle { queue, kick });
    }
    let irq: Arc<dyn VirtioInterrupt> = irqs.clone();
    dev.activate(mem.clone(), irq, handles).unwrap();
    let rx_buf = |q: u64, n: u16| 0x90_0000 + q * 0x10_0000 + u64::from(n) * 2048;
    for q in [0u64, 2] {
        for n in 0..QSIZE {
            post(&mem, base, q, n, rx_buf(q, n), 2048, true);
        }
    }
    // Guest first (the switch learns its MAC), then four flows: all on pair 0.
    transmit(&mem, base, 0, &frame(PEER, MAC, 1), &kicks[1]);
    assert!(received(&peer, 10).is_some());
    for flow in 0..4 {
        peer.send(&flow_frame(flow)).unwrap();
    }
    assert!(wait_until(|| used_idx(&mem, base, 0) == 4, 10), "pair 0 RX");
    assert_eq!(
        used_idx(&mem, base, 2),
        0,
        "a pair the driver did not turn on got frames"
    );

    // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2: class and command, the count, the ack byte.
    let (d, a, _) = ring(base, ctrl);
    let cmd = 0xf0_0000u64;
    mem.write_slice(&[4, 0, 2, 0, 0xff], GuestAddress(cmd))
        .unwrap();
    for (i, (addr, len, flags)) in [(cmd, 2u32, 1u16), (cmd + 2, 2, 1), (cmd + 4, 1, 2)]
        .into_iter()
        .enumerate()
    {
        let at = d + 16 * i as u64;
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(i as u16 + 1, GuestAddress(at + 14)).unwrap();
    }
    mem.write_obj(0u16, GuestAddress(a + 4)).unwrap();
    std::sync::atomic::fence(Ordering::SeqCst);
    mem.write_obj(1u16, GuestAddress(a + 2)).unwrap();
    kicks[ctrl as usize].write(1).unwrap();
    assert!(
        wait_until(|| used_idx(&mem, base, ctrl) == 1, 10),
        "no answer"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(cmd + 4)).unwrap(),
        0,
        "VIRTIO_NET_OK"
    );

    // Twelve more flows spread over both RX queues; pair 1 transmits.
    for flow in 4..16 {
        peer.send(&flow_frame(flow)).unwrap();
    }
    assert!(
        wait_until(
            || used_idx(&mem, base, 0) + used_idx(&mem, base, 2) == 16,
            10
        ),
        "{} + {} of 16 frames",
        used_idx(&mem, base, 0),
        used_idx(&mem, base, 2)
    );
    assert!(
        used_idx(&mem, base, 2) > 0,
        "the second pair received nothing"
    );
    let f = frame(PEER, MAC, 9);
    let mut bytes = vec![0u8; HDR];
    bytes.extend_from_slice(&f);
    mem.write_slice(&bytes, GuestAddress(0xe0_0000)).unwrap();
    post(&mem, base, 3, 0, 0xe0_0000, bytes.len() as u32, false);
    kicks[3].write(1).unwrap();
    assert_eq!(received(&peer, 10).as_deref(), Some(&f[..]), "pair 1 TX");

    // Saved: two pairs in use and every ring's position, the control queue's included.
    dev.pause(Duration::from_secs(5)).unwrap();
    let saved = dev.save_state().unwrap();
    let vireo_virtio::DeviceState::Net(n) = &saved else {
        panic!("{saved:?}")
    };
    assert_eq!(n.queue_pairs, 2);
    let pos = &n.rings.as_ref().unwrap().queues;
    assert_eq!(pos.len(), nq);
    let rx2 = used_idx(&mem, base, 2);
    assert_eq!(pos[1], (1, 1));
    assert_eq!(pos[2], (rx2, rx2));
    assert_eq!(pos[3], (1, 1));
    assert_eq!(pos[ctrl as usize], (1, 1));

    // Resumed, the second pair is still on. The back end restarts its rings one after the
    // other, so frames that arrive before the second pair's ring is back go to the first:
    // each batch gets room for all of it in either queue, and batches go on (bounded) until
    // one lands on the second pair.
    dev.resume();
    let refill = |q: u64| {
        let avail: u16 = mem.read_obj(GuestAddress(ring(base, q).1 + 2)).unwrap();
        let room_to = used_idx(&mem, base, q).wrapping_add(QSIZE);
        let mut n = avail;
        while n != room_to {
            post(&mem, base, q, n, rx_buf(q, n % QSIZE), 2048, true);
            n = n.wrapping_add(1);
        }
        kicks[q as usize].write(1).unwrap();
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut flow = 16;
    loop {
        refill(0);
        refill(2);
        let before = (used_idx(&mem, base, 0), used_idx(&mem, base, 2));
        for _ in 0..12 {
            peer.send(&flow_frame(flow)).unwrap();
            flow += 1;
        }
        // A frame that came while no ring was back yet is dropped, as on a wire; once they
        // are, a batch arrives whole.
        let whole = wait_until(
            || {
                used_idx(&mem, base, 0).wrapping_add(used_idx(&mem, base, 2))
                    == before.0.wrapping_add(before.1).wrapping_add(12)
            },
            3,
        );
        if whole && used_idx(&mem, base, 2) != before.1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the resume no batch of 12 arrived whole with some on pair 1: {} + {} from {before:?}",
            used_idx(&mem, base, 0),
            used_idx(&mem, base, 2)
        );
    }

    dev.reset();
    drop(dev);
    assert!(wait_until(|| !port.connected(), 10));
    server.stop().unwrap();
    rt.stop().unwrap();
}
