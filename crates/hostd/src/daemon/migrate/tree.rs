//! A migration carries the VM's checkpoint tree (docs/migration.md, "Checkpoints travel with
//! the VM"). Quick: the saved VM has no worker, so every file of the tree — the running tops
//! included — is at rest while it is sent. Live (shared storage): every file but the running
//! tops (frozen files and state do not change while the migration holds the VM's lock) is sent
//! before the memory pre-copy; each running top is then copied live by the shared-nothing disk
//! copy (`storage.rs`, `DiskTransfer::tops`) into an empty child of its arrived parent, made
//! here by [`Arrival::settle_live`].
//!
//! - Source (`describe`): the tree's files come from `move_tree::tree_files` (the same walk a
//!   storage move plans with). Files vireod made and each checkpoint's state travel; the
//!   user's own files (a base disk the first checkpoint froze) stay where they are, on shared
//!   storage, as the VM's disks do; in a shared-nothing migration they travel too (`File`s
//!   named `tree-user-*`, at rest like the frozen files), into the destination's `dest_dir`.
//!   The source deletes nothing until the VM runs there; then
//!   its folder goes with its record, and `remove_outside` deletes what a storage move put in a
//!   `vireo-checkpoints-<id>/` folder; after a shared-nothing migration the user's files that
//!   travelled go too, unless `keep_source` (`source_files.rs`).
//! - Destination (`Arrival`): each travelling file gets a path in this vireod's folder for the
//!   VM (disks in `checkpoints/disks/`, state in `checkpoints/<id>/`; the user's files of a
//!   shared-nothing migration in `dest_dir`, claimed empty at the offer), planned at the offer so
//!   the VM's spec can be checked on its new paths; at the commit the children are relinked to
//!   their parents' new paths and the records stored in one transaction. A failed arrival
//!   loses them with the VM's folder (`store.remove`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use uuid::Uuid;
use vireo_api::migrate::{CheckpointTree, CopiedDisk, TreeFile, TreeTop};
use vireo_api::{DiskSpec, Vm, VmSpec};
use vireo_vhdx::{OpenOptions, Rebase, Vhdx};

use crate::checkpoint_store::{Head, Top};
use crate::daemon::checkpoints::{self, disks, is_ours, move_tree};
use crate::daemon::http_error::HttpError;
use crate::daemon::Daemon;

/// The `File` names of the user's own files of a tree that travel (shared-nothing): they land
/// in `dest_dir`, not in vireod's folder.
pub const USER_FILE: &str = "tree-user-";

/// The VM's tree for the offer, or `None` when it has no checkpoints and runs on no file of
/// vireod's. Refused (409) while a checkpoint operation is in flight or a file is missing.
/// `user_files_travel` (shared-nothing): the user's files are `files` named `tree-user-*`
/// rather than `shared`.
pub fn describe(
    d: &Daemon,
    vm: &Vm,
    user_files_travel: bool,
) -> Result<Option<CheckpointTree>, HttpError> {
    let checkpoints = d.store.list_checkpoints(vm.id())?;
    let runs_on_ours = vm.spec.disks.iter().any(|k| is_ours(d, vm.id(), &k.path));
    if checkpoints.is_empty() && !runs_on_ours {
        return Ok(None);
    }
    if d.store
        .checkpoint_intents()?
        .iter()
        .any(|(id, _, _)| *id == vm.id())
    {
        return Err(checkpoints::busy(vm));
    }
    let head = d.store.checkpoint_head(vm.id())?;
    let mut tree = CheckpointTree {
        tops: head
            .tops
            .iter()
            .map(|(serial, t)| TreeTop {
                serial: serial.clone(),
                file: t.file.clone(),
                parent: t.parent.clone(),
            })
            .collect(),
        checkpoints,
        files: Vec::new(),
        shared: Vec::new(),
    };
    let mut files = move_tree::tree_files(d, vm).map_err(HttpError::conflict)?;
    if user_files_travel {
        files = without_flattened(d, vm, &head, files).map_err(HttpError::conflict)?;
    }
    for (i, (file, mut spellings)) in files.into_iter().enumerate() {
        let prefix = match is_ours(d, vm.id(), &file) {
            true => "tree-disk-",
            false if user_files_travel => USER_FILE,
            false => {
                tree.shared.push(file);
                continue;
            }
        };
        let base = file.file_name().unwrap_or_default().to_string_lossy();
        spellings.push(file.clone());
        tree.files.push(TreeFile {
            name: format!("{prefix}{i}-{base}"),
            spellings,
            state_of: None,
        });
    }
    for cp in tree.checkpoints.iter().filter(|c| c.has_state) {
        let dir = checkpoints::state_dir(d, vm.id(), cp.id);
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            HttpError::conflict(format!(
                "the state of checkpoint {:?} ({}) cannot be read: {e}; the tree cannot move whole",
                cp.name,
                dir.display()
            ))
        })?;
        for e in entries.filter_map(Result::ok) {
            if !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            tree.files.push(TreeFile {
                name: format!("tree-state-{}-{name}", cp.id.simple()),
                spellings: vec![e.path()],
                state_of: Some(cp.id),
            });
        }
    }
    Ok(Some(tree))
}

