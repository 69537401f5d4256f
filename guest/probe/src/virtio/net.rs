//! virtio-net, polled: one receive and one transmit queue per queue pair, up to `MAX_PAIRS`
//! pairs with VIRTIO_NET_F_MQ (the count in use is set over the control queue, `net_ctrl.rs`).
//! Every received frame lands in a pre-posted 2 KiB buffer; transmit buffers are reclaimed
//! lazily from the used ring. Each pair owns its buffers, so a command on one pair never
//! touches another's ring.

use super::mmio::Transport;
use super::queue::{Buf, Virtqueue};
use crate::arch::rdtsc;
use crate::arena;

#[path = "net_bench.rs"]
pub mod bench;
#[path = "net_ctrl.rs"]
mod ctrl;

const F_MAC: u64 = 1 << 5;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;
/// VIRTIO_RING_F_EVENT_IDX: the device names the avail index it wants a kick at, so a blast
/// kicks once per refill of a drained ring, not per frame.
const F_EVENT_IDX: u64 = 1 << 29;
/// Config space offset of `max_virtqueue_pairs` (after mac[6] and status u16).
const CONFIG_MAX_PAIRS: u64 = 8;
/// Pairs set up at most: as many as Vireo's VMM offers. Each takes ~260 KiB of the arena.
pub const MAX_PAIRS: usize = 4;
/// virtio_net_hdr with num_buffers: always 12 bytes with VIRTIO_F_VERSION_1.
const HDR_LEN: usize = 12;
const BUF_LEN: usize = 2048;
pub const FRAME_MAX: usize = BUF_LEN - HDR_LEN;
const RX_BUFS: usize = 64;
/// As many as the benchmark's window (64), so one publish can carry a whole window.
const TX_BUFS: usize = 64;
const STALL_TICKS: u64 = 100_000_000_000;

pub struct Net {
    pub mac: [u8; 6],
    pairs: [Option<Pair>; MAX_PAIRS],
    /// Pairs set up (a prefix of `pairs`), and how many of them the device uses now.
    set_up: usize,
    active: usize,
    /// Present when MQ and CTRL_VQ were negotiated and the queue could be set up.
    ctrl: Option<ctrl::Ctrl>,
}

/// One receive queue and one transmit queue with their buffers.
pub struct Pair {
    rx: Virtqueue,
    tx: Virtqueue,
    mac: [u8; 6],
    rx_bufs: u64,
    rx_count: usize,
    tx_bufs: u64,
    /// Head descriptor id of the chain using each tx buffer, if in flight.
    tx_inflight: [Option<u16>; TX_BUFS],
    /// Head id per rx buffer (single-descriptor chains).
    rx_heads: [u16; RX_BUFS],
}

pub enum Error {
    TooLong,
    Stalled,
    /// No such pair set up, or a pair count out of range.
    NoPair,
    /// The pair is set up but the device does not use it now (`NET i PAIRS`).
    PairOff,
    /// The device answered the control command with VIRTIO_NET_ERR.
    Refused,
}

impl Net {
    pub fn new(transport: Transport) -> Option<Self> {
        let features = transport.begin_init(F_MAC | F_EVENT_IDX | F_CTRL_VQ | F_MQ)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = transport.config_read8(i as u64);
            }
        }
        // The control queue comes after the device's last pair, however many of them we use.
        let device_pairs = if features & (F_MQ | F_CTRL_VQ) == F_MQ | F_CTRL_VQ {
            u16::from_le_bytes([
                transport.config_read8(CONFIG_MAX_PAIRS),
                transport.config_read8(CONFIG_MAX_PAIRS + 1),
            ])
            .max(1)
        } else {
            1
        };
        let event_idx = features & F_EVENT_IDX != 0;
        let mut pairs = [const { None }; MAX_PAIRS];
        let mut set_up = 0;
        for (p, slot) in pairs
            .iter_mut()
            .enumerate()
            .take((device_pairs as usize).min(MAX_PAIRS))
        {
            // Pair 0 is required; a later one that does not fit the arena just is not used.
            match Pair::new(transport, p as u16, event_idx, mac) {
                Some(pair) => *slot = Some(pair),
                None if p == 0 => {
                    transport.fail();
                    return None;
                }
                None => break,
            }
            set_up += 1;
        }
        let ctrl = if device_pairs > 1 {
            ctrl::Ctrl::new(transport, 2 * device_pairs, event_idx)
        } else {
            None
        };
        if ctrl.is_none() {
            set_up = 1;
        }
        transport.finish_init();
        for pair in pairs.iter_mut().flatten() {
            pair.rx.publish();
        }
        Some(Net {
            mac,
            pairs,
            set_up,
            active: 1,
            ctrl,
        })
    }

    /// (pairs in use, pairs set up).
    pub fn pair_counts(&self) -> (usize, usize) {
        (self.active, self.set_up)
    }

    /// Tells the device to use the first `n` pairs (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET). Without
    /// multiqueue only `n = 1` is accepted, and needs no command.
    pub fn set_pairs(&mut self, n: usize) -> Result<(), Error> {
        if n == 0 || n > self.set_up {
            return Err(Error::NoPair);
        }
        if let Some(ctrl) = self.ctrl.as_mut() {
            ctrl.set_pairs(n as u16)?;
        }
        self.active = n;
        Ok(())
    }

    /// Pair `p` for receiving: any pair set up (a pair turned off just gets no new frames).
    pub fn rx_pair(&mut self, p: usize) -> Result<&mut Pair, Error> {
        if p >= self.set_up {
            return Err(Error::NoPair);
        }
        self.pairs[p].as_mut().ok_or(Error::NoPair)
    }

    /// Pair `p` for transmitting: only a pair in use, since the device takes nothing from the
    /// others and their buffers would never come back.
    pub fn tx_pair(&mut self, p: usize) -> Result<&mut Pair, Error> {
        if p >= self.set_up {
            return Err(Error::NoPair);
        }
        if p >= self.active {
            return Err(Error::PairOff);
        }
        self.pairs[p].as_mut().ok_or(Error::NoPair)
    }
}

