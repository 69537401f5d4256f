//! EVENT_IDX and offload pass-through on vhost-user ports, without a VM: each "guest" is a
//! memfd and split rings this test drives the way a virtio-net driver does (kicking only when
//! the device's `avail_event` or flags ask for it), connected with the rust-vmm frontend.
//!
//! - EVENT_IDX: frames sent in random bursts with random pauses all arrive, in order, while the
//!   driver kicks far less than once per frame (no lost wake-up: a frame never sits in the ring
//!   with neither side going to look).
//! - Offloads: a TCP super-frame (partial checksum, GSO metadata) from a guest reaches a guest
//!   that negotiated the offloads byte for byte with its header; a guest without them and a
//!   plain port get MSS-sized segments with correct checksums; IPv4 and IPv6; a UDP frame with
//!   a partial checksum is finished for the ports that did not negotiate CSUM.

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vireo_netport::{channel_pair, FramePort, VNET_HDR_LEN};
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::vhost_user::{VhostUserPort, VhostUserServer};
use vireo_vswitch::{PortConfig, Switch, SwitchConfig};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 8 << 20;
const N: u16 = 64;
const HDR: usize = 12;
const RX_BUF: u64 = 0x10_0000;
const RX_LEN: u32 = 2048;
const TX_BUF: u64 = 0x20_0000;
const TX_LEN: u64 = 0x1_1000;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const OFFLOADS: u64 =
    F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
const DESC_F_WRITE: u16 = 2;

fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked and owned.
    let fd = unsafe { libc::memfd_create(c"vhu-offload".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    let region =
        GuestRegionMmap::from_range(GuestAddress(0), MEM, Some(FileOffset::new(file, 0))).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

/// Descriptor table, avail ring and used ring of queue `q` (0 = RX, 1 = TX).
fn ring_addrs(q: u64) -> (u64, u64, u64) {
    let base = q * 0x10000;
    (base, base + 16 * u64::from(N), base + 0x8000)
}

fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// One fake guest: its memory, the frontend session, and a driver's ring state.
struct Guest {
    mem: GuestMemoryMmap,
    _fe: Frontend,
    kicks: Vec<EventFd>,
    _calls: Vec<EventFd>,
    features: u64,
    avail: [u16; 2],
    published: [u16; 2],
    used_seen: [u16; 2],
    /// Kicks sent per queue (each a VM exit in a real guest).
    kicked: [u64; 2],
}

impl Guest {
    /// Connects to `socket` accepting `extra` on top of VERSION_1, posts every receive buffer.
    fn connect(socket: &std::path::Path, extra: u64) -> Guest {
        let mem = guest_memory();
        let mut fe = Frontend::connect(socket, 2).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert_eq!(offered & extra, extra, "backend does not offer {extra:#x}");
        fe.get_protocol_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::empty())
            .unwrap();
        let proto = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        fe.set_features(F_VERSION_1 | proto | extra).unwrap();
        let regions: Vec<_> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).unwrap())
            .collect();
        fe.set_mem_table(&regions).unwrap();
        let host = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        let calls: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        for q in 0..2u64 {
            let (d, a, _) = ring_addrs(q);
            for i in 0..u64::from(N) {
                let desc = if q == 0 {
                    SplitDescriptor::new(RX_BUF + i * u64::from(RX_LEN), RX_LEN, DESC_F_WRITE, 0)
                } else {
                    SplitDescriptor::new(TX_BUF + i * TX_LEN, 0, 0, 0)
                };
                mem.write_obj(RawDescriptor::from(desc), GuestAddress(d + 16 * i))
                    .unwrap();
            }
            // VRING_AVAIL_F_NO_INTERRUPT, and used_event far behind: this driver polls.
            mem.write_obj(1u16, GuestAddress(a)).unwrap();
            mem.write_obj(0x8000u16, GuestAddress(a + 4 + 2 * u64::from(N)))
                .unwrap();
        }
        for (i, (call, kick)) in calls.iter().zip(&kicks).enumerate() {
            let (d, a, u) = ring_addrs(i as u64);
            fe.set_vring_num(i, N).unwrap();
            fe.set_vring_addr(
                i,
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
            fe.set_vring_base(i, 0).unwrap();
            fe.set_vring_call(i, call).unwrap();
            fe.set_vring_kick(i, kick).unwrap();
            fe.set_vring_enable(i, true).unwrap();
        }
        let mut g = Guest {
            mem,
            _fe: fe,
            kicks,
            _calls: calls,
            features: extra,
            avail: [0; 2],
            published: [0; 2],
            used_seen: [0; 2],
            kicked: [0; 2],
        };
        for i in 0..N {
            g.push_avail(0, i);
        }
        g.publish(0);
        g
    }

    fn push_avail(&mut self, q: usize, id: u16) {
        let (_, a, _) = ring_addrs(q as u64);
        let slot = u64::from(self.avail[q] % N);
        self.mem
            .write_obj(id, GuestAddress(a + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
    }

    /// Makes pushed entries visible and kicks the way a driver does: under EVENT_IDX only when
    /// the published range crosses `avail_event`, else unless VRING_USED_F_NO_NOTIFY is set.
    fn publish(&mut self, q: usize) {
        let (_, a, u) = ring_addrs(q as u64);
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(self.avail[q], GuestAddress(a + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        let new = self.avail[q];
        let old = self.published[q];
        self.published[q] = new;
        let kick = if self.features & F_EVENT_IDX != 0 {
            let event: u16 = self
                .mem
                .read_obj(GuestAddress(u + 4 + 8 * u64::from(N)))
                .unwrap();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self.mem.read_obj(GuestAddress(u)).unwrap();
            flags & 1 == 0
        };
        if kick {
            self.kicked[q] += 1;
            self.kicks[q].write(1).unwrap();
        }
    }

    fn used_idx(&self, q: usize) -> u16 {
        let (_, _, u) = ring_addrs(q as u64);
        self.mem.read_obj(GuestAddress(u + 2)).unwrap()
    }

    fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let (_, _, u) = ring_addrs(q as u64);
        let at = u + 4 + 8 * u64::from(i % N);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// TX entries not yet returned by the device.
    fn tx_in_flight(&mut self) -> u16 {
        self.used_seen[1] = self.used_idx(1);
        self.avail[1].wrapping_sub(self.used_seen[1])
    }

    /// Queues `hdr` + `frame` in the next TX slot (not yet published); false when the ring
    /// is full.
    fn queue_tx(&mut self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> bool {
        if self.tx_in_flight() >= N {
            return false;
        }
        let id = self.avail[1] % N;
        let buf = TX_BUF + u64::from(id) * TX_LEN;
        let mut bytes = vec![0u8; HDR];
        bytes[..VNET_HDR_LEN].copy_from_slice(hdr);
        bytes.extend_from_slice(frame);
        assert!(bytes.len() as u64 <= TX_LEN);
        self.mem.write_slice(&bytes, GuestAddress(buf)).unwrap();
        let (d, _, _) = ring_addrs(1);
        let desc = SplitDescriptor::new(buf, bytes.len() as u32, 0, 0);
        self.mem
            .write_obj(
                RawDescriptor::from(desc),
                GuestAddress(d + 16 * u64::from(id)),
            )
            .unwrap();
        self.push_avail(1, id);
        true
    }

    /// The next received frame: (its virtio_net_hdr_v1, the frame), merged over as many
    /// buffers as `num_buffers` says; the buffers go back to the device.
    fn recv(&mut self) -> Option<([u8; HDR], Vec<u8>)> {
        let seen = self.used_seen[0];
        if self.used_idx(0) == seen {
            return None;
        }
        fence(Ordering::Acquire);
        let mut data = Vec::new();
        let mut taken = 0u16;
        let mut count = 1u16;
        while taken < count {
            let i = seen.wrapping_add(taken);
            assert!(
                wait_until(5, || self.used_idx(0).wrapping_sub(i) as i16 > 0),
                "merged buffer {taken} of {count} never came"
            );
            let (id, len) = self.used_elem(0, i);
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(
                    &mut b,
                    GuestAddress(RX_BUF + u64::from(id) * u64::from(RX_LEN)),
                )
                .unwrap();
            if taken == 0 {
                count = u16::from_le_bytes([b[10], b[11]]);
                assert!(count >= 1);
            }
            data.extend(b);
            taken += 1;
            self.push_avail(0, id as u16);
        }
        self.used_seen[0] = seen.wrapping_add(count);
        self.publish(0);
        let mut hdr = [0u8; HDR];
        hdr.copy_from_slice(&data[..HDR]);
        Some((hdr, data[HDR..].to_vec()))
    }

    fn recv_wait(&mut self, secs: u64) -> Option<([u8; HDR], Vec<u8>)> {
        let mut got = None;
        wait_until(secs, || {
            got = self.recv();
            got.is_some()
        });
        got
    }
}

struct Rig {
    rt: Option<SwitchRuntime>,
    servers: Vec<VhostUserServer>,
    ports: Vec<Arc<VhostUserPort>>,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// A switch with `vms` vhost-user ports (sockets `vm0.sock`, ...) and one plain channel
    /// port, whose far end is returned.
    fn new(name: &str, vms: usize) -> (Rig, vireo_netport::ChannelPort) {
        let dir = tempfile::tempdir().unwrap();
        let mut sw = Switch::new(SwitchConfig::private(name)).unwrap();
        let ids: Vec<_> = (0..vms)
            .map(|i| {
                sw.add_port(PortConfig::access(&format!("vm{i}"), 1))
                    .unwrap()
            })
            .collect();
        let p_peer = sw.add_port(PortConfig::access("peer", 1)).unwrap();
        let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
        let mut servers = Vec::new();
        let mut ports = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (port, server) =
                VhostUserServer::listen(&dir.path().join(format!("vm{i}.sock")), &format!("vm{i}"))
                    .unwrap();
            rt.attach(*id, port.clone());
            ports.push(port);
            servers.push(server);
        }
        let (peer_sw, peer) = channel_pair(&format!("{name}-sw"), &format!("{name}-peer")).unwrap();
        rt.attach(p_peer, Arc::new(peer_sw));
        (
            Rig {
                rt: Some(rt),
                servers,
                ports,
                _dir: dir,
            },
            peer,
        )
    }

    fn socket(&self, i: usize) -> std::path::PathBuf {
        self._dir.path().join(format!("vm{i}.sock"))
    }

    fn guest(&self, i: usize, features: u64) -> Guest {
        let g = Guest::connect(&self.socket(i), features);
        let port = self.ports[i].clone();
        assert!(
            wait_until(10, || port.connected()),
            "vm{i} rings never reached the port"
        );
        g
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for s in self.servers.drain(..) {
            let _ = s.stop();
        }
        if let Some(rt) = self.rt.take() {
            let _ = rt.stop();
        }
    }
}

const A_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];

fn seq_frame(seq: u32) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&B_MAC);
    f.extend_from_slice(&A_MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend((0..56u8).map(|i| i ^ seq as u8));
    f
}

/// A small xorshift, so the bursts differ per run of the loop but the test is repeatable.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Sends `total` frames from a guest in random bursts with random pauses; every one must reach
/// the plain peer in order. Returns the guest's TX kicks.
fn burst_run(features: u64, total: u32, seed: u64) -> u64 {
    let (rig, peer) = Rig::new(&format!("evi{}", features & F_EVENT_IDX != 0), 1);
    let mut g = rig.guest(0, features);
    let mut rng = seed;
    let mut sent = 0u32;
    let mut got = 0u32;
    let mut buf = vec![0u8; 9216];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < total {
        assert!(
            Instant::now() < deadline,
            "stalled: {got} of {total} frames arrived, {sent} sent"
        );
        let burst = 1 + (next(&mut rng) % 24) as u32;
        let mut queued = 0;
        while queued < burst && sent < total && g.queue_tx(&[0; VNET_HDR_LEN], &seq_frame(sent)) {
            sent += 1;
            queued += 1;
        }
        if queued > 0 {
            g.publish(1);
        }
        // Sometimes pause so the switch drains the ring and sleeps (kicks on again), sometimes
        // publish the next burst at once while it may still be draining.
        match next(&mut rng) % 3 {
            0 => {}
            1 => std::thread::sleep(Duration::from_micros(next(&mut rng) % 300)),
            _ => std::thread::yield_now(),
        }
        while let Ok(Some(n)) = peer.recv(&mut buf) {
            let seq = u32::from_be_bytes(buf[14..18].try_into().unwrap());
            assert_eq!(seq, got, "frame out of order or lost");
            assert_eq!(&buf[..n], &seq_frame(seq)[..]);
            got += 1;
        }
        if sent == total && got < total {
            // Everything is published: the rest must come without any further kick.
            let mut last = Instant::now();
            while got < total {
                match peer.recv(&mut buf) {
                    Ok(Some(_)) => {
                        let seq = u32::from_be_bytes(buf[14..18].try_into().unwrap());
                        assert_eq!(seq, got, "frame out of order or lost");
                        got += 1;
                        last = Instant::now();
                    }
                    _ => {
                        assert!(
                            last.elapsed() < Duration::from_secs(10),
                            "lost wake-up: {} frames published but never taken",
                            total - got
                        );
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            }
        }
    }
    g.kicked[1]
}

#[test]
fn event_idx_is_offered_and_bursts_never_lose_a_wakeup() {
    let total = 3000;
    for seed in [0x9e37_79b9_7f4a_7c15u64, 0x1234_5678_9abc_def1] {
        let with = burst_run(F_EVENT_IDX, total, seed);
        let without = burst_run(0, total, seed);
        eprintln!("tx kicks for {total} frames: EVENT_IDX {with}, flags {without}");
        // Suppression works in both modes: far fewer kicks than frames.
        assert!(with < u64::from(total) / 2, "EVENT_IDX: {with} kicks");
        assert!(without < u64::from(total) / 2, "flags: {without} kicks");
    }
}

/// Ones' complement sum of big-endian words, not folded.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        acc += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Replaces the L4 checksum of a correct frame by the pseudo-header sum, as a sender that
/// leaves the checksum to the device does; returns its virtio-net header fields
/// (csum_start, csum_offset).
fn make_partial(f: &mut [u8], v6: bool, udp: bool) -> (u16, u16) {
    let l3 = 14;
    let (l4, pseudo) = if v6 {
        (l3 + 40, sum(&f[l3 + 8..l3 + 40], 0))
    } else {
        (l3 + 20, sum(&f[l3 + 12..l3 + 20], 0))
    };
    let proto = if udp { 17 } else { 6 };
    let off = if udp { 6 } else { 16 };
    let len = (f.len() - l4) as u64;
    let p = fold(pseudo + proto + len);
    f[l4 + off..l4 + off + 2].copy_from_slice(&p.to_be_bytes());
    (l4 as u16, off as u16)
}

/// Checks IP and L4 checksums of a complete frame; returns the L4 payload.
fn valid_payload(f: &[u8]) -> Vec<u8> {
    let p = SlicedPacket::from_ethernet(f).unwrap();
    match (&p.net, &p.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) => {
            let h = ip.header().to_header();
            assert_eq!(
                h.calc_header_checksum(),
                h.header_checksum,
                "IPv4 header checksum"
            );
            let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
            assert_eq!(want, t.checksum(), "TCP/IPv4 checksum");
            t.payload().to_vec()
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Tcp(t))) => {
            let h = ip.header().to_header();
            let want = t.to_header().calc_checksum_ipv6(&h, t.payload()).unwrap();
            assert_eq!(want, t.checksum(), "TCP/IPv6 checksum");
            t.payload().to_vec()
        }
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(u))) => {
            let h = ip.header().to_header();
            let want = u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap();
            assert_eq!(want, u.checksum(), "UDP/IPv4 checksum");
            u.payload().to_vec()
        }
        other => panic!("unexpected frame {other:?}"),
    }
}

