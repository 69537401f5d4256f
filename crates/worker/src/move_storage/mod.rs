//! Storage live migration (`MoveStorage` on worker.sock; docs/storage-migration.md): copy
//! every disk of the running VM into another folder, keep copying what the guest writes
//! meanwhile, then switch all disks to their copies in one step and delete the old files.
//!
//! Steps, all on one thread of their own:
//! 1. for each disk: create the destination (`prepare.rs`), start marking guest writes
//!    (`mirror.rs`), copy what the disk holds (first pass);
//! 2. passes over the chunks the guest wrote meanwhile, until few are left (or
//!    [`MAX_PASSES`]);
//! 3. park every disk (no request runs; the vCPUs go on), copy the last dirty chunks, flush
//!    the copies, switch each disk's backend to its copy, unpark: the switch is one step for
//!    all disks, so the VM never runs on a mix of old and new files;
//! 4. point the worker's lists (meter, control socket, hot-plug slots) at the new files, then
//!    delete the old files except those in `keep` and those another process holds locked.
//!
//! A cancel or an error before step 3 finished leaves the VM on its old files and removes
//! every file the move created. Hot add/remove and save are refused while a move runs; so is
//! a move while a live merge runs (the control socket's merge), and a live merge started
//! during a move fails at its own resize/lock checks or is caught before the switch.

mod mirror;
mod prepare;
pub mod record;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vireo_api::worker::{MoveDiskProgress, MoveProgress, MoveState, MoveTarget};
use vireo_block::BlockBackend;

pub use mirror::{DirtyMap, MovableBackend, Parked};
// copy_file_sparse: vireod's move of a checkpointed VM copies the frozen files with it.
pub use prepare::{copy_file_sparse, prepare, remove_created, Prepared};

use crate::server::State;

/// Copy unit and dirty-tracking granularity.
pub const CHUNK: u64 = 1 << 20;
/// Passes over dirty chunks before the final parked copy, at most.
pub const MAX_PASSES: u32 = 10;
/// Dirty chunks (all disks together) small enough to copy while the disks are parked.
pub const FINAL_CHUNKS: usize = 16;
pub(crate) const CANCELLED: &str = "cancelled";

/// The worker's storage-move state (one move at a time).
#[derive(Default)]
pub struct Mover {
    progress: Arc<Mutex<MoveProgress>>,
    cancel: Arc<AtomicBool>,
}

impl Mover {
    pub fn progress(&self) -> MoveProgress {
        self.progress.lock().clone()
    }

