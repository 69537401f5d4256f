//! virtio-net driven through real split virtqueues, with an in-process channel port as the wire.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use vireo_netport::{channel_pair, ChannelPort, FramePort};
use vireo_virtio::net::NET_HDR_LEN;
use vireo_virtio::{GuestMemory, Net, VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const QSIZE: u16 = 16;
const RX_BUF: u64 = DATA_BASE;
const TX_BUF: u64 = DATA_BASE + (4 << 20);
const HDR: u32 = NET_HDR_LEN as u32;

struct Rig {
    dev: Net,
    mem: GuestMemory,
    rx: DriverQueue,
    tx: DriverQueue,
    peer: ChannelPort,
    irq: Arc<RecordingInterrupt>,
}

const MRG_RXBUF: u64 = 1 << 15;

fn rig() -> Rig {
    rig_with("vm", None)
}

fn rig_named(name: &str) -> Rig {
    rig_with(name, None)
}

/// A device on a channel port named `name`, with `features` negotiated (default: all offered).
fn rig_with(name: &str, features: Option<u64>) -> Rig {
    let (vm_end, peer) = channel_pair(name, "peer").unwrap();
    let mut dev = Net::new(Arc::new(vm_end), MAC);
    let mem = guest_memory();
    let features = features.unwrap_or(dev.features());
    let (mut qs, irq) = activate_with(&mut dev, &mem, QSIZE, features);
    let tx = qs.pop().unwrap();
    let rx = qs.pop().unwrap();
    Rig {
        dev,
        mem,
        rx,
        tx,
        peer,
        irq,
    }
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, tag]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(tag)));
    f
}

impl Rig {
    /// Posts one rx buffer of `len` bytes (slot `i` of the rx area) and kicks the rx queue.
    fn post_rx(&mut self, i: u64, len: u32) {
        self.rx
            .add_chain(&self.mem, &[wo(RX_BUF + i * 0x4000, len)]);
        self.rx.notify();
    }

    fn rx_bytes(&self, i: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem
            .read_slice(&mut out, GuestAddress(RX_BUF + i * 0x4000))
            .unwrap();
        out
    }

    /// Queues `frame` for transmission with the header in its own descriptor.
    fn send(&mut self, slot: u64, frame: &[u8]) {
        let at = TX_BUF + slot * 0x4000;
        self.mem
            .write_slice(&[0; NET_HDR_LEN], GuestAddress(at))
            .unwrap();
        self.mem.write_slice(frame, GuestAddress(at + 64)).unwrap();
        self.tx
            .add_chain(&self.mem, &[ro(at, HDR), ro(at + 64, frame.len() as u32)]);
        self.tx.notify();
    }

    fn peer_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0; 65536];
        let mut got = None;
        wait_for(|| match self.peer.recv(&mut buf).unwrap() {
            Some(n) => {
                got = Some(buf[..n].to_vec());
                true
            }
            None => false,
        });
        got
    }
}

#[test]
fn features_and_config() {
    let r = rig();
    let f = r.dev.features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & (1 << 5), 0, "MAC");
    assert_ne!(f & (1 << 16), 0, "STATUS");
    assert_eq!(r.dev.queue_max_sizes().len(), 2);
    let mut cfg = [0u8; 8];
    r.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]) & 1, 1, "link up");
}

#[test]
fn tx_strips_header_and_sends_frames() {
    let mut r = rig();
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    r.send(0, &f1);
    assert_eq!(r.peer_recv().as_deref(), Some(&f1[..]));
    // Header and frame in one descriptor.
    let at = TX_BUF + 0x10000;
    r.mem
        .write_slice(&[0; NET_HDR_LEN], GuestAddress(at))
        .unwrap();
    r.mem
        .write_slice(&f2, GuestAddress(at + NET_HDR_LEN as u64))
        .unwrap();
    r.tx.add_chain(&r.mem, &[ro(at, HDR + f2.len() as u32)]);
    r.tx.notify();
    assert_eq!(r.peer_recv().as_deref(), Some(&f2[..]));
    assert_eq!(r.tx.wait_used(&r.mem, 2).len(), 2);
    let s = r.dev.counters().snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes, s.tx_drops), (2, 60 + 1514, 0));
    assert!(wait_for(|| r.irq.count(1) >= 1));
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mut r = rig();
    // Shorter than header + Ethernet header; device-writable only; past guest memory.
    r.tx.add_chain(&r.mem, &[ro(TX_BUF, 20)]);
    r.tx.add_chain(&r.mem, &[wo(TX_BUF, 100)]);
    r.tx.add_chain(&r.mem, &[ro(TX_BUF, HDR), ro(MEM_SIZE as u64 - 10, 60)]);
    // Larger than any frame a port carries.
    r.tx.add_chain(&r.mem, &[ro(TX_BUF, HDR + 10_000)]);
    r.tx.notify();
    assert_eq!(r.tx.wait_used(&r.mem, 4).len(), 4);
    assert_eq!(r.dev.counters().snapshot().tx_drops, 4);
    let f = frame(100, 3);
    r.send(1, &f);
    assert_eq!(r.peer_recv().as_deref(), Some(&f[..]));
}

