//! virtio-blk driven through real split virtqueues in guest memory, against a RawFile disk.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vireo_block::{BlockBackend, RawFile};
use vireo_virtio::block::qos::burst;
use vireo_virtio::block::QosConfig;
use vireo_virtio::{Block, GuestMemory, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const DISK_SIZE: u64 = 1 << 20;
const QSIZE: u16 = 16;
const HDR: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 0x100;
const DATA: u64 = DATA_BASE + 0x10000;

struct Rig {
    _file: tempfile::NamedTempFile,
    path: std::path::PathBuf,
    backend: Arc<RawFile>,
    dev: Block,
    mem: GuestMemory,
    q: DriverQueue,
    irq: Arc<RecordingInterrupt>,
}

fn rig_with(read_only: bool, features: Option<u64>) -> Rig {
    rig_full(read_only, features, None)
}

fn rig_full(read_only: bool, features: Option<u64>, serial: Option<&str>) -> Rig {
    rig_qos(read_only, features, serial, QosConfig::default())
}

fn rig_qos(read_only: bool, features: Option<u64>, serial: Option<&str>, qos: QosConfig) -> Rig {
    let file = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
    file.as_file().write_all(&pattern).unwrap();
    let backend = Arc::new(RawFile::open(file.path(), read_only).unwrap());
    let mut dev = Block::new(backend.clone()).with_qos(qos);
    if let Some(serial) = serial {
        dev = dev.with_serial(serial);
    }
    let mem = guest_memory();
    let features = features.unwrap_or(dev.features());
    let (mut qs, irq) = activate_with(&mut dev, &mem, QSIZE, features);
    Rig {
        path: file.path().to_path_buf(),
        _file: file,
        backend,
        dev,
        mem,
        q: qs.remove(0),
        irq,
    }
}

fn rig() -> Rig {
    rig_with(false, None)
}

impl Rig {
    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at + 8))
            .unwrap();
    }

    /// Submits one request (header, optional data buffer, status) and waits for it.
    fn request(&mut self, kind: u32, sector: u64, data: Option<Buf>) -> (u8, u32) {
        self.header(HDR, kind, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut bufs = vec![ro(HDR, 16)];
        bufs.extend(data);
        bufs.push(wo(STATUS, 1));
        self.q.add_chain(&self.mem, &bufs);
        self.q.notify();
        let used = self.q.wait_used(&self.mem, 1);
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used[0].1)
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut out = vec![0; len];
        f.read_exact(&mut out).unwrap();
        out
    }

    fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    fn segment(&self, at: u64, sector: u64, sectors: u32, flags: u32) {
        self.mem
            .write_obj(sector.to_le(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_obj(sectors.to_le(), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
    }
}

fn read_config_u64(dev: &Block, off: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.read_config(off, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn features_and_config_describe_the_disk() {
    let r = rig();
    let f = r.dev.features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    for bit in [2, 6, 9, 13, 14] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_eq!(f & (1 << 5), 0, "writable disk claims RO");
    assert_eq!(read_config_u64(&r.dev, 0), DISK_SIZE / 512);
    let mut seg_max = [0u8; 4];
    r.dev.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 256 - 2);
    let mut past_end = [0xaa; 8];
    r.dev.read_config(4096, &mut past_end);
    assert_eq!(past_end, [0; 8]);
}

#[test]
fn write_then_read_round_trips_through_the_file() {
    let mut r = rig();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 7) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (status, _) = r.request(T_OUT, 3, Some(ro(DATA, 4096)));
    assert_eq!(status, S_OK);
    assert_eq!(r.file_bytes(3 * 512, 4096), data);

    // Read back into a buffer split over two descriptors, one crossing a page boundary.
    let back = DATA + 0x8000 - 100;
    r.header(HDR, T_IN, 3);
    r.q.add_chain(
        &r.mem,
        &[
            ro(HDR, 16),
            wo(back, 1000),
            wo(back + 1000, 3096),
            wo(STATUS, 1),
        ],
    );
    r.q.notify();
    let used = r.q.wait_used(&r.mem, 1);
    assert_eq!(used[0].1, 4096 + 1);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(r.guest_bytes(back, 4096), data);

    // The pattern the file started with is what an untouched sector reads as.
    let (status, len) = r.request(T_IN, 100, Some(wo(DATA, 1024)));
    assert_eq!((status, len), (S_OK, 1025));
    assert_eq!(r.guest_bytes(DATA, 1024), r.file_bytes(100 * 512, 1024));
    let s = r.dev.counters().snapshot();
    assert_eq!((s.writes, s.write_bytes), (1, 4096));
    assert_eq!((s.reads, s.read_bytes), (2, 4096 + 1024));
    // Three requests under 8 KiB: one normalized IO each; no QoS, nothing held.
    assert_eq!((s.normalized_ios, s.throttled_ns), (3, 0));
}

#[test]
fn max_iops_delays_requests_by_what_the_bucket_allows_and_counts_the_hold() {
    let max = 50;
    let mut r = rig_qos(
        false,
        None,
        None,
        QosConfig {
            max_iops: Some(max),
            min_iops: None,
        },
    );
    r.mem
        .write_slice(&[7u8; 65536], GuestAddress(DATA))
        .unwrap();
    let start = Instant::now();
    // 10 single-IO writes, one 64 KiB write (8 IOs), a flush (1 IO) and a GET_ID (free).
    for i in 0..10 {
        assert_eq!(r.request(T_OUT, i * 16, Some(ro(DATA, 8192))).0, S_OK);
    }
    assert_eq!(r.request(T_OUT, 512, Some(ro(DATA, 65536))).0, S_OK);
    assert_eq!(r.request(T_FLUSH, 0, None).0, S_OK);
    assert_eq!(r.request(T_GET_ID, 0, Some(wo(DATA, 20))).0, S_OK);
    let elapsed = start.elapsed();
    let ios = 10 + 8 + 1;
    // The bucket's guarantee: N IOs take at least (N - max(burst, largest request)) / rate.
    let bound = Duration::from_secs_f64((ios - burst(max).max(8)) as f64 / f64::from(max));
    assert!(elapsed >= bound, "{elapsed:?} < {bound:?}");
    let s = r.dev.counters().snapshot();
    assert_eq!(s.normalized_ios, ios);
    assert_eq!((s.writes, s.flushes, s.errors), (11, 1, 0));
    assert!(s.throttled_ns > 0);
    assert!(Duration::from_nanos(s.throttled_ns) <= elapsed);
    assert_eq!(r.file_bytes(512 * 512, 65536), vec![7u8; 65536]);
}

#[test]
fn a_held_request_holds_up_neither_another_disk_nor_a_reset() {
    let mut r = rig_qos(
        false,
        None,
        None,
        QosConfig {
            max_iops: Some(1),
            min_iops: None,
        },
    );
    // 512 KiB (64 IOs) passes on the burst of one and leaves 63 s of debt.
    assert_eq!(r.request(T_IN, 0, Some(wo(DATA, 512 << 10))).0, S_OK);
    r.header(HDR, T_IN, 0);
    r.q.add_chain(&r.mem, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
    r.q.notify();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.q.take_used(&r.mem), vec![], "the limit must hold it");
    // Another disk is served meanwhile: only the limited disk's thread waits.
    let mut other = rig();
    assert_eq!(other.request(T_IN, 0, Some(wo(DATA, 512 << 10))).0, S_OK);
    assert_eq!(r.q.take_used(&r.mem), vec![], "still held");
    // Stopping the device must not wait for the bucket.
    let start = Instant::now();
    let dev = reset_in_time(r.dev);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let s = dev.counters().snapshot();
    assert_eq!((s.reads, s.normalized_ios), (1, 64));
}

#[test]
fn large_request_spanning_many_chunks() {
    let mut r = rig();
    let len = 600 * 1024; // More than one staging chunk.
    let data: Vec<u8> = (0..len).map(|i| (i / 3) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(T_OUT, 0, Some(ro(DATA, len))).0, S_OK);
    let back = DATA + (1 << 20);
    assert_eq!(r.request(T_IN, 0, Some(wo(back, len))), (S_OK, len + 1));
    assert_eq!(r.guest_bytes(back, len as usize), data);
}

#[test]
fn get_id_answers_the_serial_given_instead_of_the_backend_id() {
    let mut r = rig_full(false, None, Some("vm-disk-0"));
    assert_eq!(r.request(T_GET_ID, 0, Some(wo(DATA, 20))), (S_OK, 21));
    let mut want = [0u8; 20];
    want[..9].copy_from_slice(b"vm-disk-0");
    assert_eq!(r.guest_bytes(DATA, 20), want);
    assert_ne!(r.backend.id(), "vm-disk-0");
    // Only 20 bytes fit the id; a longer serial is cut, not refused.
    let mut r = rig_full(false, None, Some("0123456789abcdefghijKLMN"));
    assert_eq!(r.request(T_GET_ID, 0, Some(wo(DATA, 20))), (S_OK, 21));
    assert_eq!(r.guest_bytes(DATA, 20), b"0123456789abcdefghij");
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let mut r = rig();
    assert_eq!(r.request(T_FLUSH, 0, None), (S_OK, 1));

    let (status, len) = r.request(T_GET_ID, 0, Some(wo(DATA, 20)));
    assert_eq!((status, len), (S_OK, 21));
    let id = r.backend.id();
    let mut want = [0u8; 20];
    want[..id.len().min(20)].copy_from_slice(&id.as_bytes()[..id.len().min(20)]);
    assert_eq!(r.guest_bytes(DATA, 20), want);

    // Discard sectors 8..16 and write-zeroes 40..48 (with the unmap hint) in one request each.
    let seg = DATA + 0x1000;
    r.segment(seg, 8, 8, 0);
    assert_eq!(r.request(T_DISCARD, 0, Some(ro(seg, 16))).0, S_OK);
    assert!(r.file_bytes(8 * 512, 4096).iter().all(|&b| b == 0));
    assert_ne!(r.file_bytes(16 * 512, 512), vec![0; 512]);
    r.segment(seg, 40, 4, 1);
    r.segment(seg + 16, 60, 4, 0);
    assert_eq!(r.request(T_WRITE_ZEROES, 0, Some(ro(seg, 32))).0, S_OK);
    assert!(r.file_bytes(40 * 512, 2048).iter().all(|&b| b == 0));
    assert!(r.file_bytes(60 * 512, 2048).iter().all(|&b| b == 0));
    assert_ne!(r.file_bytes(44 * 512, 512), vec![0; 512]);

    // Flags a command does not define are refused, and nothing changes.
    let before = r.file_bytes(100 * 512, 512);
    r.segment(seg, 100, 1, 1);
    assert_eq!(r.request(T_DISCARD, 0, Some(ro(seg, 16))).0, S_UNSUPP);
    r.segment(seg, 100, 1, 2);
    assert_eq!(r.request(T_WRITE_ZEROES, 0, Some(ro(seg, 16))).0, S_UNSUPP);
    // A segment past the end fails the whole request before any segment is applied.
    r.segment(seg, 100, 1, 0);
    r.segment(seg + 16, DISK_SIZE / 512, 1, 0);
    assert_eq!(r.request(T_DISCARD, 0, Some(ro(seg, 32))).0, S_IOERR);
    assert_eq!(r.file_bytes(100 * 512, 512), before);
    // A payload that is not whole segments.
    assert_eq!(r.request(T_DISCARD, 0, Some(ro(seg, 10))).0, S_IOERR);
}

#[test]
fn read_only_disk_refuses_writes() {
    let mut r = rig_with(true, None);
    let f = r.dev.features();
    assert_ne!(f & (1 << 5), 0, "RO not offered");
    assert_eq!(f & (1 << 13 | 1 << 14), 0);
    let before = r.file_bytes(0, 1024);
    r.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(r.request(T_OUT, 0, Some(ro(DATA, 1024))).0, S_IOERR);
    r.segment(DATA, 0, 2, 0);
    assert_eq!(r.request(T_WRITE_ZEROES, 0, Some(ro(DATA, 16))).0, S_IOERR);
    assert_eq!(r.request(T_DISCARD, 0, Some(ro(DATA, 16))).0, S_IOERR);
    assert_eq!(r.file_bytes(0, 1024), before);
    // Reads and flushes still work.
    assert_eq!(r.request(T_IN, 0, Some(wo(DATA, 1024))), (S_OK, 1025));
    assert_eq!(r.guest_bytes(DATA, 1024), before);
    assert_eq!(r.request(T_FLUSH, 0, None).0, S_OK);
}

#[test]
fn bad_requests_get_error_statuses() {
    let mut r = rig();
    let last = DISK_SIZE / 512 - 1;
    assert_eq!(r.request(T_IN, last, Some(wo(DATA, 1024))).0, S_IOERR);
    assert_eq!(r.request(T_IN, last, Some(wo(DATA, 512))).0, S_OK);
    assert_eq!(r.request(T_OUT, u64::MAX, Some(ro(DATA, 512))).0, S_IOERR);
    assert_eq!(
        r.request(T_IN, u64::MAX / 512, Some(wo(DATA, 512))).0,
        S_IOERR
    );
    // Data not a whole number of sectors.
    assert_eq!(r.request(T_IN, 0, Some(wo(DATA, 100))).0, S_IOERR);
    assert_eq!(r.request(T_OUT, 0, Some(ro(DATA, 700))).0, S_IOERR);
    // Unknown request type.
    assert_eq!(r.request(99, 0, None), (S_UNSUPP, 1));
    assert_eq!(r.request(2, 0, Some(wo(DATA, 512))).0, S_UNSUPP);
    assert_eq!(r.dev.counters().snapshot().errors, 7);
}

#[test]
fn malformed_chains_do_not_stop_the_device() {
    let mut r = rig();
    let outside = common::MEM_SIZE as u64 - 8;
    r.header(HDR, T_IN, 0);
    // A head index past the queue: skipped, the chains after it are still served.
    r.q.publish(&r.mem, QSIZE + 3);
    // No status byte at all.
    r.q.add_chain(&r.mem, &[ro(HDR, 16)]);
    // Data buffer running past guest memory.
    r.q.add_chain(&r.mem, &[ro(HDR, 16), wo(outside, 512), wo(STATUS, 1)]);
    // Readable descriptor after a writable one.
    r.q.add_chain(
        &r.mem,
        &[
            ro(HDR, 16),
            wo(DATA, 512),
            ro(DATA + 4096, 16),
            wo(STATUS, 1),
        ],
    );
    // Header shorter than 16 bytes: the device answers IOERR.
    r.q.add_chain(&r.mem, &[ro(HDR, 8), wo(STATUS + 8, 1)]);
    r.q.notify();
    let used = r.q.wait_used(&r.mem, 4);
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0, 0, 1]
    );
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS + 8)).unwrap(),
        S_IOERR
    );
    // A loop in the descriptor table ends at the queue size instead of spinning.
    let head = r.q.write_chain(&r.mem, &[ro(HDR, 16), wo(STATUS, 1)]);
    r.q.write_desc(&r.mem, head + 1, STATUS, 1, 2 | 1, head);
    r.q.publish(&r.mem, head);
    r.q.notify();
    // The device still serves a good request afterwards.
    std::thread::sleep(Duration::from_millis(50));
    r.q.take_used(&r.mem);
    assert_eq!(r.request(T_IN, 0, Some(wo(DATA, 512))), (S_OK, 513));
}