    pub fn is_running(&self) -> bool {
        self.progress.lock().state == MoveState::Running
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

/// One disk being moved.
pub struct Disk {
    pub index: usize,
    pub serial: Option<String>,
    pub from: PathBuf,
    pub movable: Arc<MovableBackend>,
}

/// Starts a move of every disk into `to` (or onto its entry in `targets`) on a thread of its
/// own (`Err`: nothing started).
pub fn start(
    s: &Arc<State>,
    to: PathBuf,
    flatten: bool,
    keep: Vec<PathBuf>,
    targets: Vec<MoveTarget>,
) -> Result<(), String> {
    if !to.is_absolute() {
        return Err(format!("destination {} is not absolute", to.display()));
    }
    if !to.is_dir() {
        return Err(format!(
            "destination {} is not a folder; create it first",
            to.display()
        ));
    }
    let mut p = s.mover.progress.lock();
    if p.state == MoveState::Running {
        return Err("a storage move of this VM is running already".into());
    }
    if s.vm.exited() {
        return Err("the VM is not running".into());
    }
    let disks: Vec<Disk> = s
        .hotplug
        .disks()
        .into_iter()
        .enumerate()
        .map(|(index, d)| Disk {
            index,
            serial: d.serial,
            from: d.movable.image().0,
            movable: d.movable,
        })
        .collect();
    if disks.is_empty() {
        return Err("this VM has no disks to move".into());
    }
    for d in &disks {
        if target_of(&targets, &d.from).is_none() && same_dir(&d.from, &to) {
            return Err(format!(
                "disk {} is in {} already",
                d.from.display(),
                to.display()
            ));
        }
    }
    s.hotplug.begin_move()?;
    *p = MoveProgress {
        state: MoveState::Running,
        disks: disks
            .iter()
            .map(|d| MoveDiskProgress {
                serial: d.serial.clone(),
                from: d.from.clone(),
                to: target_of(&targets, &d.from).map_or_else(
                    || to.join(d.from.file_name().unwrap_or_default()),
                    |t| t.to.clone(),
                ),
                current: d.from.clone(),
                bytes_total: 0,
                bytes_copied: 0,
                pass: 0,
                switched: false,
            })
            .collect(),
        message: None,
    };
    drop(p);
    s.mover.cancel.store(false, Ordering::SeqCst);
    let st = s.clone();
    let spawned = std::thread::Builder::new()
        .name("move-storage".into())
        .spawn(move || {
            let progress = st.mover.progress.clone();
            let cancel = st.mover.cancel.clone();
            let job = Job {
                to: &to,
                flatten,
                keep: &keep,
                targets: &targets,
                progress: &progress,
                cancel: &cancel,
                record_in: Some(&st.vm_dir),
            };
            let outcome = job.run(&disks, &|index, path, image| {
                st.hotplug.retarget(index, path, image, &st.meter)
            });
            st.hotplug.end_move();
            let mut p = progress.lock();
            match outcome {
                Ok(note) => {
                    p.state = MoveState::Completed;
                    p.message = note;
                    tracing::info!("move storage to {}: done", to.display());
                }
                Err(e) if e == CANCELLED => {
                    p.state = MoveState::Cancelled;
                    p.message = Some("cancelled; the VM stays on its old files".into());
                    tracing::info!("move storage to {}: cancelled", to.display());
                }
                Err(e) => {
                    tracing::warn!("move storage to {}: {e}", to.display());
                    p.state = MoveState::Failed;
                    p.message = Some(e);
                }
            }
        });
    if let Err(e) = spawned {
        s.hotplug.end_move();
        let mut p = s.mover.progress.lock();
        p.state = MoveState::Failed;
        p.message = Some(format!("cannot start the copy thread: {e}"));
        return Err(format!("cannot start the copy thread: {e}"));
    }
    tracing::info!("move storage: started");
    Ok(())
}

/// The target vireod chose for the disk at `file`, if any.
pub fn target_of<'t>(targets: &'t [MoveTarget], file: &Path) -> Option<&'t MoveTarget> {
    targets.iter().find(|t| same_file(&t.from, file))
}

fn same_dir(file: &Path, dir: &Path) -> bool {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    file.parent().map(real) == Some(real(dir))
}

/// What the switch tells the rest of the worker: disk `index` is now at `path` as `image`.
pub type Retarget<'a> = dyn Fn(usize, &Path, crate::image::Image) + 'a;

/// One move: the pure sequence of steps over [`MovableBackend`]s, so tests run it without a
/// VM.
pub struct Job<'a> {
    pub to: &'a Path,
    pub flatten: bool,
    pub keep: &'a [PathBuf],
    /// Disks vireod placed itself (a VM with checkpoints); their old files stay.
    pub targets: &'a [MoveTarget],
    pub progress: &'a Mutex<MoveProgress>,
    pub cancel: &'a AtomicBool,
    /// The VM folder the switch is recorded in ([`record`]) before any disk switches; `None`
    /// where nobody runs the VM meanwhile (vireod's move of a VM that is off, tests).
    pub record_in: Option<&'a Path>,
}

