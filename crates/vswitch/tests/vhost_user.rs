//! The vhost-user port without a VM: this test plays the VMM with the rust-vmm frontend,
//! sharing a memfd "guest RAM" and split virtqueues it builds itself, so the data path and its
//! handling of hostile descriptors are checked on any host (no /dev/kvm needed).

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vireo_netport::{channel_pair, FramePort};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{DropReason, PortConfig, Switch, SwitchConfig};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 2 << 20;
const QSIZE: u16 = 16;
const HDR: usize = 12;
const VRING_DESC_F_WRITE: u16 = 2;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];

fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked and owned.
    let fd = unsafe { libc::memfd_create(c"vhu-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let region =
        GuestRegionMmap::from_range(GuestAddress(0), MEM, Some(FileOffset::new(file, 0))).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..60u8).map(|i| i ^ tag));
    f
}

fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap()
}

/// (descriptor id, length) of used element `i`.
fn used_elem(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let at = q.used_addr().unchecked_add(4 + 8 * u64::from(i % QSIZE));
    (
        mem.read_obj::<u32>(at).unwrap(),
        mem.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
    )
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn recv_frame(port: &dyn FramePort) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 9216];
    let mut got = None;
    wait_until(|| match port.recv(&mut buf) {
        Ok(Some(n)) => {
            got = Some(buf[..n].to_vec());
            true
        }
        _ => false,
    });
    got
}

#[test]
fn frames_cross_between_guest_rings_and_the_switch() {
    let mem = guest_memory();
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
    let txq = MockSplitQueue::create(&mem, GuestAddress(0x10000), QSIZE);

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("port.sock");
    let mut sw = Switch::new(SwitchConfig::private("vhu-unit")).unwrap();
    let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
    let p_peer = sw.add_port(PortConfig::access("peer", 1)).unwrap();
    let sw = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let (port, server) = VhostUserServer::listen(&socket, "vm").unwrap();
    rt.attach(p_vm, port.clone());
    let (peer_sw, peer) = channel_pair("peer-sw", "peer").unwrap();
    rt.attach(p_peer, Arc::new(peer_sw));

    // The VMM's side of the handshake.
    let mut fe = Frontend::connect(&socket, 2).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
    assert_ne!(features & proto, 0);
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(VhostUserProtocolFeatures::empty())
        .unwrap();
    fe.set_features((1 << 32) | proto).unwrap();
    let regions: Vec<_> = mem
        .iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
        .collect();
    fe.set_mem_table(&regions).unwrap();
    let host = |a: GuestAddress| mem.get_host_address(a).unwrap() as u64;
    let calls: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    for (i, q) in [&rxq, &txq].into_iter().enumerate() {
        fe.set_vring_num(i, QSIZE).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host(q.desc_table_addr()),
                used_ring_addr: host(q.used_addr()),
                avail_ring_addr: host(q.avail_addr()),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        fe.set_vring_call(i, &calls[i]).unwrap();
        fe.set_vring_kick(i, &kicks[i]).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }
    assert!(
        wait_until(|| port.connected()),
        "rings never reached the port"
    );

    // Guest -> switch: header + frame in two descriptors (the split must not matter).
    let f1 = frame(PEER_MAC, GUEST_MAC, 1);
    let mut bytes = vec![0u8; HDR];
    bytes.extend_from_slice(&f1);
    mem.write_slice(&bytes, GuestAddress(0x100000)).unwrap();
    txq.build_desc_chain(&[
        RawDescriptor::from(SplitDescriptor::new(0x100000, 20, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(
            0x100014,
            bytes.len() as u32 - 20,
            0,
            0,
        )),
    ])
    .unwrap();
    kicks[1].write(1).unwrap();
    assert_eq!(recv_frame(&peer).as_deref(), Some(&f1[..]));
    assert!(wait_until(|| used_idx(&mem, &txq) == 1));
    assert_eq!(used_elem(&mem, &txq, 0).0, 0);

    // A hostile TX chain (buffer outside guest RAM) is consumed and dropped, nothing else.
    txq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            (MEM as u64) + 0x1000,
            100,
            0,
            0,
        ))],
        2,
    )
    .unwrap();
    kicks[1].write(1).unwrap();
    assert!(
        wait_until(|| used_idx(&mem, &txq) == 2),
        "bad chain not returned"
    );

    // Switch -> guest: the peer sends, the frame lands after a 12-byte header, num_buffers=1.
    rxq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            0x180000,
            2048,
            VRING_DESC_F_WRITE,
            0,
        ))],
        0,
    )
    .unwrap();
    kicks[0].write(1).unwrap();
    let f2 = frame(GUEST_MAC, PEER_MAC, 2);
    peer.send(&f2).unwrap();
    assert!(wait_until(|| used_idx(&mem, &rxq) == 1), "no RX completion");
    let (id, len) = used_elem(&mem, &rxq, 0);
    assert_eq!((id, len as usize), (0, HDR + f2.len()));
    let mut got = vec![0u8; HDR + f2.len()];
    mem.read_slice(&mut got, GuestAddress(0x180000)).unwrap();
    assert_eq!(&got[HDR..], &f2[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert!(calls[0].read().is_ok(), "guest not notified of RX");

    // No receive buffer posted: the frame is dropped and counted, not queued forever.
    let before = lock(&sw).drops(p_vm, DropReason::TxFull);
    peer.send(&frame(GUEST_MAC, PEER_MAC, 3)).unwrap();
    assert!(wait_until(
        || lock(&sw).drops(p_vm, DropReason::TxFull) > before
    ));

    // A receive buffer too small for the frame is given back empty.
    rxq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            0x190000,
            30,
            VRING_DESC_F_WRITE,
            0,
        ))],
        1,
    )
    .unwrap();
    kicks[0].write(1).unwrap();
    peer.send(&frame(GUEST_MAC, PEER_MAC, 4)).unwrap();
    assert!(wait_until(|| used_idx(&mem, &rxq) == 2));
    assert_eq!(used_elem(&mem, &rxq, 1), (1, 0));

    // A polling driver (VRING_AVAIL_F_NO_INTERRUPT) gets its frame without an interrupt.
    let _ = calls[0].read();
    mem.write_obj(1u16.to_le(), rxq.avail_addr()).unwrap();
    rxq.add_desc_chains(
        &[RawDescriptor::from(SplitDescriptor::new(
            0x1a0000,
            2048,
            VRING_DESC_F_WRITE,
            0,
        ))],
        2,
    )
    .unwrap();
    kicks[0].write(1).unwrap();
    peer.send(&frame(GUEST_MAC, PEER_MAC, 5)).unwrap();
    assert!(wait_until(|| used_idx(&mem, &rxq) == 3));
    assert!(calls[0].read().is_err(), "interrupt despite NO_INTERRUPT");

    // The VMM goes away: the port lets go of the rings.
    drop(fe);
    assert!(wait_until(|| !port.connected()), "port kept the rings");
    server.stop().unwrap();
    rt.stop().unwrap();
}
