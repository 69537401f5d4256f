//! Multiqueue virtio-blk (VIRTIO_BLK_F_MQ) under a randomized load: three request queues, each
//! with its own worker thread, fed at once. Every round the queues race to allocate one fresh
//! payload block (interleaved 4 KiB writes of one block, one request per queue and stripe),
//! and random reads and writes of 512 B to 64 KiB land anywhere, reads freely overlapping
//! reads and earlier rounds' writes. In the middle of a round the device is paused, saved,
//! and replaced by a new device restored from that state (built with one queue, so it must
//! take the saved count), which finishes the round. Every read is checked byte for byte
//! against a model, and at the end the image is reopened from its file (VHDX: BAT and sector
//! bitmaps as written by the concurrent allocations, then `check`) and compared whole.
//!
//! Backends: raw, dynamic VHD, dynamic VHDX, and a differencing VHDX over a patterned parent
//! (partially present blocks). The seed is printed; `VIREO_STRESS_SEED=<n>` replays a run.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::stress::*;
use common::*;
use vireo_block::{BlockBackend, RawFile};
use vireo_vhdx::vhd::{DiskType as VhdType, Vhd, VhdCreateOptions};
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};
use vireo_virtio::state::DeviceState;
use vireo_virtio::{Block, StateError, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const QUEUES: usize = 3;
const QSIZE: u16 = 256;
const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 32 * MIB;
/// The VHDX payload block (the smallest the format allows) and the VHD block.
const BLOCK: u64 = MIB;
const ROUNDS: usize = 40;
/// Fresh blocks raced for per round (while there are any).
const RACES_PER_ROUND: usize = 2;
const RANDOM_PER_ROUND: usize = 18;
const MAX_LEN: u64 = 64 << 10;
const SLOT_STRIDE: u64 = 68 << 10;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Read,
    Write,
    Flush,
}

struct Req {
    op: Op,
    queue: usize,
    offset: u64,
    len: u64,
    data_at: u64,
    status: u64,
    data: Vec<u8>,
}

/// The image kinds under test and how each one is made and reopened.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Raw,
    Vhd,
    Vhdx,
    VhdxChild,
}

/// Creates the image in `dir`; returns its backend and what the disk reads as at first.
fn create(kind: Kind, dir: &Path) -> (Arc<dyn BlockBackend>, Vec<u8>) {
    let path = image_path(kind, dir);
    let zeroes = vec![0u8; DISK_SIZE as usize];
    match kind {
        Kind::Raw => {
            std::fs::write(&path, &zeroes).unwrap();
            (Arc::new(RawFile::open(&path, false).unwrap()), zeroes)
        }
        Kind::Vhd => {
            let opts = VhdCreateOptions {
                size: DISK_SIZE,
                disk_type: VhdType::Dynamic,
                block_size: Some(BLOCK as u32),
            };
            (Arc::new(Vhd::create(&path, &opts).unwrap()), zeroes)
        }
        Kind::Vhdx => (
            Arc::new(Vhdx::create(&path, &vhdx_opts(None)).unwrap()),
            zeroes,
        ),
        Kind::VhdxChild => {
            // The parent holds a pattern in some blocks, so the child's first writes land in
            // partially present blocks whose other sectors must keep reading the parent.
            let parent = dir.join("parent.vhdx");
            let base = Vhdx::create(&parent, &vhdx_opts(None)).unwrap();
            let mut model = zeroes;
            for block in [0u64, 2, 3, 6, 11, 17, 18, 30] {
                let at = (block * BLOCK) as usize;
                for (i, b) in model[at..at + BLOCK as usize].iter_mut().enumerate() {
                    *b = (i * 7 % 251) as u8 ^ block as u8;
                }
                base.write_at(&model[at..at + BLOCK as usize], block * BLOCK)
                    .unwrap();
            }
            base.flush().unwrap();
            drop(base);
            let child = Vhdx::create(&path, &vhdx_opts(Some(parent))).unwrap();
            (Arc::new(child), model)
        }
    }
}