impl Job<'_> {
    fn check_cancel(&self) -> Result<(), String> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(CANCELLED.into());
        }
        Ok(())
    }

    fn add_total(&self, i: usize, n: u64) {
        if let Some(d) = self.progress.lock().disks.get_mut(i) {
            d.bytes_total += n;
        }
    }

    fn add_copied(&self, i: usize, n: u64) {
        if let Some(d) = self.progress.lock().disks.get_mut(i) {
            d.bytes_copied += n;
        }
    }

    /// Runs the move; `Ok(note)` once every disk is on its copy (the note names old files
    /// that were kept). On `Err` every disk is on its old file and the copies are gone.
    pub fn run(&self, disks: &[Disk], retarget: &Retarget) -> Result<Option<String>, String> {
        let mut ready: Vec<Prepared> = Vec::new();
        let outcome = self.copy_all(disks, &mut ready);
        let outcome = outcome.and_then(|()| self.switch_all(disks, &ready));
        if let Err(e) = outcome {
            for d in disks {
                d.movable.untrack();
            }
            let created: Vec<PathBuf> = ready.iter().flat_map(|p| p.created.clone()).collect();
            drop(ready);
            remove_created(&created);
            return Err(e);
        }
        let mut kept = Vec::new();
        let mut old_files = Vec::new();
        for (d, p) in disks.iter().zip(&ready) {
            retarget(d.index, &p.dest_path, p.dest_image.clone());
            old_files.extend(p.old_files.iter().cloned());
        }
        drop(ready);
        for f in old_files {
            if self.keep.iter().any(|k| same_file(k, &f)) {
                kept.push(format!("{} (used by another disk)", f.display()));
                continue;
            }
            match delete_if_unused(&f) {
                Ok(()) => tracing::info!("move storage: deleted old {}", f.display()),
                Err(why) => kept.push(format!("{} ({why})", f.display())),
            }
        }
        Ok((!kept.is_empty()).then(|| format!("old files kept: {}", kept.join(", "))))
    }

    /// Steps 1 and 2: every destination created and filled, dirty set small.
    fn copy_all(&self, disks: &[Disk], ready: &mut Vec<Prepared>) -> Result<(), String> {
        for (i, d) in disks.iter().enumerate() {
            self.check_cancel()?;
            let (_, image) = d.movable.image();
            let size = d.movable.size();
            // Tracking starts before the first pass reads anything: no write is missed.
            d.movable.track(CHUNK);
            let prepared = prepare(
                &d.from,
                &image,
                size,
                self.to,
                self.flatten,
                target_of(self.targets, &d.from),
                self.cancel,
                &|n| {
                    self.add_copied(i, n);
                },
            );
            let p = match prepared {
                Ok(p) => p,
                Err((e, created)) => {
                    remove_created(&created);
                    return Err(e);
                }
            };
            self.add_total(i, p.file_bytes);
            if let Some(dp) = self.progress.lock().disks.get_mut(i) {
                dp.to = p.dest_path.clone();
            }
            let total: u64 = p.initial.iter().map(|r| r.1).sum();
            self.add_total(i, total);
            ready.push(p);
            let p = ready.last().expect("pushed");
            let src = d.movable.clone();
            for &(start, len) in &p.initial {
                let mut pos = start;
                while pos < start + len {
                    self.check_cancel()?;
                    let n = (start + len - pos).min(CHUNK - pos % CHUNK);
                    copy_range(&*src, &*p.dest, pos, n, p.skip_zeroes)
                        .map_err(|e| self.dest_error(p, e))?;
                    self.add_copied(i, n);
                    pos += n;
                }
            }
        }
        for pass in 1..=MAX_PASSES {
            let dirty: usize = disks.iter().map(|d| d.movable.dirty_count()).sum();
            if dirty <= FINAL_CHUNKS {
                break;
            }
            for (i, (d, p)) in disks.iter().zip(ready.iter()).enumerate() {
                if let Some(dp) = self.progress.lock().disks.get_mut(i) {
                    dp.pass = pass;
                }
                let chunks = d.movable.take_dirty();
                self.add_total(i, chunks.len() as u64 * CHUNK);
                for c in chunks {
                    self.check_cancel()?;
                    let n = self.copy_chunk(&*d.movable, p, c)?;
                    self.add_copied(i, n);
                }
            }
        }
        Ok(())
    }

    fn dest_error(&self, p: &Prepared, e: String) -> String {
        format!("copying to {}: {e}", p.dest_path.display())
    }

    /// Copies chunk `c` from `src` to `p.dest` (always written: the guest may have zeroed it).
    fn copy_chunk(&self, src: &dyn BlockBackend, p: &Prepared, c: u64) -> Result<u64, String> {
        let size = src.size();
        let start = c * CHUNK;
        if start >= size {
            return Ok(0);
        }
        let n = CHUNK.min(size - start);
        copy_range(src, &*p.dest, start, n, false).map_err(|e| self.dest_error(p, e))?;
        Ok(n)
    }

    /// Step 3: park all, last copy, flush, switch all — or nothing.
    fn switch_all(&self, disks: &[Disk], ready: &[Prepared]) -> Result<(), String> {
        self.check_cancel()?;
        let parked: Vec<_> = disks.iter().map(|d| d.movable.park()).collect();
        for (i, (park, p)) in parked.iter().zip(ready).enumerate() {
            let chunks = park.take_dirty();
            self.add_total(i, chunks.len() as u64 * CHUNK);
            for c in chunks {
                let n = self.copy_chunk(&**park.source(), p, c)?;
                self.add_copied(i, n);
            }
            p.dest
                .flush()
                .map_err(|e| self.dest_error(p, e.to_string()))?;
        }
        self.record_switch(disks, ready)?;
        // Past this point nothing can fail: every copy is complete and durable, and so is
        // the record saying the VM runs on them.
        let mut old = Vec::new();
        for (i, (park, p)) in parked.into_iter().zip(ready).enumerate() {
            old.push(park.switch(p.dest.clone(), p.dest_path.clone(), p.dest_image.clone()));
            if let Some(dp) = self.progress.lock().disks.get_mut(i) {
                dp.current = p.dest_path.clone();
                dp.switched = true;
            }
        }
        // The old images close here (their locks go); the guards above unparked the disks.
        drop(old);
        Ok(())
    }
}

