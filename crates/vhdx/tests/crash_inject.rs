//! Crash consistency by fault injection: the file layer stops performing writes after N
//! mutating operations (as if power failed there), for every N an operation uses. After each
//! simulated crash the file must open (replaying the log), check clean, and hold every write
//! acknowledged by a completed flush.
mod common;
use std::path::Path;
use std::sync::atomic::Ordering;

use common::*;
use vireo_vhdx::{CreateOptions, DiskType, FaultInjector, OpenOptions, Vhdx};

const MIB: u64 = 1 << 20;

/// Each 512-byte sector of `got` must equal `old` or `new` (an unflushed write may be lost,
/// never torn inside a sector or replaced by garbage).
fn old_or_new(got: &[u8], old: &[u8], new: &[u8]) {
    for (i, ((g, o), n)) in got
        .chunks(512)
        .zip(old.chunks(512))
        .zip(new.chunks(512))
        .enumerate()
    {
        assert!(g == o || g == n, "sector {i} is neither old nor new data");
    }
}

fn allocating_writes(disk_type: DiskType, parent: Option<&Path>, dir: &Path, torn: bool) -> u64 {
    let pristine = dir.join("pristine.vhdx");
    let o = CreateOptions {
        size: 16 * MIB,
        disk_type,
        block_size: MIB as u32,
        parent: parent.map(Path::to_path_buf),
        ..Default::default()
    };
    drop(Vhdx::create(&pristine, &o).unwrap());
    let base_data = |off: u64, len: usize| -> Vec<u8> {
        match parent {
            Some(p) => read(&Vhdx::open(p, &OpenOptions::read_only()).unwrap(), off, len),
            None => vec![0; len],
        }
    };
    let old_a = base_data(MIB / 2, 2 * MIB as usize);
    let old_b = base_data(9 * MIB + 4096, 8192);
    let a = pattern(2 * MIB as usize, 1);
    let b = pattern(8192, 2);
    let points = crash_matrix(
        &pristine,
        torn,
        &|d, stage| {
            d.write(&a, MIB / 2)?;
            d.flush()?;
            stage.store(1, Ordering::SeqCst);
            d.write(&b, 9 * MIB + 4096)?;
            d.write(&b[..4096], MIB)?; // already allocated: no metadata change
            d.flush()?;
            stage.store(2, Ordering::SeqCst);
            Ok(())
        },
        &|d, stage| {
            let got_a = read(d, MIB / 2, a.len());
            let got_b = read(d, 9 * MIB + 4096, b.len());
            if stage >= 1 {
                let mut expect = a.clone();
                if stage >= 2 {
                    expect[MIB as usize / 2..MIB as usize / 2 + 4096].copy_from_slice(&b[..4096]);
                    assert_eq!(got_a, expect);
                    assert_eq!(got_b, b);
                } else {
                    let mut newer = a.clone();
                    newer[MIB as usize / 2..MIB as usize / 2 + 4096].copy_from_slice(&b[..4096]);
                    old_or_new(&got_a, &expect, &newer);
                    old_or_new(&got_b, &old_b, &b);
                }
            } else {
                old_or_new(&got_a, &old_a, &a);
                old_or_new(&got_b, &old_b, &b);
            }
        },
    );
    eprintln!("{disk_type:?} (torn: {torn}): {points} crash points");
    points
}

#[test]
fn crash_during_allocating_writes_dynamic() {
    let dir = tmpdir();
    assert!(allocating_writes(DiskType::Dynamic, None, dir.path(), false) > 10);
    let dir = tmpdir();
    assert!(allocating_writes(DiskType::Dynamic, None, dir.path(), true) > 10);
}

#[test]
fn crash_during_allocating_writes_differencing() {
    let dir = tmpdir();
    let base = dir.path().join("base.vhdx");
    let d = Vhdx::create(&base, &opts(16 * MIB, MIB as u32, DiskType::Dynamic)).unwrap();
    d.write(&pattern(16 * MIB as usize, 9), 0).unwrap();
    drop(d);
    assert!(allocating_writes(DiskType::Differencing, Some(&base), dir.path(), false) > 10);
    assert!(
        allocating_writes(
            DiskType::Differencing,
            Some(&base),
            &{
                let t = dir.path().join("torn");
                std::fs::create_dir_all(&t).unwrap();
                t
            },
            true
        ) > 10
    );
}

