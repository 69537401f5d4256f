//! Checksum/TSO offloads of the in-VMM virtio-net device at the device level, on an in-memory
//! offload port: what is offered, what the port is told to hand over, and that headers pass
//! unchanged both ways only within what the driver negotiated. (The same over a real TAP and
//! the kernel's TCP: `tap_offload.rs`.)

mod common;

use std::sync::Arc;

use common::offload_port::{OffloadPort, ALL_OFFLOADS};
use common::*;
use vireo_netport::{channel_pair, Offloads, VNET_HDR_LEN};
use vireo_virtio::net::NET_HDR_LEN;
use vireo_virtio::{GuestMemory, Net, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
const QSIZE: u16 = 16;
const CSUM: u64 = 1;
const GUEST_CSUM: u64 = 1 << 1;
const GUEST_TSO: u64 = 1 << 7 | 1 << 8;
const HOST_TSO: u64 = 1 << 11 | 1 << 12;
const OFFLOADS: u64 = CSUM | GUEST_CSUM | GUEST_TSO | HOST_TSO;
const RX_BUF: u64 = DATA_BASE;
const TX_BUF: u64 = DATA_BASE + (4 << 20);

/// A TCP/IPv4 super-frame's header: partial checksum, TSO at 1448.
const TSO_HDR: [u8; VNET_HDR_LEN] = [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0];
/// A finished frame the far side already checked (DATA_VALID).
const VALID_HDR: [u8; VNET_HDR_LEN] = [2, 0, 0, 0, 0, 0, 0, 0, 0, 0];

struct Rig {
    dev: Net,
    port: Arc<OffloadPort>,
    mem: GuestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
}

/// A device on an offload port, the driver accepting what it offers except `declined`.
fn rig(declined: u64) -> Rig {
    let port = Arc::new(OffloadPort::new());
    let mut dev = Net::new(port.clone(), MAC);
    let mem = guest_memory();
    let features = dev.features() & !declined;
    let (mut qs, _irq) = activate_with(&mut dev, &mem, QSIZE, features);
    let tx = qs.pop().unwrap();
    let rx = qs.pop().unwrap();
    Rig {
        dev,
        port,
        mem,
        rx,
        tx,
    }
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = MAC.to_vec();
    f.extend_from_slice(&[2, 0, 0, 0, 0, tag, 0x08, 0x00]);
    f.extend((0..len - 14).map(|i| (i as u8) ^ tag));
    f
}

impl Rig {
    fn send(&mut self, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) {
        let mut h = [0u8; NET_HDR_LEN];
        h[..VNET_HDR_LEN].copy_from_slice(&hdr);
        self.mem.write_slice(&h, GuestAddress(TX_BUF)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(TX_BUF + NET_HDR_LEN as u64))
            .unwrap();
        let len = (NET_HDR_LEN + frame.len()) as u32;
        self.tx.add_chain(&self.mem, &[ro(TX_BUF, len)]);
        self.tx.notify();
        self.tx.wait_used(&self.mem, 1);
    }

    /// Posts one buffer of `len` and returns the header and frame the device put in it.
    fn receive(&mut self, len: u32) -> ([u8; NET_HDR_LEN], Vec<u8>) {
        self.rx.add_chain(&self.mem, &[wo(RX_BUF, len)]);
        self.rx.notify();
        let used = self.rx.wait_used(&self.mem, 1);
        let mut got = vec![0u8; used[0].1 as usize];
        self.mem.read_slice(&mut got, GuestAddress(RX_BUF)).unwrap();
        let hdr = got[..NET_HDR_LEN].try_into().unwrap();
        (hdr, got.split_off(NET_HDR_LEN))
    }
}

#[test]
fn offloads_are_offered_only_on_a_port_that_carries_them() {
    let (plain, _peer) = channel_pair("plain", "peer").unwrap();
    assert_eq!(Net::new(Arc::new(plain), MAC).features() & OFFLOADS, 0);
    let offload = Net::new(Arc::new(OffloadPort::new()), MAC);
    assert_eq!(offload.features() & OFFLOADS, OFFLOADS);
}

#[test]
fn the_port_is_told_what_the_driver_takes() {
    let none = Offloads::default();
    let csum_only = Offloads { csum: true, ..none };
    for (declined, want) in [
        (0, ALL_OFFLOADS),
        (GUEST_TSO, csum_only),
        (GUEST_CSUM, none),
        (OFFLOADS, none),
    ] {
        let r = rig(declined);
        assert_eq!(
            *r.port.recv_offloads.lock().unwrap(),
            Some(want),
            "declined {declined:#x}"
        );
        reset_in_time(r.dev);
    }
}

#[test]
fn a_tx_super_frame_reaches_the_port_with_its_header_unchanged() {
    let mut r = rig(0);
    let big = frame(20_054, 1);
    r.send(TSO_HDR, &big);
    let sent = r.port.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Some(TSO_HDR));
    assert!(sent[0].1 == big, "the super-frame changed on the way");
    assert_eq!(r.dev.counters().snapshot().tx_bytes, big.len() as u64);
    reset_in_time(r.dev);
}

#[test]
fn tx_headers_beyond_the_negotiated_offloads_are_not_passed() {
    // Checksum offload without TSO: a TSO header is refused, a partial checksum passes.
    let mut r = rig(HOST_TSO);
    r.send(TSO_HDR, &frame(3000, 2));
    let csum_hdr = [1, 0, 0, 0, 0, 0, 34, 0, 16, 0];
    r.send(csum_hdr, &frame(600, 3));
    let sent = r.port.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, Some(csum_hdr));
    assert_eq!(r.dev.counters().snapshot().tx_drops, 1);
    reset_in_time(r.dev);

    // No offloads: the header means nothing and the frame goes out plain.
    let mut r = rig(OFFLOADS);
    r.send(csum_hdr, &frame(600, 4));
    assert_eq!(r.port.sent.lock().unwrap()[0].0, None);
    reset_in_time(r.dev);
}

#[test]
fn rx_headers_reach_a_driver_with_offloads_unchanged() {
    let mut r = rig(0);
    let big = frame(30_000, 5);
    r.port.push(TSO_HDR, &big);
    let (hdr, got) = r.receive(40_000);
    assert_eq!(hdr[..VNET_HDR_LEN], TSO_HDR);
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
    assert!(got == big);
    reset_in_time(r.dev);
}

#[test]
fn a_driver_without_offloads_gets_plain_headers_and_no_super_frames() {
    let mut r = rig(OFFLOADS);
    // Queued before the port was told (a driver that reset and declined): dropped, counted.
    r.port.push(TSO_HDR, &frame(3000, 6));
    let plain = frame(200, 7);
    r.port.push(VALID_HDR, &plain);
    let (hdr, got) = r.receive(2048);
    assert_eq!(
        hdr[..VNET_HDR_LEN],
        [0; VNET_HDR_LEN],
        "DATA_VALID without GUEST_CSUM"
    );
    assert!(got == plain);
    let s = r.dev.counters().snapshot();
    assert_eq!((s.rx_frames, s.rx_drops), (1, 1));
    reset_in_time(r.dev);
}
