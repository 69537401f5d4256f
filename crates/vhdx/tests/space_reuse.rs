//! Runtime reuse of freed space: under trim/rewrite churn the file stays bounded, freed space
//! is reused only after the flush that made the free durable, reused space never shows old
//! data, and every crash point leaves a clean file holding all flushed data.
mod common;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use common::*;
use vireo_vhdx::{DiskType, FaultInjector, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;
/// Header section, log, metadata and BAT of the small disks created here.
const META: u64 = 4 * MIB;

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// The tag of virtual sector `s`: a hash, so that tags of different sectors differ in (almost)
/// every byte and a byte-wise comparison still tells them apart.
fn sector_tag(s: u64) -> [u8; 8] {
    let mut z = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Data whose every 512-byte sector carries the tag of the virtual sector it belongs to and a
/// version, so a read can tell when it sees another block's bytes.
fn tagged(off: u64, len: usize, ver: u32) -> Vec<u8> {
    let sector = pattern(512, ver as u8);
    let mut v = sector.repeat(len.div_ceil(512));
    v.truncate(len);
    for (i, s) in v.chunks_mut(512).enumerate() {
        s[..8].copy_from_slice(&sector_tag(off / 512 + i as u64));
        s[8..12].copy_from_slice(&ver.to_le_bytes());
    }
    v
}

/// No sector of `buf` (read at `off`) carries another sector's tag. A read racing a write or
/// a trim of the same sector may see its tag half old, half new: each tag byte must be zero or
/// the sector's own.
fn assert_own_or_zero(buf: &[u8], off: u64) {
    for (i, s) in buf.chunks(512).enumerate() {
        let sector = off / 512 + i as u64;
        let want = sector_tag(sector);
        assert!(
            s[..8].iter().zip(want).all(|(&g, w)| g == 0 || g == w),
            "sector {sector} shows another sector's data: tag {:02x?}",
            &s[..8]
        );
    }
}

fn write_model(d: &Vhdx, model: &mut [u8], off: u64, data: &[u8]) {
    d.write(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

fn discard_model(d: &Vhdx, model: &mut [u8], off: u64, len: u64) {
    d.discard(off, len).unwrap();
    model[off as usize..(off + len) as usize].fill(0);
}

fn assert_model(d: &Vhdx, model: &[u8], what: &str) {
    let got = read(d, 0, model.len());
    if got == model {
        return;
    }
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{what}: mismatch at byte {i} (block {})", i as u64 / MIB);
    }
}

/// `qemu-img check` and a comparison of the whole disk with `model` written to a raw file.
fn qemu_agrees(p: &Path, model: &[u8]) {
    let Some((ok, out)) = qemu_img(&["check", "-f", "vhdx", p.to_str().unwrap()]) else {
        return;
    };
    assert!(ok, "qemu-img check: {out}");
    let raw = p.with_extension("raw");
    std::fs::write(&raw, model).unwrap();
    let (ok, out) = qemu_img(&[
        "compare",
        "-f",
        "vhdx",
        "-F",
        "raw",
        p.to_str().unwrap(),
        raw.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "qemu-img compare: {out}");
}

fn assert_clean(p: &Path) {
    let report = Vhdx::check(p, false).unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// (a) Write N blocks, trim them, flush, write N others, flush: the file does not grow.
#[test]
fn churn_keeps_file_bounded() {
    let dir = tmpdir();
    const N: u64 = 16;
    let size = 4 * N * MIB;
    let (p, d) = create(
        dir.path(),
        "churn.vhdx",
        &opts(size, MIB as u32, DiskType::Dynamic),
    );
    let mut model = vec![0u8; size as usize];
    let mut bound = 0;
    for round in 0..8u64 {
        // Each round uses another quarter of the disk, with one partial write per round.
        let base = (round % 4) * N * MIB;
        for b in 0..N {
            let off = base + b * MIB;
            let data = tagged(off, MIB as usize, round as u32);
            write_model(&d, &mut model, off, &data);
        }
        write_model(
            &d,
            &mut model,
            base + MIB / 2,
            &tagged(base + MIB / 2, 4096, 99),
        );
        d.flush().unwrap();
        if round == 0 {
            bound = file_len(&p);
            assert_eq!(bound, META + N * MIB);
        }
        assert_eq!(file_len(&p), bound, "round {round}: the file grew");
        assert_model(&d, &model, "after write");
        discard_model(&d, &mut model, base, N * MIB);
        d.flush().unwrap();
        assert_model(&d, &model, "after trim");
    }
    // Keep some data so the final comparisons see more than zeroes.
    for b in (0..N).step_by(3) {
        let off = 2 * N * MIB + b * MIB;
        write_model(&d, &mut model, off, &tagged(off, MIB as usize, 7));
    }
    d.flush().unwrap();
    assert_eq!(file_len(&p), bound);
    drop(d);
    // Free space at the end went back to the filesystem at the clean close.
    assert!(file_len(&p) <= META + N * MIB, "len {}", file_len(&p));
    let d = reopen(&p);
    assert_model(&d, &model, "after reopen");
    drop(d);
    assert_clean(&p);
    qemu_agrees(&p, &model);
}

/// At the clean close every trailing free block is truncated away.
#[test]
fn clean_close_truncates_free_tail() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "t.vhdx",
        &opts(32 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&tagged(0, 8 * MIB as usize, 1), 0).unwrap();
    d.flush().unwrap();
    assert_eq!(file_len(&p), META + 8 * MIB);
    d.discard(2 * MIB, 6 * MIB).unwrap();
    drop(d);
    assert_eq!(file_len(&p), META + 2 * MIB);
    let d = reopen(&p);
    assert_eq!(
        read(&d, 0, 2 * MIB as usize),
        tagged(0, 2 * MIB as usize, 1)
    );
    assert_eq!(
        read(&d, 2 * MIB, 6 * MIB as usize),
        vec![0; 6 * MIB as usize]
    );
    drop(d);
    assert_clean(&p);
    qemu_agrees(&p, &{
        let mut m = vec![0u8; 32 * MIB as usize];
        m[..2 * MIB as usize].copy_from_slice(&tagged(0, 2 * MIB as usize, 1));
        m
    });
}

/// (b) Space freed by a trim is not reused before a flush made the trim durable; after a
/// crash the trimmed block never shows the data of the block written after it.
#[test]
fn no_reuse_before_flush() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "b.vhdx",
        &opts(16 * MIB, MIB as u32, DiskType::Dynamic),
    );
    let old = tagged(0, MIB as usize, 1);
    d.write(&old, 0).unwrap();
    d.flush().unwrap();
    let len = file_len(&p);
    d.discard(0, MIB).unwrap();
    let new = tagged(5 * MIB, MIB as usize, 2);
    d.write(&new, 5 * MIB).unwrap();
    assert_eq!(
        file_len(&p),
        len + MIB,
        "reused space before the trim was flushed"
    );
    // Crash here: the trim was never committed, so block 0 still points at its old space.
    d.abandon();
    let d = reopen(&p);
    let got = read(&d, 0, MIB as usize);
    for (i, (g, o)) in got.chunks(512).zip(old.chunks(512)).enumerate() {
        assert!(
            g == o || g.iter().all(|&x| x == 0),
            "sector {i}: not old data nor zero"
        );
    }
    // Now the same with a flush in between: the space is reused and the file stays put.
    d.discard(0, MIB).unwrap();
    d.write(&new, 5 * MIB).unwrap();
    d.flush().unwrap();
    let len = file_len(&p);
    let other = tagged(9 * MIB, MIB as usize, 3);
    d.write(&other, 9 * MIB).unwrap();
    assert_eq!(file_len(&p), len, "flushed trim's space was not reused");
    d.flush().unwrap();
    assert_eq!(read(&d, 0, MIB as usize), vec![0; MIB as usize]);
    assert_eq!(read(&d, 5 * MIB, MIB as usize), new);
    assert_eq!(read(&d, 9 * MIB, MIB as usize), other);
    drop(d);
    assert_clean(&p);
}

/// (e) Blocks appended by a session that crashed before flushing are gaps at the next open;
/// they are reused, and the stale bytes in them never show through.
#[test]
fn gap_from_interrupted_session_is_reused_zeroed() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "e.vhdx",
        &opts(32 * MIB, MIB as u32, DiskType::Dynamic),
    );
    let kept = tagged(0, 2 * MIB as usize, 1);
    d.write(&kept, 0).unwrap();
    d.flush().unwrap();
    let committed = file_len(&p);
    d.write(&tagged(8 * MIB, 4 * MIB as usize, 2), 8 * MIB)
        .unwrap();
    assert_eq!(file_len(&p), committed + 4 * MIB);
    d.abandon();
    let d = reopen(&p);
    assert_eq!(read(&d, 0, kept.len()), kept);
    assert_eq!(
        read(&d, 8 * MIB, 4 * MIB as usize),
        vec![0; 4 * MIB as usize]
    );
    let stale_len = file_len(&p);
    // A small write into each of four new blocks: the rest of each block must read zero
    // although the gap they land in holds the lost session's bytes.
    let mut model = vec![0u8; 32 * MIB as usize];
    model[..kept.len()].copy_from_slice(&kept);
    for b in 20..24u64 {
        let off = b * MIB + 64 * 1024;
        write_model(&d, &mut model, off, &tagged(off, 4096, 3));
    }
    assert_eq!(file_len(&p), stale_len, "the gap was not reused");
    assert_model(&d, &model, "gap reuse");
    drop(d);
    assert_clean(&p);
    qemu_agrees(&p, &model);
}

