//! `Checkpoint` on worker.sock (docs/checkpoints.md, "Live capture"): a checkpoint of the
//! running VM that keeps its worker. Memory goes out while the guest runs (the VMM's live
//! save); in the pause that follows, `memory.bin` and `vm.state` become durable, then every
//! checkpointed disk is flushed, closed, given its new differencing child and reopened as that
//! child; then the VM resumes. The guest sees one pause; the frozen files are never written
//! again by this worker.
//!
//! Why the old file is closed before the child opens: a read-write VHDX holds an exclusive OFD
//! lock, and the child's open takes a shared lock on its parent; OFD locks conflict between
//! two opens of the same process too. So each disk goes old → detached (refuses I/O; no I/O
//! can come, the disk is parked and the VM paused) → child, and a failure puts the old file
//! back.
//!
//! Locks, in this order: the hot-plug slots (no hot add/remove, and the disk list stays the
//! one the state describes), then the VMM's lifecycle lock (inside `checkpoint_live`; no
//! pause/resume/reset by anyone else until the swap is done), then each disk's park. A storage
//! move and live merges are kept out for the whole operation (`begin_move`).
//!
//! Crash points: `VIREO_CHECKPOINT_FAULT=worker-saved|worker-child|worker-switched|
//! worker-resumed` aborts the worker (as a SIGKILL would) after the state is durable, after
//! the first child was made, after all disks were switched (VM still paused), after the
//! resume; vireod's recovery handles each (docs/checkpoints.md, "Crash safety").

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vireo_api::worker::{CheckpointChild, CheckpointReport};
use vireo_block::{BlockBackend, BlockError};
use vireo_vhdx::convert::Format;
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};
use vireo_vmm::state::Identity;
use vireo_vmm::LiveSaveOptions;

use crate::hotplug::SlotDisk;
use crate::image::{self, DiskArg, Image};
use crate::metrics::Meter;
use crate::move_storage::MovableBackend;
use crate::server::State;

/// Test hook shared with vireod's (`VIREO_CHECKPOINT_FAULT`): the worker dies at `point`.
pub fn fault_point(point: &str) {
    if std::env::var("VIREO_CHECKPOINT_FAULT").is_ok_and(|p| p == point) {
        tracing::error!("fault injection: dying at {point}");
        std::process::abort();
    }
}

/// One disk to put on a child.
pub(crate) struct Planned {
    index: usize,
    movable: Arc<MovableBackend>,
    old_path: PathBuf,
    old_format: Format,
    read_only: bool,
    child: PathBuf,
    /// The child's parent: the disk's current file (create), the checkpoint's frozen file
    /// (apply).
    parent: PathBuf,
}

/// A disk to move onto a new child: its serial, the child's path, and the child's parent
/// when it is not the disk's current file.
pub(crate) struct ChildOf<'a> {
    pub serial: &'a str,
    pub path: &'a Path,
    pub parent: Option<&'a Path>,
}

/// Marks the worker as checkpointing (Status shows it) and keeps merges and moves out.
pub(crate) struct Busy<'a>(&'a State);