/// Shared-nothing: the tree's files without the user's disks on no running top (added since
/// the last checkpoint): those travel flattened (`outside_tree`), not as files of the tree,
/// and neither do the files only they reach (their parents).
fn without_flattened(
    d: &Daemon,
    vm: &Vm,
    head: &Head,
    files: BTreeMap<PathBuf, Vec<PathBuf>>,
) -> Result<BTreeMap<PathBuf, Vec<PathBuf>>, String> {
    let on_top = |p: &PathBuf| {
        files.iter().any(|(resolved, spellings)| {
            let all = || spellings.iter().chain([resolved]);
            head.tops.values().any(|t| all().any(|s| *s == t.file)) && all().any(|s| s == p)
        })
    };
    let kept: Vec<PathBuf> = vm
        .spec
        .disks
        .iter()
        .map(|k| &k.path)
        .filter(|p| is_ours(d, vm.id(), p) || on_top(p))
        .cloned()
        .collect();
    if kept.len() == vm.spec.disks.len() {
        return Ok(files);
    }
    let checkpoints = d
        .store
        .list_checkpoints(vm.id())
        .map_err(|e| e.to_string())?;
    let mut roots = kept;
    roots.extend(move_tree::checkpoint_roots(&checkpoints, &head.tops));
    move_tree::tree_files_from(roots, &vm.spec.name)
}

/// The differencing child a disk of the VM runs on now (`tops`): in a live migration it is
/// written while the tree travels, so it is copied live rather than sent as a file.
pub fn is_running_top(tree: &CheckpointTree, f: &TreeFile) -> bool {
    f.state_of.is_none() && tree.tops.iter().any(|t| f.spellings.contains(&t.file))
}

/// Whether `f` is one of the user's own files, travelling in a shared-nothing migration.
pub fn is_user_file(f: &TreeFile) -> bool {
    f.state_of.is_none() && f.name.starts_with(USER_FILE)
}

/// Shared-nothing, at the source: the disks of the VM on no file of the tree (the user's,
/// added since the last checkpoint; `describe` leaves them out). They travel as the disks of
/// a VM without checkpoints do, flattened whole into `dest_dir` beside the arrived tree
/// (`DiskTransfer::flattened`).
pub fn outside_tree<'a>(tree: &CheckpointTree, spec: &'a VmSpec) -> Vec<&'a DiskSpec> {
    let spellings: Vec<&PathBuf> = tree
        .files
        .iter()
        .filter(|f| f.state_of.is_none())
        .flat_map(|f| &f.spellings)
        .collect();
    spec.disks
        .iter()
        .filter(|k| !spellings.contains(&&k.path))
        .collect()
}

