//! Live merge: `Vhdx::merge_live` while other threads keep reading, writing and trimming the
//! same disk; crashes (fault injection) at many points of it; cancel and resume; 3-deep chains.
mod common;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use common::*;
use vireo_vhdx::{DiskType, FaultInjector, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;

/// xorshift64*: enough randomness for test traffic, reproducible from the seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// base.vhdx (`size`, 1 MiB blocks, pattern data with a hole) under child.avhdx (2 MiB blocks,
/// some writes and a trim of its own). Returns (base, child, expected contents).
fn base_and_child(dir: &Path, size: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join("base.vhdx");
    let b = Vhdx::create(&base, &opts(size, MIB as u32, DiskType::Dynamic)).unwrap();
    let mut model = pattern(size as usize, 11);
    b.write(&model, 0).unwrap();
    b.discard(3 * MIB, MIB + 4096).unwrap();
    model[3 * MIB as usize..(4 * MIB + 4096) as usize].fill(0);
    drop(b);
    let child = dir.join("child.avhdx");
    let c = Vhdx::create(&child, &diff_opts(&base, 2 * MIB as u32)).unwrap();
    let w = pattern(MIB as usize + 777, 3);
    c.write(&w, 5 * MIB - 100).unwrap();
    model[(5 * MIB - 100) as usize..(5 * MIB - 100) as usize + w.len()].copy_from_slice(&w);
    c.discard(MIB / 2, 2 * MIB).unwrap();
    model[(MIB / 2) as usize..(MIB / 2 + 2 * MIB) as usize].fill(0);
    drop(c);
    (base, child, model)
}

fn verify_all(d: &Vhdx, model: &[u8], what: &str) {
    let got = read(d, 0, model.len());
    if let Some(i) = (0..model.len()).find(|&i| got[i] != model[i]) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {} want {}",
            i / 512,
            got[i],
            model[i]
        );
    }
}

fn qemu_check(p: &Path) {
    if let Some((ok, out)) = qemu_img(&["check", "-f", "vhdx", p.to_str().unwrap()]) {
        assert!(ok, "qemu-img check {}: {out}", p.display());
    }
}

/// Sector-aligned cells owned by one thread each, so concurrent traffic has an exact model.
const CELL: u64 = 12 * 1024;

/// Random writes (unaligned inside the cell), trims and read-backs of `thread`'s cells until
/// `stop`; keeps `model` up to date. Returns the number of operations done and the longest one
/// (the live merge's pause shows there).
fn traffic(
    d: &Vhdx,
    model: &Mutex<Vec<u8>>,
    thread: u64,
    threads: u64,
    stop: &AtomicBool,
) -> (u64, std::time::Duration) {
    let size = d.virtual_size().min(model.lock().unwrap().len() as u64);
    let cells = size / CELL;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((thread + 1) * 7919));
    let mut ops = 0;
    let mut longest = std::time::Duration::ZERO;
    while !stop.load(Ordering::Relaxed) && ops < 200_000 {
        let t = std::time::Instant::now();
        let cell = rng.below(cells / threads) * threads + thread;
        let start = cell * CELL;
        let off = start + rng.below(CELL - 1);
        let len = 1 + rng.below(start + CELL - off);
        match rng.below(10) {
            0..=5 => {
                let data = pattern(len as usize, rng.next() as u8);
                d.write(&data, off).unwrap();
                model.lock().unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            6 => {
                d.discard(off, len).unwrap();
                model.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
            }
            7 => d.flush().unwrap(),
            _ => {
                let got = read(d, start, CELL as usize);
                let m = model.lock().unwrap();
                assert!(
                    got == m[start as usize..(start + CELL) as usize],
                    "thread {thread}: cell {cell} reads wrong"
                );
            }
        }
        longest = longest.max(t.elapsed());
        ops += 1;
    }
    (ops, longest)
}

