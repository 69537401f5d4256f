//! Merge, compact and check.
mod common;
use std::sync::atomic::AtomicBool;

use common::*;
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;

fn diff(dir: &std::path::Path, name: &str, parent: &std::path::Path) -> (std::path::PathBuf, Vhdx) {
    let p = dir.join(name);
    let d = Vhdx::create(
        &p,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(parent.to_path_buf()),
            block_size: MIB as u32,
            ..Default::default()
        },
    )
    .unwrap();
    (p, d)
}

#[test]
fn merge_child_into_parent_and_deep_chain() {
    let dir = tmpdir();
    let (base, d) = create(
        dir.path(),
        "base.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    let mut model = pattern(8 * MIB as usize, 1);
    d.write(&model, 0).unwrap();
    drop(d);
    let (mid, m) = diff(dir.path(), "mid.vhdx", &base);
    m.write(&[2; 4096], 3 * MIB).unwrap();
    m.discard(5 * MIB, MIB).unwrap();
    model[3 * MIB as usize..3 * MIB as usize + 4096].fill(2);
    model[5 * MIB as usize..6 * MIB as usize].fill(0);
    drop(m);
    let (top, t) = diff(dir.path(), "top.vhdx", &mid);
    t.write(&[3; 1024], 7 * MIB + 512).unwrap();
    model[7 * MIB as usize + 512..7 * MIB as usize + 1536].fill(3);
    assert_eq!(t.chain_depth(), 3);
    assert_eq!(read(&t, 0, model.len()), model);
    drop(t);
    // Merge top into mid: mid then holds everything top had; top is deleted.
    Vhdx::merge_into_parent(&top, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    assert!(!top.exists());
    let m = Vhdx::open(&mid, &OpenOptions::read_only()).unwrap();
    assert_eq!(read(&m, 0, model.len()), model);
    drop(m);
    Vhdx::merge_into_parent(&mid, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(read(&reopen(&base), 0, model.len()), model);
    assert!(Vhdx::check(&base, false).unwrap().is_clean());
}

#[test]
fn cancelled_merge_leaves_valid_files_and_resumes() {
    let dir = tmpdir();
    let (base, d) = create(
        dir.path(),
        "base.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    drop(d);
    let (child, c) = diff(dir.path(), "child.vhdx", &base);
    let data = pattern(8 * MIB as usize, 4);
    c.write(&data, 0).unwrap();
    drop(c);
    let cancel = AtomicBool::new(false);
    let r = Vhdx::merge_into_parent(
        &child,
        &|done, _| {
            if done == 3 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed)
            }
        },
        &cancel,
    );
    assert!(matches!(r, Err(VhdxError::Cancelled)));
    // The child still opens (its parent now has the merge's DataWriteGuid) and reads right.
    let c = Vhdx::open(&child, &OpenOptions::read_only()).unwrap();
    assert!(c.info().merge_in_progress);
    assert_eq!(read(&c, 0, data.len()), data);
    drop(c);
    Vhdx::merge_into_parent(&child, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(read(&reopen(&base), 0, data.len()), data);
}

#[test]
fn compact_releases_zero_blocks_and_shrinks_file() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "a.vhdx",
        &opts(32 * MIB, MIB as u32, DiskType::Dynamic),
    );
    for i in 0..16 {
        let fill = if i % 2 == 0 { 0 } else { i as u8 };
        d.write(&vec![fill; MIB as usize], i * 2 * MIB).unwrap();
    }
    drop(d);
    let before = std::fs::metadata(&p).unwrap().len();
    let r = Vhdx::compact(&p, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(r.blocks_zeroed, 8);
    assert!(r.blocks_moved > 0);
    assert!(r.file_size_after < before, "{r:?}");
    let d = reopen(&p);
    for i in 0..16u64 {
        let fill = if i % 2 == 0 { 0 } else { i as u8 };
        assert_eq!(
            read(&d, i * 2 * MIB, MIB as usize),
            vec![fill; MIB as usize],
            "block {i}"
        );
    }
    drop(d);
    assert!(Vhdx::check(&p, false).unwrap().is_clean());
    if let Some((ok, out)) = qemu_img(&["check", "-f", "vhdx", p.to_str().unwrap()]) {
        assert!(ok, "{out}");
    }
}

#[test]
fn check_reports_and_repairs_bad_header_copy_and_bat_entry() {
    let dir = tmpdir();
    let (p, d) = create(
        dir.path(),
        "a.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Dynamic),
    );
    d.write(&[1; 4096], 0).unwrap();
    drop(d);
    let r = Vhdx::check(&p, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.allocated_blocks, 1);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    // Corrupt the older header copy (the current one keeps the disk usable).
    let seq = |slot: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, slot * 64 * 1024 + 8).unwrap();
        u64::from_le_bytes(b)
    };
    let older = if seq(1) < seq(2) { 1 } else { 2 };
    f.write_all_at(&[0xff; 16], older * 64 * 1024 + 100)
        .unwrap();
    // Point BAT entry 3 far outside the file.
    f.write_all_at(&((1u64 << 40) | 6).to_le_bytes(), 3 * MIB + 3 * 8)
        .unwrap();
    drop(f);
    assert!(matches!(
        Vhdx::open(&p, &OpenOptions::default()),
        Err(VhdxError::BadBatOffset { index: 3, .. })
    ));
    let r = Vhdx::check(&p, false).unwrap();
    assert!(!r.is_clean());
    assert!(
        r.problems
            .iter()
            .any(|x| x.message.contains(&format!("header {older}"))),
        "{r:?}"
    );
    assert!(
        r.problems
            .iter()
            .any(|x| x.message.contains("outside the file")),
        "{r:?}"
    );
    let r = Vhdx::check(&p, true).unwrap();
    assert!(r.is_clean(), "{r:?}");
    let r = Vhdx::check(&p, false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
    assert_eq!(read(&reopen(&p), 0, 4096), vec![1; 4096]);
}