#[test]
fn event_idx_suppresses_interrupts_until_used_event() {
    let mut r = rig();
    // Interrupt only when the used index moves past 2, i.e. at the third completion.
    r.q.set_used_event(&r.mem, 2);
    for i in 0..2 {
        assert_eq!(r.request(T_IN, i, Some(wo(DATA, 512))).0, S_OK);
    }
    assert_eq!(r.request(T_IN, 5, Some(wo(DATA, 512))).0, S_OK);
    assert!(wait_for(|| r.irq.count(0) >= 1));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.irq.count(0), 1, "interrupts despite used_event");
    // The device asks to be kicked for the next request.
    assert_eq!(r.q.avail_event(&r.mem), 3);

    // A batch of requests with one kick: all served, one interrupt at used_event.
    r.q.set_used_event(&r.mem, 3 + 7);
    for i in 0..8u64 {
        r.header(HDR + 0x20 * i, T_IN, i);
        r.q.add_chain(
            &r.mem,
            &[
                ro(HDR + 0x20 * i, 16),
                wo(DATA + 512 * i, 512),
                wo(STATUS + i, 1),
            ],
        );
    }
    r.q.notify();
    assert_eq!(r.q.wait_used(&r.mem, 8).len(), 8);
    assert!(wait_for(|| r.irq.count(0) >= 2));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.irq.count(0), 2);
}

