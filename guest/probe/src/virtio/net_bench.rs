//! `NET i BLAST` / `NET i SINK`: frame-rate measurement between probes. Every blast frame carries
//! a magic, a run id and a sequence number (layout below), so the sink counts loss and
//! reordering. Both sides work in batches: the blaster fills every free transmit buffer, the
//! sink re-posts every consumed receive buffer, and each batch is published with one
//! notification.
//!
//! Frame: dst MAC, src MAC, ethertype 0x88b5, `VBLS`, run id (u32 LE), sequence (u64 LE), then
//! zero padding up to the frame size.

use super::{Net, BUF_LEN, HDR_LEN, STALL_TICKS, TX_BUFS};
use crate::arch::rdtsc;
use crate::virtio::queue::Buf;

pub const MIN_FRAME: usize = 30;
const MAGIC: &[u8; 4] = b"VBLS";
const SEQ_AT: usize = 22;

pub enum Limit {
    Frames(u64),
    Ticks(u64),
}

pub struct BlastOutcome {
    pub sent: u64,
    pub ticks: u64,
    /// Transmit notifications (VM exits) during the blast.
    pub kicks: u64,
}

#[derive(Default)]
pub struct SinkOutcome {
    pub frames: u64,
    pub bytes: u64,
    /// Ticks from the first to the last blast frame received.
    pub ticks: u64,
    /// Sequence numbers below the highest seen + 1 that never arrived.
    pub lost: u64,
    /// Frames that arrived after a higher sequence number.
    pub reordered: u64,
    /// Frames that were not blast frames of the run the sink locked onto.
    pub other: u64,
    /// Receive-queue notifications (VM exits) while sinking.
    pub kicks: u64,
}

impl Net {
    /// Sends blast frames of `size` bytes to `dst` until `limit`.
    pub fn blast(
        &mut self,
        size: usize,
        dst: [u8; 6],
        limit: Limit,
    ) -> Result<BlastOutcome, super::Error> {
        if !(MIN_FRAME..=super::FRAME_MAX).contains(&size) {
            return Err(super::Error::TooLong);
        }
        // Every tx buffer gets the constant part once; only the sequence changes per frame.
        let run = (rdtsc() >> 4) as u32;
        let src = self.mac;
        for slot in 0..TX_BUFS {
            let f = self.tx_frame(slot);
            f[..HDR_LEN + size].fill(0);
            let e = &mut f[HDR_LEN..];
            e[..6].copy_from_slice(&dst);
            e[6..12].copy_from_slice(&src);
            e[12..14].copy_from_slice(&[0x88, 0xb5]);
            e[14..18].copy_from_slice(MAGIC);
            e[18..22].copy_from_slice(&run.to_le_bytes());
        }
        let kicks_before = self.tx.kicks;
        let start = rdtsc();
        let mut sent = 0u64;
        let mut stalled_since = start;
        loop {
            let now = rdtsc();
            let more = match limit {
                Limit::Frames(n) => sent < n,
                Limit::Ticks(t) => now.wrapping_sub(start) < t,
            };
            if !more {
                break;
            }
            self.reclaim_tx();
            let mut added = 0;
            for slot in 0..TX_BUFS {
                if self.tx_inflight[slot].is_some() {
                    continue;
                }
                if let Limit::Frames(n) = limit {
                    if sent + added >= n {
                        break;
                    }
                }
                let f = self.tx_frame(slot);
                f[HDR_LEN + SEQ_AT..HDR_LEN + SEQ_AT + 8]
                    .copy_from_slice(&(sent + added).to_le_bytes());
                let buf = Buf {
                    addr: self.tx_bufs + (slot * BUF_LEN) as u64,
                    len: (HDR_LEN + size) as u32,
                    device_writes: false,
                };
                let Some(head) = self.tx.add(&[buf]) else {
                    break;
                };
                self.tx_inflight[slot] = Some(head);
                added += 1;
            }
            if added > 0 {
                self.tx.publish();
                sent += added;
                stalled_since = rdtsc();
            } else if rdtsc().wrapping_sub(stalled_since) > STALL_TICKS {
                return Err(super::Error::Stalled);
            }
        }
        let ticks = rdtsc().wrapping_sub(start).max(1);
        // Let the device finish the last batch, so a following command finds free buffers.
        let drain_from = rdtsc();
        while self.tx_inflight.iter().any(Option::is_some)
            && rdtsc().wrapping_sub(drain_from) < STALL_TICKS
        {
            self.reclaim_tx();
            core::hint::spin_loop();
        }
        Ok(BlastOutcome {
            sent,
            ticks,
            kicks: self.tx.kicks - kicks_before,
        })
    }

    /// Counts blast frames until TSC value `deadline`, or until `idle` ticks pass without a
    /// frame once the first one has arrived.
    pub fn sink(&mut self, deadline: u64, idle: u64) -> SinkOutcome {
        let mut out = SinkOutcome::default();
        let kicks_before = self.rx.kicks;
        let mut run: Option<u32> = None;
        let (mut first, mut last) = (0u64, 0u64);
        let mut highest: Option<u64> = None;
        loop {
            let mut consumed = 0;
            while let Some((head, len)) = self.rx.pop_used() {
                let now = rdtsc();
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
                let frame = &data[HDR_LEN..];
                match parse(frame) {
                    Some((r, seq)) if run.is_none_or(|x| x == r) => {
                        if run.is_none() {
                            run = Some(r);
                            first = now;
                        }
                        last = now;
                        out.frames += 1;
                        out.bytes += frame.len() as u64;
                        match highest {
                            Some(h) if seq <= h => out.reordered += 1,
                            _ => highest = Some(seq),
                        }
                    }
                    _ => out.other += 1,
                }
                let buf = Buf {
                    addr,
                    len: BUF_LEN as u32,
                    device_writes: true,
                };
                if let Some(h) = self.rx.add(&[buf]) {
                    self.rx_heads[i] = h;
                }
                consumed += 1;
            }
            if consumed > 0 {
                self.rx.publish();
                continue;
            }
            let now = rdtsc();
            if now >= deadline || (run.is_some() && now.wrapping_sub(last) > idle) {
                break;
            }
            core::hint::spin_loop();
        }
        out.ticks = last.wrapping_sub(first);
        out.kicks = self.rx.kicks - kicks_before;
        out.lost = highest.map_or(0, |h| (h + 1).saturating_sub(out.frames));
        out
    }

    fn tx_frame(&mut self, slot: usize) -> &mut [u8] {
        let addr = self.tx_bufs + (slot * BUF_LEN) as u64;
        // SAFETY: tx buffer `slot` is not in flight (callers check) and is BUF_LEN bytes of
        // arena memory only this driver uses.
        unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, BUF_LEN) }
    }
}

/// (run id, sequence) of a blast frame.
fn parse(frame: &[u8]) -> Option<(u32, u64)> {
    if frame.len() < MIN_FRAME || frame[12..14] != [0x88, 0xb5] || &frame[14..18] != MAGIC {
        return None;
    }
    let run = u32::from_le_bytes(frame[18..22].try_into().ok()?);
    let seq = u64::from_le_bytes(frame[SEQ_AT..SEQ_AT + 8].try_into().ok()?);
    Some((run, seq))
}
