//! Writing an export folder from a [`Source`]: everything is built in a partial folder
//! (`.<name>.export-<job>.partial`), the manifest written last, then the folder renamed to its
//! final name. A cancel or failure removes the partial folder; a crash leaves one whose name
//! says it is unfinished and that holds no `vm.json` under a final name — nothing that looks
//! complete. Import and clone copy with the same pieces.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use uuid::Uuid;
use vireo_api::{VmIdentity, VmSpec, VmState};

use super::files::{self, CopyError};
use super::manifest::{DiskEntry, FileEntry, Manifest, FORMAT_NAME, FORMAT_VERSION, MANIFEST};
use crate::daemon::http_error::HttpError;
use crate::daemon::{save, Daemon};

/// What an export reads: a VM's spec and identity, each disk's chain of files (which must not
/// change while they are copied) and a saved state, if any. Today a VM that is off or saved;
/// the checkpoint work can build one from a temporary checkpoint of a running VM.
pub struct Source {
    pub spec: VmSpec,
    pub identity: VmIdentity,
    pub disks: Vec<Vec<PathBuf>>,
    /// A folder holding `memory.bin` and `vm.state`.
    pub saved: Option<PathBuf>,
}

/// The answer for a VM in a state nothing can be exported from (starting, stopping, saving).
pub fn not_while_running(name: &str, state: &VmState) -> HttpError {
    HttpError::conflict(format!(
        "VM {name:?} is {state}; retry once it is running, paused, saved or off"
    ))
}

impl Source {
    /// The source of checkpoint `cp` of VM `vm`: the checkpoint's spec (its disks are the
    /// frozen files, never written while the checkpoint exists, so they may be copied while
    /// the VM runs on its children) and its state, if it has one.
    pub fn of_checkpoint(
        daemon: &Daemon,
        vm: &vireo_api::Vm,
        cp: &vireo_api::Checkpoint,
    ) -> Result<Source, String> {
        let disks = cp
            .spec
            .disks
            .iter()
            .map(|d| files::chain(&d.path))
            .collect::<Result<Vec<_>, _>>()?;
        let sdir = crate::daemon::checkpoints::state_dir(daemon, vm.id(), cp.id);
        Ok(Source {
            spec: VmSpec {
                name: vm.spec.name.clone(),
                ..cp.spec.clone()
            },
            identity: vm.identity.clone(),
            disks,
            saved: cp.has_state.then_some(sdir),
        })
    }