#[test]
fn without_event_idx_every_batch_interrupts() {
    let features = Block::new(Arc::new(
        RawFile::open(tempfile::NamedTempFile::new().unwrap().path(), false).unwrap(),
    ))
    .features()
        & !VIRTIO_RING_F_EVENT_IDX;
    let mut r = rig_with(false, Some(features));
    r.q.set_used_event(&r.mem, 100); // Ignored without EVENT_IDX.
    for i in 0..3 {
        assert_eq!(r.request(T_IN, i, Some(wo(DATA, 512))).0, S_OK);
        assert!(wait_for(|| r.irq.count(0) > i));
    }
    // A polling driver sets VRING_AVAIL_F_NO_INTERRUPT and gets none.
    r.q.set_avail_flags(&r.mem, 1);
    for i in 0..3 {
        assert_eq!(r.request(T_IN, i, Some(wo(DATA, 512))).0, S_OK);
    }
    r.q.set_avail_flags(&r.mem, 0);
    assert_eq!(r.request(T_IN, 0, Some(wo(DATA, 512))).0, S_OK);
    assert!(wait_for(|| r.irq.count(0) >= 4));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.irq.count(0), 4);
}

#[test]
fn device_writes_are_recorded_in_the_dirty_bitmap() {
    let mut r = rig();
    let src = DATA + 40 * 4096;
    r.mem.write_slice(&[7u8; 4096], GuestAddress(src)).unwrap();
    assert_eq!(r.request(T_OUT, 0, Some(ro(src, 4096))).0, S_OK);
    clear_dirty(&r.mem);
    let dst = DATA + 10 * 4096 + 2048; // Straddles two pages.
    let status = STATUS + 64 * 4096;
    r.header(HDR, T_IN, 0);
    r.q.add_chain(&r.mem, &[ro(HDR, 16), wo(dst, 4096), wo(status, 1)]);
    // The driver's own writes above are not what we check: forget them.
    clear_dirty(&r.mem);
    r.q.notify();
    r.q.wait_used(&r.mem, 1);
    assert_eq!(r.guest_bytes(dst, 4096), vec![7u8; 4096]);
    assert!(is_dirty(&r.mem, dst));
    assert!(is_dirty(&r.mem, dst + 4095));
    assert!(is_dirty(&r.mem, status));
    assert!(is_dirty(&r.mem, r.q.used_ring_addr()));
    // Pages the device only read, and pages nobody touched, stay clean.
    assert!(!is_dirty(&r.mem, src));
    assert!(!is_dirty(&r.mem, HDR));
    assert!(!is_dirty(&r.mem, DATA + 200 * 4096));
}