#[test]
fn rx_delivers_header_and_frame() {
    let mut r = rig();
    for i in 0..4 {
        r.post_rx(i, 2048);
    }
    let frames: Vec<_> = (0..3).map(|i| frame(60 + 500 * i, i as u8 + 1)).collect();
    for f in &frames {
        r.peer.send(f).unwrap();
    }
    let used = r.rx.wait_used(&r.mem, 3);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(used[i].1 as usize, NET_HDR_LEN + f.len());
        let got = r.rx_bytes(i as u64, NET_HDR_LEN + f.len());
        // num_buffers = 1, everything else zero.
        assert_eq!(&got[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&got[NET_HDR_LEN..], &f[..]);
    }
    let s = r.dev.counters().snapshot();
    assert_eq!(s.rx_frames, 3);
    assert_eq!(
        s.rx_bytes,
        frames.iter().map(|f| f.len() as u64).sum::<u64>()
    );
    assert!(wait_for(|| r.irq.count(0) >= 1));
}

/// CPU time (user + system, in clock ticks) used so far by this process's thread `name`.
fn thread_cpu_ticks(name: &str) -> Option<u64> {
    // Threads of other tests come and go while we look: skip any that vanish.
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // Fields after the parenthesised command name; utime and stime are 14 and 15.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            return Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?);
        }
    }
    None
}

#[test]
fn rx_waits_for_buffers_without_spinning_or_dropping() {
    // A name no other test uses, so the worker thread ("virtio-net-" + name) is ours.
    let mut r = rig_named("idle");
    let first = frame(200, 7);
    let second = frame(300, 8);
    r.peer.send(&first).unwrap();
    r.peer.send(&second).unwrap();
    // No rx buffers: nothing is delivered, nothing is dropped, and the worker sleeps.
    // The worker names itself once running.
    let mut before = None;
    assert!(wait_for(|| {
        before = thread_cpu_ticks("virtio-net-idle");
        before.is_some()
    }));
    let before = before.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let after = thread_cpu_ticks("virtio-net-idle").unwrap();
    assert!(
        after - before < 25,
        "worker busy while idle: {} ticks",
        after - before
    );
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    assert_eq!(r.dev.counters().snapshot().rx_drops, 0);

    // The driver adds one buffer and kicks: the held frame goes in; the next waits again.
    r.post_rx(0, 2048);
    let used = r.rx.wait_used(&r.mem, 1);
    assert_eq!(used[0].1 as usize, NET_HDR_LEN + first.len());
    assert_eq!(
        &r.rx_bytes(0, used[0].1 as usize)[NET_HDR_LEN..],
        &first[..]
    );
    r.post_rx(1, 2048);
    let used = r.rx.wait_used(&r.mem, 1);
    assert_eq!(
        &r.rx_bytes(1, used[0].1 as usize)[NET_HDR_LEN..],
        &second[..]
    );

    // With buffers to spare, the port is watched again: a new frame arrives on its own.
    r.post_rx(2, 2048);
    let third = frame(64, 9);
    r.peer.send(&third).unwrap();
    let used = r.rx.wait_used(&r.mem, 1);
    assert_eq!(
        &r.rx_bytes(2, used[0].1 as usize)[NET_HDR_LEN..],
        &third[..]
    );
    assert_eq!(r.dev.counters().snapshot().rx_drops, 0);
}

