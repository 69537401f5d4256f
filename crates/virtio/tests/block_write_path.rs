//! The batched write path of virtio-blk: writes run one after the other on the queue's worker
//! (not through io_uring) while the batch's small reads are in the ring, and every request is
//! published on the used ring as soon as it is finished rather than with the whole batch.
//!
//! - Writes and reads of every size from 512 B to 1.5 MiB (inside the ring's limit and past it,
//!   one descriptor or several, across VHDX payload blocks), many per batch, on a raw file and a
//!   dynamic VHDX, with pauses in the middle of batches: every read and the whole disk at the
//!   end match a model byte for byte, and a paused disk publishes nothing.
//! - A write held inside the backend: the requests finished before it are already in the used
//!   ring, a pause cannot complete while it is in flight, and once it is let go the batch ends
//!   before the worker parks.
//!
//! The seed is printed; `VIREO_STRESS_SEED=<n>` replays a run.

mod common;

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::stress::*;
use common::*;
use vireo_block::{BlockBackend, BlockError, GuestBuf, RawFile};
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};
use vireo_virtio::{Block, GuestMemory, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const QSIZE: u16 = 128;
const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 8 * MIB;
const MAX_LEN: u64 = 3 * MIB / 2;
const MAX_QD: usize = 6;
const SLOT_STRIDE: u64 = MAX_LEN + (16 << 10);
const BATCHES: usize = 40;

/// A request header at `hdr` and its status byte after it.
fn header(mem: &GuestMemory, hdr: u64, kind: u32, sector: u64) -> u64 {
    mem.write_obj(kind.to_le(), GuestAddress(hdr)).unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(hdr + 8))
        .unwrap();
    let status = hdr + 0x80;
    mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    status
}

/// A sector-multiple length, spread so small, ring-sized and large requests all come up.
fn random_len(rng: &mut Rng) -> u64 {
    let max_sectors = match rng.below(3) {
        0 => 8,
        1 => 128,
        _ => MAX_LEN / 512,
    };
    512 * (1 + rng.below(max_sectors))
}

struct Req {
    write: bool,
    offset: u64,
    pieces: Vec<(u64, u32)>,
    status: u64,
    data: Vec<u8>,
}