/// Shared-nothing, at the source: the offer's `disks`, the user's files the tree uses (in
/// the order of their `tree-user-*` files), then the disks outside the tree (slot order).
pub fn describe_copied(tree: &CheckpointTree, spec: &VmSpec) -> Result<Vec<CopiedDisk>, HttpError> {
    let mut out = tree
        .files
        .iter()
        .filter(|f| is_user_file(f))
        .map(|f| super::storage::describe_user_file(source_path(f)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(HttpError::conflict)?;
    for k in outside_tree(tree, spec) {
        // A VHD refuses as it does without checkpoints: 422, convert it first.
        let c = super::storage::describe_disk(&k.path, k.format)
            .map_err(|e| HttpError::new(vireo_api::ApiErrorCode::Invalid, e))?;
        out.push(c);
    }
    Ok(out)
}

/// Shared-nothing, at the source: the serials of the disks outside the tree, which the
/// worker copies flattened after the running tops.
pub fn flattened_serials(tree: &CheckpointTree, spec: &VmSpec) -> Result<Vec<String>, String> {
    outside_tree(tree, spec)
        .into_iter()
        .map(|k| {
            k.serial.clone().ok_or_else(|| {
                format!(
                    "disk {} has no serial, so the worker cannot name it for the copy",
                    k.path.display()
                )
            })
        })
        .collect()
}

/// Where a tree file is on the source (its resolved path comes last in `spellings`).
pub fn source_path(f: &TreeFile) -> &Path {
    f.spellings
        .last()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new(""))
}

/// The destination's plan for an arriving tree: each `File` name → where it goes, and every
/// source spelling → the new path.
pub struct Arrival {
    pub tree: CheckpointTree,
    pub dest_of: BTreeMap<String, PathBuf>,
    pub renames: BTreeMap<PathBuf, PathBuf>,
    pub received: BTreeSet<String>,
    /// Live: the running tops are made here (empty children) rather than received.
    pub live: bool,
    /// Shared-nothing: `dest_dir` on this host, where the user's files land (claimed empty
    /// at the offer, `storage::claim_tree_files`).
    pub dest_dir: Option<PathBuf>,
    /// Shared-nothing: the disks in none of the checkpoints, each copied flattened into its
    /// file in `dest_dir` (created empty at the offer with the user's files), slot order.
    pub flattened: Vec<Flattened>,
}

/// A disk in none of the checkpoints of a shared-nothing migration's VM: its flattened copy.
pub struct Flattened {
    pub serial: String,
    pub copy: CopiedDisk,
    pub path: PathBuf,
}

/// Plans the arrival in `vm`'s folder here and puts `spec`'s disks on their new paths;
/// `Err` is the refusal's one line. Every name and file is checked before a byte arrives.
/// `dest` (shared-nothing): the checked `dest_dir` and the offer's `disks`: the user's files
/// (in the order of the `tree-user-*` files), which land there, then the disks outside the
/// tree (slot order), whose flattened copies are made there.
pub fn plan_arrival(
    d: &Daemon,
    vm: Uuid,
    tree: CheckpointTree,
    spec: &mut VmSpec,
    live: bool,
    dest: Option<(&Path, &[CopiedDisk])>,
) -> Result<Arrival, String> {
    let mut user_files = dest.map(|(_, files)| files.iter());
    let mut user_described = Vec::new();
    let root = checkpoints::root(d, vm);
    let mut dest_of = BTreeMap::new();
    let mut renames = BTreeMap::new();
    let mut taken = BTreeSet::new();
    for f in &tree.files {
        let plain = |n: &str| !n.is_empty() && !n.contains('/') && n != "." && n != "..";
        let base = source_path(f)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !plain(&f.name) || !plain(&base) || !f.name.starts_with("tree-") {
            return Err(format!("checkpoint file name {:?} refused", f.name));
        }
        let to = match f.state_of {
            Some(cp) if tree.checkpoints.iter().any(|c| c.id == cp) => {
                checkpoints::state_dir(d, vm, cp).join(&base)
            }
            Some(cp) => return Err(format!("state for an unknown checkpoint {cp}")),
            None if is_user_file(f) => {
                let (Some((dir, _)), Some(described)) = (dest, user_files.as_mut()) else {
                    return Err(format!(
                        "{} is a user's file, which travels only in a shared-nothing migration",
                        f.name
                    ));
                };
                match described.next() {
                    Some(c) if c.file_name == base => {
                        user_described.push(c);
                        dir.join(&base)
                    }
                    _ => {
                        return Err(format!(
                            "the user's file {} is not the one the offer described",
                            f.name
                        ))
                    }
                }
            }
            None => root.join("disks").join(&base),
        };
        if !taken.insert(to.clone()) || dest_of.insert(f.name.clone(), to.clone()).is_some() {
            return Err(format!(
                "two files of the checkpoint tree would both be {}",
                to.display()
            ));
        }
        for s in &f.spellings {
            renames.insert(s.clone(), to.clone());
        }
    }
    // What the offer describes beyond the user's files: the disks outside the tree.
    let mut outside = user_files.into_iter().flatten();
    let mut flattened = Vec::new();
    if let (Some(p), Some(_)) = (tree.shared.first(), dest) {
        return Err(format!(
            "{} (a file of the VM's checkpoints) would stay on the source in a shared-nothing \
             migration",
            p.display()
        ));
    }
    // The user's own files stay where they are: shared storage, as the VM's disks.
    for p in &tree.shared {
        let here = d
            .storage
            .confine_path("checkpoint file", p)
            .map_err(|e| e.body.message)?;
        if !here.is_file() {
            return Err(format!(
                "{} (a file of the VM's checkpoints) is not a file on this host",
                p.display()
            ));
        }
    }
    for disk in &mut spec.disks {
        if let Some(to) = renames.get(&disk.path) {
            disk.path = to.clone();
        }
    }
    if live {
        // Each disk running on vireod's file must be a top: only tops are copied live.
        for disk in &spec.disks {
            let runs_on_tree = tree
                .files
                .iter()
                .any(|f| f.state_of.is_none() && dest_of.get(&f.name) == Some(&disk.path));
            let is_top = tree
                .tops
                .iter()
                .any(|t| renames.get(&t.file) == Some(&disk.path));
            if runs_on_tree && !is_top {
                return Err(format!(
                    "disk {} runs on a file of the checkpoint tree that is no running top; \
                     migrate the VM with --quick",
                    disk.path.display()
                ));
            }
        }
        // Shared-nothing: no disk stays behind on the source; one outside the tree arrives
        // flattened in `dest_dir`, as a disk of a VM without checkpoints does.
        for disk in &mut spec.disks {
            let (Some((dir, _)), false) = (dest, runs_on_top(&tree, &renames, &disk.path)) else {
                continue;
            };
            let source_name = disk.path.file_name().map(|n| n.to_string_lossy());
            let c = match outside.next() {
                Some(c) if source_name.as_deref() == Some(c.file_name.as_str()) => c,
                _ => {
                    return Err(format!(
                        "disk {} is in none of the VM's checkpoints and the offer describes no \
                         copy of it",
                        disk.path.display()
                    ))
                }
            };
            if c.format == vireo_api::DiskFormat::Vhd {
                return Err(format!("disk {}: VHD copies are not made", c.file_name));
            }
            let to = dir.join(&c.file_name);
            if !taken.insert(to.clone()) {
                return Err(format!("two files would both be {}", to.display()));
            }
            disk.path = to.clone();
            disk.format = Some(c.format);
            flattened.push(Flattened {
                serial: disk.serial.clone().unwrap_or_default(),
                copy: c.clone(),
                path: to,
            });
        }
    }
    if outside.next().is_some() {
        return Err(
            "the offer describes more disks than the tree's user's files and the disks in none \
             of its checkpoints"
                .into(),
        );
    }
    if let Some((dir, _)) = dest {
        let copies: Vec<&CopiedDisk> = flattened.iter().map(|f| &f.copy).collect();
        super::storage::check_tree_room(dir, &user_described, &copies)?;
    }
    Ok(Arrival {
        tree,
        dest_of,
        renames,
        received: BTreeSet::new(),
        live,
        dest_dir: dest.map(|(dir, _)| dir.to_path_buf()),
        flattened,
    })
}

/// Whether `path` (a disk's path here, after `renames`) is the new path of a running top.
fn runs_on_top(tree: &CheckpointTree, renames: &BTreeMap<PathBuf, PathBuf>, path: &Path) -> bool {
    tree.tops
        .iter()
        .any(|t| renames.get(&t.file).map(PathBuf::as_path) == Some(path))
}

impl Arrival {
    /// Where the `File` named `name` goes, if it is one of the tree's.
    pub fn path_for(&self, name: &Path) -> Option<PathBuf> {
        self.dest_of.get(name.to_str()?).cloned()
    }

    /// The new path of a source path. A parent locator may spell a file
    /// `<dir>/../base.vhdx`; the source's folders need not exist here, so such a spelling is
    /// normalized by its text, not by the file system.
    fn follow(&self, p: &Path) -> PathBuf {
        let plain = lexical(p);
        self.renames
            .get(p)
            .or_else(|| self.renames.get(&plain))
            .cloned()
            .unwrap_or(plain)
    }

    /// Shared-nothing: where the user's files land in `dest_dir`, to be claimed at the offer.
    pub fn user_file_paths(&self) -> Vec<PathBuf> {
        match self.dest_dir {
            None => Vec::new(),
            Some(_) => self
                .tree
                .files
                .iter()
                .filter(|f| is_user_file(f))
                .filter_map(|f| self.dest_of.get(&f.name).cloned())
                .collect(),
        }
    }

    /// Whether the `File` named `name` goes into a file claimed at the offer (a user's file
    /// in `dest_dir`) rather than a new one.
    pub fn is_claimed(&self, name: &Path) -> bool {
        self.dest_dir.is_some() && name.to_str().is_some_and(|n| n.starts_with(USER_FILE))
    }

    /// Whether the file named `name` is made here rather than received (a live migration's
    /// running top).
    fn made_here(&self, name: &str) -> bool {
        self.live
            && self
                .tree
                .files
                .iter()
                .any(|f| f.name == name && is_running_top(&self.tree, f))
    }

    /// Live, once every other file is in: the files relinked, an empty child of each running
    /// top's arrived parent made at the top's new path, the records and head stored (they go
    /// with the VM's row if the migration fails). The files the disk copy writes with their
    /// disks' serials, in its order: the tops' new paths (`tree.tops` order), then the
    /// flattened copies. Blocking.
    pub fn settle_live(&self, d: &Daemon, vm: Uuid) -> Result<Vec<(String, PathBuf)>, String> {
        let mut made = Vec::new();
        let tops = self.tree.tops.iter().map(|t| {
            let file = self.follow(&t.file);
            (t, file)
        });
        self.settle_with(d, vm, || {
            for (t, file) in tops {
                let parent = self.follow(&t.parent);
                disks::make_child(&parent, &file)?;
                made.push((t.serial.clone(), file));
            }
            Ok(())
        })?;
        made.extend(
            self.flattened
                .iter()
                .map(|f| (f.serial.clone(), f.path.clone())),
        );
        Ok(made)
    }

    /// After the commit, every file in: the children relinked to their parents' new paths,
    /// each opening with its whole chain; then the records and head stored. Blocking.
    pub fn settle(&self, d: &Daemon, vm: Uuid) -> Result<(), String> {
        self.settle_with(d, vm, || Ok(()))
    }

    /// `settle`, with `make_tops` run between the relinking and the check that every disk file
    /// opens with its chain.
    fn settle_with(
        &self,
        d: &Daemon,
        vm: Uuid,
        make_tops: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        if let Some(missing) = self
            .dest_of
            .keys()
            .find(|n| !self.received.contains(*n) && !self.made_here(n))
        {
            return Err(format!("the checkpoint file {missing} did not arrive"));
        }
        let never = AtomicBool::new(false);
        let disk_files = self
            .tree
            .files
            .iter()
            .filter(|f| f.state_of.is_none())
            .filter_map(|f| self.dest_of.get(&f.name));
        let received_files = self
            .tree
            .files
            .iter()
            .filter(|f| f.state_of.is_none() && !self.made_here(&f.name))
            .filter_map(|f| self.dest_of.get(&f.name));
        for file in received_files.filter(|p| disks::is_vhdx(p)) {
            let Some(parent) = disks::parent_of(file)? else {
                continue;
            };
            let new_parent = self.follow(&parent);
            Vhdx::rebase(file, Rebase::Relink(&new_parent), &|_, _| {}, &never).map_err(|e| {
                format!(
                    "relinking {} to {}: {e}",
                    file.display(),
                    new_parent.display()
                )
            })?;
        }
        make_tops()?;
        for file in disk_files.filter(|p| disks::is_vhdx(p)) {
            Vhdx::open(file, &OpenOptions::read_only())
                .map_err(|e| format!("the arrived {} does not open: {e}", file.display()))?;
        }
        let mut records = self.tree.checkpoints.clone();
        for cp in &mut records {
            cp.vm_id = vm;
            cp.spec
                .disks
                .iter_mut()
                .for_each(|k| k.path = self.follow(&k.path));
            for k in &mut cp.disks {
                k.frozen = self.follow(&k.frozen);
                k.parent_file = k.parent_file.as_deref().map(|p| self.follow(p));
            }
        }
        let head = Head {
            current: records.iter().find(|c| c.current).map(|c| c.id),
            tops: self
                .tree
                .tops
                .iter()
                .map(|t| {
                    let top = Top {
                        file: self.follow(&t.file),
                        parent: self.follow(&t.parent),
                    };
                    (t.serial.clone(), top)
                })
                .collect(),
        };
        d.store
            .import_checkpoints(vm, &records, &head)
            .map_err(|e| format!("storing the VM's checkpoints here: {e}"))
    }
}

/// `p` with `.` and `..` removed by their text.
fn lexical(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Files vireod made for `vm` outside its own folder (a storage move's
/// `vireo-checkpoints-<id>/`), which do not go with the folder when the record is removed.
pub fn outside_vm_dir(d: &Daemon, vm: &Vm) -> Vec<PathBuf> {
    let folder = move_tree::resolved(&d.store.vm_dir(vm.id()));
    match move_tree::tree_files(d, vm) {
        Ok(files) => files
            .into_keys()
            .filter(|f| is_ours(d, vm.id(), f) && !f.starts_with(&folder))
            .collect(),
        Err(e) => {
            tracing::warn!(vm = %vm.id(), "listing the VM's checkpoint files: {e}");
            Vec::new()
        }
    }
}

/// Deletes `files` (see [`outside_vm_dir`]) and their `vireo-checkpoints-<id>/` folders once
/// empty.
pub fn remove_outside(files: &[PathBuf]) {
    for f in files {
        disks::remove(f);
        if let Some(dir) = f.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
