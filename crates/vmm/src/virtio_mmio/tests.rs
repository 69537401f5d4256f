use std::sync::Mutex;

use vm_memory::GuestAddress;

use super::*;

#[derive(Default)]
struct Seen {
    acked: Option<u64>,
    activated: Vec<(u64, u64, u64, u16, bool)>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    kicks: Vec<EventFd>,
    resets: usize,
}

struct FakeDevice {
    seen: Arc<Mutex<Seen>>,
    config: [u8; 8],
}

const FAKE_FEATURES: u64 = vireo_virtio::VIRTIO_F_VERSION_1 | 1 << 5 | 1;

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        vireo_virtio::device_type::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn ack_features(&mut self, acked: u64) {
        self.seen.lock().unwrap().acked = Some(acked);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = *self.config.get(offset as usize + i).unwrap_or(&0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, d) in data.iter().enumerate() {
            if let Some(c) = self.config.get_mut(offset as usize + i) {
                *c = *d;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueHandle>,
    ) -> Result<(), vireo_virtio::ActivateError> {
        let mut s = self.seen.lock().unwrap();
        for h in queues {
            let q = &h.queue;
            s.activated.push((
                q.desc_table(),
                q.avail_ring(),
                q.used_ring(),
                q.size(),
                q.ready(),
            ));
            s.kicks.push(h.kick);
        }
        s.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
    }
}

fn transport() -> (MmioTransport, Arc<Mutex<Seen>>, EventFd) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = FakeDevice {
        seen: seen.clone(),
        config: *b"abcdefgh",
    };
    let t = MmioTransport::new(Box::new(dev), mem, irq.try_clone().unwrap()).unwrap();
    (t, seen, irq)
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut d = [0u8; 4];
    t.read(off, &mut d);
    u32::from_le_bytes(d)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    wr(t, reg::STATUS, status::ACKNOWLEDGE);
    wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, reg::DRIVER_FEATURES_SEL, 0);
    wr(t, reg::DRIVER_FEATURES, features as u32);
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    wr(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    rd(t, reg::STATUS)
}

fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, base: u64) {
    wr(t, reg::QUEUE_SEL, sel);
    wr(t, reg::QUEUE_NUM, size);
    wr(t, reg::QUEUE_DESC_LOW, base as u32);
    wr(t, reg::QUEUE_DESC_HIGH, 0);
    wr(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    wr(t, reg::QUEUE_DRIVER_HIGH, 0);
    wr(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    wr(t, reg::QUEUE_DEVICE_HIGH, 0);
    wr(t, reg::QUEUE_READY, 1);
}

#[test]
fn identification_registers() {
    let (mut t, _, _) = transport();
    assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
    assert_eq!(rd(&mut t, reg::VERSION), 2);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), 2);
    assert_eq!(rd(&mut t, reg::VENDOR_ID), VENDOR);
    // Sub-word register reads are not allowed and read as zero.
    let mut b = [0u8; 2];
    t.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn features_are_offered_in_32_bit_pages() {
    let (mut t, _, _) = transport();
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), FAKE_FEATURES as u32);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
    wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_refused_for_unknown_or_legacy_subsets() {
    let (mut t, seen, _) = transport();
    let st = negotiate(&mut t, vireo_virtio::VIRTIO_F_VERSION_1 | 1 << 7);
    assert_eq!(st & status::FEATURES_OK, 0, "unoffered bit accepted");
    wr(&mut t, reg::STATUS, 0);
    let st = negotiate(&mut t, 1);
    assert_eq!(st & status::FEATURES_OK, 0, "legacy driver accepted");
    assert!(seen.lock().unwrap().acked.is_none());
    wr(&mut t, reg::STATUS, 0);
    let st = negotiate(&mut t, vireo_virtio::VIRTIO_F_VERSION_1 | 1 << 5);
    assert_ne!(st & status::FEATURES_OK, 0);
    assert_eq!(
        seen.lock().unwrap().acked,
        Some(vireo_virtio::VIRTIO_F_VERSION_1 | 1 << 5)
    );
}