fn vhdx_opts(parent: Option<std::path::PathBuf>) -> CreateOptions {
    CreateOptions {
        size: if parent.is_some() { 0 } else { DISK_SIZE },
        disk_type: if parent.is_some() {
            DiskType::Differencing
        } else {
            DiskType::Dynamic
        },
        block_size: BLOCK as u32,
        parent,
        ..CreateOptions::default()
    }
}

fn image_path(kind: Kind, dir: &Path) -> std::path::PathBuf {
    dir.join(match kind {
        Kind::Raw => "disk.img",
        Kind::Vhd => "disk.vhd",
        Kind::Vhdx | Kind::VhdxChild => "disk.vhdx",
    })
}

/// The image as a fresh open of its file reads it, whole.
fn reread(kind: Kind, dir: &Path) -> Vec<u8> {
    let path = image_path(kind, dir);
    let backend: Box<dyn BlockBackend> = match kind {
        Kind::Raw => Box::new(RawFile::open(&path, true).unwrap()),
        Kind::Vhd => Box::new(Vhd::open(&path, true).unwrap()),
        Kind::Vhdx | Kind::VhdxChild => {
            let report = Vhdx::check(&path, false).unwrap();
            assert!(
                report.is_clean(),
                "{kind:?}: check found {:?}",
                report.problems
            );
            Box::new(
                Vhdx::open(
                    &path,
                    &OpenOptions {
                        read_only: true,
                        ..OpenOptions::default()
                    },
                )
                .unwrap(),
            )
        }
    };
    let mut out = vec![0u8; DISK_SIZE as usize];
    backend.read_at(&mut out, 0).unwrap();
    out
}

#[test]
fn three_queues_racing_for_new_blocks_keep_every_byte_across_a_save_and_restore() {
    let seed = stress_seed("multiqueue stress");
    for (i, kind) in [Kind::Raw, Kind::Vhd, Kind::Vhdx, Kind::VhdxChild]
        .into_iter()
        .enumerate()
    {
        run(kind, seed.wrapping_add(i as u64));
    }
}