/// (f) Differencing disks: trimmed blocks become ZERO and their space is reused both by
/// blocks rewritten from ZERO (FULLY_PRESENT) and by first writes to blocks that still show
/// the parent (PARTIALLY_PRESENT); neither shows stale bytes or loses the parent's data.
#[test]
fn differencing_churn() {
    let dir = tmpdir();
    let size = 32 * MIB;
    let base = dir.path().join("base.vhdx");
    let b = Vhdx::create(&base, &opts(size, MIB as u32, DiskType::Dynamic)).unwrap();
    let parent = tagged(0, size as usize, 50);
    b.write(&parent, 0).unwrap();
    drop(b);
    let child = dir.path().join("child.vhdx");
    let d = Vhdx::create(&child, &diff_opts(&base, MIB as u32)).unwrap();
    let mut model = parent.clone();
    let mut bound = 0;
    for round in 0..6u64 {
        let first = (round % 3) * 8;
        for b in first..first + 8 {
            let off = b * MIB;
            write_model(
                &d,
                &mut model,
                off,
                &tagged(off, MIB as usize, round as u32),
            );
        }
        // Sector-sized writes: into a block trimmed earlier (ZERO: the rest must stay zero)
        // and into one never written (the rest must still show the parent).
        let zeroed = ((round + 1) % 3) * 8 + 1;
        let fresh = 24 + round;
        for blk in [zeroed, fresh] {
            let off = blk * MIB + 3 * 512;
            write_model(&d, &mut model, off, &tagged(off, 1024, 77));
        }
        d.flush().unwrap();
        if round == 0 {
            bound = file_len(&child);
        }
        assert_model(&d, &model, "diff after write");
        discard_model(&d, &mut model, first * MIB, 8 * MIB);
        d.flush().unwrap();
        assert_model(&d, &model, "diff after trim");
    }
    // Round 0 allocated 10 blocks and a sector bitmap; later rounds reuse the 8 trimmed ones,
    // each adding at most the two single-sector blocks.
    assert!(
        file_len(&child) <= bound + 10 * MIB,
        "grew from {bound} to {}",
        file_len(&child)
    );
    drop(d);
    let d = reopen(&child);
    assert_model(&d, &model, "diff after reopen");
    drop(d);
    assert_clean(&child);
}