#[test]
fn live_merge_under_concurrent_io() {
    let dir = tmpdir();
    let size = 24 * MIB;
    let (base, child, model) = base_and_child(dir.path(), size);
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    let model = Mutex::new(model);
    let stop = AtomicBool::new(false);
    let no = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let last_total = AtomicU64::new(0);
    let threads = 4;
    let mut longest = std::time::Duration::ZERO;
    let (merged, ops) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (d, model, stop) = (&d, &model, &stop);
                s.spawn(move || traffic(d, model, t, threads, stop))
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let merged = d.merge_live(
            &|done, total| {
                assert!(done <= total);
                calls.fetch_add(1, Ordering::Relaxed);
                last_total.store(total, Ordering::Relaxed);
                // Slow the first pass down so the writers dirty blocks it already copied.
                if done <= size {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            },
            &no,
        );
        // Keep going on the parent for a moment after the pivot.
        std::thread::sleep(std::time::Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        let ops: u64 = results.iter().map(|r| r.0).sum();
        longest = results.iter().map(|r| r.1).max().unwrap();
        (merged, ops)
    });
    let merged = merged.unwrap();
    eprintln!(
        "{ops} concurrent operations (longest {:.1} ms), {} progress calls, {} MiB examined and \
         copied for a {} MiB disk",
        longest.as_secs_f64() * 1000.0,
        calls.load(Ordering::Relaxed),
        last_total.load(Ordering::Relaxed) / MIB,
        size / MIB
    );
    assert!(ops > 100, "the writers barely ran ({ops} operations)");
    assert_eq!(merged, base);
    assert_eq!(d.path(), base);
    assert_eq!(d.chain_depth(), 1);
    assert!(!child.exists(), "child file still exists");
    // The parent is now this disk's read-write top: locked exclusively, even against readers.
    assert!(matches!(
        Vhdx::open(&base, &OpenOptions::read_only()),
        Err(VhdxError::Locked { .. })
    ));
    let model = model.into_inner().unwrap();
    verify_all(&d, &model, "after the pivot, same disk");
    d.write(&[0x5a; 4096], 8192).unwrap();
    let mut model = model;
    model[8192..8192 + 4096].fill(0x5a);
    d.flush().unwrap();
    drop(d);
    let p = reopen(&base);
    assert!(!p.info().merge_in_progress);
    verify_all(&p, &model, "parent reopened");
    drop(p);
    assert!(Vhdx::check(&base, false).unwrap().is_clean());
    qemu_check(&base);
}

/// One cell per 4 KiB; each 512-byte sector of a cell holds its tag repeated (tag 0: zeroes).
const TCELL: u64 = 4096;

fn tagged(tag: u32) -> Vec<u8> {
    if tag == 0 {
        return vec![0; TCELL as usize];
    }
    tag.to_le_bytes().repeat(TCELL as usize / 4)
}

/// What may be in each cell after a crash: the value at the last completed flush, or any
/// value written after it (an unflushed write may or may not have reached the disk).
struct CrashModel {
    durable: Vec<u32>,
    pending: Vec<Vec<u32>>,
}

