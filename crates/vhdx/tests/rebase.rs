//! `Vhdx::rebase`: onto another parent (the child's content must not change), relink only, and
//! standalone (no parent); cancel; refusals. qemu-img checks the results it can open.
mod common;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use vireo_testkit::Need;
use vireo_vhdx::{DiskType, OpenOptions, Rebase, Vhdx, VhdxError};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

fn no_cancel() -> AtomicBool {
    AtomicBool::new(false)
}

fn base(dir: &Path, name: &str, block: u64, writes: &[(u64, usize, u8)]) -> PathBuf {
    let p = dir.join(name);
    let d = Vhdx::create(&p, &opts(SIZE, block as u32, DiskType::Dynamic)).unwrap();
    for &(off, len, seed) in writes {
        d.write(&pattern(len, seed), off).unwrap();
    }
    drop(d);
    p
}

/// a.vhdx and b.vhdx (different data, overlapping in places, different block sizes) and
/// child.avhdx over a.vhdx with data of its own: unaligned sectors, a whole block, a zeroed
/// block that hides its parent's data. Returns (a, b, child).
fn two_bases_and_child(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let a = base(
        dir,
        "a.vhdx",
        MIB,
        &[
            (0, 3 * MIB as usize, 1),
            (10 * MIB, 4096, 2),
            (30 * MIB, 2 * MIB as usize, 3),
        ],
    );
    let b = base(
        dir,
        "b.vhdx",
        2 * MIB,
        &[
            (MIB, 4 * MIB as usize, 4),
            (20 * MIB, 8192, 5),
            (30 * MIB, 512, 3),
        ],
    );
    let child = dir.join("child.avhdx");
    let c = Vhdx::create(&child, &diff_opts(&a, MIB as u32)).unwrap();
    c.write(&pattern(1536, 6), 2 * MIB + 512).unwrap();
    c.write(&pattern(MIB as usize, 7), 40 * MIB).unwrap();
    c.discard(31 * MIB, MIB).unwrap();
    drop(c);
    (a, b, child)
}

fn view(p: &Path) -> Vec<u8> {
    let d = Vhdx::open(p, &OpenOptions::read_only()).unwrap();
    read(&d, 0, d.virtual_size() as usize)
}

fn assert_view(p: &Path, want: &[u8], what: &str) {
    let got = view(p);
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: first difference at byte {i}");
    }
}

/// The parent file `p` resolves to, if any.
fn parent_of(p: &Path) -> Option<PathBuf> {
    let d = Vhdx::open(p, &OpenOptions::read_only()).unwrap();
    let parent = d.info().parent?;
    Some(std::fs::canonicalize(parent.path).unwrap())
}

/// qemu-img (which cannot open differencing VHDX) must pass `p` and read it as `want`.
fn qemu_agrees(p: &Path, want: &[u8]) {
    if !vireo_testkit::require(Need::QemuImg) {
        return;
    }
    let raw = p.with_extension("want.raw");
    std::fs::write(&raw, want).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ok, out) = qemu_img(&["check", "-f", "vhdx", &s(p)]).unwrap();
    assert!(ok, "qemu-img check: {out}");
    let (ok, out) = qemu_img(&["compare", "-f", "vhdx", "-F", "raw", &s(p), &s(&raw)]).unwrap();
    assert!(ok && !out.contains("mismatch"), "qemu-img compare: {out}");
}

#[test]
fn rebase_onto_another_parent_keeps_the_content() {
    let dir = tmpdir();
    let (a, b, child) = two_bases_and_child(dir.path());
    let want = view(&child);
    let b_bytes = std::fs::read(&b).unwrap();
    Vhdx::rebase(&child, Rebase::Onto(&b), &|_, _| {}, &no_cancel()).unwrap();
    assert_eq!(parent_of(&child), Some(std::fs::canonicalize(&b).unwrap()));
    // The old parent is no longer needed; the new one was only read.
    std::fs::remove_file(&a).unwrap();
    assert_view(&child, &want, "after rebase onto b");
    assert!(
        std::fs::read(&b).unwrap() == b_bytes,
        "the new parent changed"
    );
    assert!(Vhdx::check(&child, false).unwrap().is_clean());
    // Merged into b, the result is what the child showed; qemu-img agrees.
    Vhdx::merge_into_parent(&child, &|_, _| {}, &no_cancel()).unwrap();
    assert_view(&b, &want, "b after merging the rebased child");
    qemu_agrees(&b, &want);
}

