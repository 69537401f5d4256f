//! virtio-blk: large pattern writes and verifying reads, pipelined over several in-flight
//! requests so the device always has work while the probe generates or checks the next chunk.

use super::mmio::Transport;
use super::queue::{Buf, Virtqueue};
use crate::arch::rdtsc;
use crate::{arena, pattern};

#[path = "blk_bench.rs"]
pub mod bench;

const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_MQ: `num_queues` request queues; without it only queue 0 exists.
const F_MQ: u64 = 1 << 12;
/// VIRTIO_RING_F_EVENT_IDX: kick only at the avail index the device names.
const F_EVENT_IDX: u64 = 1 << 29;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

pub const SECTOR: u64 = 512;
/// Bytes of one request's data; the probe keeps up to SLOTS of them in flight.
const SLOT_BYTES: usize = 512 << 10;
const SLOTS: usize = 4;
const MAX_SEGS_PER_REQ: usize = 64;
/// Most request queues the probe sets up on one disk (BENCH `queues=`); a device offering
/// more gets its first MAX_QUEUES used.
pub const MAX_QUEUES: usize = 4;
/// Entries per extra request queue: enough for BENCH's queue depth spread over them.
const EXTRA_QUEUE_SIZE: u16 = 256;
/// A request the device has not completed after this many TSC ticks (tens of seconds at any
/// plausible frequency) is reported as a timeout instead of hanging the probe.
const STALL_TICKS: u64 = 100_000_000_000;

#[repr(C, align(4096))]
struct DataBuffers([[u8; SLOT_BYTES]; SLOTS]);

/// Shared by all disks: commands run one at a time.
static mut DATA: DataBuffers = DataBuffers([[0; SLOT_BYTES]; SLOTS]);

#[repr(C)]
struct Header {
    kind: u32,
    reserved: u32,
    sector: u64,
}

pub enum Error {
    Status(u8),
    Mismatch(u64),
    Range,
    Timeout,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    Verify,
}

pub struct Blk {
    /// Request queue 0: pattern I/O, flush, get-id and single-queue BENCH use it.
    vq: Virtqueue,
    /// Request queues 1.. (VIRTIO_BLK_F_MQ), used by BENCH `queues=N` only.
    more: [Option<Virtqueue>; MAX_QUEUES - 1],
    /// Kept for config-space reads: the capacity is never cached (see [`Blk::sectors`]).
    transport: Transport,
    pub ro: bool,
    pub blk_size: u32,
    flush: bool,
    seg_bytes: usize,
    /// Data segments per request (the device's seg_max, our descriptor budget).
    segs: usize,
    slots: usize,
    /// Data segments one request may have at most (seg_max, our chain budget): BENCH's large
    /// blocks may use more than a pattern slot's `segs`.
    seg_limit: usize,
    /// Per slot: a Header followed by the status byte (device-writable), in the arena.
    meta: u64,
}

#[derive(Clone, Copy, Default)]
struct Inflight {
    busy: bool,
    head: u16,
    lba: u64,
    sectors: u64,
}

impl Blk {
    pub fn new(transport: Transport) -> Option<Self> {
        let features = transport.begin_init(
            F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_EVENT_IDX | F_MQ,
        )?;
        let size_max = if features & F_SIZE_MAX != 0 {
            transport.config_read32(8)
        } else {
            0
        };
        let seg_max = if features & F_SEG_MAX != 0 {
            transport.config_read32(12)
        } else {
            0
        };
        let blk_size = if features & F_BLK_SIZE != 0 {
            transport.config_read32(20)
        } else {
            512
        };
        let Some(mut vq) = Virtqueue::new(transport, 0, 256) else {
            transport.fail();
            return None;
        };
        if features & F_EVENT_IDX != 0 {
            vq.set_event_idx();
        }
        // num_queues is the u16 at config offset 34, read as the upper half of the aligned
        // 32-bit word at 32.
        let num_queues = if features & F_MQ != 0 {
            (transport.config_read32(32) >> 16) as usize
        } else {
            1
        };
        let mut more = [const { None }; MAX_QUEUES - 1];
        for (i, slot) in more
            .iter_mut()
            .enumerate()
            .take(num_queues.clamp(1, MAX_QUEUES) - 1)
        {
            let Some(mut q) = Virtqueue::new(transport, i as u16 + 1, EXTRA_QUEUE_SIZE) else {
                transport.fail();
                return None;
            };
            if features & F_EVENT_IDX != 0 {
                q.set_event_idx();
            }
            *slot = Some(q);
        }
        let mut seg_bytes = if size_max >= 4096 {
            (size_max as usize) & !4095
        } else {
            SLOT_BYTES
        };
        seg_bytes = seg_bytes.min(SLOT_BYTES);
        let seg_limit = (if seg_max != 0 {
            seg_max as usize
        } else {
            MAX_SEGS_PER_REQ
        })
        .min(MAX_SEGS_PER_REQ)
        .min((vq.size() as usize).saturating_sub(2));
        let mut segs = SLOT_BYTES.div_ceil(seg_bytes);
        if seg_max != 0 && segs > seg_max as usize {
            segs = seg_max as usize;
        }
        // A request is header + segments + status, and must fit in the queue on its own.
        segs = segs
            .min(MAX_SEGS_PER_REQ)
            .min((vq.size() as usize).saturating_sub(2));
        if segs == 0 {
            transport.fail();
            return None;
        }
        let slots = (vq.size() as usize / (segs + 2)).clamp(1, SLOTS);
        let meta = arena::alloc(32 * SLOTS, 64)?;
        transport.finish_init();
        Some(Blk {
            vq,
            more,
            transport,
            ro: features & F_RO != 0,
            blk_size,
            flush: features & F_FLUSH != 0,
            seg_bytes,
            segs,
            slots,
            seg_limit,
            meta,
        })
    }

