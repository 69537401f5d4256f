//! virtio-net: one receive and one transmit queue, polled. Every received frame lands in a
//! pre-posted 2 KiB buffer; transmit buffers are reclaimed lazily from the used ring.

use super::mmio::Transport;
use super::queue::{Buf, Virtqueue};
use crate::arch::rdtsc;
use crate::arena;

#[path = "net_bench.rs"]
pub mod bench;

const F_MAC: u64 = 1 << 5;
/// VIRTIO_RING_F_EVENT_IDX: the device names the avail index it wants a kick at, so a blast
/// kicks once per refill of a drained ring, not per frame.
const F_EVENT_IDX: u64 = 1 << 29;
/// virtio_net_hdr with num_buffers: always 12 bytes with VIRTIO_F_VERSION_1.
const HDR_LEN: usize = 12;
const BUF_LEN: usize = 2048;
pub const FRAME_MAX: usize = BUF_LEN - HDR_LEN;
const RX_BUFS: usize = 64;
/// As many as the benchmark's window (64), so one publish can carry a whole window.
const TX_BUFS: usize = 64;
const STALL_TICKS: u64 = 100_000_000_000;

pub struct Net {
    rx: Virtqueue,
    tx: Virtqueue,
    pub mac: [u8; 6],
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
}

impl Net {
    pub fn new(transport: Transport) -> Option<Self> {
        let features = transport.begin_init(F_MAC | F_EVENT_IDX)?;
        let mut mac = [0u8; 6];
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = transport.config_read8(i as u64);
            }
        }
        let (Some(mut rx), Some(mut tx)) = (
            Virtqueue::new(transport, 0, RX_BUFS as u16),
            Virtqueue::new(transport, 1, TX_BUFS as u16),
        ) else {
            transport.fail();
            return None;
        };
        if features & F_EVENT_IDX != 0 {
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
        transport.finish_init();
        rx.publish();
        Some(Net {
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
