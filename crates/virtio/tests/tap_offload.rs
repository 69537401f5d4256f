//! Checksum and TSO offloads of the in-VMM virtio-net device on a real TAP, against the TCP
//! stack of a network namespace: a test-side driver plays a guest that speaks just enough TCP
//! (handshake, one send, collecting the reply by sequence number). With offloads it sends a
//! 20,000-byte TSO super-frame with a partial checksum and must receive the peer's reply as
//! super-frame(s); without, it must receive only plain frames with valid checksums. Needs
//! root, /dev/net/tun and `ip netns` (vireo-testkit: a recorded skip without them, a failure
//! under CI).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::enter_new_netns;
use common::*;
use vireo_netport::{FramePort, TapPort};
use vireo_virtio::net::NET_HDR_LEN;
use vireo_virtio::{GuestMemory, Net, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x11];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_PORT: u16 = 5555;
const GUEST_PORT: u16 = 40000;
const GUEST_ISS: u32 = 1000;
/// CSUM, GUEST_CSUM, GUEST_TSO4/6, HOST_TSO4/6.
const OFFLOAD_FEATURES: u64 = 1 | 1 << 1 | 1 << 7 | 1 << 8 | 1 << 11 | 1 << 12;
const QSIZE: u16 = 256;
const RX_BASE: u64 = DATA_BASE + (8 << 20);
const RX_BUF_LEN: u32 = 4096;
const TX_SLOT: u64 = 0x11000;
/// Ethernet + IPv4 + TCP without options.
const HEADERS: usize = 54;
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// The guest side: the device on the TAP and the driver's two queues.
struct Guest {
    dev: Net,
    mem: GuestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
    sent: u64,
    /// A mergeable frame whose chains are still arriving: buffers left, header, bytes so far.
    partial: Option<(u16, [u8; NET_HDR_LEN], Vec<u8>)>,
}

impl Guest {
    fn new(tap: Arc<TapPort>, features: u64) -> Guest {
        let mut dev = Net::new(tap, GUEST_MAC);
        let mem = guest_memory();
        let (mut qs, _irq) = activate_with(&mut dev, &mem, QSIZE, features);
        let tx = qs.pop().unwrap();
        let rx = qs.pop().unwrap();
        let mut g = Guest {
            dev,
            mem,
            rx,
            tx,
            sent: 0,
            partial: None,
        };
        for _ in 0..QSIZE {
            g.post_rx();
        }
        g.rx.notify();
        g
    }

    /// One 4 KiB receive buffer, at an address tied to its descriptor.
    fn post_rx(&mut self) {
        let d = u64::from(self.rx.next_desc());
        self.rx
            .add_chain(&self.mem, &[wo(RX_BASE + d * 4096, RX_BUF_LEN)]);
    }

    fn send(&mut self, hdr: [u8; NET_HDR_LEN], frame: &[u8]) {
        let at = DATA_BASE + (self.sent % 64) * TX_SLOT;
        self.sent += 1;
        self.mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(at + NET_HDR_LEN as u64))
            .unwrap();
        let len = (NET_HDR_LEN + frame.len()) as u32;
        self.tx.add_chain(&self.mem, &[ro(at, len)]);
        self.tx.notify();
        self.tx.wait_used(&self.mem, 1);
    }

    /// Every whole frame received so far (mergeable buffers joined), with its header.
    fn recv(&mut self) -> Vec<([u8; NET_HDR_LEN], Vec<u8>)> {
        let mut frames = Vec::new();
        let used = self.rx.take_used(&self.mem);
        for &(head, len) in &used {
            let mut buf = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut buf, GuestAddress(RX_BASE + u64::from(head) * 4096))
                .unwrap();
            let (left, hdr, mut data) = match self.partial.take() {
                Some((left, hdr, mut data)) => {
                    data.extend_from_slice(&buf);
                    (left - 1, hdr, data)
                }
                None => {
                    let hdr: [u8; NET_HDR_LEN] = buf[..NET_HDR_LEN].try_into().unwrap();
                    let count = u16::from_le_bytes([hdr[10], hdr[11]]);
                    assert!(count >= 1, "num_buffers 0 in {hdr:02x?}");
                    (count - 1, hdr, buf[NET_HDR_LEN..].to_vec())
                }
            };
            if left == 0 {
                frames.push((hdr, std::mem::take(&mut data)));
            } else {
                self.partial = Some((left, hdr, data));
            }
        }
        for _ in &used {
            self.post_rx();
        }
        if !used.is_empty() {
            self.rx.notify();
        }
        frames
    }
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: [u8; 4], dst: [u8; 4], tcp_len: usize) -> u32 {
    let acc = sum(&src, sum(&dst, 0));
    acc + 6 + tcp_len as u32
}

