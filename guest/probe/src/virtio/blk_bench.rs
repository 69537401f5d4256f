//! `DISK i BENCH`: keeps `qd` requests of `bs` bytes in flight on the disk's first `queues`
//! request queues (slot `i` on queue `i % queues`) for a given time and records each
//! request's latency from the TSC. Completions are reaped in batches and the refills published
//! with one notification per queue, so the probe itself adds at most one kick per queue and
//! batch. Data buffers live in guest RAM above the probe's 8 MiB (caller-checked).

use super::{Blk, Error, MAX_SEGS_PER_REQ, SECTOR, T_IN, T_OUT};
use crate::arch::rdtsc;
use crate::bench::Histogram;
use crate::pattern;
use crate::virtio::queue::Buf;

/// Most requests in flight at once (also bounded by the queue size).
pub const MAX_QD: usize = 128;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Sequential,
    Random,
}

pub struct Spec {
    pub write: bool,
    pub pattern: Pattern,
    pub bs: u64,
    pub qd: usize,
    pub ticks: u64,
    /// Guest-physical start of `qd * bs` bytes of free RAM for the data buffers.
    pub buffers: u64,
    /// Writes carry the disk pattern for this seed (so VERIFY can check them), reads are
    /// verified against it; None moves the bytes unchecked (the fast, measuring mode).
    pub seed: Option<u64>,
    /// Request queues to spread the `qd` requests over (1: queue 0 only, as before MQ).
    pub queues: usize,
}

pub struct Outcome {
    pub ios: u64,
    pub bytes: u64,
    pub ticks: u64,
    pub hist: Histogram,
    /// Notifications (VM exits) the probe sent during the run.
    pub kicks: u64,
}

/// Per request: a virtio-blk header (16 bytes) and the status byte, 32 bytes apart.
#[repr(C, align(4096))]
struct Meta([[u8; 32]; MAX_QD]);
static mut META: Meta = Meta([[0; 32]; MAX_QD]);

#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    queue: usize,
    head: u16,
    offset: u64,
    started: u64,
}