#[test]
fn reset_stops_the_worker_and_reactivation_works() {
    let mut r = rig();
    assert_eq!(r.request(T_FLUSH, 0, None).0, S_OK);
    r.dev.reset();
    r.header(HDR, T_FLUSH, 0);
    r.q.add_chain(&r.mem, &[ro(HDR, 16), wo(STATUS, 1)]);
    r.q.notify();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        r.q.take_used(&r.mem).len(),
        0,
        "device served a queue after reset"
    );

    let features = r.dev.features();
    let (mut qs, _irq) = activate_with(&mut r.dev, &r.mem, QSIZE, features);
    r.q = qs.remove(0);
    assert_eq!(r.request(T_FLUSH, 0, None).0, S_OK);
    // Activating twice without a reset is refused.
    let (_q, handle) = DriverQueue::new(&r.mem, 5, QSIZE);
    let irq = Arc::new(RecordingInterrupt::default());
    assert!(r.dev.activate(r.mem.clone(), irq, vec![handle]).is_err());
}

#[test]
fn bogus_avail_index_neither_spins_nor_blocks_reset() {
    let r = rig();
    r.mem
        .store(
            1000u16.to_le(),
            GuestAddress(r.q.avail_addr() + 2),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
    r.q.notify();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.q.used_idx(&r.mem), 0);
    // A spinning worker would never see the stop request.
    reset_in_time(r.dev);
}