    /// Request queues set up (1 without VIRTIO_BLK_F_MQ).
    pub fn queues(&self) -> usize {
        1 + self.more.iter().filter(|q| q.is_some()).count()
    }

    /// Request queue `index` (below [`Blk::queues`]).
    fn queue(&mut self, index: usize) -> Option<&mut Virtqueue> {
        match index {
            0 => Some(&mut self.vq),
            i => self.more.get_mut(i - 1)?.as_mut(),
        }
    }

    /// The window the device sits in.
    pub fn base(&self) -> u64 {
        self.transport.base
    }

    /// The device is still the one this driver set up: a device put into the slot since (or
    /// reset by the host) has not been told DRIVER_OK.
    pub fn still_live(&self) -> bool {
        self.transport.driver_ok()
    }

    /// The capacity in 512-byte sectors, read afresh from config space (the host may have
    /// resized the disk; the probe polls rather than taking the config-change interrupt).
    pub fn sectors(&self) -> u64 {
        self.transport.config_read64_consistent(0)
    }

    fn meta_base(&self) -> u64 {
        self.meta
    }

    fn slot_data(slot: usize) -> u64 {
        // SAFETY: only the address is taken.
        unsafe { core::ptr::addr_of_mut!(DATA.0[slot]) as u64 }
    }

    fn slot_capacity(&self) -> usize {
        (self.segs * self.seg_bytes).min(SLOT_BYTES)
    }

    /// Submits one request using slot `slot`'s header/status and `data_len` bytes of its data.
    fn submit(
        &mut self,
        slot: usize,
        kind: u32,
        sector: u64,
        data: u64,
        data_len: usize,
        device_writes: bool,
    ) -> Option<u16> {
        let hdr = self.meta_base() + 32 * slot as u64;
        let status = hdr + 16;
        // SAFETY: the slot's header/status block in the arena is not in flight (caller's
        // bookkeeping), so the device does not access it concurrently.
        unsafe {
            core::ptr::write_volatile(
                hdr as *mut Header,
                Header {
                    kind,
                    reserved: 0,
                    sector,
                },
            );
            core::ptr::write_volatile(status as *mut u8, 0xff);
        }
        let mut bufs = [Buf {
            addr: 0,
            len: 0,
            device_writes: false,
        }; MAX_SEGS_PER_REQ + 2];
        bufs[0] = Buf {
            addr: hdr,
            len: 16,
            device_writes: false,
        };
        let mut n = 1;
        let mut off = 0;
        while off < data_len {
            let len = (data_len - off).min(self.seg_bytes);
            bufs[n] = Buf {
                addr: data + off as u64,
                len: len as u32,
                device_writes,
            };
            n += 1;
            off += len;
        }
        bufs[n] = Buf {
            addr: status,
            len: 1,
            device_writes: true,
        };
        n += 1;
        self.vq.add(&bufs[..n])
    }

    fn slot_status(&self, slot: usize) -> u8 {
        // SAFETY: the status byte of a completed request.
        unsafe { core::ptr::read_volatile((self.meta_base() + 32 * slot as u64 + 16) as *const u8) }
    }