/// What the driver puts in a TCP frame's checksum field.
#[derive(Clone, Copy, PartialEq)]
enum Csum {
    /// The whole checksum (a driver without offloads).
    Full,
    /// Only the pseudo-header's, for the device's far side to finish (NEEDS_CSUM).
    Partial,
}

/// An Ethernet + IPv4 + TCP frame from the guest to the namespace's listener.
fn tcp_frame(seq: u32, ack: u32, flags: u8, opts: &[u8], payload: &[u8], csum: Csum) -> Vec<u8> {
    let tcp_len = 20 + opts.len() + payload.len();
    let mut f = HOST_MAC.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + tcp_len) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&HOST_IP);
    let ip_sum = !fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = GUEST_PORT.to_be_bytes().to_vec();
    tcp.extend_from_slice(&HOST_PORT.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[(((20 + opts.len()) / 4) as u8) << 4, flags]);
    tcp.extend_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(opts);
    tcp.extend_from_slice(payload);
    let ph = pseudo(GUEST_IP, HOST_IP, tcp_len);
    let check = match csum {
        Csum::Full => !fold(sum(&tcp, ph)),
        Csum::Partial => fold(ph),
    };
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

/// The header a driver puts before a frame: plain, a partial checksum, or TSO at `mss`.
fn hdr(csum: Csum, mss: Option<u16>) -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    if csum == Csum::Partial {
        h[0] = NEEDS_CSUM;
        h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the TCP header
        h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: its checksum field
    }
    if let Some(mss) = mss {
        h[1] = GSO_TCPV4;
        h[2..4].copy_from_slice(&(HEADERS as u16).to_le_bytes());
        h[4..6].copy_from_slice(&mss.to_le_bytes());
    }
    h
}

/// A TCP segment from the listener to the guest, as the guest got it.
struct Segment {
    seq: u32,
    flags: u8,
    payload: Vec<u8>,
    gso: bool,
}