impl Pair {
    fn new(transport: Transport, p: u16, event_idx: bool, mac: [u8; 6]) -> Option<Self> {
        let mut rx = Virtqueue::new(transport, 2 * p, RX_BUFS as u16)?;
        let mut tx = Virtqueue::new(transport, 2 * p + 1, TX_BUFS as u16)?;
        if event_idx {
            rx.set_event_idx();
            tx.set_event_idx();
        }
        let rx_count = (rx.size() as usize).min(RX_BUFS);
        let rx_bufs = arena::alloc(BUF_LEN * rx_count, 4096)?;
        let tx_bufs = arena::alloc(BUF_LEN * TX_BUFS, 4096)?;
        let mut rx_heads = [0u16; RX_BUFS];
        for (i, head) in rx_heads.iter_mut().enumerate().take(rx_count) {
            let buf = Buf {
                addr: rx_bufs + (i * BUF_LEN) as u64,
                len: BUF_LEN as u32,
                device_writes: true,
            };
            *head = rx.add(&[buf])?;
        }
        Some(Pair {
            rx,
            tx,
            mac,
            rx_bufs,
            rx_count,
            tx_bufs,
            tx_inflight: [None; TX_BUFS],
            rx_heads,
        })
    }

    fn reclaim_tx(&mut self) {
        while let Some((head, _)) = self.tx.pop_used() {
            for slot in self.tx_inflight.iter_mut() {
                if *slot == Some(head) {
                    *slot = None;
                }
            }
        }
    }

    pub fn send(&mut self, frame: &[u8]) -> Result<(), Error> {
        if frame.len() > FRAME_MAX {
            return Err(Error::TooLong);
        }
        let start = rdtsc();
        let slot = loop {
            self.reclaim_tx();
            if let Some(i) = self.tx_inflight.iter().position(|s| s.is_none()) {
                break i;
            }
            if rdtsc().wrapping_sub(start) > STALL_TICKS {
                return Err(Error::Stalled);
            }
            core::hint::spin_loop();
        };
        let addr = self.tx_bufs + (slot * BUF_LEN) as u64;
        // SAFETY: tx buffer `slot` is not in flight; it is BUF_LEN bytes of arena memory.
        let buf = unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) };
        buf[..HDR_LEN].fill(0);
        buf[HDR_LEN..HDR_LEN + frame.len()].copy_from_slice(frame);
        let len = (HDR_LEN + frame.len()) as u32;
        let head = self
            .tx
            .add(&[Buf {
                addr,
                len,
                device_writes: false,
            }])
            .ok_or(Error::Stalled)?;
        self.tx_inflight[slot] = Some(head);
        self.tx.publish();
        Ok(())
    }

    /// Passes the next received frame (without the virtio header) to `f`, then gives the buffer
    /// back to the device. Returns false if none arrived before TSC value `deadline`.
    pub fn recv<R>(&mut self, deadline: u64, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        loop {
            if let Some((head, len)) = self.rx.pop_used() {
                let Some(i) = self.rx_heads[..self.rx_count]
                    .iter()
                    .position(|&h| h == head)
                else {
                    continue;
                };
                let addr = self.rx_bufs + (i * BUF_LEN) as u64;
                let len = (len as usize).clamp(HDR_LEN, BUF_LEN);
                // SAFETY: the device has finished writing this rx buffer.
                let data = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
                let r = f(&data[HDR_LEN..]);
                let buf = Buf {
                    addr,
                    len: BUF_LEN as u32,
                    device_writes: true,
                };
                if let Some(h) = self.rx.add(&[buf]) {
                    self.rx_heads[i] = h;
                }
                self.rx.publish();
                return Some(r);
            }
            if rdtsc() >= deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}
