//! Writing an export folder from a [`Source`]: everything is built in a partial folder
//! (`.<name>.export-<job>.partial`), the manifest written last, then the folder renamed to its
//! final name. A cancel or failure removes the partial folder; a crash leaves one whose name
//! says it is unfinished and that holds no `vm.json` under a final name — nothing that looks
//! complete. Import and clone copy with the same pieces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use uuid::Uuid;
use vireo_api::{VmIdentity, VmSpec, VmState};

use super::files::{self, CopyError};
use super::manifest::{
    DiskEntry, FileEntry, Manifest, FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_PLAIN, MANIFEST,
};
use super::tree_manifest::{CheckpointEntry, TopEntry, TreeFileEntry};
use crate::checkpoint_store::Top;
use crate::daemon::checkpoints::{disks, move_tree};
use crate::daemon::http_error::HttpError;
use crate::daemon::{save, Daemon};

/// What an export reads: a VM's spec and identity, each disk's chain of files (which must not
/// change while they are copied), a saved state, if any, and its checkpoint tree, if it has
/// one: a VM that is off or saved, or a temporary checkpoint of a running VM.
pub struct Source {
    pub spec: VmSpec,
    pub identity: VmIdentity,
    pub disks: Vec<Vec<PathBuf>>,
    /// A folder holding `memory.bin` and `vm.state`.
    pub saved: Option<PathBuf>,
    pub tree: Option<SourceTree>,
}

/// A VM's checkpoint tree as an export reads it: nothing here is written while the export
/// holds the VM's lock (frozen files, states, and the tops of a VM that is not running).
pub struct SourceTree {
    /// `current` set on the one "now" hangs below.
    pub checkpoints: Vec<vireo_api::Checkpoint>,
    /// Each checkpoint's state folder (those with state).
    pub states: BTreeMap<Uuid, PathBuf>,
    pub tops: BTreeMap<String, Top>,
    /// Every disk file of the tree, by resolved path.
    pub files: Vec<SourceFile>,
}

pub struct SourceFile {
    pub path: PathBuf,
    /// The resolved path of the file it is a differencing child of.
    pub parent: Option<PathBuf>,
    /// Made by vireod (a checkpoint's child): exported under `disks/vireo-checkpoints-<id>/`,
    /// so an import in place keeps treating it as vireod's.
    pub ours: bool,
}

impl SourceTree {
    /// The tree of `checkpoints` with `tops` (empty: `None`), its files walked from the
    /// records, the tops and the VM's `disks`.
    fn read(
        daemon: &Daemon,
        vm: &vireo_api::Vm,
        mut checkpoints: Vec<vireo_api::Checkpoint>,
        current: Option<Uuid>,
        tops: BTreeMap<String, Top>,
        disks: &[PathBuf],
    ) -> Result<Option<SourceTree>, String> {
        if checkpoints.is_empty() {
            return Ok(None);
        }
        for c in &mut checkpoints {
            c.current = Some(c.id) == current;
        }
        let mut roots = disks.to_vec();
        roots.extend(move_tree::checkpoint_roots(&checkpoints, &tops));
        let walked = move_tree::tree_files_from(roots, &vm.spec.name)?;
        let mut files = Vec::new();
        for path in walked.into_keys() {
            let parent = if disks::is_vhdx(&path) {
                disks::parent_of_in_use(&path)?.map(|p| move_tree::resolved(&p))
            } else {
                None
            };
            let ours = crate::daemon::checkpoints::is_ours(daemon, vm.id(), &path);
            files.push(SourceFile { path, parent, ours });
        }
        let states = checkpoints
            .iter()
            .filter(|c| c.has_state)
            .map(|c| {
                (
                    c.id,
                    crate::daemon::checkpoints::state_dir(daemon, vm.id(), c.id),
                )
            })
            .collect();
        Ok(Some(SourceTree {
            checkpoints,
            states,
            tops,
            files,
        }))
    }