/// Runs the random batches and returns the model of the disk at the end.
fn run_random_load(backend: Arc<dyn BlockBackend>, initial: Vec<u8>) -> Vec<u8> {
    let seed = stress_seed("block write path");
    let mut rng = Rng(seed);
    let mut model = initial;
    let mut dev = Block::with_queue_size(backend.clone(), QSIZE);
    let mem = guest_memory();
    let (mut qs, _irq) = activate_all(&mut dev, &mem, QSIZE);
    let q = &mut qs[0];
    let (mut writes, mut reads, mut large) = (0usize, 0usize, 0usize);
    for batch in 0..BATCHES {
        let qd = 1 + rng.below(MAX_QD as u64) as usize;
        let mut reqs: Vec<Req> = Vec::new();
        let mut claimed: Vec<(u64, u64)> = Vec::new();
        let mut tries = 0;
        while reqs.len() < qd && tries < 20 * MAX_QD {
            tries += 1;
            let write = rng.below(3) != 0;
            let len = random_len(&mut rng);
            let offset = 512 * rng.below((DISK_SIZE - len) / 512 + 1);
            // Requests of a batch run in any order: none overlaps another of its batch.
            if claimed
                .iter()
                .any(|&(o, l)| offset < o + l && o < offset + len)
            {
                continue;
            }
            claimed.push((offset, len));
            let i = reqs.len();
            let kind = if write { T_OUT } else { T_IN };
            let status = header(&mem, DATA_BASE + 0x100 * i as u64, kind, offset / 512);
            let base = DATA_BASE + 0x10000 + i as u64 * SLOT_STRIDE;
            // One descriptor, or two split at a random sector with a gap between them.
            let pieces = if len > 512 && rng.below(2) == 0 {
                let cut = 512 * (1 + rng.below(len / 512 - 1));
                vec![(base, cut as u32), (base + cut + 4096, (len - cut) as u32)]
            } else {
                vec![(base, len as u32)]
            };
            let mut data = Vec::new();
            if write {
                data = (0..len).map(|_| rng.next() as u8).collect();
                let mut at = 0;
                for &(addr, n) in &pieces {
                    mem.write_slice(&data[at..at + n as usize], GuestAddress(addr))
                        .unwrap();
                    at += n as usize;
                }
            } else {
                for &(addr, n) in &pieces {
                    mem.write_slice(&vec![0x5a; n as usize], GuestAddress(addr))
                        .unwrap();
                }
            }
            let mut bufs = vec![ro(DATA_BASE + 0x100 * i as u64, 16)];
            for &(addr, n) in &pieces {
                bufs.push(if write { ro(addr, n) } else { wo(addr, n) });
            }
            bufs.push(wo(status, 1));
            q.add_chain(&mem, &bufs);
            writes += usize::from(write);
            reads += usize::from(!write);
            large += usize::from(len > 64 << 10);
            reqs.push(Req {
                write,
                offset,
                pieces,
                status,
                data,
            });
        }
        q.notify();
        if batch % 7 == 3 {
            // A pause while the batch may be running: it finishes what it took, publishes it,
            // and publishes nothing more until resumed.
            pause_quietly_then_resume(&mut dev, q, &mem, DEVICE_TIMEOUT);
        }
        let used = q.wait_used(&mem, reqs.len() as u16);
        assert_eq!(used.len(), reqs.len(), "seed {seed} batch {batch}");
        for (i, req) in reqs.iter().enumerate() {
            let status: u8 = mem.read_obj(GuestAddress(req.status)).unwrap();
            assert_eq!(status, 0, "seed {seed} batch {batch} request {i}");
            if !req.write {
                let mut got = Vec::new();
                for &(addr, n) in &req.pieces {
                    let mut piece = vec![0; n as usize];
                    mem.read_slice(&mut piece, GuestAddress(addr)).unwrap();
                    got.extend(piece);
                }
                let want = &model[req.offset as usize..req.offset as usize + got.len()];
                assert!(
                    got == want,
                    "seed {seed} batch {batch}: read of {} at {} differs",
                    got.len(),
                    req.offset
                );
            }
        }
        for req in reqs.iter().filter(|r| r.write) {
            let at = req.offset as usize;
            model[at..at + req.data.len()].copy_from_slice(&req.data);
        }
        if batch % 10 == 9 {
            let status = header(&mem, DATA_BASE, T_FLUSH, 0);
            q.add_chain(&mem, &[ro(DATA_BASE, 16), wo(status, 1)]);
            q.notify();
            q.wait_used(&mem, 1);
            let status: u8 = mem.read_obj(GuestAddress(status)).unwrap();
            assert_eq!(status, 0, "flush");
        }
    }
    eprintln!("block write path: {writes} writes, {reads} reads, {large} over 64 KiB");
    assert!(writes > 0 && reads > 0 && large > 0);
    drop(reset_in_time(dev));
    let mut on_disk = vec![0u8; DISK_SIZE as usize];
    backend.read_at(&mut on_disk, 0).unwrap();
    assert!(
        on_disk == model,
        "seed {seed}: the disk differs from the model"
    );
    model
}

fn pattern() -> Vec<u8> {
    (0..DISK_SIZE).map(|i| (i * 131 % 253) as u8).collect()
}

#[test]
fn writes_of_every_size_land_byte_for_byte_on_a_raw_file() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let model = pattern();
    std::fs::write(file.path(), &model).unwrap();
    let backend = Arc::new(RawFile::open(file.path(), false).unwrap());
    let model = run_random_load(backend, model);
    // The file itself, not only what the backend reads back.
    assert!(std::fs::read(file.path()).unwrap() == model);
}