    /// The source of an off or saved VM (the caller holds the VM's lock, so it cannot start).
    pub fn of_vm(daemon: &Daemon, id: Uuid) -> Result<Source, HttpError> {
        let vm = daemon.store.get_by_id(id)?;
        let saved = match vm.state {
            VmState::Off | VmState::Critical { .. } | VmState::Lost { .. } => None,
            VmState::Saved if save::has_saved_state(daemon, id) => {
                Some(save::saved_dir(daemon, id))
            }
            VmState::Saved => {
                return Err(HttpError::conflict(format!(
                    "VM {:?} is saved but its saved state is missing; turn it off first",
                    vm.spec.name
                )))
            }
            ref s => return Err(not_while_running(&vm.spec.name, s)),
        };
        let disks = vm
            .spec
            .disks
            .iter()
            .map(|d| files::chain(&d.path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(HttpError::conflict)?;
        Ok(Source {
            spec: vm.spec,
            identity: vm.identity,
            disks,
            saved,
        })
    }

    /// Bytes an export copies.
    pub fn bytes(&self, with_saved: bool) -> u64 {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut n = size(&self.spec.kernel) + self.spec.initrd.as_deref().map_or(0, size);
        n += self.disks.iter().flatten().map(|p| size(p)).sum::<u64>();
        if let (true, Some(s)) = (with_saved, &self.saved) {
            n += crate::store::SAVED_FILES
                .iter()
                .map(|f| size(&s.join(f)))
                .sum::<u64>();
        }
        n
    }
}

/// A job's progress from copied bytes: 2–97 %, stored on each whole-percent change.
pub struct Progress {
    daemon: Arc<Daemon>,
    job: Uuid,
    total: u64,
    done: u64,
    shown: u8,
}

impl Progress {
    pub fn new(daemon: Arc<Daemon>, job: Uuid, total: u64) -> Progress {
        Progress {
            daemon,
            job,
            total: total.max(1),
            done: 0,
            shown: 0,
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        let pct = (2 + self.done.min(self.total) * 95 / self.total) as u8;
        if pct != self.shown {
            self.shown = pct;
            let _ = self.daemon.store.set_job_progress(self.job, pct);
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into())
}

/// Copies `src` into `root/rel` and returns its manifest entry.
fn put(
    src: &Path,
    root: &Path,
    rel: PathBuf,
    cancel: &AtomicBool,
    progress: &mut Progress,
) -> Result<FileEntry, CopyError> {
    files::copy_file(src, &root.join(&rel), cancel, &mut |n| progress.add(n))?;
    let size = std::fs::metadata(root.join(&rel))
        .map_err(|e| CopyError::Failed(format!("{}: {e}", rel.display())))?
        .len();
    Ok(FileEntry { path: rel, size })
}

/// Writes the export of `source` as `dest` (which must not exist), built in `partial`.
pub fn write(
    source: &Source,
    dest: &Path,
    partial: &Path,
    with_saved: bool,
    cancel: &AtomicBool,
    progress: &mut Progress,
) -> Result<Manifest, CopyError> {
    let r = write_partial(source, partial, with_saved, cancel, progress).and_then(|m| {
        if dest.exists() {
            return Err(CopyError::Failed(format!(
                "{} appeared meanwhile",
                dest.display()
            )));
        }
        std::fs::rename(partial, dest)
            .map_err(|e| CopyError::Failed(format!("{}: {e}", dest.display())))?;
        if let Some(parent) = dest.parent() {
            files::sync_dir(parent)?;
        }
        Ok(m)
    });
    if r.is_err() {
        files::remove_partial(partial);
    }
    r
}

fn write_partial(
    source: &Source,
    root: &Path,
    with_saved: bool,
    cancel: &AtomicBool,
    progress: &mut Progress,
) -> Result<Manifest, CopyError> {
    std::fs::create_dir_all(root)
        .map_err(|e| CopyError::Failed(format!("{}: {e}", root.display())))?;
    let spec = &source.spec;
    let boot = |p: &Path| PathBuf::from("boot").join(file_name(p));
    let kernel = put(&spec.kernel, root, boot(&spec.kernel), cancel, progress)?;
    let initrd = match &spec.initrd {
        Some(p) => Some(put(p, root, boot(p), cancel, progress)?),
        None => None,
    };
    let mut disks = Vec::new();
    for (i, chain) in source.disks.iter().enumerate() {
        let mut entries = Vec::new();
        for (depth, file) in chain.iter().enumerate() {
            let rel = PathBuf::from("disks").join(format!("{i}-{depth}-{}", file_name(file)));
            entries.push(put(file, root, rel, cancel, progress)?);
        }
        let copies: Vec<PathBuf> = entries.iter().map(|e| root.join(&e.path)).collect();
        files::relink(&copies)?;
        disks.push(DiskEntry { chain: entries });
    }
    let mut saved = Vec::new();
    if let (true, Some(dir)) = (with_saved, &source.saved) {
        for f in crate::store::SAVED_FILES {
            if crate::store::saved_file_optional(f) && !dir.join(f).exists() {
                continue;
            }
            saved.push(put(
                &dir.join(f),
                root,
                PathBuf::from("saved").join(f),
                cancel,
                progress,
            )?);
        }
    }
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        exported_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
        spec: spec.clone(),
        identity: source.identity.clone(),
        state: if saved.is_empty() { "off" } else { "saved" }.into(),
        kernel,
        initrd,
        disks,
        saved,
        checkpoints: Vec::new(),
    };
    for sub in ["", "boot", "disks", "saved"] {
        if root.join(sub).is_dir() {
            files::sync_dir(&root.join(sub))?;
        }
    }
    crate::daemon::files::write_json_atomic(&root.join(MANIFEST), &manifest)
        .map_err(|e| CopyError::Failed(format!("{MANIFEST}: {e}")))?;
    Ok(manifest)
}
