//! A split virtqueue driven by polling: the probe asks devices not to interrupt
//! (VRING_AVAIL_F_NO_INTERRUPT) and watches the used ring in memory, which costs no VM exit;
//! it kicks only when the device has not suppressed notifications. With EVENT_IDX (negotiated
//! per device, see `set_event_idx`) the device says which avail index it wants a kick at
//! (avail_event) and the probe keeps used_event half the index space ahead of what it has
//! consumed, so the device never interrupts.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use super::mmio::Transport;
use crate::arena;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One buffer of a request: guest-physical address, length, and whether the device writes it.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

pub struct Virtqueue {
    transport: Transport,
    index: u16,
    size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u16,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    /// Notifications sent (each one is a VM exit): the benchmarks report them per I/O.
    pub kicks: u64,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated: kicks follow avail_event, not the flags.
    event_idx: bool,
    /// Avail index at the last publish (EVENT_IDX decides on the range published since).
    published: u16,
}

impl Virtqueue {
    /// Sets up queue `index` with at most `max_size` entries; None if the device has no such
    /// queue or the arena is exhausted.
    pub fn new(transport: Transport, index: u16, max_size: u16) -> Option<Self> {
        let device_max = transport.queue_max(index as u32);
        if device_max == 0 {
            return None;
        }
        let mut size = (device_max.min(max_size as u32)) as u16;
        // Split queues need a power-of-two size.
        while size & (size - 1) != 0 {
            size &= size - 1;
        }
        let n = size as usize;
        let desc = arena::alloc(16 * n, 4096)?;
        let avail = arena::alloc(6 + 2 * n, 4096)?;
        let used = arena::alloc(6 + 8 * n, 4096)?;
        let desc_ptr = desc as *mut Desc;
        for i in 0..size {
            // SAFETY: `desc` has room for `size` descriptors.
            unsafe { (*desc_ptr.add(i as usize)).next = i.wrapping_add(1) };
        }
        let q = Virtqueue {
            transport,
            index,
            size,
            desc: desc_ptr,
            avail: avail as *mut u16,
            used: used as *mut u16,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            kicks: 0,
            event_idx: false,
            published: 0,
        };
        // SAFETY: avail ring flags word, freshly allocated.
        unsafe { write_volatile(q.avail, AVAIL_F_NO_INTERRUPT) };
        transport.setup_queue(index as u32, size, desc, avail, used);
        Some(q)
    }

    /// Switches to EVENT_IDX suppression; call only when the feature was negotiated, before
    /// the first request.
    pub fn set_event_idx(&mut self) {
        self.event_idx = true;
        self.set_used_event();
    }

    /// used_event half the index space ahead of the last entry consumed: a device interrupts
    /// when the entries it just published cross used_event, and these never can (a ring holds
    /// at most 32768 entries in flight). Just behind the last entry consumed was not enough: a
    /// polling guest that takes an entry before the device looks moves used_event to
    /// `new - 1`, which asks for an interrupt for that very entry, and the device then paid an
    /// interrupt write per request. (The probe polls; it has no interrupt handler.)
    fn set_used_event(&mut self) {
        // SAFETY: used_event is the avail ring's last word, after the `size` entries.
        unsafe {
            write_volatile(
                self.avail.add(2 + self.size as usize),
                self.last_used.wrapping_add(0x7fff),
            )
        };
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Chains `bufs` into descriptors and puts the chain in the avail ring (not yet visible to
    /// the device: call `publish`). Returns the head descriptor id.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.num_free as usize {
            return None;
        }
        let head = self.free_head;
        let mut id = head;
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: `id` is a free descriptor index below `size`.
            let d = unsafe { &mut *self.desc.add(id as usize) };
            let next_free = d.next;
            d.addr = b.addr;
            d.len = b.len;
            d.flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                d.flags |= DESC_F_NEXT;
                id = next_free;
            } else {
                self.free_head = next_free;
            }
        }
        self.num_free -= bufs.len() as u16;
        let slot = 2 + (self.avail_idx % self.size) as usize;
        // SAFETY: slot indexes the avail ring (2 header words + size entries).
        unsafe { write_volatile(self.avail.add(slot), head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Some(head)
    }

    /// Makes added chains visible and notifies the device unless it asked not to be.
    pub fn publish(&mut self) {
        fence(Ordering::SeqCst);
        // SAFETY: avail ring idx word.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            // SAFETY: avail_event is the used ring's last word, after the `size` 8-byte entries.
            let event = unsafe { read_volatile(self.used.add(2 + 4 * self.size as usize)) };
            // vring_need_event: the device asked for a kick at an index published just now.
            self.avail_idx.wrapping_sub(event).wrapping_sub(1)
                < self.avail_idx.wrapping_sub(self.published)
        } else {
            // SAFETY: used ring flags word.
            let flags = unsafe { read_volatile(self.used) };
            flags & USED_F_NO_NOTIFY == 0
        };
        self.published = self.avail_idx;
        if kick {
            self.kicks += 1;
            self.transport.notify(self.index);
        }
    }

    /// Takes one completed chain off the used ring: (head id, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used ring idx word.
        let used_idx = unsafe { read_volatile(self.used.add(1)) };
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: used ring element `slot`: u32 id and u32 len after the 4-byte header.
        let (id, len) = unsafe {
            let elem = (self.used as *mut u8).add(4 + 8 * slot) as *const u32;
            (read_volatile(elem), read_volatile(elem.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            self.set_used_event();
        }
        let head = id as u16;
        if head >= self.size {
            return None; // a broken device; drop the entry rather than corrupt the free list
        }
        // Return the chain to the free list.
        let mut last = head;
        let mut count = 1u16;
        loop {
            // SAFETY: `last` is below size (checked for head, chain links written by us).
            let d = unsafe { &mut *self.desc.add(last as usize) };
            if d.flags & DESC_F_NEXT == 0 || count >= self.size {
                d.next = self.free_head;
                break;
            }
            last = d.next;
            count += 1;
        }
        self.free_head = head;
        self.num_free += count;
        Some((head, len))
    }
}