#[test]
fn frames_too_big_for_the_buffer_are_dropped_and_counted() {
    let features = rig().dev.features() & !MRG_RXBUF;
    let mut r = rig_with("vm", Some(features));
    r.post_rx(0, HDR + 100);
    r.peer.send(&frame(1000, 1)).unwrap();
    // Longer than any port buffer: the port reports it and the device counts it.
    r.peer.send(&vec![0xab; 20_000]).unwrap();
    let small = frame(80, 2);
    r.peer.send(&small).unwrap();
    // The small frame lands in the buffer the big one could not use.
    let used = r.rx.wait_used(&r.mem, 1);
    assert_eq!(used[0].1 as usize, NET_HDR_LEN + small.len());
    assert_eq!(
        &r.rx_bytes(0, used[0].1 as usize)[NET_HDR_LEN..],
        &small[..]
    );
    let s = r.dev.counters().snapshot();
    assert_eq!((s.rx_frames, s.rx_drops), (1, 2));
}

#[test]
fn rx_writes_are_dirty_tracked() {
    let mut r = rig();
    r.post_rx(3, 2048);
    // Let the worker see the buffer before forgetting the driver's own writes.
    std::thread::sleep(Duration::from_millis(50));
    clear_dirty(&r.mem);
    r.peer.send(&frame(1000, 4)).unwrap();
    r.rx.wait_used(&r.mem, 1);
    assert!(is_dirty(&r.mem, RX_BUF + 3 * 0x4000));
    assert!(is_dirty(&r.mem, r.rx.used_ring_addr()));
    assert!(!is_dirty(&r.mem, RX_BUF));
    assert!(!is_dirty(&r.mem, TX_BUF));
}

#[test]
fn echo_through_a_port_pair_both_ways() {
    let mut r = rig();
    for i in 0..QSIZE as u64 {
        r.post_rx(i, 2048);
    }
    // 40 frames each way, more than the queue holds, recycling rx buffers as they are used.
    for n in 0..40u8 {
        let out = frame(100 + n as usize, n.wrapping_add(1));
        r.send(u64::from(n % 8), &out);
        assert_eq!(r.peer_recv().as_deref(), Some(&out[..]));
        r.tx.wait_used(&r.mem, 1);
        r.peer.send(&out).unwrap();
        let used = r.rx.wait_used(&r.mem, 1);
        // Buffers are used in the order they were posted.
        let slot = u64::from(n) % u64::from(QSIZE);
        assert_eq!(
            &r.rx_bytes(slot, used[0].1 as usize)[NET_HDR_LEN..],
            &out[..]
        );
        r.post_rx(slot, 2048);
    }
    let s = r.dev.counters().snapshot();
    assert_eq!(
        (s.rx_frames, s.tx_frames, s.rx_drops, s.tx_drops),
        (40, 40, 0, 0)
    );
}