    /// The files of each checkpoint's state.
    fn state_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        out.sort();
        Ok(out)
    }
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
            tree: None,
        })
    }

    /// A running VM exported through its temporary checkpoint `temp` (just taken, the newest):
    /// the VM as of `temp`, with the rest of its tree — `temp` is left out, "now" hangs below
    /// `temp`'s parent and each disk's top is `temp`'s frozen file (the file the VM wrote until
    /// `temp`), as if `temp` had never been taken.
    pub fn of_live_checkpoint(
        daemon: &Daemon,
        vm: &vireo_api::Vm,
        temp: &vireo_api::Checkpoint,
    ) -> Result<Source, String> {
        let mut source = Source::of_checkpoint(daemon, vm, temp)?;
        let others: Vec<vireo_api::Checkpoint> = daemon
            .store
            .list_checkpoints(vm.id())
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|c| c.id != temp.id)
            .collect();
        let tops = temp
            .disks
            .iter()
            .filter_map(|k| {
                let parent = k.parent_file.clone()?;
                Some((
                    k.serial.clone(),
                    Top {
                        file: k.frozen.clone(),
                        parent,
                    },
                ))
            })
            .collect();
        let heads: Vec<PathBuf> = source
            .disks
            .iter()
            .filter_map(|c| c.first().cloned())
            .collect();
        source.tree = SourceTree::read(daemon, vm, others, temp.parent, tops, &heads)?;
        Ok(source)
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
        let head = daemon.store.checkpoint_head(id)?;
        let heads: Vec<PathBuf> = vm.spec.disks.iter().map(|d| d.path.clone()).collect();
        let tree = SourceTree::read(
            daemon,
            &vm,
            daemon.store.list_checkpoints(id)?,
            head.current,
            head.tops,
            &heads,
        )
        .map_err(HttpError::conflict)?;
        Ok(Source {
            spec: vm.spec,
            identity: vm.identity,
            disks,
            saved,
            tree,
        })
    }

    /// Bytes an export copies.
    pub fn bytes(&self, with_saved: bool) -> u64 {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut n = size(&self.spec.kernel) + self.spec.initrd.as_deref().map_or(0, size);
        match &self.tree {
            None => n += self.disks.iter().flatten().map(|p| size(p)).sum::<u64>(),
            Some(t) => {
                n += t.files.iter().map(|f| size(&f.path)).sum::<u64>();
                for dir in t.states.values() {
                    let files = SourceTree::state_files(dir).unwrap_or_default();
                    n += files.iter().map(|p| size(p)).sum::<u64>();
                }
            }
        }
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
    let mut boot = BootFiles::default();
    let kernel = boot.put(&spec.kernel, root, cancel, progress)?;
    let initrd = match &spec.initrd {
        Some(p) => Some(boot.put(p, root, cancel, progress)?),
        None => None,
    };
    let vm_boot = boot.entries.len();
    let mut disks = Vec::new();
    let mut written = WrittenTree::default();
    match &source.tree {
        None => {
            for (i, chain) in source.disks.iter().enumerate() {
                let mut entries = Vec::new();
                for (depth, file) in chain.iter().enumerate() {
                    let rel =
                        PathBuf::from("disks").join(format!("{i}-{depth}-{}", file_name(file)));
                    entries.push(put(file, root, rel, cancel, progress)?);
                }
                let copies: Vec<PathBuf> = entries.iter().map(|e| root.join(&e.path)).collect();
                files::relink(&copies)?;
                disks.push(DiskEntry { chain: entries });
            }
        }
        Some(tree) => {
            written = write_tree(source, tree, root, &mut boot, cancel, progress)?;
            disks = std::mem::take(&mut written.disks);
        }
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
        version: if source.tree.is_some() {
            FORMAT_VERSION
        } else {
            FORMAT_VERSION_PLAIN
        },
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
        checkpoints: written.checkpoints,
        tree: written.files,
        tops: written.tops,
        boot: boot.entries.split_off(vm_boot),
    };
    manifest.check().map_err(CopyError::Failed)?;
    for sub in ["", "boot", "disks", "saved", "checkpoints"] {
        if root.join(sub).is_dir() {
            files::sync_dir(&root.join(sub))?;
        }
    }
    crate::daemon::files::write_json_atomic(&root.join(MANIFEST), &manifest)
        .map_err(|e| CopyError::Failed(format!("{MANIFEST}: {e}")))?;
    Ok(manifest)
}

/// The boot files an export copies, each once (checkpoints mostly share the VM's kernel).
#[derive(Default)]
struct BootFiles {
    by_source: BTreeMap<PathBuf, FileEntry>,
    entries: Vec<FileEntry>,
}

impl BootFiles {
    fn put(
        &mut self,
        src: &Path,
        root: &Path,
        cancel: &AtomicBool,
        progress: &mut Progress,
    ) -> Result<FileEntry, CopyError> {
        let key = move_tree::resolved(src);
        if let Some(e) = self.by_source.get(&key) {
            return Ok(e.clone());
        }
        let mut rel = PathBuf::from("boot").join(file_name(src));
        if self.entries.iter().any(|e| e.path == rel) {
            let n = self.entries.len();
            rel = PathBuf::from("boot").join(format!("{n}-{}", file_name(src)));
        }
        let entry = put(src, root, rel, cancel, progress)?;
        self.by_source.insert(key, entry.clone());
        self.entries.push(entry.clone());
        Ok(entry)
    }
}