/// Writes tagged cells (and trims) of `thread`'s share, flushing now and then, until the disk
/// fails (the simulated crash) or `stop`; `model` tracks what each cell may hold.
fn crash_traffic(d: &Vhdx, model: &Mutex<CrashModel>, thread: u32, round: u32, stop: &AtomicBool) {
    let cells = model.lock().unwrap().durable.len() as u64;
    let mut rng = Rng(0x2545_f491 + thread as u64 * 104_729 + round as u64 * 7);
    let mut written: Vec<(u64, u32)> = vec![];
    for i in 0..100_000u32 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if i % 8 == 7 {
            if d.flush().is_err() {
                return;
            }
            let mut m = model.lock().unwrap();
            for (c, tag) in written.drain(..) {
                m.durable[c as usize] = tag;
                m.pending[c as usize].clear();
            }
            continue;
        }
        let c = rng.below(cells / 2) * 2 + thread as u64;
        let tag = if rng.below(6) == 0 {
            0
        } else {
            (thread + 1) << 24 | i
        };
        model.lock().unwrap().pending[c as usize].push(tag);
        written.push((c, tag));
        let r = if tag == 0 {
            d.discard(c * TCELL, TCELL)
        } else {
            d.write(&tagged(tag), c * TCELL)
        };
        if r.is_err() {
            return;
        }
        // Leave most of the crash points to the merge itself.
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

fn check_crash_model(d: &Vhdx, m: &CrashModel, point: &str) -> Vec<u8> {
    let all = read(d, 0, m.durable.len() * TCELL as usize);
    for (c, cell) in all.chunks(TCELL as usize).enumerate() {
        let ok = |t: u32| t == m.durable[c] || m.pending[c].contains(&t);
        // Usually the whole cell holds one tag; otherwise judge each sector on its own.
        let first = u32::from_le_bytes(cell[..4].try_into().unwrap());
        if ok(first) && cell == tagged(first) {
            continue;
        }
        for (s, sector) in cell.chunks(512).enumerate() {
            let t = u32::from_le_bytes(sector[..4].try_into().unwrap());
            assert!(
                sector == &tagged(t)[..512],
                "crash point {point}: cell {c} sector {s} holds no tag (torn or garbage)"
            );
            assert!(
                ok(t),
                "crash point {point}: cell {c} sector {s} holds tag {t:#x}; durable {:#x}, pending {:x?}",
                m.durable[c],
                m.pending[c]
            );
        }
    }
    all
}

struct CrashFiles {
    pristine_base: PathBuf,
    pristine_child: PathBuf,
    base: PathBuf,
    child: PathBuf,
    initial: Vec<u32>,
}

impl CrashFiles {
    /// One live merge with writers running and a crash after `n` mutating operations, then
    /// the checks. `None` when even opening the child needed more operations than that;
    /// otherwise (whether the crash happened, whether it happened after the pivot).
    fn crash_run(&self, n: u64, round: u32) -> Option<(bool, bool)> {
        let (base, child) = (&self.base, &self.child);
        let _ = std::fs::remove_file(child);
        std::fs::copy(&self.pristine_base, base).unwrap();
        std::fs::copy(&self.pristine_child, child).unwrap();
        let fault = if round % 2 == 1 {
            FaultInjector::after_torn(n)
        } else {
            FaultInjector::after(n)
        };
        let cells = self.initial.len();
        let model = Mutex::new(CrashModel {
            durable: self.initial.clone(),
            pending: vec![vec![]; cells],
        });
        let opts = OpenOptions {
            fault: Some(fault.clone()),
            ..Default::default()
        };
        let d = Vhdx::open(child, &opts).ok()?;
        let stop = AtomicBool::new(false);
        let no = AtomicBool::new(false);
        let merged = std::thread::scope(|s| {
            let w: Vec<_> = (0..2)
                .map(|t| {
                    let (d, model, stop) = (&d, &model, &stop);
                    s.spawn(move || crash_traffic(d, model, t, round, stop))
                })
                .collect();
            let r = d.merge_live(&|_, _| {}, &no);
            if r.is_ok() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            for t in w {
                t.join().unwrap();
            }
            r
        });
        let fired = fault.fired();
        assert!(
            merged.is_ok() || fired,
            "crash point {n}: merge failed without a crash: {merged:?}"
        );
        d.abandon();
        let m = model.into_inner().unwrap();
        let point = format!("round {round} crash point {n}");
        let child_left = child.exists();
        if child_left {
            let c = Vhdx::open(child, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{point}: child does not open: {e}"));
            let seen = check_crash_model(&c, &m, &point);
            drop(c);
            if n.is_multiple_of(4) {
                // The offline merge finishes what the live one started.
                let no = AtomicBool::new(false);
                Vhdx::merge_into_parent(child, &|_, _| {}, &no).unwrap();
                let p = reopen(base);
                assert!(read(&p, 0, seen.len()) == seen, "{point}: offline merge");
            }
        } else {
            let p = Vhdx::open(base, &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{point}: parent does not open: {e}"));
            check_crash_model(&p, &m, &point);
        }
        assert!(
            Vhdx::check(base, false).unwrap().is_clean(),
            "{point}: parent checks dirty"
        );
        if n.is_multiple_of(16) {
            qemu_check(base);
        }
        Some((fired, fired && !child_left))
    }
}

#[test]
fn live_merge_crash_at_many_points() {
    let dir = tmpdir();
    let size = 4 * MIB;
    let cells = size / TCELL;
    let pristine_base = dir.path().join("pristine-base.vhdx");
    let b = Vhdx::create(&pristine_base, &opts(size, MIB as u32, DiskType::Dynamic)).unwrap();
    let initial: Vec<u32> = (0..cells as u32)
        .map(|c| if c % 3 == 0 { 0 } else { 0x7000_0000 | c })
        .collect();
    for (c, &t) in initial.iter().enumerate() {
        if t != 0 {
            b.write(&tagged(t), c as u64 * TCELL).unwrap();
        }
    }
    drop(b);
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let base = work.join("base.vhdx");
    let child = work.join("child.avhdx");
    let pristine_child = dir.path().join("pristine-child.avhdx");
    {
        std::fs::copy(&pristine_base, &base).unwrap();
        let c = Vhdx::create(&child, &diff_opts(&base, MIB as u32)).unwrap();
        drop(c);
        std::fs::rename(&child, &pristine_child).unwrap();
        std::fs::rename(&base, &pristine_base).unwrap();
    }
    let files = CrashFiles {
        pristine_base,
        pristine_child,
        base: base.clone(),
        child,
        initial,
    };
    let (mut points, mut pivoted, mut rounds) = (0u64, 0u64, 0u64);
    let started = std::time::Instant::now();
    // Each round sweeps the crash point from 0 until the merge completes untouched; rounds
    // differ in the writers' traffic and alternate clean and torn writes at the crash.
    'rounds: for round in 0..8u32 {
        rounds += 1;
        let mut n = 0u64;
        loop {
            let Some((fired, after_pivot)) = files.crash_run(n, round) else {
                n += 1;
                continue;
            };
            points += 1;
            pivoted += after_pivot as u64;
            if points >= 300 || started.elapsed().as_secs() > 20 {
                break 'rounds;
            }
            if !fired {
                break;
            }
            // Every point early on (the merge's start), then sparser: the writers make the
            // exact position of a crash vary from run to run anyway.
            n += 1 + n / 25;
        }
    }
    eprintln!(
        "live merge: {points} crash points in {rounds} rounds, {pivoted} of them after the \
         pivot, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(points > 40, "only {points} crash points ran");
    qemu_check(&base);
}

#[test]
fn live_merge_cancel_then_resume() {
    let dir = tmpdir();
    let (base, child, mut model) = base_and_child(dir.path(), 16 * MIB);
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    let cancel = AtomicBool::new(false);
    let r = d.merge_live(
        &|done, _| {
            if done >= 4 * MIB {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(matches!(r, Err(VhdxError::Cancelled)), "{r:?}");
    assert_eq!(d.path(), child);
    assert!(child.exists());
    assert_eq!(d.chain_depth(), 2);
    // The parent is locked shared again for the running chain: no other writer gets in,
    // readers do.
    assert!(matches!(
        Vhdx::open(&base, &OpenOptions::default()),
        Err(VhdxError::Locked { .. })
    ));
    drop(Vhdx::open(&base, &OpenOptions::read_only()).unwrap());
    let w = pattern(3 * MIB as usize, 44);
    d.write(&w, 7 * MIB + 512).unwrap();
    model[(7 * MIB + 512) as usize..(10 * MIB + 512) as usize].copy_from_slice(&w);
    verify_all(&d, &model, "after cancel");
    // Resume in the same process.
    let cancel = AtomicBool::new(false);
    assert_eq!(d.merge_live(&|_, _| {}, &cancel).unwrap(), base);
    verify_all(&d, &model, "after resumed merge");
    drop(d);
    assert!(!child.exists());
    verify_all(&reopen(&base), &model, "parent reopened");
    qemu_check(&base);

    // Cancel, close, reopen the child (the parent now has the merge's DataWriteGuid), and
    // let the offline merge finish.
    let (base, child, model) = base_and_child(&dir.path().join("again").tap_mkdir(), 8 * MIB);
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    let cancel = AtomicBool::new(true);
    assert!(matches!(
        d.merge_live(&|_, _| {}, &cancel),
        Err(VhdxError::Cancelled)
    ));
    drop(d);
    let c = reopen(&child);
    assert!(c.info().merge_in_progress);
    verify_all(&c, &model, "child reopened after cancel");
    drop(c);
    let no = AtomicBool::new(false);
    Vhdx::merge_into_parent(&child, &|_, _| {}, &no).unwrap();
    verify_all(
        &reopen(&base),
        &model,
        "offline merge after a cancelled live one",
    );
}

trait Mkdir {
    fn tap_mkdir(self) -> Self;
}
impl Mkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn live_merge_three_deep_leaves_grandparent_alone() {
    let dir = tmpdir();
    let size = 12 * MIB;
    let (gp, mid, mut model) = base_and_child(dir.path(), size);
    let gp_bytes = std::fs::read(&gp).unwrap();
    let top = dir.path().join("top.avhdx");
    let t = Vhdx::create(&top, &diff_opts(&mid, MIB as u32)).unwrap();
    let w = pattern(2 * MIB as usize, 99);
    t.write(&w, MIB + 512).unwrap();
    model[(MIB + 512) as usize..(3 * MIB + 512) as usize].copy_from_slice(&w);
    t.discard(9 * MIB, MIB).unwrap();
    model[9 * MIB as usize..10 * MIB as usize].fill(0);
    drop(t);
    let d = Vhdx::open(&top, &OpenOptions::default()).unwrap();
    assert_eq!(d.chain_depth(), 3);
    let model = Mutex::new(model);
    let stop = AtomicBool::new(false);
    let no = AtomicBool::new(false);
    let merged = std::thread::scope(|s| {
        let w = s.spawn(|| traffic(&d, &model, 0, 1, &stop).0);
        let r = d.merge_live(
            &|_, _| std::thread::sleep(std::time::Duration::from_micros(300)),
            &no,
        );
        std::thread::sleep(std::time::Duration::from_millis(30));
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
        r
    });
    assert_eq!(merged.unwrap(), mid);
    assert_eq!(d.chain_depth(), 2);
    let model = model.into_inner().unwrap();
    verify_all(&d, &model, "3-deep, after the pivot");
    // The grandparent is still shared: a second reader may open it, no writer.
    drop(Vhdx::open(&gp, &OpenOptions::read_only()).unwrap());
    assert!(matches!(
        Vhdx::open(&gp, &OpenOptions::default()),
        Err(VhdxError::Locked { .. })
    ));
    drop(d);
    assert!(!top.exists());
    assert!(
        std::fs::read(&gp).unwrap() == gp_bytes,
        "grandparent changed"
    );
    verify_all(&reopen(&mid), &model, "middle reopened");
}

#[test]
fn live_merge_refuses_what_it_cannot_do() {
    let dir = tmpdir();
    let no = AtomicBool::new(false);
    let (p, d) = create(
        dir.path(),
        "plain.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    assert!(matches!(
        d.merge_live(&|_, _| {}, &no),
        Err(VhdxError::NotDifferencing(x)) if x == p
    ));
    drop(d);
    let (base, child, model) = base_and_child(dir.path(), 8 * MIB);
    let ro = Vhdx::open(&child, &OpenOptions::read_only()).unwrap();
    assert!(matches!(
        ro.merge_live(&|_, _| {}, &no),
        Err(VhdxError::ReadOnly)
    ));
    drop(ro);
    // Someone else reads the parent (a sibling checkpoint would): the merge must not write it.
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    let other = Vhdx::open(&base, &OpenOptions::read_only()).unwrap();
    assert!(matches!(
        d.merge_live(&|_, _| {}, &no),
        Err(VhdxError::Locked { .. })
    ));
    drop(other);
    // The chain holds its shared lock again.
    assert!(matches!(
        Vhdx::open(&base, &OpenOptions::default()),
        Err(VhdxError::Locked { .. })
    ));
    verify_all(&d, &model, "after a refused merge");
    // While it runs, a second merge and a resize of the same disk are refused.
    let checked = AtomicBool::new(false);
    let merged = d.merge_live(
        &|_, _| {
            if !checked.swap(true, Ordering::Relaxed) {
                assert!(matches!(
                    d.merge_live(&|_, _| {}, &no),
                    Err(VhdxError::Unsupported(_))
                ));
                assert!(matches!(
                    d.resize(16 * MIB, false),
                    Err(VhdxError::Unsupported(_))
                ));
            }
        },
        &no,
    );
    assert_eq!(merged.unwrap(), base);
    assert!(checked.load(Ordering::Relaxed));
    verify_all(&d, &model, "after the merge");
    // Afterwards the disk is a plain dynamic one again: resizable, not mergeable.
    d.resize(16 * MIB, false).unwrap();
    assert!(matches!(
        d.merge_live(&|_, _| {}, &no),
        Err(VhdxError::NotDifferencing(_))
    ));
}