fn run(kind: Kind, seed: u64) {
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let (backend, mut model) = create(kind, dir.path());
    let mut dev = Block::with_queue_size(backend.clone(), QSIZE).with_queues(QUEUES as u16);
    assert_eq!(dev.queue_max_sizes().len(), QUEUES);
    let mem = guest_memory();
    let (mut qs, _irq) = activate_all(&mut dev, &mem, QSIZE);
    let mut fresh_blocks: Vec<u64> = (0..DISK_SIZE / BLOCK).collect();
    let mut restored = false;

    for round in 0..ROUNDS {
        let mut reqs: Vec<Req> = Vec::new();
        let mut claimed: Vec<((u64, u64), bool)> = Vec::new();
        let mut claim = |range: (u64, u64), writes: bool| {
            if claimed
                .iter()
                .any(|&(r, w)| (w || writes) && overlaps(r, range))
            {
                return false;
            }
            claimed.push((range, writes));
            true
        };
        // The race: a block no request has written yet, two 4 KiB stripes per queue, every
        // queue's stripes interleaved with the others'.
        for _ in 0..RACES_PER_ROUND {
            if fresh_blocks.is_empty() {
                break;
            }
            let pick = rng.below(fresh_blocks.len() as u64) as usize;
            let block = fresh_blocks.swap_remove(pick);
            let base = block * BLOCK + rng.below(BLOCK / (64 << 10)) * (64 << 10);
            for stripe in 0..2 * QUEUES as u64 {
                let range = (base + stripe * 4096, 4096);
                assert!(claim(range, true));
                reqs.push(new_req(
                    Op::Write,
                    stripe as usize % QUEUES,
                    range,
                    &mut rng,
                ));
            }
        }
        let mut tries = 0;
        let wanted = reqs.len() + RANDOM_PER_ROUND;
        while reqs.len() < wanted && tries < 200 {
            tries += 1;
            let op = match rng.below(10) {
                0..=4 => Op::Read,
                5..=8 => Op::Write,
                _ => Op::Flush,
            };
            let sectors = 1 + rng.below(MAX_LEN / 512);
            let start = rng.below(DISK_SIZE / 512 - sectors + 1);
            let range = (start * 512, sectors * 512);
            if op != Op::Flush && !claim(range, op == Op::Write) {
                continue;
            }
            let queue = rng.below(QUEUES as u64) as usize;
            reqs.push(new_req(op, queue, range, &mut rng));
        }
        // Lay the requests out in guest memory and post them all before kicking any queue,
        // so the workers run at the same time.
        let mut heads: Vec<HashMap<u16, usize>> = vec![HashMap::new(); QUEUES];
        for (i, req) in reqs.iter_mut().enumerate() {
            let hdr = DATA_BASE + 0x100 * i as u64;
            req.status = hdr + 0x80;
            req.data_at = DATA_BASE + 0x10000 + i as u64 * SLOT_STRIDE;
            let (kind, sector) = match req.op {
                Op::Read => (T_IN, req.offset / 512),
                Op::Write => (T_OUT, req.offset / 512),
                Op::Flush => (T_FLUSH, 0),
            };
            mem.write_obj(kind.to_le(), GuestAddress(hdr)).unwrap();
            mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
            mem.write_obj(sector.to_le(), GuestAddress(hdr + 8))
                .unwrap();
            mem.write_obj(0xeeu8, GuestAddress(req.status)).unwrap();
            let mut bufs = vec![ro(hdr, 16)];
            match req.op {
                Op::Write => {
                    mem.write_slice(&req.data, GuestAddress(req.data_at))
                        .unwrap();
                    bufs.push(ro(req.data_at, req.len as u32));
                }
                Op::Read => {
                    // Poison, so a read that writes nothing is caught.
                    mem.write_slice(&vec![0x5a; req.len as usize], GuestAddress(req.data_at))
                        .unwrap();
                    bufs.push(wo(req.data_at, req.len as u32));
                }
                Op::Flush => {}
            }
            bufs.push(wo(req.status, 1));
            let head = qs[req.queue].add_chain(&mem, &bufs);
            heads[req.queue].insert(head, i);
        }
        for q in &qs {
            q.notify();
        }
        if round == ROUNDS / 2 {
            dev = save_and_restore(dev, backend.clone(), &mem, &mut qs);
            restored = true;
        }
        let mut done = vec![false; reqs.len()];
        for (q, driver) in qs.iter_mut().enumerate() {
            let want = heads[q].len() as u16;
            for (head, _) in driver.wait_used(&mem, want) {
                let i = heads[q][&head];
                assert!(!done[i], "seed {seed}: request {i} completed twice");
                done[i] = true;
            }
        }
        for (i, req) in reqs.iter().enumerate() {
            let status: u8 = mem.read_obj(GuestAddress(req.status)).unwrap();
            assert_eq!(
                status, 0,
                "{kind:?} seed {seed} round {round} request {i} {:?} on queue {} at {} len {}",
                req.op, req.queue, req.offset, req.len
            );
            if req.op == Op::Read {
                let mut got = vec![0u8; req.len as usize];
                mem.read_slice(&mut got, GuestAddress(req.data_at)).unwrap();
                let want = &model[req.offset as usize..(req.offset + req.len) as usize];
                if got != want {
                    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "{kind:?} seed {seed} round {round}: read of {} at {} on queue {} \
                         differs from byte {first}",
                        req.len, req.offset, req.queue
                    );
                }
            }
        }
        for req in reqs.iter().filter(|r| r.op == Op::Write) {
            model[req.offset as usize..(req.offset + req.len) as usize].copy_from_slice(&req.data);
        }
    }
    assert!(restored);
    let dev = reset_in_time(dev);
    drop(dev);
    backend.flush().unwrap();
    drop(backend);
    let on_disk = reread(kind, dir.path());
    if on_disk != model {
        let first = on_disk
            .iter()
            .zip(&model)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!("{kind:?} seed {seed}: the reopened image differs from the model at byte {first}");
    }
}