fn vnet(flags: u8, gso: u8, hdr_len: u16, mss: u16, start: u16, off: u16) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&mss.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&off.to_le_bytes());
    h
}

#[test]
fn offloaded_frames_cross_whole_to_offload_guests_and_are_finished_for_the_others() {
    // vm0 sends; vm1 negotiated the offloads; vm2 did not (mergeable buffers only); the peer
    // is a plain port. The destination MAC is never learned, so each frame floods to all three.
    let (rig, peer) = Rig::new("offl", 3);
    let mut a = rig.guest(0, F_EVENT_IDX | F_MRG_RXBUF | OFFLOADS);
    let mut b = rig.guest(1, F_EVENT_IDX | F_MRG_RXBUF | OFFLOADS);
    let mut c = rig.guest(2, F_EVENT_IDX | F_MRG_RXBUF);
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    let dst = [0x52, 0x54, 0, 0, 0, 0xee];
    let mut peer_buf = vec![0u8; 65600];

    let cases: [(&str, bool, bool); 3] = [
        ("tcp4", false, false),
        ("tcp6", true, false),
        ("udp4", false, true),
    ];
    for (name, v6, udp) in cases {
        let b4 = PacketBuilder::ethernet2(A_MAC, dst);
        let mut f = Vec::new();
        match (v6, udp) {
            (false, false) => b4
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(1000, 2000, 77, 512)
                .psh()
                .write(&mut f, &payload)
                .unwrap(),
            (true, false) => b4
                .ipv6([0xfd; 16], [0xfe; 16], 64)
                .tcp(1000, 2000, 77, 512)
                .psh()
                .write(&mut f, &payload)
                .unwrap(),
            _ => b4
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .udp(1000, 2000)
                .write(&mut f, &payload[..1200])
                .unwrap(),
        }
        let (start, off) = make_partial(&mut f, v6, udp);
        let hdr = if udp {
            vnet(1, 0, 0, 0, start, off)
        } else {
            vnet(1, if v6 { 4 } else { 1 }, start + 20, 1448, start, off)
        };
        assert!(a.queue_tx(&hdr, &f));
        a.publish(1);

        // Offload guest: one frame, as sent, header included (num_buffers aside).
        let (h, got) = b
            .recv_wait(10)
            .unwrap_or_else(|| panic!("{name}: nothing at vm1"));
        assert_eq!(
            &h[..VNET_HDR_LEN],
            &hdr[..],
            "{name}: header changed on the way"
        );
        assert_eq!(got, f, "{name}: super-frame changed on the way");
        assert!(b.recv().is_none(), "{name}: vm1 got more than one frame");

        // Guest without offloads and the plain port: complete frames, cut at the MSS.
        let want_segs = if udp { 1 } else { payload.len().div_ceil(1448) };
        let mut from_c = Vec::new();
        for k in 0..want_segs {
            let (h, seg) = c
                .recv_wait(10)
                .unwrap_or_else(|| panic!("{name}: segment {k} missing at vm2"));
            assert!(
                h[..VNET_HDR_LEN].iter().all(|&x| x == 0),
                "{name}: header leaked to vm2"
            );
            assert!(seg.len() <= 14 + 60 + 20 + 1448);
            from_c.extend(valid_payload(&seg));
        }
        let mut from_peer = Vec::new();
        for k in 0..want_segs {
            let mut n = None;
            wait_until(10, || {
                n = peer.recv(&mut peer_buf).ok().flatten();
                n.is_some()
            });
            let n = n.unwrap_or_else(|| panic!("{name}: segment {k} missing at the peer"));
            from_peer.extend(valid_payload(&peer_buf[..n]));
        }
        let sent = if udp { &payload[..1200] } else { &payload[..] };
        assert_eq!(from_c, sent, "{name}: vm2's segments do not add up");
        assert_eq!(from_peer, sent, "{name}: the peer's segments do not add up");
        assert!(c.recv().is_none(), "{name}: vm2 got extra frames");
    }

    // A header whose checksum field lies past the end of the frame goes nowhere.
    let f = seq_frame(1);
    assert!(a.queue_tx(&vnet(1, 0, 0, 0, 60, 16), &f));
    a.publish(1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        b.recv().is_none() && c.recv().is_none(),
        "bogus header delivered"
    );
    assert!(peer.recv(&mut peer_buf).unwrap().is_none());
}