#[test]
fn crash_during_resize_with_bat_move() {
    let dir = tmpdir();
    let pristine = dir.path().join("pristine.vhdx");
    let d = Vhdx::create(&pristine, &opts(64 * MIB, MIB as u32, DiskType::Dynamic)).unwrap();
    let data = pattern(3 * MIB as usize, 5);
    d.write(&data, 0).unwrap();
    drop(d);
    let big = 300 * 1024 * MIB;
    let points = crash_matrix(
        &pristine,
        true,
        &|d, stage| {
            d.resize(big, false)?;
            stage.store(1, Ordering::SeqCst);
            d.write(&[7; 4096], big - 4096)?;
            d.flush()?;
            stage.store(2, Ordering::SeqCst);
            Ok(())
        },
        &|d, stage| {
            assert_eq!(read(d, 0, data.len()), data);
            let size = d.virtual_size();
            assert!(size == 64 * MIB || size == big, "size {size}");
            if stage >= 1 {
                assert_eq!(size, big);
            }
            if stage >= 2 {
                assert_eq!(read(d, big - 4096, 4096), vec![7; 4096]);
            }
        },
    );
    eprintln!("resize: {points} crash points");
    assert!(points > 5);
}

#[test]
fn crash_during_shrink_and_discard() {
    let dir = tmpdir();
    let pristine = dir.path().join("pristine.vhdx");
    let d = Vhdx::create(&pristine, &opts(16 * MIB, MIB as u32, DiskType::Dynamic)).unwrap();
    let data = pattern(8 * MIB as usize, 3);
    d.write(&data, 0).unwrap();
    drop(d);
    let points = crash_matrix(
        &pristine,
        false,
        &|d, stage| {
            d.discard(MIB, 2 * MIB)?;
            d.flush()?;
            stage.store(1, Ordering::SeqCst);
            d.resize(4 * MIB, true)?;
            stage.store(2, Ordering::SeqCst);
            Ok(())
        },
        &|d, stage| {
            assert_eq!(read(d, 0, MIB as usize), &data[..MIB as usize]);
            if stage >= 1 {
                assert_eq!(read(d, MIB, 2 * MIB as usize), vec![0; 2 * MIB as usize]);
            }
            if stage >= 2 {
                assert_eq!(d.virtual_size(), 4 * MIB);
            }
            let n = (d.virtual_size().min(8 * MIB) - 3 * MIB) as usize;
            assert_eq!(
                read(d, 3 * MIB, n),
                &data[3 * MIB as usize..3 * MIB as usize + n]
            );
        },
    );
    eprintln!("shrink/discard: {points} crash points");
}