fn new_req(op: Op, queue: usize, range: (u64, u64), rng: &mut Rng) -> Req {
    Req {
        op,
        queue,
        offset: range.0,
        len: range.1,
        data_at: 0,
        status: 0,
        data: if op == Op::Write {
            (0..range.1).map(|_| rng.next() as u8).collect()
        } else {
            Vec::new()
        },
    }
}

/// A save and restore while requests are queued: pause (every worker parks with its batch
/// finished), save, drop the device, build a one-queue device, let it take the saved shape,
/// restore and activate it at the saved ring positions. What the old device had not taken
/// the new one serves.
fn save_and_restore(
    mut dev: Block,
    backend: Arc<dyn BlockBackend>,
    mem: &vireo_virtio::GuestMemory,
    qs: &mut [DriverQueue],
) -> Block {
    dev.pause(Duration::from_secs(20)).unwrap();
    let state = dev
        .save_state()
        .expect("a paused disk's state can be saved");
    let published: Vec<u16> = qs.iter().map(|q| q.used_idx(mem)).collect();
    let DeviceState::Block(block) = &state else {
        panic!("not a block state: {state:?}");
    };
    assert_eq!(block.num_queues, QUEUES as u16);
    let rings = block
        .rings
        .clone()
        .expect("an active disk reports its rings");
    assert_eq!(rings.queues.len(), QUEUES);
    for (q, &(_, next_used)) in rings.queues.iter().enumerate() {
        assert_eq!(
            next_used, published[q],
            "queue {q}: the saved position is what the guest sees"
        );
    }
    std::thread::sleep(Duration::from_millis(20));
    let now: Vec<u16> = qs.iter().map(|q| q.used_idx(mem)).collect();
    assert_eq!(now, published, "a paused disk completed requests");
    // What an in-place apply asks of the active disk before it pauses a VM.
    dev.check_restore(&state).unwrap();
    let mut other = block.clone();
    other.num_queues = 1;
    assert!(matches!(
        dev.check_restore(&DeviceState::Block(other)),
        Err(StateError::Invalid(why)) if why.contains("request queues")
    ));
    let mut other = block.clone();
    other.acked_features |= 1 << 40;
    assert!(matches!(
        dev.check_restore(&DeviceState::Block(other)),
        Err(StateError::Invalid(why)) if why.contains("does not offer")
    ));
    let old = reset_in_time(dev);
    drop(old);

    let text = serde_json::to_string(&state).unwrap();
    let state: DeviceState = serde_json::from_str(&text).unwrap();
    let mut dev = Block::with_queue_size(backend, QSIZE);
    assert_eq!(dev.queue_max_sizes().len(), 1);
    dev.adopt_saved_shape(&state).unwrap();
    assert_eq!(dev.queue_max_sizes().len(), QUEUES);
    dev.restore_state(&state).unwrap();
    let handles = qs
        .iter_mut()
        .zip(&rings.queues)
        .map(|(q, &(next_avail, next_used))| q.restored_handle(next_avail, next_used))
        .collect();
    let irq = Arc::new(RecordingInterrupt::default());
    dev.activate(mem.clone(), irq, handles).unwrap();
    // A restored device comes up parked (its VM is paused): the requests queued before the
    // save wait for the resume.
    std::thread::sleep(Duration::from_millis(20));
    let now: Vec<u16> = qs.iter().map(|q| q.used_idx(mem)).collect();
    assert_eq!(now, published, "a restored disk served before its resume");
    dev.resume();
    dev
}
