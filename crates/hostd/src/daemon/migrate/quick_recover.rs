//! Start-up, source side: a quick migration whose vireod died after the VM's save
//! (`quick_note.rs` left in its folder). The VM is `saved` here, but whether the `Commit` went
//! out, and so whether the destination restored it, only the destination knows: each such VM
//! gets a task that asks it (`whereabouts::ask`, `where_is` every second for up to `vireod
//! --migration-answer-wait`), as a job of its own (`migrate`, shown by `vireo job list`):
//! - `here`: the VM moved; its record, ports and folder go as in a completed quick migration
//!   (the destination restored it from the copy it received; the saved state here is spent),
//!   and the job completes;
//! - `absent`: it never arrived (or the destination undid the arrival); it is restored here
//!   and the job fails saying so, as a quick migration that did not happen does;
//! - `lost`: the destination restored it, ran it and lost it since (a later post-copy); its
//!   saved state here is older than its disks, so it stays saved here, never restored on its
//!   own, and the job fails saying so, with the reason and what to run on which host
//!   (`source::lost_after_commit`, as a quick migration's source told `lost` does);
//! - no final answer in time: it stays saved, and the job fails with the lost answer's words
//!   (where it may run, the command to start it here).
//!
//! The task takes the VM's lock before the API serves and holds it until the question is
//! settled, so a `vireo vm start` (or turn-off, remove, migrate) meanwhile is refused as busy
//! rather than allowed to restore a VM that may already run on the destination; abandoning the
//! question on such a request would bring back the guess the note exists to avoid. The saved
//! VM's disk locks are not taken again at start-up either (`disk_locks::relock_saved`): they
//! may be the destination's now, and a restore here takes them itself.
//!
//! A note beside a VM that is not `saved`:
//! - `saving`: the save went on while vireod was down (its worker re-adopted or its exit read);
//!   the task waits for its end, then asks as above (no commit can have gone out, so the
//!   destination says `absent`, but the answer is cheap and the rule stays one);
//! - anything else (the crash came before the save, or after the VM was restored here): the
//!   VM never left, and the note is removed.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use vireo_api::migrate::VmWhereabouts;
use vireo_api::{JobKind, Vm, VmState};

use super::quick_note::{self, QuickNote};
use super::source;
use crate::daemon::Daemon;

/// Bound on the wait for a save that went on while vireod was down (its `SAVE_LIMIT`).
const SAVE_END_WAIT: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(50);

/// At start-up, after the workers were re-adopted and before the API serves: each VM with a
/// note is settled by its own task (the locks are taken here, the questions asked there).
pub async fn recover_all(d: &Arc<Daemon>) {
    let Ok(vms) = d.store.list() else { return };
    for vm in vms {
        let Some(note) = quick_note::read(d, vm.id()) else {
            continue;
        };
        if !matches!(vm.state, VmState::Saved | VmState::Saving) {
            tracing::info!(vm = %vm.id(), state = %vm.state, to = %note.to, "a quick migration cut short before the save (or restored here since): nothing to settle");
            quick_note::remove(d, vm.id());
            continue;
        }
        let guard = d.lock_vm(vm.id()).await;
        let d = d.clone();
        tokio::spawn(async move { settle(&d, vm, note, guard).await });
    }
}

/// Whether `vm`'s disk locks wait for its quick migration to be settled (see the header).
pub fn settling(d: &Daemon, vm: Uuid) -> bool {
    quick_note::read(d, vm).is_some()
}

async fn settle(d: &Arc<Daemon>, vm: Vm, note: QuickNote, _guard: OwnedMutexGuard<()>) {
    let (id, name, to) = (vm.id(), vm.spec.name.clone(), note.to);
    let job = match d.store.create_job(Some(id), JobKind::Migrate) {
        Ok(j) => Some(j.id),
        Err(e) => {
            tracing::error!(vm = %id, "no job for settling its quick migration: {e}");
            None
        }
    };
    tracing::warn!(vm = %id, %name, %to, old_job = %note.job, ?job, "a quick migration was cut short by vireod's restart with the VM saved; asking {to} where it is");
    if let Some(j) = job {
        let _ = d.store.set_job_progress(j, 10);
    }
    let outcome = match saved_at_last(d, id).await {
        Err(why) => Err(why),
        Ok(vm) => decide(d, &vm, &note, job.unwrap_or(note.job)).await,
    };
    // Settled: a failure to move, restore or ask is the job's error, not a question for the
    // next start.
    quick_note::remove(d, id);
    match &outcome {
        Ok(()) => {
            tracing::info!(vm = %id, %name, %to, "quick migration settled: the VM runs on {to}; its record here removed")
        }
        Err(m) => tracing::warn!(vm = %id, %name, "quick migration settled: {m}"),
    }
    if let Some(j) = job {
        let _ = d.store.finish_job(j, outcome);
    }
}

/// The VM once it is no longer `saving`; `Err` if it did not end saved.
async fn saved_at_last(d: &Daemon, id: Uuid) -> Result<Vm, String> {
    let deadline = tokio::time::Instant::now() + SAVE_END_WAIT;
    loop {
        let vm = d.store.get_by_id(id).map_err(|e| e.to_string())?;
        match vm.state {
            VmState::Saved => return Ok(vm),
            VmState::Saving if tokio::time::Instant::now() < deadline => {}
            other => {
                return Err(format!(
                    "the save of VM {:?} for its quick migration, cut short by a restart of \
                     vireod, ended {other}; the VM did not leave",
                    vm.spec.name
                ))
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn decide(d: &Arc<Daemon>, vm: &Vm, note: &QuickNote, job: Uuid) -> Result<(), String> {
    let (name, to) = (&vm.spec.name, note.to);
    let lead = format!(
        "vireod restarted during the quick migration of VM {name:?} to {to} (job {}), after \
         the save",
        note.job
    );
    let unheard = format!("{lead}: the answer to a commit, if one went out, was not heard");
    match super::whereabouts::ask(d, to, vm.id()).await {
        Ok(VmWhereabouts::Here) => {
            // As a completed quick migration: the checkpoint files a storage move put outside
            // the VM's folder go too (the folder goes with the record).
            let outside = match super::tree::describe(d, vm, false) {
                Ok(Some(_)) => super::tree::outside_vm_dir(d, vm),
                _ => Vec::new(),
            };
            match source::forget_moved(d, vm, job, &note.dest_pas).await {
                Ok(()) => {
                    super::tree::remove_outside(&outside);
                    Ok(())
                }
                Err(e) => Err(format!("VM {name:?} runs on {to}, but {e}")),
            }
        }
        Ok(VmWhereabouts::Lost { reason }) => {
            Err(source::lost_after_commit(&unheard, to, &reason, name))
        }
        Ok(VmWhereabouts::Absent) => {
            let restored = source::restore_here(d, vm).await;
            Err(format!("{lead}, and {to} does not have it; {restored}"))
        }
        // `ask` keeps asking while the restore there is under way; never a final answer.
        Ok(VmWhereabouts::Arriving) => Err(source::may_be_there(
            &unheard,
            to,
            "its restore there was still under way",
            name,
        )),
        Err(e) => Err(source::may_be_there(&unheard, to, &e, name)),
    }
}