#[test]
fn crash_during_merge_resumes() {
    use std::sync::atomic::AtomicBool;
    let dir = tmpdir();
    let pristine = dir.path().join("pristine");
    std::fs::create_dir_all(&pristine).unwrap();
    let base = pristine.join("base.vhdx");
    let b = Vhdx::create(&base, &opts(8 * MIB, MIB as u32, DiskType::Dynamic)).unwrap();
    let mut model = pattern(8 * MIB as usize, 1);
    b.write(&model, 0).unwrap();
    drop(b);
    let child = pristine.join("child.vhdx");
    let c = Vhdx::create(
        &child,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            block_size: MIB as u32,
            ..Default::default()
        },
    )
    .unwrap();
    c.write(&pattern(3 * MIB as usize, 2), MIB / 2).unwrap();
    c.discard(5 * MIB, MIB).unwrap();
    c.write(&[9; 1024], 7 * MIB + 512).unwrap();
    drop(c);
    model[MIB as usize / 2..MIB as usize / 2 + 3 * MIB as usize]
        .copy_from_slice(&pattern(3 * MIB as usize, 2));
    model[5 * MIB as usize..6 * MIB as usize].fill(0);
    model[7 * MIB as usize + 512..7 * MIB as usize + 1536].fill(9);
    let no = AtomicBool::new(false);
    for n in 0..2000u64 {
        let work = dir.path().join(format!("w{n}"));
        std::fs::create_dir_all(&work).unwrap();
        let (wb, wc) = (work.join("base.vhdx"), work.join("child.vhdx"));
        std::fs::copy(&base, &wb).unwrap();
        std::fs::copy(&child, &wc).unwrap();
        let fault = FaultInjector::after_torn(n);
        let r = Vhdx::merge_with_fault(&wc, &|_, _| {}, &no, Some(fault.clone()));
        assert!(r.is_ok() || fault.fired(), "{r:?}");
        if wc.exists() {
            let c = Vhdx::open(&wc, &OpenOptions::read_only())
                .unwrap_or_else(|e| panic!("crash point {n}: child: {e}"));
            assert_eq!(
                read(&c, 0, model.len()),
                model,
                "crash point {n}: child view"
            );
            drop(c);
            Vhdx::merge_into_parent(&wc, &|_, _| {}, &no)
                .unwrap_or_else(|e| panic!("crash point {n}: resume: {e}"));
        }
        assert!(!wc.exists());
        let b = Vhdx::open(&wb, &OpenOptions::read_only()).unwrap();
        assert_eq!(
            read(&b, 0, model.len()),
            model,
            "crash point {n}: merged base"
        );
        drop(b);
        assert!(Vhdx::check(&wb, false).unwrap().is_clean());
        std::fs::remove_dir_all(&work).unwrap();
        if !fault.fired() {
            eprintln!("merge: {} crash points", n + 1);
            assert!(n > 10);
            return;
        }
    }
    panic!("merge never completed");
}

#[test]
fn crash_during_compact() {
    use std::sync::atomic::AtomicBool;
    let dir = tmpdir();
    let pristine = dir.path().join("pristine.vhdx");
    let d = Vhdx::create(&pristine, &opts(24 * MIB, MIB as u32, DiskType::Dynamic)).unwrap();
    let mut model = vec![0u8; 24 * MIB as usize];
    for i in 0..12u64 {
        let fill = if i % 3 == 0 { 0 } else { i as u8 };
        d.write(&vec![fill; MIB as usize], i * 2 * MIB).unwrap();
        model[(i * 2 * MIB) as usize..(i * 2 * MIB + MIB) as usize].fill(fill);
    }
    d.discard(4 * MIB, MIB).unwrap();
    model[4 * MIB as usize..5 * MIB as usize].fill(0);
    drop(d);
    let no = AtomicBool::new(false);
    let work = dir.path().join("work.vhdx");
    for n in 0..5000u64 {
        std::fs::copy(&pristine, &work).unwrap();
        let fault = FaultInjector::after_torn(n);
        let r = Vhdx::compact_with_fault(&work, &|_, _| {}, &no, Some(fault.clone()));
        assert!(r.is_ok() || fault.fired(), "{r:?}");
        let d = Vhdx::open(&work, &OpenOptions::default())
            .unwrap_or_else(|e| panic!("crash point {n}: {e}"));
        assert_eq!(read(&d, 0, model.len()), model, "crash point {n}");
        drop(d);
        let report = Vhdx::check(&work, false).unwrap();
        assert!(report.is_clean(), "crash point {n}: {report:?}");
        if !fault.fired() {
            eprintln!("compact: {} crash points", n + 1);
            assert!(r.unwrap().blocks_moved > 0);
            return;
        }
        // Finishing the interrupted compaction must also work.
        if n % 5 == 0 {
            Vhdx::compact(&work, &|_, _| {}, &no).unwrap();
            assert_eq!(
                read(&reopen(&work), 0, model.len()),
                model,
                "crash point {n}: after resume"
            );
        }
    }
    panic!("compact never completed");
}
