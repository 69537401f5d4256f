//! The move without a VM: a writer thread plays the guest, writing through the same
//! [`MovableBackend`] the virtio-blk device would, while a [`Job`] copies and switches. Each
//! test compares the new files with a shadow of everything the "guest" wrote.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use parking_lot::Mutex;
use vireo_api::worker::{MoveDiskProgress, MoveProgress, MoveState};
use vireo_block::{BlockBackend, RawFile};
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

use super::*;
use crate::image::Image;

const SIZE: u64 = 24 << 20;
const SECTOR: u64 = 4096;

/// A deterministic sector pattern for (sector, generation).
fn pattern(sector: u64, gen: u64) -> Vec<u8> {
    let mut v = vec![0u8; SECTOR as usize];
    let mut x = sector
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(gen.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        | 1;
    for b in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    v
}

/// What the "guest" wrote last per sector (None: never written by it).
type Shadow = Arc<StdMutex<Vec<Option<u64>>>>;

fn progress_for(disks: &[Disk]) -> Mutex<MoveProgress> {
    Mutex::new(MoveProgress {
        state: MoveState::Running,
        disks: disks
            .iter()
            .map(|d| MoveDiskProgress {
                serial: d.serial.clone(),
                from: d.from.clone(),
                to: PathBuf::new(),
                current: d.from.clone(),
                bytes_total: 0,
                bytes_copied: 0,
                pass: 0,
                switched: false,
            })
            .collect(),
        message: None,
    })
}

/// Writes sector patterns through `b` until `stop` (at most 200,000 writes), recording
/// them in `shadow`.
fn guest(b: Arc<MovableBackend>, shadow: Shadow, stop: Arc<AtomicBool>, gen0: u64) -> u64 {
    let sectors = SIZE / SECTOR;
    let mut n = 0u64;
    let mut x = gen0 | 1;
    while !stop.load(Ordering::Relaxed) && n < 200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let s = x % sectors;
        let gen = gen0 + n;
        // The shadow lock is held across the write so the shadow order is the write order.
        let mut sh = shadow.lock().unwrap();
        b.write_at(&pattern(s, gen), s * SECTOR).unwrap();
        sh[s as usize] = Some(gen);
        drop(sh);
        n += 1;
    }
    n
}

fn check_against(disk: &dyn BlockBackend, base: &dyn Fn(u64) -> Vec<u8>, shadow: &Shadow) {
    let sh = shadow.lock().unwrap();
    let mut buf = vec![0u8; SECTOR as usize];
    for s in 0..SIZE / SECTOR {
        disk.read_at(&mut buf, s * SECTOR).unwrap();
        let want = match sh[s as usize] {
            Some(g) => pattern(s, g),
            None => base(s),
        };
        assert!(buf == want, "sector {s} differs");
    }
}

struct Run {
    outcome: Result<Option<String>, String>,
    writes: u64,
    progress: MoveProgress,
    new_path: Option<PathBuf>,
}

/// Runs a move of `movable` (at `from`) into `to` with the guest writing throughout.
fn run_move(
    movable: &Arc<MovableBackend>,
    from: &Path,
    to: &Path,
    flatten: bool,
    shadow: &Shadow,
    cancel_at_start: bool,
) -> Run {
    run_move_recorded(movable, from, to, flatten, shadow, cancel_at_start, None)
}

/// [`run_move`], the switch recorded in `record_in` as the worker does in its VM folder.
fn run_move_recorded(
    movable: &Arc<MovableBackend>,
    from: &Path,
    to: &Path,
    flatten: bool,
    shadow: &Shadow,
    cancel_at_start: bool,
    record_in: Option<&Path>,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let g = {
        let (b, sh, st) = (movable.clone(), shadow.clone(), stop.clone());
        std::thread::spawn(move || guest(b, sh, st, 1_000))
    };
    // Let the guest get going before the copy starts.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let disks = vec![Disk {
        index: 0,
        serial: Some("S0".into()),
        from: from.to_path_buf(),
        movable: movable.clone(),
    }];
    let progress = progress_for(&disks);
    let cancel = AtomicBool::new(cancel_at_start);
    let retargeted = Mutex::new(None);
    let job = Job {
        to,
        flatten,
        keep: &[],
        targets: &[],
        progress: &progress,
        cancel: &cancel,
        record_in,
    };
    let outcome = job.run(&disks, &|i, p, _img| {
        assert_eq!(i, 0);
        *retargeted.lock() = Some(p.to_path_buf());
    });
    // The guest keeps writing for a moment after the switch: those writes must land in the
    // new files.
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, Ordering::Relaxed);
    let writes = g.join().unwrap();
    let progress = progress.into_inner();
    Run {
        outcome,
        writes,
        progress,
        new_path: retargeted.into_inner(),
    }
}