/// The manifest's part for a checkpointed VM.
#[derive(Default)]
struct WrittenTree {
    disks: Vec<DiskEntry>,
    files: Vec<TreeFileEntry>,
    tops: Vec<TopEntry>,
    checkpoints: Vec<CheckpointEntry>,
}

/// Copies every file of `tree` once (`disks/<n>-<name>`, vireod's own children under
/// `disks/vireo-checkpoints-<vm id>/`), relinks each copy to its parent's copy, copies each
/// checkpoint's state to `checkpoints/<id>/`, and makes the records' paths relative.
fn write_tree(
    source: &Source,
    tree: &SourceTree,
    root: &Path,
    boot: &mut BootFiles,
    cancel: &AtomicBool,
    progress: &mut Progress,
) -> Result<WrittenTree, CopyError> {
    let ours_dir = move_tree::moved_dir_name(source.identity.id);
    let mut rel_of: BTreeMap<PathBuf, FileEntry> = BTreeMap::new();
    for (n, f) in tree.files.iter().enumerate() {
        let name = format!("{n}-{}", file_name(&f.path));
        let rel = if f.ours {
            PathBuf::from("disks").join(&ours_dir).join(name)
        } else {
            PathBuf::from("disks").join(name)
        };
        let entry = put(&f.path, root, rel, cancel, progress)?;
        rel_of.insert(f.path.clone(), entry);
    }
    let find = |p: &Path| -> Result<FileEntry, CopyError> {
        rel_of
            .get(&move_tree::resolved(p))
            .cloned()
            .ok_or_else(|| CopyError::Failed(format!("{} is not in the tree", p.display())))
    };
    let mut out = WrittenTree::default();
    for f in &tree.files {
        let e = find(&f.path)?;
        out.files.push(TreeFileEntry {
            path: e.path,
            size: e.size,
            parent: f.parent.as_deref().map(find).transpose()?.map(|p| p.path),
        });
    }
    relink_tree(root, &out.files)?;
    if root.join("disks").join(&ours_dir).is_dir() {
        files::sync_dir(&root.join("disks").join(&ours_dir))?;
    }
    for chain in &source.disks {
        let chain = chain.iter().map(|p| find(p)).collect::<Result<_, _>>()?;
        out.disks.push(DiskEntry { chain });
    }
    for (serial, t) in &tree.tops {
        out.tops.push(TopEntry {
            serial: serial.clone(),
            file: find(&t.file)?.path,
            parent: find(&t.parent)?.path,
        });
    }
    for cp in &tree.checkpoints {
        let mut record = cp.clone();
        for d in &mut record.spec.disks {
            d.path = find(&d.path)?.path;
        }
        for d in &mut record.disks {
            d.frozen = find(&d.frozen)?.path;
            d.parent_file = d
                .parent_file
                .as_deref()
                .map(find)
                .transpose()?
                .map(|p| p.path);
        }
        record.spec.kernel = boot.put(&cp.spec.kernel, root, cancel, progress)?.path;
        record.spec.initrd = match &cp.spec.initrd {
            Some(p) => Some(boot.put(p, root, cancel, progress)?.path),
            None => None,
        };
        let mut state = Vec::new();
        if let Some(dir) = tree.states.get(&cp.id) {
            let to = PathBuf::from("checkpoints").join(cp.id.to_string());
            for f in SourceTree::state_files(dir)? {
                state.push(put(&f, root, to.join(file_name(&f)), cancel, progress)?);
            }
            files::sync_dir(&root.join(&to))?;
        }
        out.checkpoints.push(CheckpointEntry { record, state });
    }
    Ok(out)
}

/// Points each tree file under `root` at its parent's copy, parents first (a relink opens the
/// parent's chain, which must already resolve to copies).
pub fn relink_tree(root: &Path, tree: &[TreeFileEntry]) -> Result<(), CopyError> {
    let never = AtomicBool::new(false);
    for f in super::tree_manifest::parents_first(tree) {
        let Some(parent) = &f.parent else { continue };
        let (child, parent) = (root.join(&f.path), root.join(parent));
        vireo_vhdx::Vhdx::rebase(
            &child,
            vireo_vhdx::Rebase::Relink(&parent),
            &|_, _| {},
            &never,
        )
        .map_err(|e| CopyError::Failed(format!("relinking {}: {e}", child.display())))?;
    }
    Ok(())
}
