//! The disk locks of saved VMs, held by vireod while no worker holds them (docs/vm-state.md,
//! "Disk locks across a save").
//!
//! A saving worker hands its disks' open, locked files over with its `Save` reply
//! (`worker_client::save_handing_over`); they are kept here, per VM, until a restore hands them
//! on to the new worker (inherited descriptors, `WorkerLaunch::inherited_disks`) and the VM
//! runs, or the saved state is discarded. After a vireod restart (its files closed with it),
//! [`relock_saved`] takes the same locks again for every saved VM before the API serves; a
//! restore of a VM whose disks are not held takes them first ([`acquire_missing`]), so a disk
//! some other process locked meanwhile is named, with its holder, before any worker starts.
//!
//! Locking: `held` is a std mutex, never held across an await or a blocking lock attempt.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;
use vireo_api::{DiskSpec, Vm, VmState};
use vireo_block::handover;
use vireo_block::LockKind;

/// One disk's open file, holding its lock.
#[derive(Debug)]
pub struct HeldDisk {
    pub path: PathBuf,
    pub read_only: bool,
    pub file: File,
}

/// The held locks, per VM.
#[derive(Default)]
pub struct DiskLocks {
    held: Mutex<HashMap<Uuid, Vec<HeldDisk>>>,
}

impl DiskLocks {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<HeldDisk>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `disks` for `vm` (in place of what was kept; those files close).
    pub fn keep(&self, vm: Uuid, disks: Vec<HeldDisk>) {
        let old = self.map().insert(vm, disks);
        drop(old);
    }

    /// Lets go of `vm`'s locks (its saved state is spent or discarded).
    pub fn release(&self, vm: Uuid) {
        let old = self.map().remove(&vm);
        if let Some(old) = old.filter(|o| !o.is_empty()) {
            tracing::info!(vm = %vm, disks = old.len(), "disk locks released");
        }
    }

    /// Takes `vm`'s held files out (a restore hands them on, then keeps them again).
    pub fn take(&self, vm: Uuid) -> Vec<HeldDisk> {
        self.map().remove(&vm).unwrap_or_default()
    }

    /// The disks held for `vm` now.
    pub fn paths(&self, vm: Uuid) -> Vec<PathBuf> {
        self.map()
            .get(&vm)
            .map_or_else(Vec::new, |d| d.iter().map(|h| h.path.clone()).collect())
    }
}

/// While it lives, `vm`'s held disk locks are let go, because vireod itself opens those disks
/// (a checkpoint, an export, a clone of a saved VM; the caller holds the VM's lock). When it
/// goes, a VM that is saved then (maybe with other disk files) has its disks locked again.
pub struct SetAside {
    daemon: std::sync::Arc<super::Daemon>,
    vm: Uuid,
}

pub fn set_aside(daemon: &std::sync::Arc<super::Daemon>, vm: Uuid) -> SetAside {
    daemon.disk_locks.release(vm);
    SetAside {
        daemon: daemon.clone(),
        vm,
    }
}

impl Drop for SetAside {
    fn drop(&mut self) {
        match self.daemon.store.get_by_id(self.vm) {
            Ok(vm) if vm.state == VmState::Saved => relock(&self.daemon, &vm),
            _ => {}
        }
    }
}

/// Of `held`, the files that are still the files `vm`'s spec names (a checkpoint apply or a
/// storage move may have put others there), then every spec disk not among them opened and
/// locked as its worker would (exclusive, shared for a read-only disk). The error names the
/// disk, its holder when one is found, and what to do; `held` is given back with it.
pub fn acquire_missing(
    vm: &Vm,
    held: Vec<HeldDisk>,
) -> Result<Vec<HeldDisk>, (String, Vec<HeldDisk>)> {
    acquire_disks(&vm.spec.name, &vm.spec.disks, held)
}

