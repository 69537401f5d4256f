//! A randomized load on virtio-blk through real split virtqueues: batches of 1–32 requests in
//! flight (reads, writes, flushes, discards, write-zeroes; 512 B to 128 KiB, each split into
//! one to three descriptors scattered in guest memory), a grow and a shrink of the disk, and a
//! pause with save in the middle of a batch. Every read is checked byte for byte against a
//! host-side model of the disk, and the file against the model at the end.
//!
//! The seed is printed; `VIREO_STRESS_SEED=<n>` replays a run.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::stress::*;
use common::*;
use vireo_block::{BlockBackend, RawFile};
use vireo_virtio::Block;
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
/// Room for MAX_QD chains of up to 5 descriptors each (the test driver does not recycle
/// descriptors of chains still in flight).
const QSIZE: u16 = 256;
const MAX_QD: usize = 32;
const MAX_SECTORS: u64 = 256;
const SLOT_STRIDE: u64 = 160 << 10;
const DISK_SIZE: u64 = 4 << 20;
const BATCHES: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
    Flush,
    Discard,
    Zero,
}

/// One request of a batch: what it does and where its buffers are in guest memory.
struct Req {
    op: Op,
    offset: u64,
    len: u64,
    /// Guest addresses and lengths of the data pieces, in stream order.
    pieces: Vec<(u64, u32)>,
    status: u64,
    /// For writes, the bytes written.
    data: Vec<u8>,
}

fn slot_base(i: usize) -> u64 {
    DATA_BASE + 0x10000 + i as u64 * SLOT_STRIDE
}

