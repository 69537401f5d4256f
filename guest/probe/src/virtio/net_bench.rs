//! `NET i BLAST` / `NET i SINK`: frame-rate measurement between probes. Every blast frame carries
//! a magic, a run id and a sequence number (layout below), so the sink counts loss and
//! reordering. Both sides work in batches: the blaster fills every free transmit buffer, the
//! sink re-posts every consumed receive buffer, and each batch is published with one
//! notification.
//!
//! Backpressure (optional, the benchmark's measuring mode): a sink given `ack=K` sends an ack
//! frame back to the blaster after every K frames it has counted and whose buffers it has given
//! back to the device; a blaster given `window=W` keeps at most W frames beyond the highest
//! acknowledged sequence number in flight. With W no larger than the sink's receive ring nothing
//! is ever dropped for want of a buffer, so what is measured is the rate at which frames are
//! delivered, not how many a flooded sink happened to catch. An ack lost on the way (or a tail of
//! lost frames that never makes K) would stall the window: after `ACK_TIMEOUT_MS` without
//! progress the blaster opens it again and counts a timeout.
//!
//! Frame: dst MAC, src MAC, ethertype 0x88b5, `VBLS`, run id (u32 LE), sequence (u64 LE), then
//! zero padding up to the frame size. Ack: dst MAC (the blaster), src MAC, ethertype 0x88b5,
//! `VBLA`, run id (u32 LE), next sequence expected (u64 LE: highest seen + 1), 30 bytes.

use super::{Pair, BUF_LEN, HDR_LEN, STALL_TICKS, TX_BUFS};
use crate::arch::rdtsc;
use crate::virtio::queue::Buf;

pub const MIN_FRAME: usize = 30;
const MAGIC: &[u8; 4] = b"VBLS";
const ACK_MAGIC: &[u8; 4] = b"VBLA";
const SEQ_AT: usize = 22;
/// A window without an ack for this long is opened again (the ack or the frames were lost).
/// Long, because on a loaded 2-core host a vCPU thread is often off its core for 10+ ms, and
/// re-opening then overruns the sink; real stalls are rare (the sink acks on idle, below).
pub const ACK_TIMEOUT_MS: u64 = 200;
/// A sink holding unacknowledged frames acks after this long without a new one (µs).
const ACK_IDLE_US: u64 = 100;
/// A sink locks onto a run only at a frame numbered below this: frames of an earlier run still
/// queued or in flight must not be taken for the new one.
const LOCK_BELOW_SEQ: u64 = 1 << 16;

/// Flow control of a blast: at most `frames` unacknowledged, re-opened after `timeout` ticks.
#[derive(Clone, Copy)]
pub struct Window {
    pub frames: u64,
    pub timeout: u64,
}

pub enum Limit {
    Frames(u64),
    Ticks(u64),
}

/// An early end for a timed blast: `asked` is polled every `every` ticks (a console byte: one
/// port read, an exit, so not per frame) and ends the blast when it says so.
pub struct Stop<'a> {
    pub every: u64,
    pub asked: &'a mut dyn FnMut() -> bool,
}

pub struct BlastOutcome {
    pub sent: u64,
    pub ticks: u64,
    /// Transmit notifications (VM exits) during the blast.
    pub kicks: u64,
    /// Acks received, and windows re-opened for want of one (with a window only).
    pub acks: u64,
    pub timeouts: u64,
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
    /// Ack frames sent (with `ack=K` only).
    pub acks: u64,
}