impl<'a> Busy<'a> {
    pub(crate) fn enter(s: &'a State) -> Result<Busy<'a>, String> {
        if s.checkpointing.swap(true, Ordering::SeqCst) {
            return Err("a checkpoint of this VM is being taken already".into());
        }
        if let Err(e) = s.hotplug.begin_move() {
            s.checkpointing.store(false, Ordering::SeqCst);
            return Err(e.replace("the move is refused", "the checkpoint is refused"));
        }
        Ok(Busy(s))
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.hotplug.end_move();
        self.0.checkpointing.store(false, Ordering::SeqCst);
    }
}

/// Takes the checkpoint into `dir` (see the module docs).
pub fn checkpoint(
    s: &State,
    dir: &Path,
    children: &[CheckpointChild],
) -> Result<CheckpointReport, String> {
    let started = Instant::now();
    if !dir.is_absolute() {
        return Err(format!(
            "checkpoint needs an absolute directory, not {}",
            dir.display()
        ));
    }
    if s.vm.exited() {
        return Err("the VM is not running".into());
    }
    let _busy = Busy::enter(s)?;
    let mut slots = s.hotplug.hold_slots();
    let disks: Vec<SlotDisk> = slots.iter().flatten().cloned().collect();
    let wanted: Vec<ChildOf> = children
        .iter()
        .map(|c| ChildOf {
            serial: &c.serial,
            path: &c.path,
            parent: None,
        })
        .collect();
    let plan = plan(&disks, &wanted)?;
    let identity = Identity {
        id: Some(s.vm_id.to_string()),
        name: Some(s.spec_name.clone()),
    };
    // Untracked: a tracked capture leaves every page write-protected and the guest pays a
    // fault per page it writes next; an in-place apply of this checkpoint (`apply --keep-running`)
    // compares every page instead (docs/vm-state.md, "In-place apply").
    let opts = LiveSaveOptions {
        track_changes: false,
        ..LiveSaveOptions::default()
    };
    let meter = &s.meter;
    let mut swap = || -> Result<(), String> {
        fault_point("worker-saved");
        swap_all(s, &mut slots, meter, &plan)?;
        fault_point("worker-switched");
        Ok(())
    };
    let r =
        s.vm.checkpoint_live(dir, identity, Some(s.spec_json.clone()), &opts, &mut swap)
            .map_err(|e| {
                format!(
                    "checkpoint into {}: {e}; the VM goes on as before, on its old files",
                    dir.display()
                )
            })?;
    drop(slots);
    fault_point("worker-resumed");
    Ok(CheckpointReport {
        pause_us: r.pause.as_micros() as u64,
        total_ms: started.elapsed().as_millis() as u64,
        rounds: r.rounds,
        memory_written_bytes: r.bytes_written,
    })
}

/// Matches `children` to the VM's disks by serial and checks each before anything changes.
pub(crate) fn plan(disks: &[SlotDisk], children: &[ChildOf]) -> Result<Vec<Planned>, String> {
    let mut out: Vec<Planned> = Vec::new();
    for c in children {
        let Some((index, d)) = disks
            .iter()
            .enumerate()
            .find(|(_, d)| d.serial.as_deref() == Some(c.serial))
        else {
            return Err(format!("this VM has no disk with serial {}", c.serial));
        };
        if out.iter().any(|p| p.index == index) {
            return Err(format!("disk {} is named twice", c.serial));
        }
        if !c.path.is_absolute() {
            return Err(format!(
                "the child of disk {} must be an absolute path, not {}",
                c.serial,
                c.path.display()
            ));
        }
        if c.path.exists() {
            return Err(format!(
                "the child of disk {} exists already: {} (choose a new path)",
                c.serial,
                c.path.display()
            ));
        }
        let (old_path, image) = d.movable.image();
        if !matches!(image, Image::Vhdx(_)) {
            return Err(format!(
                "disk {} ({}) is not a VHDX image; a differencing child needs a VHDX parent",
                c.serial,
                old_path.display()
            ));
        }
        let read_only = d.movable.read_only();
        if read_only {
            return Err(format!(
                "disk {} ({}) is read-only; it needs no child",
                c.serial,
                old_path.display()
            ));
        }
        if let Some(parent) = c.parent.filter(|p| !p.is_absolute()) {
            return Err(format!(
                "the parent of disk {}'s child must be an absolute path, not {}",
                c.serial,
                parent.display()
            ));
        }
        out.push(Planned {
            index,
            movable: d.movable.clone(),
            parent: c.parent.map_or_else(|| old_path.clone(), Path::to_path_buf),
            old_path,
            old_format: image.format(),
            read_only,
            child: c.path.to_path_buf(),
        });
    }
    Ok(out)
}

/// A disk between its old file and its child: no file open, every request refused. No
/// request comes while it is in place (the disk is parked and the VM paused).
struct Detached {
    size: u64,
    read_only: bool,
}

impl BlockBackend for Detached {
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), BlockError> {
        Err(self.refused())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), BlockError> {
        Err(self.refused())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Err(self.refused())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(self.refused())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn resize(&self, _: u64) -> Result<(), BlockError> {
        Err(self.refused())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn id(&self) -> String {
        "detached".into()
    }
}

impl Detached {
    fn refused(&self) -> BlockError {
        BlockError::Refused("the disk is being switched to a checkpoint's child".into())
    }
}

fn open(path: &Path, format: Format, read_only: bool) -> Result<image::OpenedDisk, String> {
    image::open(&DiskArg {
        path: path.to_path_buf(),
        read_only,
        format: Some(format),
        queues: None,
    })
    .map_err(|e| e.to_string())
}

fn make_child(parent: &Path, child: &Path) -> Result<(), String> {
    if let Some(d) = child.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let opts = CreateOptions {
        disk_type: DiskType::Differencing,
        parent: Some(parent.to_path_buf()),
        ..CreateOptions::default()
    };
    let v = Vhdx::create(child, &opts)
        .map_err(|e| format!("creating the differencing disk {}: {e}", child.display()))?;
    v.flush()
        .map_err(|e| format!("flushing {}: {e}", child.display()))
}

/// Flushes every planned disk, then moves each onto its child. All or nothing: on an error
/// every disk is back on its old file and the children made are deleted.
pub(crate) fn swap_all(
    s: &State,
    slots: &mut [Option<SlotDisk>],
    meter: &Meter,
    plan: &[Planned],
) -> Result<(), String> {
    let mut parked: Vec<_> = plan.iter().map(|p| p.movable.park()).collect();
    for (p, park) in plan.iter().zip(&parked) {
        park.source()
            .flush()
            .map_err(|e| format!("flushing {}: {e}", p.old_path.display()))?;
    }
    let mut done = 0;
    let mut failure = None;
    for (p, park) in plan.iter().zip(parked.iter_mut()) {
        let detached = Arc::new(Detached {
            size: park.source().size(),
            read_only: p.read_only,
        });
        // Every reference to the old image goes, so the file closes and its lock with it.
        s.hotplug
            .retarget_held(slots, p.index, &p.old_path, Image::Raw, meter);
        drop(park.replace(detached.clone(), p.old_path.clone(), Image::Raw));
        let step = make_child(&p.parent, &p.child).and_then(|()| {
            if done == 0 {
                fault_point("worker-child");
            }
            open(&p.child, Format::Vhdx, false)
        });
        match step {
            Ok(child) => {
                drop(park.replace(child.backend, p.child.clone(), child.image.clone()));
                s.hotplug
                    .retarget_held(slots, p.index, &p.child, child.image, meter);
                done += 1;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&p.child);
                failure = Some(e);
                break;
            }
        }
    }
    let Some(e) = failure else {
        tracing::info!("checkpoint: {} disk(s) on their new children", plan.len());
        return Ok(());
    };
    // Back onto the old files: those switched, and the one that failed half way.
    let undo = (done + 1).min(plan.len());
    let mut lost = Vec::new();
    for (p, park) in plan.iter().zip(parked.iter_mut()).take(undo) {
        let detached = Arc::new(Detached {
            size: park.source().size(),
            read_only: p.read_only,
        });
        s.hotplug
            .retarget_held(slots, p.index, &p.old_path, Image::Raw, meter);
        drop(park.replace(detached, p.old_path.clone(), Image::Raw));
        let _ = std::fs::remove_file(&p.child);
        match open(&p.old_path, p.old_format, p.read_only) {
            Ok(old) => {
                drop(park.replace(old.backend, p.old_path.clone(), old.image.clone()));
                s.hotplug
                    .retarget_held(slots, p.index, &p.old_path, old.image, meter);
            }
            Err(why) => lost.push(format!("{} ({why})", p.old_path.display())),
        }
    }
    if lost.is_empty() {
        Err(e)
    } else {
        tracing::error!("checkpoint: disks left without a file: {}", lost.join(", "));
        Err(format!(
            "{e}; and these disks could not be reopened, the guest gets I/O errors on them: {}",
            lost.join(", ")
        ))
    }
}