#[test]
fn writes_of_every_size_land_byte_for_byte_on_a_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.vhdx");
    let opts = CreateOptions {
        size: DISK_SIZE,
        disk_type: DiskType::Dynamic,
        block_size: MIB as u32,
        ..CreateOptions::default()
    };
    let vhdx = Vhdx::create(&path, &opts).unwrap();
    // Half the blocks present (the direct path), half absent (allocated by the guest's
    // writes), so requests cross between the two.
    let model = pattern();
    for block in (0..DISK_SIZE / MIB).step_by(2) {
        let at = (block * MIB) as usize;
        vhdx.write_at(&model[at..at + MIB as usize], block * MIB)
            .unwrap();
    }
    let mut initial = vec![0u8; DISK_SIZE as usize];
    for block in (0..DISK_SIZE / MIB).step_by(2) {
        let at = (block * MIB) as usize;
        initial[at..at + MIB as usize].copy_from_slice(&model[at..at + MIB as usize]);
    }
    run_random_load(Arc::new(vhdx), initial);
    let report = Vhdx::check(&path, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// A raw file whose write at one offset waits inside the backend until the test lets it go.
struct HeldWrite {
    inner: RawFile,
    at: u64,
    arrived: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
}

impl BlockBackend for HeldWrite {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.inner.write_at(buf, offset)
    }
    fn read_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_vectored_at(&self, bufs: &[GuestBuf<'_>], offset: u64) -> Result<(), BlockError> {
        if offset == self.at {
            let _ = self.arrived.lock().unwrap().send(());
            let _ = self.go.lock().unwrap().recv_timeout(DEVICE_TIMEOUT);
        }
        self.inner.write_vectored_at(bufs, offset)
    }
    fn vectored_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.inner.vectored_fd()
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn resize(&self, new_size: u64) -> Result<(), BlockError> {
        self.inner.resize(new_size)
    }
    fn read_only(&self) -> bool {
        false
    }
    fn id(&self) -> String {
        self.inner.id()
    }
}

#[test]
fn finished_requests_are_published_while_a_write_of_their_batch_is_held() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let model = pattern();
    std::fs::write(file.path(), &model).unwrap();
    let (arrived_tx, arrived) = channel();
    let (go, go_rx) = channel();
    let held_at = 2 * MIB;
    let backend = Arc::new(HeldWrite {
        inner: RawFile::open(file.path(), false).unwrap(),
        at: held_at,
        arrived: Mutex::new(arrived_tx),
        go: Mutex::new(go_rx),
    });
    let mut dev = Block::with_queue_size(backend.clone(), QSIZE);
    let mem = guest_memory();
    let (mut qs, _irq) = activate_all(&mut dev, &mem, QSIZE);
    let q = &mut qs[0];
    // write, read, held write, read, write: the two 4 KiB reads make it a ring batch.
    let plan: [(bool, u64); 5] = [
        (true, 0),
        (false, MIB),
        (true, held_at),
        (false, 3 * MIB),
        (true, 4 * MIB),
    ];
    let mut statuses = Vec::new();
    for (i, &(write, offset)) in plan.iter().enumerate() {
        let hdr = DATA_BASE + 0x100 * i as u64;
        let kind = if write { T_OUT } else { T_IN };
        let status = header(&mem, hdr, kind, offset / 512);
        let buf = DATA_BASE + 0x10000 + i as u64 * 0x2000;
        mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(buf))
            .unwrap();
        let data = if write { ro(buf, 4096) } else { wo(buf, 4096) };
        q.add_chain(&mem, &[ro(hdr, 16), data, wo(status, 1)]);
        statuses.push(status);
    }
    q.notify();
    arrived
        .recv_timeout(DEVICE_TIMEOUT)
        .expect("the held write reached the backend");
    assert!(
        wait_for(|| q.used_idx(&mem) >= 1),
        "nothing was published while one write of the batch was held"
    );
    assert!(q.used_idx(&mem) < 5, "the held write was published");
    // The worker has a request in flight, so it cannot park.
    assert!(dev.pause(Duration::from_millis(200)).is_err());
    go.send(()).unwrap();
    // Still asked to pause: it finishes the batch first, then parks with all of it published.
    dev.pause(DEVICE_TIMEOUT).unwrap();
    assert_eq!(
        q.used_idx(&mem),
        5,
        "the worker parked with requests unpublished"
    );
    dev.save_state()
        .expect("a paused disk's state can be saved");
    dev.resume();
    let used = q.wait_used(&mem, 5);
    assert_eq!(used.len(), 5);
    for (i, &(write, offset)) in plan.iter().enumerate() {
        let status: u8 = mem.read_obj(GuestAddress(statuses[i])).unwrap();
        assert_eq!(status, 0, "request {i}");
        let buf = DATA_BASE + 0x10000 + i as u64 * 0x2000;
        let mut got = vec![0u8; 4096];
        if write {
            backend.read_at(&mut got, offset).unwrap();
            assert_eq!(got, vec![i as u8 + 1; 4096], "write {i} on disk");
        } else {
            mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
            let at = offset as usize;
            assert_eq!(got, model[at..at + 4096], "read {i}");
        }
    }
    drop(reset_in_time(dev));
}