/// Parses `frame` if it is TCP from the listener to the guest, checking what the header says
/// about it: a checksum that is whole or (NEEDS_CSUM) finishes to a valid one, GSO only where
/// `offloads` were negotiated, and nothing at all in the header without them.
fn parse(hdr: &[u8; NET_HDR_LEN], frame: &[u8], offloads: bool) -> Option<Segment> {
    if frame.len() < HEADERS || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    if frame[26..30] != HOST_IP || frame[34..36] != HOST_PORT.to_be_bytes() {
        return None;
    }
    if !offloads {
        assert_eq!(hdr[..10], [0; 10], "a header for a driver without offloads");
        assert!(frame.len() <= 1514, "a {}-byte frame", frame.len());
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let end = (14 + total).min(frame.len());
    let tcp = &frame[14 + ihl..end];
    let doff = usize::from(tcp[12] >> 4) * 4;
    let gso = hdr[1] != 0;
    assert!(!gso || hdr[1] == GSO_TCPV4, "gso_type {}", hdr[1]);
    if !gso {
        let ph = pseudo(HOST_IP, GUEST_IP, tcp.len());
        let whole = if hdr[0] & NEEDS_CSUM != 0 {
            assert_eq!(
                (
                    u16::from_le_bytes([hdr[6], hdr[7]]),
                    u16::from_le_bytes([hdr[8], hdr[9]])
                ),
                (14 + ihl as u16, 16),
                "csum_start/csum_offset"
            );
            // The partial sum covers the pseudo-header; finish it as the driver would.
            let mut t = tcp.to_vec();
            let done = !fold(sum(&t, 0));
            t[16..18].copy_from_slice(&done.to_be_bytes());
            fold(sum(&t, ph))
        } else {
            fold(sum(tcp, ph))
        };
        assert_eq!(
            whole,
            0xffff,
            "bad TCP checksum in a {}-byte frame",
            frame.len()
        );
    }
    Some(Segment {
        seq: u32::from_be_bytes(tcp[4..8].try_into().unwrap()),
        flags: tcp[13],
        payload: tcp[doff..].to_vec(),
        gso,
    })
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

/// The whole exchange; `offloads`: the driver accepts every offload the device offers.
fn tcp_through_the_tap(ns_name: &str, offloads: bool) {
    let ns = enter_new_netns(ns_name).expect("cannot create and enter a network namespace");
    let tap = Arc::new(TapPort::open_offload("vnet%d").unwrap());
    let ifname = tap.name().to_string();
    let mac = HOST_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&["link", "set", &ifname, "address", &mac, "up"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", &ifname]);
    let guest_mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&[
        "neigh",
        "add",
        "10.77.0.2",
        "lladdr",
        &guest_mac,
        "dev",
        &ifname,
    ]);

    let up_len = if offloads { 20_000 } else { 1_400 };
    let down_len = 14_000;
    let up = pattern(up_len, 1);
    let down = pattern(down_len, 7);
    let listener =
        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::from(HOST_IP), HOST_PORT)).unwrap();
    let down_copy = down.clone();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(DEVICE_TIMEOUT)).unwrap();
        let mut got = vec![0u8; up_len];
        s.read_exact(&mut got).unwrap();
        s.write_all(&down_copy).unwrap();
        (got, s)
    });

    let offered = {
        let probe = Net::new(tap.clone(), GUEST_MAC);
        probe.features()
    };
    assert_eq!(
        offered & OFFLOAD_FEATURES,
        OFFLOAD_FEATURES,
        "an offload TAP"
    );
    let features = if offloads {
        offered
    } else {
        offered & !OFFLOAD_FEATURES
    };
    let mut guest = Guest::new(tap, features);
    let csum = if offloads { Csum::Partial } else { Csum::Full };
    let deadline = Instant::now() + DEVICE_TIMEOUT;

    let mss_option = [2, 4, 0x05, 0xb4];
    guest.send(
        hdr(csum, None),
        &tcp_frame(GUEST_ISS, 0, TCP_SYN, &mss_option, &[], csum),
    );
    let peer_iss = loop {
        assert!(Instant::now() < deadline, "no SYN-ACK");
        let synack = guest.recv().into_iter().find_map(|(h, f)| {
            parse(&h, &f, offloads).filter(|s| s.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK)
        });
        if let Some(s) = synack {
            break s.seq;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let ack = peer_iss.wrapping_add(1);
    let seq = GUEST_ISS + 1;
    guest.send(
        hdr(csum, None),
        &tcp_frame(seq, ack, TCP_ACK, &[], &[], csum),
    );
    let data = tcp_frame(seq, ack, TCP_ACK | TCP_PSH, &[], &up, csum);
    let gso = offloads.then_some(1460);
    guest.send(hdr(csum, gso), &data);
    assert_eq!(guest.dev.counters().snapshot().tx_drops, 0);

    // The reply, put together by sequence number (a retransmission lands on itself).
    let mut reply = vec![None::<u8>; down_len];
    let mut saw_super_frame = false;
    while reply.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "{} of {down_len} reply bytes reached the guest",
            reply.iter().flatten().count()
        );
        for (h, f) in guest.recv() {
            let Some(s) = parse(&h, &f, offloads) else {
                continue;
            };
            saw_super_frame |= s.gso && s.payload.len() > 1460;
            let at = s.seq.wrapping_sub(ack) as usize;
            for (i, b) in s.payload.iter().enumerate() {
                if let Some(slot) = reply.get_mut(at + i) {
                    *slot = Some(*b);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let reply: Vec<u8> = reply.into_iter().flatten().collect();
    assert!(reply == down, "the reply arrived with other bytes");
    let (got, _stream) = peer.join().unwrap();
    assert!(
        got == up,
        "the listener read other bytes than the guest sent"
    );
    if offloads {
        assert!(
            saw_super_frame,
            "a GUEST_TSO4 driver got the reply only as MSS-sized frames"
        );
    }
    reset_in_time(guest.dev);
}

fn run_in_own_thread(ns_name: String, offloads: bool) {
    use vireo_testkit::{require_all, Need};
    if !require_all(&[Need::Tap, Need::Netns]) {
        return;
    }
    let result = std::thread::spawn(move || tcp_through_the_tap(&ns_name, offloads)).join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn a_tso_super_frame_reaches_a_namespace_tcp_peer_and_super_frames_come_back() {
    run_in_own_thread(format!("vireo-tso-{}", std::process::id()), true);
}

#[test]
fn a_driver_without_offloads_gets_plain_frames_with_valid_checksums() {
    run_in_own_thread(format!("vireo-plain-{}", std::process::id()), false);
}
