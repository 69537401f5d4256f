//! Import: from an export folder to a VM in the inventory. [`plan`] checks everything before
//! anything is written and answers 422 listing every problem with the flag that fixes it;
//! [`run`] then copies the files (with `copy`) into a partial folder renamed when complete,
//! and stores the VM (one transaction, see `store/import.rs`).
//!
//! Decisions (docs/export.md): without `new_id` the VM keeps its id, MACs and serials and a
//! saved state imports as a saved VM; with `new_id` it gets a new id, new MACs and new serials,
//! and a saved state is dropped with a warning (a saved state restores only with the MACs it
//! was saved with); so is each checkpoint's memory state, its disks kept (`import_tree`).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use uuid::Uuid;
use vireo_api::{validate_name, validate_spec, ApiErrorCode, ImportRequest, VmIdentity, VmSpec};

use super::files::{self, CopyError};
use super::import_tree;
use super::manifest::Manifest;
use super::package::Progress;
use super::tree_manifest::TreeFileEntry;
use crate::daemon::http_error::HttpError;
use crate::daemon::Daemon;
use crate::switch_store::SwitchStoreError;

/// Where copies go when the request names no place: `<first storage root>/vireo-vms/`.
pub const DEFAULT_SUBDIR: &str = "vireo-vms";

/// A checked import.
#[derive(Debug)]
pub struct Plan {
    pub manifest: Manifest,
    /// The export folder.
    pub from: PathBuf,
    /// Where the VM's files will be: `from` in place, `<to>/<name>` with a copy.
    pub dest: PathBuf,
    pub copy: bool,
    pub id: Uuid,
    /// The spec to store: paths under `dest`, overrides applied.
    pub spec: VmSpec,
    pub keep_saved: bool,
    pub warnings: Vec<String>,
    /// The checkpoint tree to store with the VM (manifest version 2).
    pub tree: Option<crate::store::ImportedTree>,
    /// With a copy and a new id: the manifest's `vireo-checkpoints-<old id>` folder is named
    /// for the new id in the copy, so its files stay vireod's (`checkpoints::is_ours`).
    ours_rename: Option<(String, String)>,
}

impl Plan {
    /// Where a manifest path goes, relative to `dest`.
    pub fn rel(&self, rel: &Path) -> PathBuf {
        match &self.ours_rename {
            Some((old, new)) => rel
                .components()
                .map(|c| {
                    if c.as_os_str() == old.as_str() {
                        PathBuf::from(new)
                    } else {
                        PathBuf::from(c.as_os_str())
                    }
                })
                .collect(),
            None => rel.to_path_buf(),
        }
    }

    /// Where a manifest path is once imported.
    pub fn place(&self, rel: &Path) -> PathBuf {
        self.dest.join(self.rel(rel))
    }
}

/// The default place for copies, or a message asking for one.
pub fn default_dir(daemon: &Daemon) -> Result<PathBuf, String> {
    daemon
        .storage
        .roots()
        .first()
        .map(|r| r.join(DEFAULT_SUBDIR))
        .ok_or_else(|| "vireod has no storage root; name the destination (--to DIR)".to_string())
}

/// The 422 of an import: every problem, one per line item.
pub fn report(what: &str, problems: &[String]) -> HttpError {
    let list: Vec<String> = problems
        .iter()
        .enumerate()
        .map(|(i, p)| format!("({}) {p}", i + 1))
        .collect();
    HttpError::new(
        ApiErrorCode::Invalid,
        format!(
            "cannot {what}: {} problem(s): {}",
            problems.len(),
            list.join("; ")
        ),
    )
}

