//! The virtual size across a differencing chain: a shrink must not discard data that lives in a
//! parent, and merging (offline and live) leaves the parent at the size the child had.
mod common;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use common::*;
use vireo_testkit::Need;
use vireo_vhdx::{DiskType, OpenOptions, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// base.vhdx (64 MiB, 1 MiB blocks) holding data at 2 MiB and at 39 MiB, under an empty
/// child.avhdx (2 MiB blocks). Returns (base, child).
fn base_and_empty_child(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhdx");
    let b = Vhdx::create(&base, &opts(SIZE, MIB as u32, DiskType::Dynamic)).unwrap();
    b.write(&pattern(8192, 1), 2 * MIB).unwrap();
    b.write(&pattern(4096, 2), 39 * MIB).unwrap();
    drop(b);
    let child = dir.join("child.avhdx");
    drop(Vhdx::create(&child, &diff_opts(&base, 2 * MIB as u32)).unwrap());
    (base, child)
}

fn view(d: &Vhdx) -> Vec<u8> {
    read(d, 0, d.virtual_size() as usize)
}

/// The merged parent must be exactly `want` (size included), pass our check and qemu-img's,
/// and `qemu-img compare` must find it equal to a raw copy of `want`.
fn assert_merged(base: &Path, want: &[u8]) {
    let b = Vhdx::open(base, &OpenOptions::read_only()).unwrap();
    assert_eq!(
        b.virtual_size(),
        want.len() as u64,
        "parent size after merge"
    );
    assert!(view(&b) == want, "parent content after merge differs");
    drop(b);
    assert!(Vhdx::check(base, false).unwrap().is_clean());
    if !vireo_testkit::require(Need::QemuImg) {
        return;
    }
    let raw = base.with_extension("want.raw");
    std::fs::write(&raw, want).unwrap();
    let (b, r) = (base.to_str().unwrap(), raw.to_str().unwrap());
    let (ok, out) = qemu_img(&["check", "-f", "vhdx", b]).unwrap();
    assert!(ok, "qemu-img check: {out}");
    let (ok, out) = qemu_img(&["compare", "-f", "vhdx", "-F", "raw", b, r]).unwrap();
    // Without -s (which also compares allocation); a size difference prints a warning.
    assert!(ok && !out.contains("mismatch"), "qemu-img compare: {out}");
}

#[test]
fn shrink_refuses_data_that_lives_in_a_parent() {
    let dir = tmpdir();
    let (base, child) = base_and_empty_child(dir.path());
    let c = reopen(&child);
    match c.resize(16 * MIB, false) {
        Err(VhdxError::ShrinkOverData { data_at, .. }) => assert_eq!(data_at, 39 * MIB),
        other => panic!("shrinking over the parent's data: {other:?}"),
    }
    // Unaligned to the child's blocks, the parent's data inside the last kept block counts too.
    let c2 = dir.path().join("c2.avhdx");
    drop(c);
    drop(Vhdx::create(&c2, &diff_opts(&child, 4 * MIB as u32)).unwrap());
    let d = reopen(&c2);
    assert_eq!(d.chain_depth(), 3);
    assert!(matches!(
        d.resize(39 * MIB - 512, false),
        Err(VhdxError::ShrinkOverData { data_at, .. }) if data_at == 39 * MIB
    ));
    // Past the data, a shrink needs no force; a layer that zeroes the range hides the parent.
    d.resize(40 * MIB, false).unwrap();
    d.discard(36 * MIB, 4 * MIB).unwrap();
    d.resize(16 * MIB, false).unwrap();
    assert_eq!(d.virtual_size(), 16 * MIB);
    drop(d);
    assert_eq!(reopen(&c2).virtual_size(), 16 * MIB);
    // The parent was never touched.
    assert_eq!(read(&reopen(&base), 39 * MIB, 4096), pattern(4096, 2));
}

#[test]
fn shrink_of_a_fixed_disk_looks_at_its_data() {
    let dir = tmpdir();
    let (_p, d) = create(
        dir.path(),
        "f.vhdx",
        &opts(8 * MIB, MIB as u32, DiskType::Fixed),
    );
    d.write(&[7; 512], 6 * MIB + 512).unwrap();
    assert!(matches!(
        d.resize(4 * MIB, false),
        Err(VhdxError::ShrinkOverData { data_at, .. }) if data_at == 6 * MIB + 512
    ));
    d.resize(7 * MIB, false).unwrap();
}

#[test]
fn offline_merge_leaves_the_parent_at_a_shrunk_childs_size() {
    let dir = tmpdir();
    let (base, child) = base_and_empty_child(dir.path());
    let c = reopen(&child);
    c.write(&pattern(MIB as usize, 3), 10 * MIB).unwrap();
    // Forced, and not on a block boundary of either file.
    let small = 16 * MIB + 4096;
    c.resize(small, true).unwrap();
    let want = view(&c);
    assert_eq!(want.len() as u64, small);
    drop(c);
    Vhdx::merge_into_parent(&child, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    assert!(!child.exists());
    assert_merged(&base, &want);
}

#[test]
fn offline_merge_carries_a_grown_childs_size_and_zeroes() {
    let dir = tmpdir();
    let (base, child) = base_and_empty_child(dir.path());
    let c = reopen(&child);
    // Shrunk (forced) then grown back: the parent's old data at 39 MiB is gone for good.
    c.resize(16 * MIB, true).unwrap();
    c.resize(96 * MIB, false).unwrap();
    c.write(&pattern(4096, 4), 90 * MIB).unwrap();
    let want = view(&c);
    assert_eq!(
        &want[39 * MIB as usize..40 * MIB as usize],
        &[0; MIB as usize]
    );
    drop(c);
    Vhdx::merge_into_parent(&child, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    assert_merged(&base, &want);
}

#[test]
fn live_merge_leaves_the_parent_at_a_shrunk_childs_size() {
    let dir = tmpdir();
    let (base, child) = base_and_empty_child(dir.path());
    let d = reopen(&child);
    d.write(&pattern(3 * MIB as usize, 5), 5 * MIB).unwrap();
    let small = 24 * MIB - 512;
    d.resize(small, true).unwrap();
    let want = view(&d);
    assert_eq!(
        d.merge_live(&|_, _| {}, &AtomicBool::new(false)).unwrap(),
        base
    );
    assert_eq!(d.virtual_size(), small);
    assert!(view(&d) == want, "running disk after the pivot");
    drop(d);
    assert_merged(&base, &want);
}