impl Pair {
    /// Sends blast frames of `size` bytes to `dst` until `limit`.
    pub fn blast(
        &mut self,
        size: usize,
        dst: [u8; 6],
        limit: Limit,
        window: Option<Window>,
        mut stop: Option<Stop<'_>>,
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
        // Next sequence number the sink has not acknowledged; when it last moved.
        let (mut acked, mut acked_at) = (0u64, start);
        let (mut acks, mut timeouts) = (0u64, 0u64);
        let mut polled = start;
        loop {
            let now = rdtsc();
            let more = match limit {
                Limit::Frames(n) => sent < n,
                Limit::Ticks(t) => now.wrapping_sub(start) < t,
            };
            if !more {
                break;
            }
            if let Some(stop) = stop.as_mut() {
                if now.wrapping_sub(polled) >= stop.every {
                    polled = now;
                    if (stop.asked)() {
                        break;
                    }
                }
            }
            self.reclaim_tx();
            // The frames/s ceiling this window allows: how far past the last ack we may go.
            let mut allowed = u64::MAX;
            if let Some(w) = window {
                self.drain_rx(|frame| {
                    if let Some((r, next)) = parse_with(frame, ACK_MAGIC) {
                        if r == run && next > acked && next <= sent {
                            acked = next;
                            acked_at = now;
                        }
                        acks += 1;
                    }
                });
                if sent > acked && now.wrapping_sub(acked_at) > w.timeout {
                    acked = sent;
                    acked_at = now;
                    timeouts += 1;
                }
                allowed = (acked + w.frames).saturating_sub(sent);
            }
            let mut added = 0;
            for slot in 0..TX_BUFS {
                if self.tx_inflight[slot].is_some() {
                    continue;
                }
                if added >= allowed {
                    break;
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
            } else if allowed == 0 {
                // Waiting for an ack is not a stall of the device.
                stalled_since = rdtsc();
                core::hint::spin_loop();
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
            acks,
            timeouts,
        })
    }

    /// Counts blast frames until TSC value `deadline`, or until `idle` ticks pass without a
    /// frame once the first one has arrived.
    /// With `ack_every`, acknowledges every that many frames to the blaster (module header).
    /// `khz` converts the idle-ack delay to ticks.
    pub fn sink(
        &mut self,
        deadline: u64,
        idle: u64,
        ack_every: Option<u64>,
        khz: u64,
    ) -> SinkOutcome {
        let mut out = SinkOutcome::default();
        let kicks_before = self.rx.kicks;
        let mut run: Option<u32> = None;
        let (mut first, mut last) = (0u64, 0u64);
        let mut highest: Option<u64> = None;
        // Where acks go (the blaster's MAC), and frames counted since the last ack.
        let mut peer = [0u8; 6];
        let mut unacked = 0u64;
        let ack_idle = ACK_IDLE_US * khz / 1000;
        // Frames already waiting are an earlier run's leftovers.
        self.drain_rx(|_| {});
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
                    Some((r, seq)) if run.map_or(seq < LOCK_BELOW_SEQ, |x| x == r) => {
                        if run.is_none() {
                            run = Some(r);
                            first = now;
                            peer.copy_from_slice(&frame[6..12]);
                        }
                        unacked += 1;
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
                // Only now are the buffers of the acknowledged frames back with the device.
                if let (Some(k), Some(r), Some(h)) = (ack_every, run, highest) {
                    if unacked >= k && self.try_send_ack(peer, r, h + 1) {
                        unacked = 0;
                        out.acks += 1;
                    }
                }
                continue;
            }
            let now = rdtsc();
            // Nothing new for a while and frames unacknowledged (fewer than k, or an ack that
            // found no transmit buffer): ack now rather than leave the blaster waiting.
            if let (Some(_), Some(r), Some(h)) = (ack_every, run, highest) {
                if unacked > 0
                    && now.wrapping_sub(last) > ack_idle
                    && self.try_send_ack(peer, r, h + 1)
                {
                    unacked = 0;
                    out.acks += 1;
                }
            }
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

    /// Every received frame (without the virtio header) to `f`; buffers go back to the device,
    /// published with one notification at most.
    fn drain_rx(&mut self, mut f: impl FnMut(&[u8])) {
        let mut consumed = 0;
        while let Some((head, len)) = self.rx.pop_used() {
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
            f(&data[HDR_LEN..]);
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
        }
    }

    /// Sends an ack if a transmit buffer is free now (never waits: the next ack carries more).
    fn try_send_ack(&mut self, dst: [u8; 6], run: u32, next: u64) -> bool {
        self.reclaim_tx();
        let Some(slot) = self.tx_inflight.iter().position(|s| s.is_none()) else {
            return false;
        };
        let src = self.mac;
        let f = self.tx_frame(slot);
        f[..HDR_LEN + MIN_FRAME].fill(0);
        let e = &mut f[HDR_LEN..];
        e[..6].copy_from_slice(&dst);
        e[6..12].copy_from_slice(&src);
        e[12..14].copy_from_slice(&[0x88, 0xb5]);
        e[14..18].copy_from_slice(ACK_MAGIC);
        e[18..22].copy_from_slice(&run.to_le_bytes());
        e[SEQ_AT..SEQ_AT + 8].copy_from_slice(&next.to_le_bytes());
        let buf = Buf {
            addr: self.tx_bufs + (slot * BUF_LEN) as u64,
            len: (HDR_LEN + MIN_FRAME) as u32,
            device_writes: false,
        };
        let Some(head) = self.tx.add(&[buf]) else {
            return false;
        };
        self.tx_inflight[slot] = Some(head);
        self.tx.publish();
        true
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
    parse_with(frame, MAGIC)
}

/// (run id, sequence) of a blast frame (`VBLS`) or an ack (`VBLA`).
fn parse_with(frame: &[u8], magic: &[u8; 4]) -> Option<(u32, u64)> {
    if frame.len() < MIN_FRAME || frame[12..14] != [0x88, 0xb5] || &frame[14..18] != magic {
        return None;
    }
    let run = u32::from_le_bytes(frame[18..22].try_into().ok()?);
    let seq = u64::from_le_bytes(frame[SEQ_AT..SEQ_AT + 8].try_into().ok()?);
    Some((run, seq))
}
