//! Automatic checkpoints (Hyper-V's "automatic checkpoints", docs/checkpoints.md): with the
//! VM's `auto_checkpoint` setting on, vireod checkpoints the VM before each risky operation
//! ([`RiskyOp`]) and keeps only the newest `keep` of these.
//!
//! The checkpoint goes through the ordinary create paths (`create::in_place` for a VM without
//! a worker, the live capture for a running or paused one, so the VM never stops) and is
//! marked `automatic` in the same commit. If it cannot be taken, the operation does not run:
//! [`before`] fails with the reason and how to turn the setting off.
//!
//! Locking: [`before`] runs under the VM's lock, which the caller holds for its operation
//! too, so nothing slips in between the checkpoint and the operation. Retention ([`Taken`]
//! dropped) deletes through the ordinary delete job, which waits for that lock: it runs once
//! the operation is over, so it never sees the VM half-changed.

use std::sync::Arc;

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use vireo_api::{Checkpoint, JobKind, VmSpec};

use super::super::http_error::HttpError;
use super::super::Daemon;
use super::{create, delete, live};

/// The operations an automatic checkpoint protects (the name goes into the checkpoint's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RiskyOp {
    /// Applying a checkpoint discards the VM's current state.
    Apply,
    /// `vm set` changing memory, vCPUs, disks or NICs.
    Set,
    DiskAdd,
    DiskRemove,
    /// A shrink drops data; even a grow changes what the guest sees.
    DiskResize,
}

impl RiskyOp {
    pub fn name(self) -> &'static str {
        match self {
            RiskyOp::Apply => "apply",
            RiskyOp::Set => "set",
            RiskyOp::DiskAdd => "disk-add",
            RiskyOp::DiskRemove => "disk-rm",
            RiskyOp::DiskResize => "disk-resize",
        }
    }

    /// As the error says what did not happen.
    fn described(self) -> &'static str {
        match self {
            RiskyOp::Apply => "the checkpoint was not applied",
            RiskyOp::Set => "the VM's configuration was not changed",
            RiskyOp::DiskAdd => "the disk was not added",
            RiskyOp::DiskRemove => "the disk was not removed",
            RiskyOp::DiskResize => "the disk was not resized",
        }
    }
}

/// `auto-<op>-YYYYMMDD-HHMMSS` (UTC), with `-2`, `-3`, ... when two operations of one second
/// would share it. Pure, for tests.
pub fn auto_name(op: RiskyOp, now_ms: i64, taken: impl Fn(&str) -> bool) -> String {
    let base = format!("auto-{}-{}", op.name(), create::utc_stamp(now_ms));
    if !taken(&base) {
        return base;
    }
    (2u32..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken(n))
        .expect("some suffix is free")
}

/// The automatic checkpoints retention deletes: all but the newest `keep` automatic ones,
/// oldest first. A user's checkpoint is never chosen, nor the one the VM runs from (it was
/// just applied: deleting it would take away what the user went back to). Pure, for tests.
pub fn beyond_retention(cps: &[Checkpoint], keep: u32) -> Vec<Uuid> {
    let mut autos: Vec<&Checkpoint> = cps.iter().filter(|c| c.automatic).collect();
    autos.sort_by_key(|c| (c.created_at, c.id));
    let excess = autos.len().saturating_sub(keep as usize);
    autos
        .into_iter()
        .take(excess)
        .filter(|c| !c.current)
        .map(|c| c.id)
        .collect()
}

/// `vm set`'s change is one an automatic checkpoint protects: the VM's hardware.
pub fn changes_hardware(old: &VmSpec, new: &VmSpec) -> bool {
    old.memory_bytes != new.memory_bytes
        || old.vcpus != new.vcpus
        || old.disks != new.disks
        || old.nics != new.nics
}

/// The spec differs from the stored one in the automatic checkpoint setting only (that may
/// change in any state: it is vireod's, the worker never reads it).
pub fn only_setting_changes(old: &VmSpec, new: &VmSpec) -> bool {
    let mut same = new.clone();
    same.auto_checkpoint = old.auto_checkpoint.clone();
    same == *old && new.auto_checkpoint != old.auto_checkpoint
}