    /// Waits for one completion; returns its head id.
    fn wait_one(&mut self) -> Result<u16, Error> {
        let start = rdtsc();
        loop {
            if let Some((head, _)) = self.vq.pop_used() {
                return Ok(head);
            }
            if rdtsc().wrapping_sub(start) > STALL_TICKS {
                return Err(Error::Timeout);
            }
            core::hint::spin_loop();
        }
    }

    /// Writes the pattern over, or verifies it in, `count` sectors from `lba`.
    pub fn pattern_io(&mut self, op: Op, lba: u64, count: u64, seed: u64) -> Result<(), Error> {
        let sectors = self.sectors();
        if lba.checked_add(count).is_none_or(|end| end > sectors) {
            return Err(Error::Range);
        }
        let chunk_sectors = (self.slot_capacity() as u64 / SECTOR).max(1);
        let mut inflight = [Inflight::default(); SLOTS];
        let mut next = lba;
        let end = lba + count;
        let mut busy = 0;
        let mut first_error: Option<Error> = None;
        loop {
            let mut added = false;
            for (slot, inf) in inflight.iter_mut().enumerate().take(self.slots) {
                if inf.busy || next >= end || first_error.is_some() {
                    continue;
                }
                let n = chunk_sectors.min(end - next);
                let bytes = (n * SECTOR) as usize;
                let data = Self::slot_data(slot);
                if op == Op::Write {
                    // SAFETY: the slot's data buffer is not in flight.
                    let words =
                        unsafe { core::slice::from_raw_parts_mut(data as *mut u64, bytes / 8) };
                    pattern::fill(words, seed, next * SECTOR);
                }
                let kind = if op == Op::Write { T_OUT } else { T_IN };
                let Some(head) = self.submit(slot, kind, next, data, bytes, op == Op::Verify)
                else {
                    break; // queue full: wait for completions first
                };
                *inf = Inflight {
                    busy: true,
                    head,
                    lba: next,
                    sectors: n,
                };
                next += n;
                busy += 1;
                added = true;
            }
            if added {
                self.vq.publish();
            }
            if busy == 0 {
                break;
            }
            let head = self.wait_one()?;
            let Some(slot) = inflight[..self.slots]
                .iter()
                .position(|i| i.busy && i.head == head)
            else {
                continue;
            };
            inflight[slot].busy = false;
            busy -= 1;
            let status = self.slot_status(slot);
            if status != 0 {
                first_error.get_or_insert(Error::Status(status));
                continue;
            }
            if op == Op::Verify {
                let inf = inflight[slot];
                // SAFETY: the device has completed this slot's read.
                let words = unsafe {
                    core::slice::from_raw_parts(
                        Self::slot_data(slot) as *const u64,
                        (inf.sectors * SECTOR) as usize / 8,
                    )
                };
                if let Some(off) = pattern::verify(words, seed, inf.lba * SECTOR) {
                    match first_error {
                        Some(Error::Mismatch(prev)) if prev <= off => {}
                        Some(Error::Status(_)) => {}
                        _ => first_error = Some(Error::Mismatch(off)),
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs a request without data-pattern work (flush, get-id) and returns its status.
    fn simple(&mut self, kind: u32, data: u64, len: usize) -> Result<u8, Error> {
        let head = self
            .submit(0, kind, 0, data, len, true)
            .ok_or(Error::Timeout)?;
        self.vq.publish();
        loop {
            let done = self.wait_one()?;
            if done == head {
                return Ok(self.slot_status(0));
            }
        }
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        if !self.flush {
            return Ok(()); // without VIRTIO_BLK_F_FLUSH the device is write-through
        }
        match self.simple(T_FLUSH, 0, 0)? {
            0 => Ok(()),
            s => Err(Error::Status(s)),
        }
    }

    /// The device id string (up to 20 bytes).
    pub fn id(&mut self, out: &mut [u8; 20]) -> Result<usize, Error> {
        let data = Self::slot_data(0);
        // SAFETY: slot 0's buffer is idle between commands.
        unsafe { core::ptr::write_bytes(data as *mut u8, 0, 20) };
        match self.simple(T_GET_ID, data, 20)? {
            0 => {}
            s => return Err(Error::Status(s)),
        }
        // SAFETY: the device has completed writing the 20-byte id.
        let id = unsafe { core::slice::from_raw_parts(data as *const u8, 20) };
        let len = id.iter().position(|&b| b == 0).unwrap_or(20);
        out[..len].copy_from_slice(&id[..len]);
        Ok(len)
    }
}