#[test]
fn rebase_onto_the_grandparent_and_grandchildren_stay_valid() {
    let dir = tmpdir();
    let (a, b, mid) = two_bases_and_child(dir.path());
    let top = dir.path().join("top.avhdx");
    let t = Vhdx::create(&top, &diff_opts(&mid, 2 * MIB as u32)).unwrap();
    t.write(&pattern(4096, 8), 11 * MIB).unwrap();
    drop(t);
    let (want_mid, want_top) = (view(&mid), view(&top));
    // Collapse: top straight onto a, without mid.
    let top2 = dir.path().join("top2.avhdx");
    std::fs::copy(&top, &top2).unwrap();
    Vhdx::rebase(&top2, Rebase::Onto(&a), &|_, _| {}, &no_cancel()).unwrap();
    assert_eq!(parent_of(&top2), Some(std::fs::canonicalize(&a).unwrap()));
    assert_view(&top2, &want_top, "top rebased onto its grandparent");
    std::fs::remove_file(&top2).unwrap();
    // Rebasing the middle keeps its DataWriteGuid: its own child still opens, same content.
    Vhdx::rebase(&mid, Rebase::Onto(&b), &|_, _| {}, &no_cancel()).unwrap();
    assert_view(&mid, &want_mid, "middle after rebase");
    assert_view(&top, &want_top, "its child after the middle's rebase");
}

#[test]
fn no_parent_makes_a_standalone_dynamic_disk() {
    let dir = tmpdir();
    let (a, _b, child) = two_bases_and_child(dir.path());
    let want = view(&child);
    Vhdx::rebase(&child, Rebase::Standalone, &|_, _| {}, &no_cancel()).unwrap();
    std::fs::remove_file(&a).unwrap();
    let d = Vhdx::open(&child, &OpenOptions::default()).unwrap();
    assert_eq!(d.chain_depth(), 1);
    let info = d.info();
    assert!(info.parent.is_none());
    assert_eq!(info.disk_type, DiskType::Dynamic);
    // Still a working disk: writes and a grow.
    d.write(&[9; 4096], 2 * MIB).unwrap();
    drop(d);
    let mut want = want;
    want[2 * MIB as usize..2 * MIB as usize + 4096].fill(9);
    assert_view(&child, &want, "standalone");
    assert!(Vhdx::check(&child, false).unwrap().is_clean());
    qemu_agrees(&child, &want);
}

#[test]
fn cancelled_rebase_leaves_the_child_on_its_old_parent() {
    let dir = tmpdir();
    let (a, b, child) = two_bases_and_child(dir.path());
    let want = view(&child);
    let a_real = std::fs::canonicalize(&a).unwrap();
    for how in [Rebase::Onto(&b), Rebase::Standalone] {
        let cancel = no_cancel();
        let r = Vhdx::rebase(
            &child,
            how,
            &|done, _| {
                if done >= 5 * MIB {
                    cancel.store(true, Ordering::Relaxed)
                }
            },
            &cancel,
        );
        assert!(matches!(r, Err(VhdxError::Cancelled)), "{how:?}: {r:?}");
        assert_eq!(parent_of(&child), Some(a_real.clone()), "{how:?}");
        assert_view(&child, &want, "after a cancelled rebase");
        assert!(Vhdx::check(&child, false).unwrap().is_clean());
    }
    Vhdx::rebase(&child, Rebase::Onto(&b), &|_, _| {}, &no_cancel()).unwrap();
    assert_view(&child, &want, "rebase after the cancels");
}

