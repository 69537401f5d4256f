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

fn wait_until(mut f: impl FnMut() -> bool, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
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
    dev.activate(mem.clone(), irq, handles).unwrap();
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