#[test]
fn bogus_avail_index_neither_spins_nor_blocks_reset() {
    let r = rig();
    // An avail index further ahead than the queue size is a driver bug the queue refuses.
    for q in [&r.rx, &r.tx] {
        r.mem
            .store(
                100u16.to_le(),
                GuestAddress(q.avail_addr() + 2),
                std::sync::atomic::Ordering::Release,
            )
            .unwrap();
        q.notify();
    }
    r.peer.send(&frame(60, 1)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    // A spinning worker would never see the stop request.
    reset_in_time(r.dev);
}

#[test]
fn reset_stops_the_worker() {
    let mut r = rig();
    r.dev.reset();
    r.post_rx(0, 2048);
    r.peer.send(&frame(60, 1)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    let (mut qs, _irq) = activate_all(&mut r.dev, &r.mem, QSIZE);
    r.tx = qs.pop().unwrap();
    r.rx = qs.pop().unwrap();
    r.post_rx(0, 2048);
    assert_eq!(r.rx.wait_used(&r.mem, 1).len(), 1);
}

#[test]
fn link_state_changes_reach_config_space_and_driver() {
    let r = rig();
    let link = r.dev.link_control();
    let status = |dev: &Net| {
        let mut b = [0u8; 2];
        dev.read_config(6, &mut b);
        u16::from_le_bytes(b)
    };
    assert_eq!(status(&r.dev), 1);
    link.set_up(false).unwrap();
    link.set_up(false).unwrap();
    assert_eq!(status(&r.dev), 0);
    assert!(!link.is_up());
    assert_eq!(r.irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    link.set_up(true).unwrap();
    assert_eq!(status(&r.dev), 1);
    assert_eq!(r.irq.config.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn mergeable_rx_spreads_a_frame_over_several_buffers() {
    let mut r = rig();
    assert_ne!(r.dev.features() & MRG_RXBUF, 0);
    for i in 0..4 {
        r.post_rx(i, 512);
    }
    let big = frame(1400, 5);
    r.peer.send(&big).unwrap();
    let used = r.rx.wait_used(&r.mem, 3);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![512, 512, 1412 - 1024]
    );
    let mut got = Vec::new();
    for (i, u) in used.iter().enumerate() {
        got.extend(r.rx_bytes(i as u64, u.1 as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[NET_HDR_LEN..], &big[..]);

    // One buffer left, a frame needing three: it waits for more buffers, then arrives whole.
    let next = frame(1200, 6);
    r.peer.send(&next).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.rx.used_idx(&r.mem), 3);
    r.post_rx(4, 512);
    r.post_rx(5, 512);
    let used = r.rx.wait_used(&r.mem, 3);
    let mut got = Vec::new();
    for (slot, u) in [3u64, 4, 5].iter().zip(&used) {
        got.extend(r.rx_bytes(*slot, u.1 as usize));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[NET_HDR_LEN..], &next[..]);
    assert_eq!(r.dev.counters().snapshot().rx_drops, 0);
}

#[test]
fn mergeable_frame_larger_than_the_whole_ring_is_dropped() {
    let mut r = rig();
    for i in 0..u64::from(QSIZE) {
        r.post_rx(i, 64);
    }
    r.peer.send(&frame(2000, 1)).unwrap(); // Needs 2012 bytes, the ring holds 1024.
    let small = frame(100, 2);
    r.peer.send(&small).unwrap();
    let used = r.rx.wait_used(&r.mem, 2);
    assert_eq!(
        used.iter().map(|u| u.1).sum::<u32>() as usize,
        NET_HDR_LEN + 100
    );
    let s = r.dev.counters().snapshot();
    assert_eq!((s.rx_frames, s.rx_drops), (1, 1));
}

#[test]
fn transmitting_does_not_disturb_a_frame_waiting_for_rx_buffers() {
    let mut r = rig();
    let waiting = frame(500, 3);
    r.peer.send(&waiting).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let out = frame(1500, 4);
    r.send(0, &out);
    assert_eq!(r.peer_recv().as_deref(), Some(&out[..]));
    r.post_rx(0, 2048);
    let used = r.rx.wait_used(&r.mem, 1);
    assert_eq!(
        &r.rx_bytes(0, used[0].1 as usize)[NET_HDR_LEN..],
        &waiting[..]
    );
}

#[test]
fn out_of_range_rx_head_is_skipped() {
    let mut r = rig();
    r.rx.publish(&r.mem, QSIZE + 2);
    r.post_rx(0, 2048);
    let f = frame(90, 5);
    r.peer.send(&f).unwrap();
    let used = r.rx.wait_used(&r.mem, 1);
    assert_eq!(used[0].1 as usize, NET_HDR_LEN + f.len());
    assert_eq!(&r.rx_bytes(0, used[0].1 as usize)[NET_HDR_LEN..], &f[..]);
}

/// A VM pause, device side: while paused a frame from the wire is not written into the guest's
/// receive buffers and a frame the guest queued is not sent; resume delivers both. Pause and
/// resume are idempotent, and a paused device still resets.
#[test]
fn paused_device_moves_no_frame_until_resume() {
    let mut r = rig_named("paused");
    for i in 0..4 {
        r.post_rx(i, 2048);
    }
    let before = frame(100, 1);
    r.peer.send(&before).unwrap();
    r.rx.wait_used(&r.mem, 1);
    r.dev.pause(Duration::from_secs(10)).unwrap();
    r.dev.pause(Duration::ZERO).unwrap();
    let inbound = frame(120, 2);
    r.peer.send(&inbound).unwrap();
    let outbound = frame(80, 3);
    r.send(0, &outbound);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r.rx.take_used(&r.mem), vec![], "received while paused");
    let mut buf = vec![0; 4096];
    assert_eq!(r.peer.recv(&mut buf).unwrap(), None, "sent while paused");
    assert_eq!(r.dev.counters().snapshot().rx_frames, 1);
    r.dev.resume();
    r.dev.resume();
    let used = r.rx.wait_used(&r.mem, 1);
    assert_eq!(
        &r.rx_bytes(1, used[0].1 as usize)[NET_HDR_LEN..],
        &inbound[..]
    );
    assert_eq!(r.peer_recv().as_deref(), Some(&outbound[..]));
    r.dev.pause(Duration::from_secs(10)).unwrap();
    reset_in_time(r.dev);
}