impl Job<'_> {
    /// Still parked: a guest write can reach a copy only after this returned Ok, so a reader
    /// of the record that finds the worker gone knows every later write is in the copies.
    fn record_switch(&self, disks: &[Disk], ready: &[Prepared]) -> Result<(), String> {
        let Some(dir) = self.record_in else {
            return Ok(());
        };
        let r = record::SwitchRecord {
            disks: disks
                .iter()
                .zip(ready)
                .map(|(d, p)| record::SwitchedDisk {
                    serial: d.serial.clone(),
                    from: d.from.clone(),
                    to: p.dest_path.clone(),
                    old_files: p.old_files.clone(),
                })
                .collect(),
        };
        record::write(dir, &r).map_err(|e| {
            // Half written (renamed, the folder not synced): gone, so nobody trusts it.
            record::remove(dir);
            format!(
                "recording the switch in {}: {e}",
                dir.join(record::SWITCH_RECORD).display()
            )
        })
    }
}

/// Copies `len` bytes at `pos` (inside one chunk) from `src` to `dst`.
fn copy_range(
    src: &dyn BlockBackend,
    dst: &dyn BlockBackend,
    pos: u64,
    len: u64,
    skip_zeroes: bool,
) -> Result<(), String> {
    let mut buf = vec![0u8; len as usize];
    src.read_at(&mut buf, pos)
        .map_err(|e| format!("reading the source at {pos}: {e}"))?;
    if skip_zeroes && buf.iter().all(|&b| b == 0) {
        return Ok(());
    }
    dst.write_at(&buf, pos).map_err(|e| e.to_string())
}

fn same_file(a: &Path, b: &Path) -> bool {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    real(a) == real(b)
}

/// Deletes `f` unless another process has it open (it holds a lock on it: another VM's chain
/// uses it as a parent).
pub fn delete_if_unused(f: &Path) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(f)
        .map_err(|e| e.to_string())?;
    vireo_block::lock(&file, f, vireo_block::LockKind::Exclusive)
        .map_err(|_| "in use by another process".to_string())?;
    std::fs::remove_file(f).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