#[test]
fn relink_follows_a_moved_parent_without_copying() {
    let dir = tmpdir();
    let (a, b, child) = two_bases_and_child(dir.path());
    let want = view(&child);
    let moved = dir.path().join("sub");
    std::fs::create_dir(&moved).unwrap();
    let a2 = moved.join("a-renamed.vhdx");
    std::fs::rename(&a, &a2).unwrap();
    assert!(matches!(
        Vhdx::open(&child, &OpenOptions::read_only()),
        Err(VhdxError::ParentNotFound { .. })
    ));
    // Safe rebase needs the old parent; relink does not.
    assert!(Vhdx::rebase(&child, Rebase::Onto(&b), &|_, _| {}, &no_cancel()).is_err());
    let before = std::fs::metadata(&child).unwrap().len();
    Vhdx::rebase(&child, Rebase::Relink(&a2), &|_, _| {}, &no_cancel()).unwrap();
    assert_eq!(std::fs::metadata(&child).unwrap().len(), before);
    assert_view(&child, &want, "relinked to the moved parent");
    // Onto an unrelated disk, relink shows that disk wherever the child has no data.
    Vhdx::rebase(&child, Rebase::Relink(&b), &|_, _| {}, &no_cancel()).unwrap();
    let (got, b_view) = (view(&child), view(&b));
    assert_eq!(
        &got[20 * MIB as usize..20 * MIB as usize + 8192],
        &b_view[20 * MIB as usize..20 * MIB as usize + 8192]
    );
}

#[test]
fn rebase_refuses_loops_sizes_and_plain_disks() {
    let dir = tmpdir();
    let (a, _b, child) = two_bases_and_child(dir.path());
    let grandchild = dir.path().join("gc.avhdx");
    drop(Vhdx::create(&grandchild, &diff_opts(&child, MIB as u32)).unwrap());
    let other = dir.path().join("other.vhdx");
    drop(Vhdx::create(&other, &opts(SIZE + MIB, MIB as u32, DiskType::Dynamic)).unwrap());
    let bytes = std::fs::read(&child).unwrap();
    let go = |how| Vhdx::rebase(&child, how, &|_, _| {}, &no_cancel());
    for how in [
        Rebase::Onto(&child),
        Rebase::Relink(&child),
        Rebase::Onto(&grandchild),
        Rebase::Relink(&grandchild),
    ] {
        assert!(
            matches!(go(how), Err(VhdxError::RebaseLoop { .. })),
            "{how:?}"
        );
    }
    for how in [Rebase::Onto(&other), Rebase::Relink(&other)] {
        match go(how) {
            Err(VhdxError::ParentSizeMismatch {
                child_size,
                parent_size,
                ..
            }) => {
                assert_eq!((child_size, parent_size), (SIZE, SIZE + MIB))
            }
            r => panic!("{how:?}: {r:?}"),
        }
    }
    assert!(
        std::fs::read(&child).unwrap() == bytes,
        "a refused rebase changed the child"
    );
    assert!(matches!(
        Vhdx::rebase(&a, Rebase::Standalone, &|_, _| {}, &no_cancel()),
        Err(VhdxError::NotDifferencing(_))
    ));
}

/// A crash at every point of a rebase (onto b, and standalone) leaves a child that opens,
/// passes check and shows the same content, on whichever parent it then names.
#[test]
fn rebase_survives_a_crash_at_every_point() {
    use vireo_vhdx::FaultInjector;
    let dir = tmpdir();
    let (a, b, child) = two_bases_and_child(dir.path());
    let want = view(&child);
    let (a, b) = (
        std::fs::canonicalize(&a).unwrap(),
        std::fs::canonicalize(&b).unwrap(),
    );
    let work = dir.path().join("work.avhdx");
    for how in [Rebase::Onto(&b), Rebase::Standalone] {
        let mut points = 0;
        for n in 0..20_000u64 {
            std::fs::copy(&child, &work).unwrap();
            let fault = FaultInjector::after(n);
            let r =
                Vhdx::rebase_with_fault(&work, how, &|_, _| {}, &no_cancel(), Some(fault.clone()));
            assert!(
                r.is_ok() || fault.fired(),
                "{how:?} at {n}: failed without a crash: {r:?}"
            );
            let on = parent_of(&work);
            assert!(
                on == Some(a.clone()) || on == Some(b.clone()) || on.is_none(),
                "{on:?}"
            );
            assert_view(
                &work,
                &want,
                &format!("{how:?}, crash after {n} operations"),
            );
            let report = Vhdx::check(&work, false).unwrap();
            assert!(report.is_clean(), "{how:?} at {n}: {report:?}");
            points += 1;
            if !fault.fired() {
                let done = parent_of(&work);
                assert_eq!(done, matches!(how, Rebase::Onto(_)).then(|| b.clone()));
                break;
            }
        }
        eprintln!("{how:?}: {points} crash points");
        assert!(points > 10, "{how:?}: only {points} points");
    }
}