/// Checks `req` against this host and the folder's manifest; nothing is written.
pub fn plan(daemon: &Daemon, req: &ImportRequest) -> Result<Plan, HttpError> {
    let what = format!("import {}", req.dir.display());
    if !req.dir.is_absolute() {
        return Err(report(
            &what,
            &["the folder must be an absolute path".into()],
        ));
    }
    if req.to.is_some() && !req.copy {
        return Err(report(&what, &["--to needs --copy".into()]));
    }
    let from = req.dir.clone();
    let manifest = Manifest::read(&from).map_err(|e| report(&what, &[e]))?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();

    for f in &manifest.files() {
        match std::fs::metadata(from.join(&f.path)) {
            Ok(m) if m.len() == f.size => {}
            Ok(m) => problems.push(format!(
                "{} has {} bytes, the manifest says {}: the export is damaged; export again",
                f.path.display(),
                m.len(),
                f.size
            )),
            Err(e) => problems.push(format!(
                "{}: {e}: the export is incomplete; export again",
                f.path.display()
            )),
        }
    }

    let mut spec = manifest.spec.clone();
    if let Some(name) = &req.name {
        spec.name = name.clone();
    }
    if let Err(e) = validate_name("name", &spec.name) {
        problems.push(format!("{e}; fix: --name NAME"));
    } else if daemon.store.get_by_name(&spec.name).is_ok() {
        problems.push(format!(
            "a VM named {:?} already exists; fix: --name NEW-NAME",
            spec.name
        ));
    }

    let id = if req.new_id {
        Uuid::new_v4()
    } else {
        manifest.identity.id
    };
    if !req.new_id {
        if daemon.store.get_by_id(id).is_ok() {
            problems.push(format!(
                "a VM with id {id} already exists (imported before?); fix: --new-id"
            ));
        }
        let others = daemon.store.list().unwrap_or_default();
        for mac in &manifest.identity.macs {
            if let Some(o) = others.iter().find(|o| o.identity.macs.contains(mac)) {
                problems.push(format!(
                    "MAC {mac} is used by VM {:?}; fix: --new-id",
                    o.spec.name
                ));
            }
        }
    }

    for (i, nic) in spec.nics.iter_mut().enumerate() {
        let switch = req
            .switches
            .get(&nic.switch)
            .cloned()
            .unwrap_or_else(|| nic.switch.clone());
        match daemon.store.find_switch(&switch) {
            Ok(_) => nic.switch = switch,
            Err(SwitchStoreError::NotFound(_)) => problems.push(format!(
                "NIC {} is on switch {switch:?}, which this host lacks; fix: --switch {switch}=SWITCH \
                 (an existing switch) or create it",
                nic.name.clone().unwrap_or_else(|| format!("nics[{i}]"))
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }

    if let Some(m) = req.memory_bytes {
        spec.memory_bytes = m;
    }
    if spec.memory_bytes > daemon.limits.max_memory_bytes {
        problems.push(format!(
            "memory {} bytes is more than this host's {} bytes; fix: --memory SIZE",
            spec.memory_bytes, daemon.limits.max_memory_bytes
        ));
    }
    if spec.vcpus > daemon.limits.max_vcpus {
        problems.push(format!(
            "{} vCPUs is more than this host's {}; change the VM's vCPUs after importing it \
             elsewhere, or export it again with fewer",
            spec.vcpus, daemon.limits.max_vcpus
        ));
    }

    let saved = !manifest.saved.is_empty();
    let keep_saved = saved && !req.new_id;
    if saved && req.new_id {
        warnings.push(
            "the saved state is dropped: a new id gives new MACs, which a saved state cannot \
             take; the VM is imported off"
                .into(),
        );
    }
    if keep_saved && spec.memory_bytes != manifest.spec.memory_bytes {
        problems.push(format!(
            "the saved state needs memory {} bytes; fix: leave out --memory, or --new-id (the \
             saved state is then dropped)",
            manifest.spec.memory_bytes
        ));
    }

    let dest = if req.copy {
        let to = match &req.to {
            Some(to) => Some(to.clone()),
            None => match default_dir(daemon) {
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
        };
        to.map(|to| {
            if req.to.is_some() {
                if !to.is_dir() {
                    problems.push(format!(
                        "{} is not a directory; fix: --to DIR (an existing one)",
                        to.display()
                    ));
                } else if let Err(e) = daemon.storage.confine_path("to", &to) {
                    problems.push(format!("{}; fix: --to DIR", e.body.message));
                }
            }
            let dest = to.join(&spec.name);
            if dest.exists() {
                problems.push(format!(
                    "{} already exists; fix: --to DIR or --name NEW-NAME",
                    dest.display()
                ));
            }
            dest
        })
    } else {
        if let Err(e) = daemon.storage.confine_path("the folder", &from) {
            problems.push(format!(
                "{}; fix: --copy (to a place inside them)",
                e.body.message
            ));
        }
        Some(from.clone())
    };
    let dest = dest.unwrap_or_default();

    let ours_rename = (req.copy && req.new_id).then(|| {
        (
            crate::daemon::checkpoints::move_tree::moved_dir_name(manifest.identity.id),
            crate::daemon::checkpoints::move_tree::moved_dir_name(id),
        )
    });
    let manifest_spec = manifest.spec.clone();
    let mut plan = Plan {
        manifest,
        from,
        dest,
        copy: req.copy,
        id,
        spec: manifest_spec.clone(),
        keep_saved,
        warnings,
        tree: None,
        ours_rename,
    };
    spec.kernel = plan.place(&plan.manifest.kernel.path);
    spec.initrd = plan.manifest.initrd.as_ref().map(|f| plan.place(&f.path));
    if spec.disks.len() != plan.manifest.disks.len() {
        problems.push("the manifest's disks do not match its spec: the export is damaged".into());
    } else {
        for (disk, entry) in spec.disks.iter_mut().zip(&plan.manifest.disks) {
            match entry.chain.first() {
                Some(f) => disk.path = plan.place(&f.path),
                None => problems.push("a disk with no file: the export is damaged".into()),
            }
        }
    }
    let mut renames = import_tree::Renames::default();
    if req.new_id {
        for nic in &mut spec.nics {
            nic.mac = None;
        }
        for disk in &mut spec.disks {
            disk.serial = None;
        }
        // Assigned here rather than by the store, so the checkpoints can follow them.
        VmIdentity::assign(id, &mut spec, import_tree::random_mac);
        renames =
            import_tree::Renames::new_identity(&plan.manifest, &plan.manifest.spec, &spec, id);
        let dropped = import_tree::drops_state(&plan.manifest, &renames);
        if !dropped.is_empty() {
            plan.warnings.push(format!(
                "checkpoint(s) {} keep their disks but not their memory state (applying one \
                 leaves the VM off): a new id gives new MACs, which a saved state cannot take; \
                 import without --new-id to keep it",
                dropped.join(", ")
            ));
        }
    }
    plan.tree = import_tree::tree_for_import(
        &plan.manifest,
        id,
        &renames,
        &req.switches,
        &|rel| plan.place(rel),
        &|rel| plan.from.join(rel),
    );
    if let Err(e) = validate_spec(&spec, &daemon.limits) {
        let dup = problems
            .iter()
            .any(|p| p.contains("memory") || p.contains("vCPU"));
        if !dup {
            problems.push(e.to_string());
        }
    }
    if !problems.is_empty() {
        return Err(report(&what, &problems));
    }
    plan.spec = spec;
    Ok(plan)
}

/// A checkpoint's state file: read from the export folder by the store, never copied with the
/// VM's files.
fn is_state(rel: &Path) -> bool {
    rel.starts_with("checkpoints")
}

/// Bytes `run` copies.
pub fn bytes(plan: &Plan) -> u64 {
    if !plan.copy {
        return 0;
    }
    plan.manifest
        .files()
        .into_iter()
        .filter(|f| plan.keep_saved || !f.path.starts_with("saved"))
        .filter(|f| !is_state(&f.path))
        .map(|f| f.size)
        .sum()
}

/// With `copy`: the files into `<dest>` (built as a partial folder, renamed when complete).
pub fn copy_files(
    plan: &Plan,
    job: Uuid,
    cancel: &AtomicBool,
    progress: &mut Progress,
) -> Result<(), CopyError> {
    if !plan.copy {
        return Ok(());
    }
    let parent = plan.dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)
        .map_err(|e| CopyError::Failed(format!("{}: {e}", parent.display())))?;
    let tag = job.simple().to_string();
    let partial = files::partial_name(parent, &plan.spec.name, "import", &tag[..8]);
    let r = (|| {
        for f in plan.manifest.files() {
            if (!plan.keep_saved && f.path.starts_with("saved")) || is_state(&f.path) {
                continue;
            }
            files::copy_file(
                &plan.from.join(&f.path),
                &partial.join(plan.rel(&f.path)),
                cancel,
                &mut |n| progress.add(n),
            )?;
        }
        if plan.manifest.tree.is_empty() {
            for d in &plan.manifest.disks {
                let copies: Vec<PathBuf> = d.chain.iter().map(|f| partial.join(&f.path)).collect();
                files::relink(&copies)?;
            }
        } else {
            let tree: Vec<TreeFileEntry> = plan
                .manifest
                .tree
                .iter()
                .map(|f| TreeFileEntry {
                    path: plan.rel(&f.path),
                    size: f.size,
                    parent: f.parent.as_deref().map(|p| plan.rel(p)),
                })
                .collect();
            super::package::relink_tree(&partial, &tree)?;
        }
        let ours_dirs = plan.manifest.tree.iter().filter_map(|f| {
            let dir = plan.rel(f.path.parent()?);
            (dir != Path::new("disks")).then_some(dir)
        });
        let subs: std::collections::BTreeSet<PathBuf> = ["", "boot", "disks", "saved"]
            .into_iter()
            .map(PathBuf::from)
            .chain(ours_dirs)
            .collect();
        for sub in subs {
            if partial.join(&sub).is_dir() {
                files::sync_dir(&partial.join(&sub))?;
            }
        }
        if plan.dest.exists() {
            return Err(CopyError::Failed(format!(
                "{} appeared meanwhile",
                plan.dest.display()
            )));
        }
        std::fs::rename(&partial, &plan.dest)
            .map_err(|e| CopyError::Failed(format!("{}: {e}", plan.dest.display())))?;
        files::sync_dir(parent)?;
        Ok(())
    })();
    if r.is_err() {
        files::remove_partial(&partial);
    }
    r
}

/// Stores the VM (after `copy_files`), with its NICs' ports; the saved state is copied into its
/// folder when kept. Returns the VM's name.
pub async fn register(daemon: &Daemon, plan: &Plan) -> Result<String, String> {
    use crate::daemon::switches::nics;
    let saved_from = plan.keep_saved.then(|| plan.dest.join("saved"));
    let spec = daemon
        .storage
        .confine(&plan.spec)
        .map_err(|e| e.body.message)?;
    let _guards = nics::lock_switches(daemon, &[Some(&spec)]).await;
    let vm = daemon
        .store
        .import_vm(plan.id, &spec, saved_from.as_deref(), plan.tree.as_ref())
        .map_err(|e| e.to_string())?;
    if let Err(reason) = nics::apply(daemon, vm.id(), None, Some(&vm.spec)).await {
        let _ = nics::apply(daemon, vm.id(), Some(&vm.spec), None).await;
        let _ = daemon.store.remove(vm.id());
        return Err(format!("a switch refused the VM's NIC: {reason}"));
    }
    Ok(vm.spec.name)
}