/// (c) Writers, trimmers, readers and flushes at once. Each writer owns some blocks and checks
/// them against its model; a reader checks that any sector it sees is zero or the sector's own
/// data (never bytes of another block that reused the space).
#[test]
fn concurrent_churn_with_flushes() {
    const OWNERS: u64 = 3;
    const BLOCKS: u64 = 24;
    const OPS: u64 = 250;
    let dir = tmpdir();
    let size = BLOCKS * MIB;
    let (p, d) = create(
        dir.path(),
        "c.vhdx",
        &opts(size, MIB as u32, DiskType::Dynamic),
    );
    let d = Arc::new(d);
    let done = Arc::new(AtomicBool::new(false));
    let owners: Vec<_> = (0..OWNERS)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut model = vec![0u8; size as usize];
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for i in 0..OPS {
                    let blk = (next() % (BLOCKS / OWNERS)) * OWNERS + t;
                    let sectors = MIB / 512;
                    let s = next() % sectors;
                    let n = 1 + next() % (sectors - s);
                    let (off, len) = (blk * MIB + s * 512, n * 512);
                    match next() % 5 {
                        0 | 1 => {
                            let data = tagged(off, len as usize, (t << 16 | i) as u32);
                            write_model(&d, &mut model, off, &data)
                        }
                        2 => {
                            let data = tagged(blk * MIB, MIB as usize, (t << 16 | i) as u32);
                            write_model(&d, &mut model, blk * MIB, &data)
                        }
                        3 => discard_model(&d, &mut model, blk * MIB, MIB),
                        _ => discard_model(&d, &mut model, off, len),
                    }
                    let got = read(&d, blk * MIB, MIB as usize);
                    let want = &model[(blk * MIB) as usize..((blk + 1) * MIB) as usize];
                    assert!(got == want, "owner {t} op {i}: block {blk} differs");
                }
                model
            })
        })
        .collect();
    let reader = {
        let (d, done) = (d.clone(), done.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) && n < 100_000 {
                let off = (n * 7919 % (size / 4096 - 64)) * 4096;
                assert_own_or_zero(&read(&d, off, 256 * 1024), off);
                n += 1;
            }
            n
        })
    };
    let flusher = {
        let (d, done) = (d.clone(), done.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) && n < 20_000 {
                d.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(2));
                n += 1;
            }
            n
        })
    };
    let models: Vec<Vec<u8>> = owners.into_iter().map(|h| h.join().unwrap()).collect();
    done.store(true, Ordering::SeqCst);
    let reads = reader.join().unwrap();
    let flushes = flusher.join().unwrap();
    let mut model = vec![0u8; size as usize];
    for blk in 0..BLOCKS {
        let r = (blk * MIB) as usize..((blk + 1) * MIB) as usize;
        model[r.clone()].copy_from_slice(&models[(blk % OWNERS) as usize][r]);
    }
    d.flush().unwrap();
    assert_model(&d, &model, "after the threads");
    eprintln!(
        "concurrent churn: {reads} checked reads, {flushes} flushes, file {} MiB",
        file_len(&p) / MIB
    );
    drop(d);
    let d = reopen(&p);
    assert_model(&d, &model, "after reopen");
    drop(d);
    assert_clean(&p);
    qemu_agrees(&p, &model);
}