#[test]
fn wrong_queue_count_is_refused() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let mut dev = Block::new(Arc::new(RawFile::open(file.path(), false).unwrap()));
    let mem = guest_memory();
    let irq = Arc::new(RecordingInterrupt::default());
    assert!(dev.activate(mem, irq, Vec::new()).is_err());
}

#[test]
fn resize_updates_capacity_and_notifies_the_driver() {
    let r = rig();
    let resizer = r.dev.resizer();
    resizer.resize(2 * DISK_SIZE).unwrap();
    assert_eq!(read_config_u64(&r.dev, 0), 2 * DISK_SIZE / 512);
    assert_eq!(r.irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Once reset, nobody is told (the driver re-reads config when it initialises again).
    let dev = reset_in_time(r.dev);
    resizer.resize(DISK_SIZE).unwrap();
    assert_eq!(read_config_u64(&dev, 0), DISK_SIZE / 512);
    assert_eq!(r.irq.config.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn requests_follow_the_size_after_a_resize() {
    let mut r = rig();
    let resizer = r.dev.resizer();
    let last = DISK_SIZE / 512 - 1;
    let (status, _) = r.request(T_IN, last, Some(wo(DATA, 512)));
    assert_eq!(status, S_OK);
    // Shrunk: the old last sector is now past the end.
    resizer.resize(DISK_SIZE / 2).unwrap();
    assert_eq!(resizer.size(), DISK_SIZE / 2);
    assert_eq!(read_config_u64(&r.dev, 0), DISK_SIZE / 1024);
    let (status, _) = r.request(T_IN, last, Some(wo(DATA, 512)));
    assert_eq!(status, S_IOERR);
    let data = vec![0x5au8; 4096];
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (status, _) = r.request(T_OUT, DISK_SIZE / 1024 - 4, Some(ro(DATA, 4096)));
    assert_eq!(
        status, S_IOERR,
        "a write straddling the new end went through"
    );
    // Grown past the original size: the new area takes writes and reads them back.
    resizer.resize(4 * DISK_SIZE).unwrap();
    assert_eq!(r.backend.size(), 4 * DISK_SIZE);
    let sector = 3 * DISK_SIZE / 512;
    let (status, _) = r.request(T_OUT, sector, Some(ro(DATA, 4096)));
    assert_eq!(status, S_OK);
    assert_eq!(r.file_bytes(3 * DISK_SIZE, 4096), data);
    r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    let (status, _) = r.request(T_IN, sector, Some(wo(DATA, 4096)));
    assert_eq!(status, S_OK);
    assert_eq!(r.guest_bytes(DATA, 4096), data);
    // Two resizes, two config interrupts; a size change made elsewhere is one more.
    assert_eq!(r.irq.config.load(std::sync::atomic::Ordering::SeqCst), 2);
    resizer.size_changed().unwrap();
    assert_eq!(r.irq.config.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[test]
fn read_only_disk_refuses_a_resize() {
    let r = rig_with(true, None);
    let resizer = r.dev.resizer();
    assert!(matches!(
        resizer.resize(2 * DISK_SIZE),
        Err(vireo_block::BlockError::ReadOnly)
    ));
    assert_eq!(read_config_u64(&r.dev, 0), DISK_SIZE / 512);
    assert_eq!(r.irq.config.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn request_behind_an_indirect_table() {
    let mut r = rig();
    assert_ne!(
        r.dev.features() & vireo_virtio::VIRTIO_RING_F_INDIRECT_DESC,
        0
    );
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 5) as u8).collect();
    r.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(T_OUT, 9, Some(ro(DATA, 1024))).0, S_OK);

    let table = DATA_BASE + 0x30000;
    let back = DATA + 0x20000;
    let entries: [(u64, u32, u16, u16); 3] = [
        (HDR, 16, 1, 1),        // NEXT
        (back, 1024, 1 | 2, 2), // NEXT | WRITE
        (STATUS, 1, 2, 0),      // WRITE
    ];
    for (i, (addr, len, flags, next)) in entries.iter().enumerate() {
        let at = table + 16 * i as u64;
        r.mem.write_obj(*addr, GuestAddress(at)).unwrap();
        r.mem.write_obj(*len, GuestAddress(at + 8)).unwrap();
        r.mem.write_obj(*flags, GuestAddress(at + 12)).unwrap();
        r.mem.write_obj(*next, GuestAddress(at + 14)).unwrap();
    }
    r.header(HDR, T_IN, 9);
    let head = 7;
    r.q.write_desc(&r.mem, head, table, 48, 4, 0); // INDIRECT
    r.q.publish(&r.mem, head);
    r.q.notify();
    let used = r.q.wait_used(&r.mem, 1);
    assert_eq!(used[0], (head, 1025));
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(r.guest_bytes(back, 1024), data);
}

/// A backend whose writes take `delay`, so a request is surely in flight when a pause comes.
struct SlowWrites {
    inner: Arc<RawFile>,
    delay: Duration,
}

impl BlockBackend for SlowWrites {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), vireo_block::BlockError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), vireo_block::BlockError> {
        std::thread::sleep(self.delay);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), vireo_block::BlockError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), vireo_block::BlockError> {
        self.inner.discard(offset, len)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn resize(&self, new_size: u64) -> Result<(), vireo_block::BlockError> {
        self.inner.resize(new_size)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> String {
        "slow".into()
    }
}

/// A VM pause, device side: the requests the worker had taken from the ring (both writes, found
/// in one look and run as one batch) finish and are published in the used ring before `pause`
/// returns, so nothing is in flight at the park; a request submitted while paused waits until
/// resume. Pause and resume are idempotent.
#[test]
fn pause_stops_at_a_request_boundary_and_resume_serves_what_waited() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(DISK_SIZE).unwrap();
    let inner = Arc::new(RawFile::open(file.path(), false).unwrap());
    let delay = Duration::from_millis(300);
    let mut dev = Block::new(Arc::new(SlowWrites { inner, delay }));
    let mem = guest_memory();
    let features = dev.features();
    let (mut qs, _irq) = activate_with(&mut dev, &mem, QSIZE, features);
    let q = &mut qs[0];
    mem.write_slice(&[9u8; 4096], GuestAddress(DATA)).unwrap();
    // Two writes, each with its own header and status byte.
    for i in 0..2u64 {
        let hdr = HDR + i * 16;
        mem.write_obj(T_OUT.to_le(), GuestAddress(hdr)).unwrap();
        mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        mem.write_obj((i * 8).to_le(), GuestAddress(hdr + 8))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        q.add_chain(&mem, &[ro(hdr, 16), ro(DATA, 4096), wo(STATUS + i, 1)]);
    }
    q.notify();
    // Let the first write start, then pause while it sleeps in the backend.
    std::thread::sleep(delay / 3);
    let start = Instant::now();
    dev.pause(Duration::from_secs(10)).unwrap();
    assert!(
        start.elapsed() >= delay / 3,
        "returned before the write finished"
    );
    assert!(
        start.elapsed() >= delay,
        "returned before the second write of the batch finished"
    );
    let used = q.take_used(&mem);
    assert_eq!(used.len(), 2, "the in-flight batch is published");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(), S_OK);
    dev.pause(Duration::ZERO).unwrap();
    // Submitted while paused: nothing moves.
    mem.write_obj(T_FLUSH.to_le(), GuestAddress(HDR + 32))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS + 2)).unwrap();
    q.add_chain(&mem, &[ro(HDR + 32, 16), wo(STATUS + 2, 1)]);
    q.notify();
    std::thread::sleep(delay * 2);
    assert_eq!(
        q.take_used(&mem),
        vec![],
        "a paused device served a request"
    );
    assert_eq!(dev.counters().snapshot().writes, 2);
    dev.resume();
    dev.resume();
    let used = q.wait_used(&mem, 1);
    assert_eq!(used.len(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 2)).unwrap(), S_OK);
    let s = dev.counters().snapshot();
    assert_eq!((s.writes, s.flushes), (2, 1));
    // A reset of a paused device does not wait for a resume.
    dev.pause(Duration::from_secs(10)).unwrap();
    reset_in_time(dev);
}