fn acquire_disks(
    name: &str,
    disks: &[DiskSpec],
    held: Vec<HeldDisk>,
) -> Result<Vec<HeldDisk>, (String, Vec<HeldDisk>)> {
    let mut kept: Vec<HeldDisk> = held
        .into_iter()
        .filter(|h| {
            disks.iter().any(|d| {
                d.path == h.path
                    && d.read_only == h.read_only
                    && handover::is_same_file(&h.file, &d.path).unwrap_or(false)
            })
        })
        .collect();
    for d in disks {
        if kept.iter().any(|h| h.path == d.path) {
            continue;
        }
        match lock_disk(&d.path, d.read_only) {
            Ok(file) => kept.push(HeldDisk {
                path: d.path.clone(),
                read_only: d.read_only,
                file,
            }),
            Err(why) => {
                return Err((
                    format!(
                        "VM {name:?} cannot be restored: disk {why}; stop that process, then start \
                         the VM again (its saved state is kept)"
                    ),
                    kept,
                ))
            }
        }
    }
    Ok(kept)
}

/// Opens `path` (read-write unless `read_only`) and takes the lock its worker would take.
/// The error is "<path> is locked by pid N (comm)" or another reason, for a sentence.
fn lock_disk(path: &Path, read_only: bool) -> Result<File, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let kind = if read_only {
        LockKind::Shared
    } else {
        LockKind::Exclusive
    };
    match vireo_block::lock(&file, path, kind) {
        Ok(()) => Ok(file),
        Err(vireo_block::LockError::Locked { .. }) => Err(match handover::describe_holders(path) {
            Some(who) => format!("{} is locked by {who}", path.display()),
            None => format!("{} is locked by another process", path.display()),
        }),
        Err(e) => Err(format!("{}: locking it: {e}", path.display())),
    }
}

/// At start-up, before the API serves: takes the disk locks of every saved VM again (vireod's
/// files, and so its locks, ended with the previous vireod), but those of a quick migration
/// being settled (`migrate::quick_recover`). A disk that cannot be locked is
/// logged; that VM's `start` tries again and, failing, says which disk and who holds it.
pub fn relock_saved(daemon: &super::Daemon) {
    let vms = match daemon.store.list() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot list VMs to lock saved VMs' disks");
            return;
        }
    };
    // Not a VM whose quick migration is being settled: its disks may be the destination's
    // now (a lock here could fail the restore there); a restore here takes them itself.
    let settling = |vm: &Vm| super::migrate::quick_recover::settling(daemon, vm.id());
    for vm in vms
        .iter()
        .filter(|v| v.state == VmState::Saved && !settling(v))
    {
        relock(daemon, vm);
    }
}

/// Locks the disks of saved VM `vm` that vireod does not hold yet. A disk that cannot be
/// locked is logged; the VM's restore tries again and, failing, names it and its holder.
pub fn relock(daemon: &super::Daemon, vm: &Vm) {
    let held = match acquire_missing(vm, daemon.disk_locks.take(vm.id())) {
        Ok(held) => {
            tracing::info!(vm = %vm.id(), disks = held.len(), "saved VM's disks locked");
            held
        }
        Err((message, held)) => {
            tracing::warn!(vm = %vm.id(), %message, "saved VM's disks not all locked");
            held
        }
    };
    daemon.disk_locks.keep(vm.id(), held);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &Path, read_only: bool) -> DiskSpec {
        DiskSpec {
            path: path.to_path_buf(),
            read_only,
            format: None,
            serial: None,
            max_iops: None,
            min_iops: None,
            queues: None,
        }
    }

    #[test]
    fn acquire_keeps_what_it_holds_locks_the_rest_and_names_the_holder_of_a_taken_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&a, [0u8; 512]).unwrap();
        std::fs::write(&b, [0u8; 512]).unwrap();
        let disks = [disk(&a, false), disk(&b, true)];
        let held = acquire_disks("a", &disks, Vec::new()).unwrap();
        assert_eq!(held.len(), 2);
        // Both locked: a writer is kept out of each.
        for p in [&a, &b] {
            let other = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap();
            assert!(vireo_block::lock(&other, p, LockKind::Exclusive).is_err());
        }
        // Held files are kept as they are (no second open, which would conflict).
        let held = acquire_disks("a", &disks, held).unwrap();
        assert_eq!(held.len(), 2);
        drop(held);
        let squatter = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&a)
            .unwrap();
        vireo_block::lock(&squatter, &a, LockKind::Exclusive).unwrap();
        let (message, back) = acquire_disks("a", &disks, Vec::new()).unwrap_err();
        assert!(back.is_empty());
        assert!(
            message.contains(&format!(
                "{} is locked by pid {}",
                a.display(),
                std::process::id()
            )),
            "{message}"
        );
        assert!(message.contains("stop that process"), "{message}");
    }
}