/// Each 512-byte sector of `got` equals the same sector of one of `choices`.
fn one_of(got: &[u8], choices: &[&[u8]], what: &str) {
    for (i, g) in got.chunks(512).enumerate() {
        let r = i * 512..(i * 512 + g.len());
        assert!(
            choices.iter().any(|c| &c[r.clone()] == g),
            "{what}: sector {i} matches no allowed version"
        );
    }
}

/// (d) A simulated power cut after every possible number of mutating file operations during
/// trim/rewrite churn with flushes (also with the failing write torn): the file opens, checks
/// clean (ours and qemu-img), every flushed write and trim holds and reused space shows no
/// stale data. Returns the number of crash points.
fn crash_churn(dir: &Path, torn: bool, differencing: bool) -> u64 {
    let pristine = dir.join("pristine.vhdx");
    let d = if differencing {
        // An empty parent: what shows through reads as zero, like an unallocated dynamic block.
        let base = dir.join("base.vhdx");
        drop(Vhdx::create(&base, &opts(16 * MIB, MIB as u32, DiskType::Dynamic)).unwrap());
        Vhdx::create(&pristine, &diff_opts(&base, MIB as u32)).unwrap()
    } else {
        Vhdx::create(&pristine, &opts(16 * MIB, MIB as u32, DiskType::Dynamic)).unwrap()
    };
    let v1 = tagged(0, 4 * MIB as usize, 1);
    d.write(&v1, 0).unwrap();
    drop(d);
    let pristine_len = file_len(&pristine);
    let v2 = tagged(8 * MIB, 4 * MIB as usize, 2);
    let small = tagged(0, 4096, 3);
    let v3 = tagged(12 * MIB, MIB as usize, 4);
    let zero = vec![0u8; 4 * MIB as usize];
    let op = |d: &Vhdx, stage: &AtomicU8| -> Result<(), VhdxError> {
        d.discard(0, 4 * MIB)?;
        d.flush()?;
        stage.store(1, Ordering::SeqCst);
        d.write(&v2, 8 * MIB)?; // reuses the space of blocks 0-3
        d.flush()?;
        stage.store(2, Ordering::SeqCst);
        d.discard(8 * MIB, 2 * MIB)?;
        d.write(&small, 0)?; // a new block: the rest of it must read zero
        d.write(&v3, 12 * MIB)?;
        d.flush()?;
        stage.store(3, Ordering::SeqCst);
        d.discard(10 * MIB, MIB)?;
        d.flush()?;
        d.write(&tagged(14 * MIB, MIB as usize, 5), 14 * MIB)?; // reuses block 10's space
        stage.store(4, Ordering::SeqCst);
        Ok(())
    };
    let verify = |d: &Vhdx, stage: u8| {
        let b0 = read(d, 0, 4 * MIB as usize);
        match stage {
            0 => one_of(&b0, &[&v1, &zero], "blocks 0-3"),
            1 => assert_eq!(b0, zero, "blocks 0-3 trimmed"),
            _ => {
                let mut with_small = zero.clone();
                with_small[..4096].copy_from_slice(&small);
                if stage == 2 {
                    one_of(&b0, &[&zero, &with_small], "blocks 0-3");
                } else {
                    assert_eq!(b0, with_small, "blocks 0-3 after the small write");
                }
            }
        }
        let b8 = read(d, 8 * MIB, 4 * MIB as usize);
        let mut v2_trimmed = v2.clone();
        v2_trimmed[..2 * MIB as usize].fill(0);
        let mut v2_trim2 = v2_trimmed.clone();
        v2_trim2[2 * MIB as usize..3 * MIB as usize].fill(0);
        match stage {
            0 => assert_eq!(b8, zero, "blocks 8-11 before"),
            1 => one_of(&b8, &[&zero, &v2], "blocks 8-11"),
            2 => one_of(&b8, &[&v2, &v2_trimmed], "blocks 8-11"),
            3 => one_of(&b8, &[&v2_trimmed, &v2_trim2], "blocks 8-11"),
            _ => assert_eq!(b8, v2_trim2, "blocks 8-11 final"),
        }
        let b12 = read(d, 12 * MIB, MIB as usize);
        if stage >= 3 {
            assert_eq!(b12, v3, "block 12");
        } else {
            one_of(&b12, &[&zero[..MIB as usize], &v3], "block 12");
        }
        let b14 = read(d, 14 * MIB, MIB as usize);
        one_of(
            &b14,
            &[&zero[..MIB as usize], &tagged(14 * MIB, MIB as usize, 5)],
            "block 14",
        );
        for (off, len) in [(4 * MIB, 4 * MIB), (13 * MIB, MIB), (15 * MIB, MIB)] {
            assert_eq!(
                read(d, off, len as usize),
                vec![0; len as usize],
                "at {off}"
            );
        }
    };
    let points = crash_matrix(&pristine, torn, &op, &verify);
    // Uncrashed: blocks 8-11 and 14 reused freed space; only the small write and block 12
    // (written while blocks 8-9's trim was unflushed) extended the file.
    assert_eq!(
        file_len(&pristine.with_extension("work.vhdx")),
        pristine_len + 2 * MIB
    );
    points
}