fn raw_source(dir: &Path) -> (PathBuf, Arc<MovableBackend>) {
    let p = dir.join("disk.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(SIZE).unwrap();
    drop(f);
    let raw = Arc::new(RawFile::open(&p, false).unwrap());
    // Some data before the move, some holes.
    for s in (0..SIZE / SECTOR).step_by(7) {
        raw.write_at(&pattern(s, 0), s * SECTOR).unwrap();
    }
    let m = Arc::new(MovableBackend::new(raw, p.clone(), Image::Raw));
    (p, m)
}

fn raw_base(s: u64) -> Vec<u8> {
    if s.is_multiple_of(7) {
        pattern(s, 0)
    } else {
        vec![0; SECTOR as usize]
    }
}

fn shadow() -> Shadow {
    Arc::new(StdMutex::new(vec![None; (SIZE / SECTOR) as usize]))
}

/// A source disk made by `source` in a fresh temporary folder (kept while the first value
/// lives), the move's target folder `to_name` made beside it, and an empty shadow of the
/// guest's writes.
fn setup(
    source: fn(&Path) -> (PathBuf, Arc<MovableBackend>),
    to_name: &str,
) -> (
    tempfile::TempDir,
    PathBuf,
    Arc<MovableBackend>,
    PathBuf,
    Shadow,
) {
    let dir = tempfile::tempdir().unwrap();
    let (src, movable) = source(dir.path());
    let to = dir.path().join(to_name);
    std::fs::create_dir(&to).unwrap();
    (dir, src, movable, to, shadow())
}

#[test]
fn raw_disk_moves_with_every_concurrent_write() {
    let (_dir, src, movable, to, sh) = setup(raw_source, "new");
    let r = run_move(&movable, &src, &to, false, &sh, false);
    assert_eq!(r.outcome, Ok(None), "{:?}", r.progress);
    assert!(r.writes > 0);
    let new = to.join("disk.img");
    assert_eq!(r.new_path.as_deref(), Some(new.as_path()));
    assert!(!src.exists(), "the old file is deleted after the switch");
    let d = &r.progress.disks[0];
    assert!(d.bytes_copied >= SIZE / 7, "{d:?}");
    // The VM's backend is the new file now, and the new file alone holds every write.
    assert_eq!(movable.image().0, new);
    check_against(&*movable, &raw_base, &sh);
    drop(movable);
    let reopened = RawFile::open(&new, false).unwrap();
    check_against(&reopened, &raw_base, &sh);
}

/// The move's target folder and the VM's own folder (where the switch record goes), made.
fn target_and_vm_dirs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (to, vm_dir) = (dir.join("new"), dir.join("vm"));
    std::fs::create_dir(&to).unwrap();
    std::fs::create_dir(&vm_dir).unwrap();
    (to, vm_dir)
}

#[test]
fn a_switch_is_recorded_before_the_vm_runs_on_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (src, movable) = raw_source(dir.path());
    let (to, vm_dir) = target_and_vm_dirs(dir.path());
    let sh = shadow();
    let r = run_move_recorded(&movable, &src, &to, false, &sh, false, Some(&vm_dir));
    assert_eq!(r.outcome, Ok(None), "{:?}", r.progress);
    let rec = record::read(&vm_dir).expect("the switch was recorded");
    assert_eq!(
        rec.disks,
        vec![record::SwitchedDisk {
            serial: Some("S0".into()),
            from: src.clone(),
            to: to.join("disk.img"),
            old_files: vec![src],
        }]
    );
    assert!(rec.copies_exist());
}

#[test]
fn a_move_that_never_switched_leaves_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let (src, movable) = raw_source(dir.path());
    let (to, vm_dir) = target_and_vm_dirs(dir.path());
    let sh = shadow();
    let r = run_move_recorded(&movable, &src, &to, false, &sh, true, Some(&vm_dir));
    assert_eq!(r.outcome, Err(CANCELLED.to_string()));
    assert_eq!(record::read(&vm_dir), None);
    assert_eq!(std::fs::read_dir(&vm_dir).unwrap().count(), 0);
}

#[test]
fn a_switch_that_cannot_be_recorded_does_not_happen() {
    let (dir, src, movable, to, sh) = setup(raw_source, "new");
    let gone = dir.path().join("no-such-vm-dir");
    let r = run_move_recorded(&movable, &src, &to, false, &sh, false, Some(&gone));
    let e = r.outcome.unwrap_err();
    assert!(e.contains("recording the switch"), "{e}");
    assert_eq!(movable.image().0, src, "still on the old file");
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0, "no leftovers");
    check_against(&*movable, &raw_base, &sh);
}

#[test]
fn cancelled_move_leaves_the_old_file_in_use_and_no_copy() {
    let (_dir, src, movable, to, sh) = setup(raw_source, "new");
    let r = run_move(&movable, &src, &to, false, &sh, true);
    assert_eq!(r.outcome, Err(CANCELLED.to_string()));
    assert_eq!(movable.image().0, src);
    assert_eq!(std::fs::read_dir(&to).unwrap().count(), 0, "no leftovers");
    assert_eq!(movable.dirty_count(), 0, "tracking stopped");
    check_against(&*movable, &raw_base, &sh);
}