/// A checkpoint moves the VM's disks onto new children; a spec the user wrote against the old
/// files (`vm set` read it first) must name the new ones, or the VM would write the frozen
/// file. Disks are matched by serial and the path they had before; others stay as given.
pub fn follow_moved_disks(before: &VmSpec, after: &VmSpec, mut new: VmSpec) -> VmSpec {
    for disk in new.disks.iter_mut() {
        let Some(serial) = disk.serial.as_deref() else {
            continue;
        };
        let was = before
            .disks
            .iter()
            .any(|d| d.serial.as_deref() == Some(serial) && d.path == disk.path);
        let now = after
            .disks
            .iter()
            .find(|d| d.serial.as_deref() == Some(serial));
        if let (true, Some(now)) = (was, now) {
            disk.path = now.path.clone();
        }
    }
    new
}

/// An automatic checkpoint was taken; dropping this (once the operation is over) runs the
/// retention in the background, through the delete job (live merge when the VM runs).
pub struct Taken {
    daemon: Arc<Daemon>,
    pub checkpoint: Checkpoint,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let d = self.daemon.clone();
        let vm = self.checkpoint.vm_id;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { prune(&d, vm).await });
            }
            Err(_) => tracing::warn!(vm = %vm, "no runtime to delete old automatic checkpoints"),
        }
    }
}

/// Deletes the automatic checkpoints beyond the VM's `keep`, in one delete job.
async fn prune(d: &Arc<Daemon>, id: Uuid) {
    let (vm, cps) = match (d.store.get_by_id(id), d.store.list_checkpoints(id)) {
        (Ok(vm), Ok(cps)) => (vm, cps),
        _ => return,
    };
    let gone = beyond_retention(&cps, vm.spec.auto_checkpoint.keep);
    if gone.is_empty() {
        return;
    }
    match delete::delete_ids(d, &vm, gone).await {
        Ok(job) => tracing::info!(vm = %id, job = %job.id, "deleting old automatic checkpoints"),
        Err(e) => tracing::warn!(
            vm = %id,
            "cannot delete old automatic checkpoints: {}",
            e.body.message
        ),
    }
}

/// The refusal of the operation, saying why and how to go on without the checkpoint.
fn blocked(vm_name: &str, op: RiskyOp, reason: &str) -> String {
    format!(
        "automatic checkpoint of VM {vm_name:?} before {} failed: {reason}; {}. Fix that, or turn \
         automatic checkpoints off with `vireo vm set {vm_name} --auto-checkpoint off` and retry",
        op.name(),
        op.described()
    )
}

/// Checks, without taking it, that the automatic checkpoint `op` needs could be taken (a job
/// that takes it later can fail the request early). `Ok` when the setting is off.
pub fn precheck(d: &Daemon, vm_id: Uuid, op: RiskyOp) -> Result<(), HttpError> {
    let vm = d.store.get_by_id(vm_id)?;
    if !vm.spec.auto_checkpoint.enabled {
        return Ok(());
    }
    create::check(d, &vm, Some("auto-check".into()))
        .map(|_| ())
        .map_err(|mut e| {
            e.body.message = blocked(&vm.spec.name, op, &e.body.message);
            e
        })
}