#[test]
fn crash_during_trim_rewrite_churn() {
    let dir = tmpdir();
    let plain = crash_churn(dir.path(), false, false);
    let dir = tmpdir();
    let torn = crash_churn(dir.path(), true, false);
    eprintln!("space reuse crash points (dynamic): {plain} plain + {torn} torn");
    assert!(plain > 30 && torn > 30);
}

#[test]
fn crash_during_trim_rewrite_churn_differencing() {
    let dir = tmpdir();
    let plain = crash_churn(dir.path(), false, true);
    let dir = tmpdir();
    let torn = crash_churn(dir.path(), true, true);
    eprintln!("space reuse crash points (differencing): {plain} plain + {torn} torn");
    assert!(plain > 30 && torn > 30);
}

/// A 16 MiB disk whose block 0 holds `data` (first in the file, at `META`), reopened with a
/// fault injector that never crashes but can pause an I/O (`pause_io_at`).
fn block_zero_with_fault_hook(
    dir: &Path,
    data: &[u8],
) -> (std::path::PathBuf, Arc<Vhdx>, Arc<FaultInjector>) {
    let (p, d) = create(
        dir,
        "f.vhdx",
        &opts(16 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(data, 0).unwrap();
    drop(d);
    assert_eq!(file_len(&p), META + MIB, "block 0 is expected at {META}");
    let fault = FaultInjector::after(1 << 40);
    let d = Vhdx::open(
        &p,
        &OpenOptions {
            fault: Some(fault.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    (p, Arc::new(d), fault)
}

/// A read that looked up a block before it was trimmed and is still in flight when the trim
/// is flushed must not see data of a block that reused the space: the flush waits for it.
#[test]
fn read_in_flight_blocks_reuse() {
    let dir = tmpdir();
    let old = tagged(0, MIB as usize, 1);
    let (p, d, fault) = block_zero_with_fault_hook(dir.path(), &old);
    let (arrived, go) = fault.pause_io_at(META);
    let reader = {
        let d = d.clone();
        std::thread::spawn(move || read(&d, 0, 4096))
    };
    arrived.recv().unwrap();
    // The reader holds block 0's old offset. Trim, flush and rewrite elsewhere meanwhile.
    d.discard(0, MIB).unwrap();
    let (flusher, writer) = {
        let (d1, d2) = (d.clone(), d.clone());
        let new = tagged(7 * MIB, MIB as usize, 2);
        (
            std::thread::spawn(move || d1.flush().unwrap()),
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                d2.write(&new, 7 * MIB).unwrap();
            }),
        )
    };
    std::thread::sleep(std::time::Duration::from_millis(400));
    go.send(()).unwrap();
    let got = reader.join().unwrap();
    flusher.join().unwrap();
    writer.join().unwrap();
    assert!(
        got == old[..4096] || got.iter().all(|&x| x == 0),
        "the in-flight read saw another block's data"
    );
    assert_eq!(read(&d, 0, MIB as usize), vec![0; MIB as usize]);
    assert_eq!(
        read(&d, 7 * MIB, MIB as usize),
        tagged(7 * MIB, MIB as usize, 2)
    );
    drop(d);
    assert_clean(&p);
}

/// A write that looked up a block before it was trimmed and lands only after the trim was
/// flushed must not reach a block that reused the space: the flush waits for it, and the
/// space is zeroed when it is reused, so its bytes do not show in the new block either.
#[test]
fn write_in_flight_blocks_reuse() {
    let dir = tmpdir();
    let (p, d, fault) = block_zero_with_fault_hook(dir.path(), &tagged(0, MIB as usize, 1));
    let (arrived, go) = fault.pause_io_at(META);
    let late = {
        let d = d.clone();
        std::thread::spawn(move || d.write(&tagged(0, 4096, 2), 0).unwrap())
    };
    arrived.recv().unwrap();
    // The late write holds block 0's old offset. Trim, flush, and write a little of block 7.
    d.discard(0, MIB).unwrap();
    let small = tagged(7 * MIB + 512 * 1024, 4096, 3);
    let (flusher, writer) = {
        let (d1, d2, small) = (d.clone(), d.clone(), small.clone());
        (
            std::thread::spawn(move || d1.flush().unwrap()),
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                d2.write(&small, 7 * MIB + 512 * 1024).unwrap();
            }),
        )
    };
    std::thread::sleep(std::time::Duration::from_millis(400));
    go.send(()).unwrap();
    late.join().unwrap();
    flusher.join().unwrap();
    writer.join().unwrap();
    let mut block7 = vec![0u8; MIB as usize];
    block7[512 * 1024..512 * 1024 + 4096].copy_from_slice(&small);
    assert_own_or_zero(&read(&d, 7 * MIB, MIB as usize), 7 * MIB);
    assert_eq!(read(&d, 7 * MIB, MIB as usize), block7, "block 7");
    // Block 0 was trimmed after the late write looked it up: zero, or that write's data if it
    // lost the race and re-allocated (it cannot: it had already looked the block up).
    assert_eq!(read(&d, 0, MIB as usize), vec![0; MIB as usize]);
    d.flush().unwrap();
    drop(d);
    assert_clean(&p);
}

/// A shrinking resize frees the blocks it drops (after its own flush), so writes after a
/// shrink and grow land in that space instead of extending the file; nothing dropped comes back.
#[test]
fn shrink_frees_dropped_blocks() {
    let dir = tmpdir();
    const N: u64 = 8;
    let size = 2 * N * MIB;
    let (p, d) = create(
        dir.path(),
        "shrink.vhdx",
        &opts(size, MIB as u32, DiskType::Dynamic),
    );
    let mut model = vec![0u8; size as usize];
    for b in 0..2 * N {
        let off = b * MIB;
        write_model(&d, &mut model, off, &tagged(off, MIB as usize, 1));
    }
    d.flush().unwrap();
    let full = file_len(&p);
    assert_eq!(full, META + 2 * N * MIB);
    // Drop the upper half, then grow back: that half reads as zeroes.
    d.resize(N * MIB, true).unwrap();
    d.resize(size, false).unwrap();
    model[(N * MIB) as usize..].fill(0);
    assert_model(&d, &model, "after shrink and grow");
    // New data in the upper half reuses the dropped blocks' space.
    for b in N..2 * N {
        let off = b * MIB;
        write_model(&d, &mut model, off, &tagged(off, MIB as usize, 2));
    }
    d.flush().unwrap();
    assert_eq!(
        file_len(&p),
        full,
        "the file grew instead of reusing dropped space"
    );
    assert_model(&d, &model, "after rewrite");
    drop(d);
    let d = reopen(&p);
    assert_model(&d, &model, "after reopen");
    drop(d);
    assert_clean(&p);
    qemu_agrees(&p, &model);
}