#[test]
fn an_existing_destination_file_is_refused_and_kept() {
    let (_dir, src, movable, to, sh) = setup(raw_source, "new");
    std::fs::write(to.join("disk.img"), b"theirs").unwrap();
    let r = run_move(&movable, &src, &to, false, &sh, false);
    let e = r.outcome.unwrap_err();
    assert!(e.contains("exists already"), "{e}");
    assert_eq!(std::fs::read(to.join("disk.img")).unwrap(), b"theirs");
    assert!(src.exists());
    check_against(&*movable, &raw_base, &sh);
}

/// base.vhdx (pattern gen 0 on every 5th sector) ← child.vhdx (gen 1 on every 11th).
fn vhdx_chain(dir: &Path) -> (PathBuf, Arc<MovableBackend>) {
    let base = dir.join("base.vhdx");
    let b = Vhdx::create(
        &base,
        &CreateOptions {
            size: SIZE,
            block_size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    for s in (0..SIZE / SECTOR).step_by(5) {
        b.write(&pattern(s, 0), s * SECTOR).unwrap();
    }
    b.flush().unwrap();
    drop(b);
    let child = dir.join("child.vhdx");
    let c = Vhdx::create(
        &child,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    for s in (0..SIZE / SECTOR).step_by(11) {
        c.write(&pattern(s, 1), s * SECTOR).unwrap();
    }
    c.flush().unwrap();
    let c = Arc::new(c);
    let m = Arc::new(MovableBackend::new(
        c.clone(),
        child.clone(),
        Image::Vhdx(c),
    ));
    (child, m)
}

fn chain_base(s: u64) -> Vec<u8> {
    if s.is_multiple_of(11) {
        pattern(s, 1)
    } else if s.is_multiple_of(5) {
        pattern(s, 0)
    } else {
        vec![0; SECTOR as usize]
    }
}

#[test]
fn vhdx_chain_moves_file_by_file_with_parents_relinked() {
    let (dir, src, movable, to, sh) = setup(vhdx_chain, "new");
    let r = run_move(&movable, &src, &to, false, &sh, false);
    assert_eq!(r.outcome, Ok(None), "{:?}", r.progress);
    assert!(!src.exists() && !dir.path().join("base.vhdx").exists());
    check_against(&*movable, &chain_base, &sh);
    drop(movable);
    let new = Vhdx::open(&to.join("child.vhdx"), &OpenOptions::default()).unwrap();
    assert_eq!(
        new.chain_paths(),
        vec![to.join("child.vhdx"), to.join("base.vhdx")]
    );
    check_against(&new, &chain_base, &sh);
    drop(new);
    for f in ["child.vhdx", "base.vhdx"] {
        let report = Vhdx::check(&to.join(f), false).unwrap();
        assert!(report.clean, "{f}: {:?}", report.problems);
    }
}

#[test]
fn vhdx_chain_flattened_into_one_file() {
    let (_dir, src, movable, to, sh) = setup(vhdx_chain, "flat");
    let r = run_move(&movable, &src, &to, true, &sh, false);
    assert_eq!(r.outcome, Ok(None), "{:?}", r.progress);
    drop(movable);
    let names: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("child.vhdx")]);
    let new = Vhdx::open(&to.join("child.vhdx"), &OpenOptions::default()).unwrap();
    assert_eq!(new.chain_depth(), 1);
    check_against(&new, &chain_base, &sh);
}

#[test]
fn a_full_destination_fails_the_move_and_the_guest_never_notices() {
    // A destination with room for a third of the disk: the tmpfs is mounted for this test
    // only and unmounted by the guard, even on failure.
    if !vireo_testkit::require(vireo_testkit::Need::Root) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, movable) = raw_source(dir.path());
    let small = vireo_testkit::tmpfs::Tmpfs::mount(&dir.path().join("small"), "8m")
        .expect("mounting a tmpfs as root");
    let to = small.path().to_owned();
    let sh = shadow();
    // Every sector written: the copy needs the whole 24 MiB.
    for s in 0..SIZE / SECTOR {
        movable.write_at(&pattern(s, 7), s * SECTOR).unwrap();
    }
    let base = |s: u64| pattern(s, 7);
    let r = run_move(&movable, &src, &to, false, &sh, false);
    let e = r.outcome.unwrap_err();
    assert!(e.contains("copying to") && e.contains("disk.img"), "{e}");
    assert_eq!(movable.image().0, src, "the VM stays on its old file");
    assert_eq!(
        std::fs::read_dir(&to).unwrap().count(),
        0,
        "partial copy removed"
    );
    check_against(&*movable, &base, &sh);
}
