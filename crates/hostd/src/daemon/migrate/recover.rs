//! Start-up: VMs left `incoming` by a vireod that died while receiving them. The connection
//! to the source died with it, so the source's side has ended too (its job failed or its
//! worker handed the VM over). What the worker here says decides:
//! - it runs the VM (its migration `completed`): adopted, `running`, the network taken over
//!   (`network_owed`);
//! - anything else (no worker, a worker still waiting, one that failed): the worker is
//!   killed and the record and its ports removed; the VM is the source's.
//!
//! And on the source side: a VM whose worker exited `MigratedAway` while no job was there to
//! remove its record (vireod died mid-migration, the workers finished the hand-over) is found
//! `off` with that `exit.json`; it runs on the destination, so its record and ports go. The
//! same holds while vireod runs: a worker it re-adopted at start-up in the middle of a
//! hand-over, which then exits `MigratedAway`, had no job here to remove its record
//! (`adopted_worker_migrated_away`).

use std::sync::Arc;
use uuid::Uuid;
use vireo_api::worker::WorkerReply;
use vireo_api::worker::{MigrateState, WorkerExit, WorkerExitReason, WorkerOp, WorkerRecord};
use vireo_api::{Action, JobKind, JobState, VmState};

use super::listener::{settle_at, Settled};
use crate::daemon::switches::nics;
use crate::daemon::{files, procfs, sys, worker_client, Daemon};

pub async fn recover_all(d: &Arc<Daemon>) {
    let Ok(vms) = d.store.list() else { return };
    for vm in vms.iter().filter(|v| v.state == VmState::Off) {
        let dir = d.store.vm_dir(vm.id());
        let exit = files::read_json::<WorkerExit>(&files::path(&dir, files::EXIT));
        if let Some(WorkerExitReason::MigratedAway { to, .. }) = exit.map(|e| e.reason) {
            tracing::warn!(vm = %vm.id(), name = %vm.spec.name, %to, "VM migrated away while vireod was down; removing its record");
            if let Err(e) = nics::remove_vm(d, vm).await {
                tracing::error!(vm = %vm.id(), "{}", e.body.message);
            }
        }
    }
    for vm in vms.into_iter().filter(|v| v.state == VmState::Incoming) {
        let dir = d.store.vm_dir(vm.id());
        let record = files::read_json::<WorkerRecord>(&files::path(&dir, files::RECORD))
            .filter(|r| r.vm_id == vm.id() && procfs::alive(r.pid, r.start_time_ticks));
        let Some(r) = record else {
            remove_incoming(d, &vm).await;
            continue;
        };
        // A VM in post-copy settles only once its last page arrived (or it is lost): that
        // can take minutes, and waiting here kept the API and the migration listener (whose
        // `where_is` a source may be asking) shut the whole time. It is settled beside them;
        // its arrival's files are dealt with after it (`arriving::recover_one`), not by the
        // start-up sweep, which skips a VM still `incoming`.
        let sock = files::path(&dir, files::SOCKET);
        let in_postcopy = matches!(
            worker_client::call_once(&sock, WorkerOp::MigrateStatus).await,
            Ok(WorkerReply::Migrate(p)) if p.state == MigrateState::Postcopy
        );
        if in_postcopy {
            tracing::info!(vm = %vm.id(), "an incoming VM is in post-copy; settling it in the background");
            d.migrations.settling_at_start(vm.id(), true);
            let d = d.clone();
            tokio::spawn(async move {
                settle_one(&d, &vm, r).await;
                d.migrations.settling_at_start(vm.id(), false);
                super::arriving::recover_one(&d, vm.id());
            });
            continue;
        }
        settle_one(d, &vm, r).await;
    }
}

/// An incoming VM whose worker is alive: kept if the worker runs it, recorded lost if it lost
/// it in post-copy, else its worker killed and its record removed.
async fn settle_one(d: &Arc<Daemon>, vm: &vireo_api::Vm, r: WorkerRecord) {
    let dir = d.store.vm_dir(vm.id());
    let sock = files::path(&dir, files::SOCKET);
    // A worker caught in the switch-over is waited for (killing it then could lose
    // the VM in both places); one that has not begun it is cancelled.
    let settled = settle_at(&sock, r.pid, || procfs::alive(r.pid, r.start_time_ticks)).await;
    if settled == Settled::RunsHere && d.store.set_state(vm.id(), &Action::Started).is_ok() {
        tracing::info!(vm = %vm.id(), "an incoming VM arrived while vireod was down; adopted running");
        d.sup.adopt(d, r, &dir);
        // The whole takeover, not only the announcement: the peers still tunnel to the source.
        super::network_owed::take_over(d, vm).await;
        return;
    }
    if settled == Settled::Lost {
        // It resumed the VM in post-copy and lost it: the record says so and stays.
        let lost = Action::MigrationLost {
            reason: "the VM was lost in a post-copy migration (its worker said so when \
                     vireod restarted)"
                .into(),
        };
        let _ = sys::kill(r.pid, libc::SIGKILL);
        if d.store.set_state(vm.id(), &lost).is_ok() {
            tracing::warn!(vm = %vm.id(), "an incoming VM was lost in post-copy while vireod was down");
            return;
        }
    }
    tracing::warn!(vm = %vm.id(), pid = r.pid, "incoming VM's worker had not received it; killed");
    let _ = sys::kill(r.pid, libc::SIGKILL);
    remove_incoming(d, vm).await;
}

async fn remove_incoming(d: &Arc<Daemon>, vm: &vireo_api::Vm) {
    tracing::warn!(vm = %vm.id(), name = %vm.spec.name, "removing an incoming VM left by a migration cut short");
    if let Err(e) = nics::remove_vm(d, vm).await {
        tracing::error!(vm = %vm.id(), "{}", e.body.message);
    }
}

/// An adopted worker (vireod restarted while it migrated) exited `MigratedAway`: the job that
/// started it died with the old vireod, so nothing else would remove the record, which would
/// stay `off` here while the VM runs on the destination. The worker said `MigratedAway` only
/// after the destination's `RUNNING`, so there is nothing to ask. A migration job of this
/// vireod (the VM migrated again after the restart) removes the record itself.
pub async fn adopted_worker_migrated_away(d: &Daemon, vm_id: Uuid) {
    let owned = d.store.list_jobs(Some(vm_id)).is_ok_and(|jobs| {
        jobs.iter()
            .any(|j| j.kind == JobKind::Migrate && j.state == JobState::Running)
    });
    let Ok(vm) = d.store.get_by_id(vm_id) else {
        return;
    };
    if owned || vm.state != VmState::Off {
        return;
    }
    tracing::warn!(vm = %vm_id, name = %vm.spec.name, "a re-adopted worker handed the VM over; removing its record");
    if let Err(e) = nics::remove_vm(d, &vm).await {
        tracing::error!(vm = %vm_id, "{}", e.body.message);
    }
    d.meters.forget(vm_id);
}
