//! Destination, shared-nothing: the files an arrival creates in `dest_dir` (the disks' copies,
//! a checkpoint tree's user files), listed on disk in `<state>/arriving/<vm id>.json` before
//! each one is created. They lie outside the VM's folder, so a vireod killed mid-arrival would
//! otherwise leave them behind: the list was only in memory (`storage::Target`). At the next
//! start ([`recover_all`], after the half-arrived VMs were settled; for a VM settled in the
//! background because it is in post-copy, [`recover_one`] once it is) a list whose VM does
//! not run here has every file it names removed; one whose VM arrived is dropped.
//!
//! A path is listed before its file is created and unlisted when the creation fails, so the
//! list never names a file that was there before the arrival (`create_new` refuses one).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vireo_api::VmState;

use crate::daemon::{files, Daemon};

#[derive(Default, Serialize, Deserialize)]
struct Listed {
    files: Vec<PathBuf>,
    /// Boot files the arrival put in place under their own names (`boot_files.rs`): removed
    /// with the rest unless a VM here boots from them by then.
    #[serde(default)]
    images: Vec<PathBuf>,
}

/// One arrival's list (a file in vireod's state folder).
#[derive(Clone)]
pub struct Manifest {
    path: PathBuf,
}

impl Manifest {
    pub fn of(d: &Daemon, vm: Uuid) -> Manifest {
        Manifest {
            path: folder(d).join(format!("{vm}.json")),
        }
    }

    fn read(&self) -> Listed {
        files::read_json(&self.path).unwrap_or_default()
    }

    /// `file` is about to be created: listed durably first.
    pub fn list(&self, file: &Path) -> Result<(), String> {
        let mut l = self.read();
        l.files.push(file.to_path_buf());
        self.write(&l)
    }

    /// A boot file is about to be linked to its name in `dest_dir`.
    pub fn list_image(&self, file: &Path) -> Result<(), String> {
        let mut l = self.read();
        l.images.push(file.to_path_buf());
        self.write(&l)
    }

    /// `file` was not created after all (it existed, or the creation failed), or is gone.
    pub fn unlist(&self, file: &Path) {
        let mut l = self.read();
        l.files.retain(|f| f != file);
        l.images.retain(|f| f != file);
        if let Err(e) = self.write(&l) {
            tracing::warn!("{e}");
        }
    }

    fn write(&self, l: &Listed) -> Result<(), String> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        files::write_json_atomic(&self.path, l).map_err(|e| {
            format!(
                "recording the arriving files in {}: {e}",
                self.path.display()
            )
        })
    }

    /// The files are the VM's now (it runs here) or were removed: the list goes.
    pub fn drop_list(&self) {
        files::remove(&self.path);
    }

    /// Removes every listed file that is still there, then the list; an image only unless
    /// `in_use` says a VM boots from it.
    pub fn remove_files(&self, in_use: impl Fn(&Path) -> bool) {
        let l = self.read();
        let images = l.images.iter().filter(|f| !in_use(f));
        for f in l.files.iter().rev().chain(images) {
            match std::fs::remove_file(f) {
                Ok(()) => {
                    tracing::info!("migration: removed {} of an arrival cut short", f.display())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("migration: cannot remove {}: {e}", f.display()),
            }
        }
        self.drop_list();
    }
}

fn folder(d: &Daemon) -> PathBuf {
    // Beside the VM folders, not in one: the folder of a VM whose record was never committed
    // is removed at start-up, before this list is read.
    d.store.state_dir().join("arriving")
}

/// Start-up, after `migrate::recover::recover_all`: every list left by a vireod that died,
/// but those of VMs still settled in the background (post-copy), which
/// [`recover_one`] handles once they are.
pub fn recover_all(d: &Daemon) {
    let Ok(entries) = std::fs::read_dir(folder(d)) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vm) = name
            .strip_suffix(".json")
            .and_then(|id| Uuid::parse_str(id).ok())
        else {
            continue;
        };
        if !d.migrations.is_settling_at_start(vm) {
            recover_one(d, vm);
        }
    }
}

/// The list of `vm`'s arrival, if one was left: dropped if the VM arrived (its files are its
/// disks), else its files removed.
pub fn recover_one(d: &Daemon, vm: Uuid) {
    let m = Manifest::of(d, vm);
    if !m.path.exists() {
        return;
    }
    match d.store.get_by_id(vm) {
        // It arrived (or is being settled by its worker): the files are its disks.
        Ok(v) if v.state != VmState::Incoming => m.drop_list(),
        _ => {
            tracing::warn!(vm = %vm, "removing the files of an arrival cut short");
            m.remove_files(|f| super::boot_files::in_use(d, f, vm));
        }
    }
}