/// Splits `len` bytes into 1–3 pieces at random byte positions, each placed with a gap after
/// the previous one, so the device sees several unaligned descriptors per request.
fn scatter(rng: &mut Rng, base: u64, len: u64) -> Vec<(u64, u32)> {
    let n = 1 + rng.below(3).min(len.saturating_sub(1));
    let mut cuts: Vec<u64> = (1..n).map(|_| 1 + rng.below(len - 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut addr = base;
    for end in cuts.into_iter().chain([len]) {
        let piece = end - start;
        pieces.push((addr, piece as u32));
        addr += piece + 4096 + rng.below(64);
        start = end;
    }
    pieces
}

#[test]
fn random_mixed_load_keeps_every_byte() {
    let seed = stress_seed("block stress");
    let mut rng = Rng(seed);

    let file = tempfile::NamedTempFile::new().unwrap();
    let mut model: Vec<u8> = (0..DISK_SIZE).map(|i| (i * 131 % 253) as u8).collect();
    std::fs::write(file.path(), &model).unwrap();
    let backend = Arc::new(RawFile::open(file.path(), false).unwrap());
    let mut dev = Block::with_queue_size(backend.clone(), QSIZE);
    let resizer = dev.resizer();
    let mem = guest_memory();
    let (mut qs, _irq) = activate_all(&mut dev, &mem, QSIZE);
    let q = &mut qs[0];

    let mut ops = [0usize; 5];
    for batch in 0..BATCHES {
        // The disk changes size twice along the way; the model follows.
        if batch == BATCHES / 3 {
            resizer.resize(DISK_SIZE * 2).unwrap();
            model.resize((DISK_SIZE * 2) as usize, 0);
        } else if batch == 2 * BATCHES / 3 {
            resizer.resize(DISK_SIZE + 512 * 7).unwrap();
            model.truncate((DISK_SIZE + 512 * 7) as usize);
        }
        let size = model.len() as u64;
        let sectors = size / 512;
        let qd = 1 + rng.below(MAX_QD as u64) as usize;
        let mut reqs: Vec<Req> = Vec::new();
        // Requests of a batch may run in any order: a write, discard or zeroing never
        // overlaps another request of its batch, so the model's outcome is the only one.
        let mut claimed: Vec<((u64, u64), bool)> = Vec::new();
        let mut tries = 0;
        while reqs.len() < qd && tries < 10 * MAX_QD {
            tries += 1;
            let op = match rng.below(12) {
                0..=4 => Op::Read,
                5..=8 => Op::Write,
                9 => Op::Flush,
                10 => Op::Discard,
                _ => Op::Zero,
            };
            let n = 1 + rng.below(MAX_SECTORS.min(sectors));
            let start = rng.below(sectors - n + 1);
            let range = (start * 512, n * 512);
            let writes = op != Op::Read;
            if op != Op::Flush
                && claimed
                    .iter()
                    .any(|&(r, w)| (w || writes) && overlaps(r, range))
            {
                continue;
            }
            if op != Op::Flush {
                claimed.push((range, writes));
            }
            let i = reqs.len();
            let hdr = DATA_BASE + 0x100 * i as u64;
            let mut req = Req {
                op,
                offset: range.0,
                len: range.1,
                pieces: Vec::new(),
                status: hdr + 0x80,
                data: Vec::new(),
            };
            let (kind, sector) = match op {
                Op::Read => (T_IN, start),
                Op::Write => (T_OUT, start),
                Op::Flush => (T_FLUSH, 0),
                Op::Discard => (T_DISCARD, 0),
                Op::Zero => (T_WRITE_ZEROES, 0),
            };
            mem.write_obj(kind.to_le(), GuestAddress(hdr)).unwrap();
            mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
            mem.write_obj(sector.to_le(), GuestAddress(hdr + 8))
                .unwrap();
            mem.write_obj(0xeeu8, GuestAddress(req.status)).unwrap();
            match op {
                Op::Read | Op::Write => {
                    req.pieces = scatter(&mut rng, slot_base(i), range.1);
                    if op == Op::Write {
                        req.data = (0..range.1).map(|_| rng.next() as u8).collect();
                        let mut at = 0;
                        for &(addr, len) in &req.pieces {
                            mem.write_slice(&req.data[at..at + len as usize], GuestAddress(addr))
                                .unwrap();
                            at += len as usize;
                        }
                    } else {
                        // Poison, so a read that writes nothing is caught.
                        for &(addr, len) in &req.pieces {
                            mem.write_slice(&vec![0x5a; len as usize], GuestAddress(addr))
                                .unwrap();
                        }
                    }
                }
                Op::Discard | Op::Zero => {
                    let seg = slot_base(i);
                    mem.write_obj(start.to_le(), GuestAddress(seg)).unwrap();
                    mem.write_obj((n as u32).to_le(), GuestAddress(seg + 8))
                        .unwrap();
                    mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
                    req.pieces = vec![(seg, 16)];
                }
                Op::Flush => {}
            }
            let mut bufs = vec![ro(hdr, 16)];
            for &(addr, len) in &req.pieces {
                bufs.push(if op == Op::Read {
                    wo(addr, len)
                } else {
                    ro(addr, len)
                });
            }
            bufs.push(wo(req.status, 1));
            q.add_chain(&mem, &bufs);
            reqs.push(req);
        }
        q.notify();
        if batch == BATCHES / 2 {
            // A VM pause in the middle of a batch: whatever was in flight is finished and
            // published, the state can be taken, and resume serves the rest.
            pause_quietly_then_resume(&mut dev, q, &mem, Duration::from_secs(10));
        }
        let used = q.wait_used(&mem, reqs.len() as u16);
        assert_eq!(used.len(), reqs.len(), "seed {seed} batch {batch}");
        // Check against the model as it stood before the batch, then apply the batch.
        for (i, req) in reqs.iter().enumerate() {
            let status: u8 = mem.read_obj(GuestAddress(req.status)).unwrap();
            assert_eq!(
                status, 0,
                "seed {seed} batch {batch} request {i} {:?} at {} len {}",
                req.op, req.offset, req.len
            );
            if req.op == Op::Read {
                let mut got = Vec::new();
                for &(addr, len) in &req.pieces {
                    let mut piece = vec![0; len as usize];
                    mem.read_slice(&mut piece, GuestAddress(addr)).unwrap();
                    got.extend(piece);
                }
                let want = &model[req.offset as usize..(req.offset + req.len) as usize];
                if got != want {
                    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "seed {seed} batch {batch}: read of {} at {} differs from byte {first}",
                        req.len, req.offset
                    );
                }
            }
        }
        for req in &reqs {
            let r = req.offset as usize..(req.offset + req.len) as usize;
            match req.op {
                Op::Write => model[r].copy_from_slice(&req.data),
                Op::Discard | Op::Zero => model[r].fill(0),
                Op::Read | Op::Flush => {}
            }
        }
        for req in &reqs {
            let k = match req.op {
                Op::Read => 0,
                Op::Write => 1,
                Op::Flush => 2,
                Op::Discard => 3,
                Op::Zero => 4,
            };
            ops[k] += 1;
        }
    }
    eprintln!("block stress: reads/writes/flushes/discards/zeroes {ops:?}");
    assert!(ops.iter().all(|&n| n > 0), "every kind ran: {ops:?}");
    let dev = reset_in_time(dev);
    drop(dev);
    assert_eq!(backend.size(), model.len() as u64);
    let on_disk = std::fs::read(file.path()).unwrap();
    assert!(
        on_disk == model,
        "seed {seed}: the file differs from the model"
    );
}
