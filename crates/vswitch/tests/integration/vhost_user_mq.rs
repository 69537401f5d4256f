//! Multiqueue (`VIRTIO_NET_F_MQ`) on a vhost-user port, without a VM: the test plays the VMM
//! (rust-vmm frontend, memfd "guest RAM") and a driver with two queue pairs. Frames it sends
//! on both TX queues all reach the peer; frames of 32 flows from the peer all reach it, each
//! flow in one RX queue and both RX queues used; the four ring bases survive a save (GET_VRING_BASE)
//! and a new session started from them (SET_VRING_BASE), in which the backend logs its writes
//! to both pairs' used rings in the dirty log; a pair the VMM disables gets nothing more.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vireo_netport::{channel_pair, ChannelPort, FramePort};
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::vhost_user::{VhostUserPort, VhostUserServer};
use vireo_vswitch::{PortConfig, Switch, SwitchConfig};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 4 << 20;
const N: u16 = 64;
const HDR: usize = 12;
const QUEUES: usize = 4;
const BUF_LEN: u32 = 2048;
const F_VERSION_1: u64 = 1 << 32;
const F_MQ: u64 = 1 << 22;
const DESC_F_WRITE: u16 = 2;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x21];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x22];

fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked and owned.
    let fd = unsafe { libc::memfd_create(c"vhu-mq".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let region =
        GuestRegionMmap::from_range(GuestAddress(0), MEM, Some(FileOffset::new(file, 0))).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

/// Descriptor table, avail ring and used ring of queue `q` (even: RX, odd: TX).
fn ring_addrs(q: usize) -> (u64, u64, u64) {
    let base = q as u64 * 0x10000;
    (base, base + 16 * u64::from(N), base + 0x8000)
}

/// Buffer `i` of queue `q`: descriptor `i` always owns it.
fn buf_addr(q: usize, i: u16) -> u64 {
    0x10_0000 + q as u64 * 0x4_0000 + u64::from(i) * u64::from(BUF_LEN)
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// A log memfd covering `MEM` (one bit per 4 KiB page), and its mapping.
fn dirty_log() -> (File, vm_memory::MmapRegion) {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked and owned.
    let fd = unsafe { libc::memfd_create(c"vhu-mq-log".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len((MEM / 4096 / 8) as u64).unwrap();
    let map = vm_memory::MmapRegion::from_file(
        FileOffset::new(file.try_clone().unwrap(), 0),
        MEM / 4096 / 8,
    )
    .unwrap();
    (file, map)
}

fn logged(map: &vm_memory::MmapRegion, addr: u64) -> bool {
    let page = addr / 4096;
    // SAFETY: the mapping is MEM/4096/8 bytes and alive; the backend only ORs bits into it.
    let byte =
        unsafe { &*(map.as_ptr().add((page / 8) as usize) as *const std::sync::atomic::AtomicU8) };
    byte.load(Ordering::Acquire) & (1 << (page % 8)) != 0
}

/// The driver's side of every ring, kept across sessions (the guest does not restart).
struct Driver {
    mem: GuestMemoryMmap,
    avail: [u16; QUEUES],
    used_seen: [u16; QUEUES],
}

/// One VMM session: the frontend and the eventfds it handed over.
struct Session {
    fe: Frontend,
    kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
}

impl Driver {
    fn new() -> Driver {
        let mem = guest_memory();
        for q in 0..QUEUES {
            let (d, a, _) = ring_addrs(q);
            for i in 0..N {
                let flags = if q % 2 == 0 { DESC_F_WRITE } else { 0 };
                let desc = SplitDescriptor::new(buf_addr(q, i), BUF_LEN, flags, 0);
                mem.write_obj(
                    RawDescriptor::from(desc),
                    GuestAddress(d + 16 * u64::from(i)),
                )
                .unwrap();
            }
            // VRING_AVAIL_F_NO_INTERRUPT: this driver polls.
            mem.write_obj(1u16, GuestAddress(a)).unwrap();
        }
        let mut d = Driver {
            mem,
            avail: [0; QUEUES],
            used_seen: [0; QUEUES],
        };
        for q in [0, 2] {
            for i in 0..N {
                d.push(q, i);
            }
            d.publish(q);
        }
        d
    }

    /// Connects a VMM session with every queue starting at `bases`, optionally logging.
    fn connect(
        &self,
        socket: &std::path::Path,
        bases: [u16; QUEUES],
        log: Option<&File>,
    ) -> Session {
        let mut fe = Frontend::connect(socket, QUEUES as u64).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert_ne!(offered & F_MQ, 0, "VIRTIO_NET_F_MQ not offered");
        let proto_offered = fe.get_protocol_features().unwrap();
        assert!(proto_offered.contains(VhostUserProtocolFeatures::MQ));
        let mut proto = VhostUserProtocolFeatures::MQ;
        let mut log_all = 0;
        if log.is_some() {
            proto |= VhostUserProtocolFeatures::LOG_SHMFD;
            log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        }
        fe.set_protocol_features(proto).unwrap();
        assert!(
            fe.get_queue_num().unwrap() >= QUEUES as u64,
            "GET_QUEUE_NUM"
        );
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.set_features(F_VERSION_1 | F_MQ | pf | log_all).unwrap();
        let regions: Vec<_> = self
            .mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        fe.set_mem_table(&regions).unwrap();
        if let Some(file) = log {
            fe.set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: (MEM / 4096 / 8) as u64,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            )
            .unwrap();
        }
        let host = |a: u64| self.mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        let calls: Vec<EventFd> = (0..QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks: Vec<EventFd> = (0..QUEUES)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        for q in 0..QUEUES {
            let (d, a, u) = ring_addrs(q);
            fe.set_vring_num(q, N).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: N,
                    queue_size: N,
                    flags: 0,
                    desc_table_addr: host(d),
                    used_ring_addr: host(u),
                    avail_ring_addr: host(a),
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, bases[q]).unwrap();
            fe.set_vring_call(q, &calls[q]).unwrap();
            fe.set_vring_kick(q, &kicks[q]).unwrap();
            fe.set_vring_enable(q, true).unwrap();
        }
        Session {
            fe,
            kicks,
            _calls: calls,
        }
    }

    fn push(&mut self, q: usize, id: u16) {
        let (_, a, _) = ring_addrs(q);
        let slot = u64::from(self.avail[q] % N);
        self.mem
            .write_obj(id, GuestAddress(a + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
    }

    fn publish(&self, q: usize) {
        let (_, a, _) = ring_addrs(q);
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail[q], GuestAddress(a + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }

    fn used_idx(&self, q: usize) -> u16 {
        let (_, _, u) = ring_addrs(q);
        self.mem.read_obj(GuestAddress(u + 2)).unwrap()
    }

    /// Queues `frame` on TX queue `q` (buffers go round in order) and kicks.
    fn send(&mut self, s: &Session, q: usize, frame: &[u8]) {
        assert!(
            wait_until(|| self.avail[q].wrapping_sub(self.used_idx(q)) < N),
            "TX queue {q} never drained"
        );
        let id = self.avail[q] % N;
        let mut bytes = vec![0u8; HDR];
        bytes.extend_from_slice(frame);
        self.mem
            .write_slice(&bytes, GuestAddress(buf_addr(q, id)))
            .unwrap();
        let (d, _, _) = ring_addrs(q);
        let desc = SplitDescriptor::new(buf_addr(q, id), bytes.len() as u32, 0, 0);
        self.mem
            .write_obj(
                RawDescriptor::from(desc),
                GuestAddress(d + 16 * u64::from(id)),
            )
            .unwrap();
        self.push(q, id);
        self.publish(q);
        s.kicks[q].write(1).unwrap();
    }

    /// Frames received on RX queue `q` since the last call (no merging: 2 KiB buffers hold
    /// these frames whole); their buffers go back to the device.
    fn recv(&mut self, q: usize) -> Vec<Vec<u8>> {
        let end = self.used_idx(q);
        fence(Ordering::Acquire);
        let (_, _, u) = ring_addrs(q);
        let mut out = Vec::new();
        while self.used_seen[q] != end {
            let at = u + 4 + 8 * u64::from(self.used_seen[q] % N);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(buf_addr(q, id as u16)))
                .unwrap();
            assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1, "num_buffers");
            out.push(b[HDR..].to_vec());
            self.push(q, id as u16);
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        if !out.is_empty() {
            self.publish(q);
        }
        out
    }
}

/// A guest frame to the peer, tagged with its TX queue and sequence number.
fn guest_frame(q: usize, seq: u16) -> Vec<u8> {
    let mut f = PEER_MAC.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x88, 0xb5, q as u8]);
    f.extend_from_slice(&seq.to_be_bytes());
    f.resize(80, 0xee);
    f
}

/// An IPv4/UDP frame from the peer to the guest in flow `flow` (its source port), copy `n`.
fn flow_frame(flow: u16, n: u8) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&PEER_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = [n; 18];
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1]);
    let mut acc = 0u32;
    for c in ip.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    ip[10..12].copy_from_slice(&(!(acc as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&(1000 + flow).to_be_bytes());
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&payload);
    f
}

fn recv_all(peer: &ChannelPort, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 9216];
    wait_until(|| {
        while let Ok(Some(n)) = peer.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got.len() >= want
    });
    got
}

/// Receives on both RX queues until `want` frames came; returns (queue, frame) pairs.
fn guest_recv_all(d: &mut Driver, want: usize) -> Vec<(usize, Vec<u8>)> {
    let mut got = Vec::new();
    wait_until(|| {
        for q in [0, 2] {
            got.extend(d.recv(q).into_iter().map(|f| (q, f)));
        }
        got.len() >= want
    });
    got
}

#[test]
fn two_queue_pairs_carry_every_frame_both_ways_and_keep_their_bases_across_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mq.sock");
    let mut sw = Switch::new(SwitchConfig::private("vhu-mq")).unwrap();
    let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
    let p_peer = sw.add_port(PortConfig::access("peer", 1)).unwrap();
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
    let (port, server): (Arc<VhostUserPort>, _) = VhostUserServer::listen(&socket, "vm").unwrap();
    rt.attach(p_vm, port.clone());
    let (peer_sw, peer) = channel_pair("mq-sw", "mq-peer").unwrap();
    rt.attach(p_peer, Arc::new(peer_sw));

    let mut d = Driver::new();
    let s = d.connect(&socket, [0; QUEUES], None);
    assert!(
        wait_until(|| port.connected()),
        "rings never reached the port"
    );

    // Guest → peer on both TX queues, interleaved.
    for seq in 0..40u16 {
        d.send(&s, 1, &guest_frame(1, seq));
        d.send(&s, 3, &guest_frame(3, seq));
    }
    let got = recv_all(&peer, 80);
    let ids: HashSet<(u8, u16)> = got
        .iter()
        .map(|f| (f[14], u16::from_be_bytes([f[15], f[16]])))
        .collect();
    assert_eq!((got.len(), ids.len()), (80, 80), "frames lost or doubled");
    for q in [1u8, 3] {
        assert!(
            (0..40).all(|seq| ids.contains(&(q, seq))),
            "queue {q} lost frames"
        );
    }

    // Peer → guest: 32 flows, two frames each, spread over both RX queues by flow.
    for n in 0..2u8 {
        for flow in 0..32u16 {
            peer.send(&flow_frame(flow, n)).unwrap();
        }
    }
    let got = guest_recv_all(&mut d, 64);
    assert_eq!(
        got.len(),
        64,
        "{} of 64 frames reached the guest",
        got.len()
    );
    let mut queue_of: HashMap<u16, usize> = HashMap::new();
    let mut seen = HashSet::new();
    for (q, f) in &got {
        let flow = u16::from_be_bytes([f[34], f[35]]) - 1000;
        assert!(
            seen.insert((flow, f[42])),
            "flow {flow} copy {} twice",
            f[42]
        );
        let first = *queue_of.entry(flow).or_insert(*q);
        assert_eq!(first, *q, "flow {flow} split over two RX queues");
    }
    let used: HashSet<usize> = queue_of.values().copied().collect();
    assert_eq!(used.len(), 2, "32 flows all went to one RX queue");

    // Save: GET_VRING_BASE stops each ring and says where it stands.
    let bases: Vec<u16> = (0..QUEUES)
        .map(|q| s.fe.get_vring_base(q).unwrap() as u16)
        .collect();
    let rx_taken = |q: usize| got.iter().filter(|(r, _)| *r == q).count() as u16;
    assert_eq!(bases, vec![rx_taken(0), 40, rx_taken(2), 40], "ring bases");
    drop(s);
    assert!(wait_until(|| !port.connected()), "the session never ended");

    // A new session from the saved bases, with the dirty log on: nothing is taken twice and
    // the writes to both pairs' used rings are logged.
    let (log_file, log) = dirty_log();
    let bases: [u16; QUEUES] = bases.try_into().unwrap();
    let mut s = d.connect(&socket, bases, Some(&log_file));
    assert!(wait_until(|| port.connected()));
    d.send(&s, 1, &guest_frame(1, 100));
    d.send(&s, 3, &guest_frame(3, 100));
    let got = recv_all(&peer, 2);
    let mut tags: Vec<(u8, u16)> = got
        .iter()
        .map(|f| (f[14], u16::from_be_bytes([f[15], f[16]])))
        .collect();
    tags.sort();
    assert_eq!(tags, vec![(1, 100), (3, 100)], "after restore");
    for flow in 0..32u16 {
        peer.send(&flow_frame(flow, 9)).unwrap();
    }
    let got = guest_recv_all(&mut d, 32);
    assert_eq!(got.len(), 32);
    for (q, f) in &got {
        let flow = u16::from_be_bytes([f[34], f[35]]) - 1000;
        assert_eq!(
            queue_of[&flow], *q,
            "flow {flow} moved queue across sessions"
        );
    }
    for q in 0..QUEUES {
        let (_, _, u) = ring_addrs(q);
        assert!(
            logged(&log, u),
            "queue {q}'s used ring not in the dirty log"
        );
    }

    // The guest goes down to one pair (the VMM disables the second pair's rings, as it does
    // for VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET): every flow now lands in the first RX queue.
    s.fe.set_vring_enable(2, false).unwrap();
    s.fe.set_vring_enable(3, false).unwrap();
    // SET_VRING_ENABLE has no reply; a GET_FEATURES round trip waits until the backend has
    // acted on both (the VMM's `set_pairs` does the same before it answers the guest).
    s.fe.get_features().unwrap();
    for flow in 0..32u16 {
        peer.send(&flow_frame(flow, 10)).unwrap();
    }
    let got = guest_recv_all(&mut d, 32);
    assert_eq!(got.len(), 32);
    assert!(
        got.iter().all(|(q, _)| *q == 0),
        "a frame went to a disabled pair"
    );
    drop(s);
    let _ = server.stop();
    let _ = rt.stop();
}