impl Blk {
    /// Runs the benchmark; the first failed request (status, mismatch) ends it with an error.
    pub fn bench(&mut self, spec: &Spec) -> Result<Outcome, Error> {
        let disk_bytes = self.sectors() * SECTOR;
        let segs = spec.bs.div_ceil(self.seg_bytes as u64) as usize;
        let nq = spec.queues;
        let per_queue = spec.qd.div_ceil(nq.max(1));
        let smallest = (0..nq)
            .filter_map(|q| self.queue(q).map(|v| v.size() as usize))
            .min()
            .unwrap_or(0);
        if nq == 0
            || nq > self.queues()
            || per_queue * (segs + 2) > smallest
            || spec.bs == 0
            || !spec.bs.is_multiple_of(SECTOR)
            || spec.bs > disk_bytes
            || segs > self.seg_limit
            || spec.qd == 0
            || spec.qd > MAX_QD
            || spec.qd * (segs + 2) > self.vq.size() as usize
        {
            return Err(Error::Range);
        }
        let blocks = disk_bytes / spec.bs;
        let mut slots = [Slot::default(); MAX_QD];
        let mut rng = rdtsc() | 1;
        let mut next_seq = 0u64;
        let mut out = Outcome {
            ios: 0,
            bytes: 0,
            ticks: 0,
            hist: Histogram::new(),
            kicks: 0,
        };
        let kicks_before = self.kicks(nq);
        let mut first_error = None;
        let start = rdtsc();
        let end = start.saturating_add(spec.ticks);
        let mut busy = 0usize;
        let mut last_done = start;
        loop {
            let now = rdtsc();
            let mut added = [false; super::MAX_QUEUES];
            if now < end && first_error.is_none() {
                for (i, slot) in slots[..spec.qd].iter_mut().enumerate() {
                    if slot.busy {
                        continue;
                    }
                    let block = match spec.pattern {
                        Pattern::Sequential => {
                            let b = next_seq;
                            next_seq = (next_seq + 1) % blocks;
                            b
                        }
                        Pattern::Random => xorshift(&mut rng) % blocks,
                    };
                    let offset = block * spec.bs;
                    let data = spec.buffers + i as u64 * spec.bs;
                    if let (true, Some(seed)) = (spec.write, spec.seed) {
                        // SAFETY: this slot's buffer is idle RAM the caller reserved for us.
                        let words = unsafe {
                            core::slice::from_raw_parts_mut(data as *mut u64, spec.bs as usize / 8)
                        };
                        pattern::fill(words, seed, offset);
                    }
                    let queue = i % nq;
                    let Some(head) = self.bench_submit(queue, i, spec, offset / SECTOR, data)
                    else {
                        break;
                    };
                    *slot = Slot {
                        busy: true,
                        queue,
                        head,
                        offset,
                        started: rdtsc(),
                    };
                    busy += 1;
                    added[queue] = true;
                }
            }
            for (q, _) in added.iter().enumerate().filter(|(_, &a)| a) {
                if let Some(vq) = self.queue(q) {
                    vq.publish();
                }
            }
            if busy == 0 {
                break;
            }
            // Reap everything that has completed; spin until at least one has.
            let mut reaped = 0;
            let wait_from = rdtsc();
            loop {
                for (q, head) in (0..nq).flat_map(|q| self.drain_queue(q).map(move |h| (q, h))) {
                    let done = rdtsc();
                    let Some(i) = slots[..spec.qd]
                        .iter()
                        .position(|s| s.busy && s.queue == q && s.head == head)
                    else {
                        continue;
                    };
                    slots[i].busy = false;
                    busy -= 1;
                    reaped += 1;
                    last_done = done;
                    out.hist.record(done.wrapping_sub(slots[i].started));
                    out.ios += 1;
                    out.bytes += spec.bs;
                    // SAFETY: the device has completed this request's status byte.
                    let status = unsafe { core::ptr::read_volatile(meta(i).add(16)) };
                    if status != 0 {
                        first_error.get_or_insert(Error::Status(status));
                    } else if let (false, Some(seed)) = (spec.write, spec.seed) {
                        let data = spec.buffers + i as u64 * spec.bs;
                        // SAFETY: the device has completed the read into this buffer.
                        let words = unsafe {
                            core::slice::from_raw_parts(data as *const u64, spec.bs as usize / 8)
                        };
                        if let Some(off) = pattern::verify(words, seed, slots[i].offset) {
                            first_error.get_or_insert(Error::Mismatch(off));
                        }
                    }
                }
                if reaped > 0 {
                    break;
                }
                if rdtsc().wrapping_sub(wait_from) > super::STALL_TICKS {
                    return Err(Error::Timeout);
                }
                core::hint::spin_loop();
            }
        }
        out.ticks = last_done.wrapping_sub(start).max(1);
        out.kicks = self.kicks(nq) - kicks_before;
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Notifications sent so far on the first `nq` queues.
    fn kicks(&mut self, nq: usize) -> u64 {
        (0..nq).filter_map(|q| self.queue(q).map(|v| v.kicks)).sum()
    }

    /// Heads completed on queue `q` since the last look (at most one ring's worth).
    fn drain_queue(&mut self, q: usize) -> impl Iterator<Item = u16> + use<> {
        let mut heads = [0u16; MAX_QD];
        let mut n = 0;
        if let Some(vq) = self.queue(q) {
            while n < MAX_QD {
                let Some((head, _)) = vq.pop_used() else {
                    break;
                };
                heads[n] = head;
                n += 1;
            }
        }
        heads.into_iter().take(n)
    }

    fn bench_submit(
        &mut self,
        queue: usize,
        i: usize,
        spec: &Spec,
        sector: u64,
        data: u64,
    ) -> Option<u16> {
        let hdr = meta(i);
        let kind = if spec.write { T_OUT } else { T_IN };
        // SAFETY: slot `i`'s header and status are not in flight (the caller checked `busy`).
        unsafe {
            core::ptr::write_volatile(hdr as *mut u32, kind);
            core::ptr::write_volatile(hdr.add(4) as *mut u32, 0);
            core::ptr::write_volatile(hdr.add(8) as *mut u64, sector);
            core::ptr::write_volatile(hdr.add(16), 0xff);
        }
        let mut bufs = [Buf {
            addr: 0,
            len: 0,
            device_writes: false,
        }; MAX_SEGS_PER_REQ + 2];
        bufs[0] = Buf {
            addr: hdr as u64,
            len: 16,
            device_writes: false,
        };
        let mut n = 1;
        let mut off = 0;
        while off < spec.bs {
            let len = (spec.bs - off).min(self.seg_bytes as u64);
            bufs[n] = Buf {
                addr: data + off,
                len: len as u32,
                device_writes: !spec.write,
            };
            n += 1;
            off += len;
        }
        bufs[n] = Buf {
            addr: hdr as u64 + 16,
            len: 1,
            device_writes: true,
        };
        self.queue(queue)?.add(&bufs[..n + 1])
    }
}

fn meta(i: usize) -> *mut u8 {
    // SAFETY: only the address is taken; `i` < MAX_QD is guaranteed by `bench`'s checks.
    unsafe { core::ptr::addr_of_mut!(META.0[i]) as *mut u8 }
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}