/// Time paused is not time throttled: a request held by `max_iops` when the pause comes counts
/// its hold up to the pause, not the pause itself.
#[test]
fn paused_time_is_not_counted_as_throttled() {
    let mut r = rig_qos(
        false,
        None,
        None,
        QosConfig {
            max_iops: Some(1),
            min_iops: None,
        },
    );
    // 512 KiB (64 IOs) passes on the burst and leaves 63 s of debt; the next request is held.
    assert_eq!(r.request(T_IN, 0, Some(wo(DATA, 512 << 10))).0, S_OK);
    r.header(HDR, T_IN, 0);
    r.q.add_chain(&r.mem, &[ro(HDR, 16), wo(DATA, 512), wo(STATUS, 1)]);
    r.q.notify();
    std::thread::sleep(Duration::from_millis(50));
    r.dev.pause(Duration::from_secs(10)).unwrap();
    let paused = Duration::from_millis(400);
    std::thread::sleep(paused);
    r.dev.resume();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(r.q.take_used(&r.mem), vec![], "still held by the bucket");
    let dev = reset_in_time(r.dev);
    let held = Duration::from_nanos(dev.counters().snapshot().throttled_ns);
    assert!(held >= Duration::from_millis(40), "{held:?}");
    assert!(
        held < paused,
        "the pause was counted as throttling: {held:?}"
    );
}
