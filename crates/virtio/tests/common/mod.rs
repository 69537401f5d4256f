//! A test-side virtio driver: lays out split virtqueues in guest memory, posts descriptor
//! chains, kicks the device's eventfd and polls the used ring, as a polling guest driver would.

#![allow(dead_code)] // Each test binary uses a different part of this driver.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_virtio::{GuestMemory, QueueHandle, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod netns;
pub mod offload_port;
pub mod stress;

pub const MEM_SIZE: usize = 16 << 20;
/// Where test data buffers live (queues sit below).
pub const DATA_BASE: u64 = 1 << 20;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// How long a test waits for the device before failing (generous: the machine is busy).
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(20);

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Forgets every page written so far (what migration does after fetching the bitmap).
pub fn clear_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        // MmapRegion::bitmap is the whole-region bitmap (the trait's is an offset view).
        let bitmap: &AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
        bitmap.reset();
    }
}

pub fn is_dirty(mem: &GuestMemory, addr: u64) -> bool {
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    region
        .bitmap()
        .dirty_at((addr - region.start_addr().0) as usize)
}

/// Counts interrupts per queue.
#[derive(Default)]
pub struct RecordingInterrupt {
    pub queue: [AtomicU64; 4],
    pub config: AtomicU64,
}

impl RecordingInterrupt {
    pub fn count(&self, queue: usize) -> u64 {
        self.queue[queue].load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        self.queue[queue as usize].fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn notify_config(&self) -> std::io::Result<()> {
        self.config.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One buffer of a chain: guest address, length, and whether the device writes it.
#[derive(Debug, Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

pub fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// The driver's view of one split virtqueue.
pub struct DriverQueue {
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    pub kick: EventFd,
}

impl DriverQueue {
    /// Lays out queue number `index` (each queue gets its own 64 KiB below `DATA_BASE`) and
    /// returns the driver side plus the handle the transport would give the device.
    pub fn new(mem: &GuestMemory, index: u64, size: u16) -> (DriverQueue, QueueHandle) {
        let base = 0x10000 * (index + 1);
        let desc = base;
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        // Rings start zeroed, as a driver would leave them.
        mem.write_slice(&vec![0u8; 0x10000], GuestAddress(base))
            .unwrap();
        let mut queue = Queue::new(size).unwrap();
        queue.set_size(size);
        queue
            .try_set_desc_table_address(GuestAddress(desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(avail))
            .unwrap();
        queue.try_set_used_ring_address(GuestAddress(used)).unwrap();
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let handle = QueueHandle {
            queue,
            kick: kick.try_clone().unwrap(),
        };
        let driver = DriverQueue {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            kick,
        };
        (driver, handle)
    }

    /// The handle a restored transport would give a device for this same ring: the addresses
    /// the driver set up, the device's saved positions, and a new kick eventfd that this driver
    /// side signals from then on (what a new VM's ioeventfd is).
    pub fn restored_handle(&mut self, next_avail: u16, next_used: u16) -> QueueHandle {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        queue.set_next_avail(next_avail);
        queue.set_next_used(next_used);
        queue.set_ready(true);
        self.kick = EventFd::new(EFD_NONBLOCK).unwrap();
        QueueHandle {
            queue,
            kick: self.kick.try_clone().unwrap(),
        }
    }

    /// Writes the descriptors of a chain (without publishing it) and returns its head.
    pub fn write_chain(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.size;
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, b.addr, b.len, flags, next);
            self.next_desc = next;
        }
        head
    }

    /// Writes raw descriptor `idx`.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.desc + 16 * u64::from(idx);
        mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    /// Makes chain `head` available to the device (without kicking).
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    /// The descriptor the next chain starts at (single-buffer chains use them in turn, so a
    /// driver can tie each buffer's address to its head).
    pub fn next_desc(&self) -> u16 {
        self.next_desc
    }

    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        let head = self.write_chain(mem, bufs);
        self.publish(mem, head);
        head
    }

    pub fn notify(&self) {
        self.kick.write(1).unwrap();
    }

    /// The used index the device published.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        u16::from_le(
            mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// Waits until `count` more chains are used; returns their (head, len) in order.
    pub fn wait_used(&mut self, mem: &GuestMemory, count: u16) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + DEVICE_TIMEOUT;
        while self.used_idx(mem).wrapping_sub(self.used_seen) < count {
            assert!(
                Instant::now() < deadline,
                "device used {} of {count} chains in time",
                self.used_idx(mem).wrapping_sub(self.used_seen)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        self.take_used(mem)
    }

    /// Takes every used element published since the last call.
    pub fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != end {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id) as u16, u32::from_le(len)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// EVENT_IDX: asks for an interrupt only once used index passes `idx`.
    pub fn set_used_event(&self, mem: &GuestMemory, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.store(idx.to_le(), GuestAddress(at), Ordering::Release)
            .unwrap();
    }

    /// Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT (1) says the driver polls.
    pub fn set_avail_flags(&self, mem: &GuestMemory, flags: u16) {
        mem.store(flags.to_le(), GuestAddress(self.avail), Ordering::Release)
            .unwrap();
    }

    /// EVENT_IDX: the avail index after which the device wants a kick.
    pub fn avail_event(&self, mem: &GuestMemory) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(mem.load(GuestAddress(at), Ordering::Acquire).unwrap())
    }

    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// Page addresses of the used ring (what a device dirties when completing requests).
    pub fn used_ring_addr(&self) -> u64 {
        self.used
    }
}

/// Negotiates every feature the device offers and activates it with queues of `size`.
pub fn activate_all(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemory,
    size: u16,
) -> (Vec<DriverQueue>, Arc<RecordingInterrupt>) {
    let features = dev.features();
    activate_with(dev, mem, size, features)
}

pub fn activate_with(
    dev: &mut dyn VirtioDevice,
    mem: &GuestMemory,
    size: u16,
    features: u64,
) -> (Vec<DriverQueue>, Arc<RecordingInterrupt>) {
    dev.ack_features(features);
    let mut drivers = Vec::new();
    let mut handles = Vec::new();
    for i in 0..dev.queue_max_sizes().len() {
        let (d, h) = DriverQueue::new(mem, i as u64, size);
        drivers.push(d);
        handles.push(h);
    }
    let irq = Arc::new(RecordingInterrupt::default());
    dev.activate(mem.clone(), irq.clone(), handles).unwrap();
    (drivers, irq)
}

/// Polls `cond` until true or the device timeout; returns whether it became true.
pub fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + DEVICE_TIMEOUT;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Resets `dev` on another thread and fails the test (instead of hanging it) if the reset does
/// not return in time, e.g. because a worker spins and never sees the stop request.
pub fn reset_in_time<D: VirtioDevice + 'static>(mut dev: D) -> D {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        dev.reset();
        let _ = done_tx.send(dev);
    });
    done_rx
        .recv_timeout(DEVICE_TIMEOUT)
        .expect("device reset did not return: worker stuck")
}