/// Takes the VM's automatic checkpoint before `op` when its setting is on; the caller holds
/// the VM's lock (`_held`) and runs the operation only on `Ok`. `Ok(None)`: the setting is off.
pub async fn before(
    d: &Arc<Daemon>,
    vm_id: Uuid,
    op: RiskyOp,
    _held: &OwnedMutexGuard<()>,
) -> Result<Option<Taken>, HttpError> {
    let vm = d.store.get_by_id(vm_id)?;
    if !vm.spec.auto_checkpoint.enabled {
        return Ok(None);
    }
    let cps = d.store.list_checkpoints(vm_id)?;
    let name = auto_name(op, crate::store::now_ms(), |n| {
        cps.iter().any(|c| c.name == n)
    });
    let refuse = |mut e: HttpError| {
        e.body.message = blocked(&vm.spec.name, op, &e.body.message);
        e
    };
    create::check(d, &vm, Some(name.clone())).map_err(refuse)?;
    let job = d.store.create_job(Some(vm_id), JobKind::Checkpoint)?;
    let made = if vm.state.has_worker() {
        live::capture(d, vm_id, &name, job.id, true).await
    } else {
        create::in_place(d, vm_id, &name, job.id, true).await
    };
    let _ = d
        .store
        .finish_job(job.id, made.as_ref().map(|_| ()).map_err(|m| m.clone()));
    match made {
        Ok(checkpoint) => {
            tracing::info!(vm = %vm_id, name, "automatic checkpoint before {}", op.name());
            Ok(Some(Taken {
                daemon: d.clone(),
                checkpoint,
            }))
        }
        Err(m) => Err(HttpError::internal(blocked(&vm.spec.name, op, &m))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(n: u128, at: i64, automatic: bool) -> Checkpoint {
        Checkpoint {
            id: Uuid::from_u128(n),
            vm_id: Uuid::from_u128(99),
            name: format!("c{n}"),
            parent: None,
            created_at: at,
            spec: serde_json::from_str(
                r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k"}"#,
            )
            .unwrap(),
            disks: vec![],
            has_state: false,
            current: false,
            automatic,
            capture: None,
        }
    }

    #[test]
    fn the_name_says_operation_and_utc_time_and_never_repeats() {
        // 2026-12-05 08:15:30 UTC.
        let ms = 1_796_458_530_000;
        assert_eq!(
            auto_name(RiskyOp::DiskResize, ms, |_| false),
            "auto-disk-resize-20261205-081530"
        );
        let taken = ["auto-apply-20261205-081530", "auto-apply-20261205-081530-2"];
        let n = auto_name(RiskyOp::Apply, ms, |n| taken.contains(&n));
        assert_eq!(n, "auto-apply-20261205-081530-3");
        assert!(vireo_api::validate_name("name", &n).is_ok());
    }

    #[test]
    fn retention_deletes_the_oldest_automatic_ones_only() {
        let cps = vec![
            cp(1, 10, true),
            cp(2, 20, false),
            cp(3, 30, true),
            cp(4, 40, true),
            cp(5, 50, false),
            cp(6, 60, true),
        ];
        assert_eq!(beyond_retention(&cps, 3), vec![Uuid::from_u128(1)]);
        assert_eq!(
            beyond_retention(&cps, 1),
            vec![Uuid::from_u128(1), Uuid::from_u128(3), Uuid::from_u128(4)]
        );
        assert!(beyond_retention(&cps, 4).is_empty());
        // User checkpoints never count nor go, however many there are.
        let users: Vec<_> = (1..=10).map(|n| cp(n, n as i64, false)).collect();
        assert!(beyond_retention(&users, 1).is_empty());
    }

    #[test]
    fn retention_keeps_the_checkpoint_the_vm_runs_from() {
        let mut cps = vec![cp(1, 10, true), cp(2, 20, true), cp(3, 30, true)];
        cps[0].current = true;
        assert_eq!(beyond_retention(&cps, 1), vec![Uuid::from_u128(2)]);
    }

    #[test]
    fn hardware_changes_are_told_from_the_setting_alone() {
        let old = cp(1, 0, false).spec;
        let mut new = old.clone();
        new.auto_checkpoint.enabled = true;
        assert!(only_setting_changes(&old, &new) && !changes_hardware(&old, &new));
        new.memory_bytes *= 2;
        assert!(!only_setting_changes(&old, &new) && changes_hardware(&old, &new));
        let mut cmdline = old.clone();
        cmdline.cmdline = "quiet".into();
        assert!(!changes_hardware(&old, &cmdline) && !only_setting_changes(&old, &cmdline));
        assert!(!only_setting_changes(&old, &old));
    }

    #[test]
    fn a_spec_written_against_the_old_files_follows_the_checkpoint() {
        let disk = |path: &str, serial: &str| vireo_api::DiskSpec {
            path: path.into(),
            read_only: false,
            format: None,
            serial: Some(serial.into()),
            max_iops: None,
            min_iops: None,
            queues: None,
        };
        let mut before = cp(1, 0, false).spec;
        before.disks = vec![disk("/s/a.vhdx", "sa"), disk("/s/b.vhdx", "sb")];
        let mut after = before.clone();
        after.disks[0].path = "/s/vm/checkpoints/disks/sa-1.avhdx".into();
        after.disks[1].path = "/s/vm/checkpoints/disks/sb-1.avhdx".into();
        let mut new = before.clone();
        new.memory_bytes *= 2;
        // The user swapped b for another file: that one is taken as given.
        new.disks[1].path = "/s/other.vhdx".into();
        new.disks.push(disk("/s/c.vhdx", "sc"));
        let out = follow_moved_disks(&before, &after, new);
        assert_eq!(out.disks[0].path, after.disks[0].path);
        assert_eq!(out.disks[1].path, std::path::PathBuf::from("/s/other.vhdx"));
        assert_eq!(out.disks[2].path, std::path::PathBuf::from("/s/c.vhdx"));
    }
}