#[test]
fn full_initialisation_activates_with_the_queue_layout() {
    let (mut t, seen, irq) = transport();
    negotiate(&mut t, vireo_virtio::VIRTIO_F_VERSION_1);
    wr(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 256);
    wr(&mut t, reg::QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 128);
    wr(&mut t, reg::QUEUE_SEL, 9);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    setup_queue(&mut t, 0, 64, 0x10000);
    setup_queue(&mut t, 1, 32, 0x20000);
    assert!(seen.lock().unwrap().activated.is_empty());
    wr(&mut t, reg::STATUS, 1 | 2 | 4 | 8);
    {
        let s = seen.lock().unwrap();
        assert_eq!(
            s.activated,
            vec![
                (0x10000, 0x11000, 0x12000, 64, true),
                (0x20000, 0x21000, 0x22000, 32, true)
            ]
        );
    }
    // Changing a queue after DRIVER_OK is ignored.
    wr(&mut t, reg::QUEUE_SEL, 0);
    wr(&mut t, reg::QUEUE_NUM, 8);
    // A QueueNotify that reaches the transport is forwarded to the queue's kick.
    wr(&mut t, reg::QUEUE_NOTIFY, 1);
    {
        let s = seen.lock().unwrap();
        assert!(s.kicks[0].read().is_err(), "queue 0 was not kicked");
        assert_eq!(s.kicks[1].read().unwrap(), 1);
    }
    // Interrupts: the device raises, the driver reads and acknowledges.
    let interrupt = seen.lock().unwrap().interrupt.clone().unwrap();
    interrupt.notify_queue(0).unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
    let gen = rd(&mut t, reg::CONFIG_GENERATION);
    interrupt.notify_config().unwrap();
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), gen + 1);
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    // Reset stops the device and clears everything.
    wr(&mut t, reg::STATUS, 0);
    assert_eq!(seen.lock().unwrap().resets, 1);
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
    wr(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn an_unacknowledged_interrupt_is_signalled_once_per_reason() {
    let (mut t, seen, irq) = transport();
    assert_eq!(negotiate(&mut t, FAKE_FEATURES), 1 | 2 | 8);
    setup_queue(&mut t, 0, 16, 0x10000);
    setup_queue(&mut t, 1, 16, 0x20000);
    wr(&mut t, reg::STATUS, 1 | 2 | 4 | 8);
    let interrupt = seen.lock().unwrap().interrupt.clone().unwrap();
    // A polling driver that never acknowledges: one edge, however many completions.
    for _ in 0..5 {
        interrupt.notify_queue(0).unwrap();
        interrupt.notify_queue(1).unwrap();
    }
    assert_eq!(irq.read().unwrap(), 1);
    // Another reason while the first is pending gets its own edge.
    interrupt.notify_config().unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
    // Once the driver acknowledged, the next completion signals again.
    wr(&mut t, reg::INTERRUPT_ACK, INT_VRING);
    assert!(irq.read().is_err(), "the acknowledgement signals nothing");
    interrupt.notify_queue(0).unwrap();
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
}

#[test]
fn queue_registers_ignored_before_features_ok() {
    let (mut t, _, _) = transport();
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, reg::QUEUE_SEL, 0);
    wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn invalid_queue_sets_needs_reset_instead_of_activating() {
    let (mut t, seen, _) = transport();
    negotiate(&mut t, vireo_virtio::VIRTIO_F_VERSION_1);
    // Descriptor table beyond guest memory.
    setup_queue(&mut t, 0, 64, 0x4000_0000);
    wr(&mut t, reg::STATUS, 1 | 2 | 4 | 8);
    assert!(seen.lock().unwrap().activated.is_empty());
    assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn config_space_passes_through_at_any_width() {
    let (mut t, _, _) = transport();
    let mut b = [0u8; 2];
    t.read(0x102, &mut b);
    assert_eq!(&b, b"cd");
    t.write(0x100, b"Z");
    let mut w = [0u8; 4];
    t.read(0x100, &mut w);
    assert_eq!(&w, b"Zbcd");
    t.read(0x106, &mut w);
    assert_eq!(&w, b"gh\0\0");
}

#[test]
fn status_bits_cannot_be_cleared_except_by_reset() {
    let (mut t, _, _) = transport();
    negotiate(&mut t, vireo_virtio::VIRTIO_F_VERSION_1);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(
        rd(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
}

/// A real virtio-blk behind the transport: a resize from outside shows up as a new capacity in
/// config space, a bumped ConfigGeneration and a config-change interrupt.
#[test]
fn block_resize_reaches_the_driver_through_the_transport() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(1 << 20).unwrap();
    let backend = Arc::new(vireo_block::RawFile::open(file.path(), false).unwrap());
    let block = vireo_virtio::Block::new(backend);
    let resizer = block.resizer();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(block), mem, irq.try_clone().unwrap()).unwrap();
    let capacity = |t: &mut MmioTransport| {
        let mut b = [0u8; 8];
        t.read(CONFIG_SPACE, &mut b);
        u64::from_le_bytes(b)
    };
    assert_eq!(capacity(&mut t), (1 << 20) / 512);
    let features = vireo_virtio::VIRTIO_F_VERSION_1;
    assert_ne!(negotiate(&mut t, features) & status::FEATURES_OK, 0);
    setup_queue(&mut t, 0, 16, 0x10000);
    wr(&mut t, reg::STATUS, 1 | 2 | 4 | 8);
    assert_eq!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    let gen = rd(&mut t, reg::CONFIG_GENERATION);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);

    resizer.resize(3 << 20).unwrap();
    assert_eq!(capacity(&mut t), (3 << 20) / 512);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), gen + 1);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(irq.read().unwrap(), 1);
    wr(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);

    resizer.resize(1 << 19).unwrap();
    assert_eq!(capacity(&mut t), (1 << 19) / 512);
    assert_eq!(rd(&mut t, reg::CONFIG_GENERATION), gen + 2);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG);
    wr(&mut t, reg::STATUS, 0);
}
