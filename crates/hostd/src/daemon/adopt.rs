//! Startup: re-adopting the workers of a previous vireod, and the automatic start.
//!
//! Rules, per VM whose stored state has a worker (`VmState::has_worker`):
//! 1. `worker.json` names a pid; that process must still exist with the recorded start time
//!    (a reused pid has another) and answer `Hello` on `worker.sock` with this VM's id → it is
//!    adopted and watched by polling `/proc/<pid>` (it is not our child).
//! 2. Without a record (vireod died between spawn and record), a worker answering `Hello` for
//!    this VM on its socket (within `HELLO_WAIT`) is adopted with the pid it gives.
//! 3. A recorded process that is alive but does not answer within `HELLO_WAIT` is killed (it is
//!    verified ours and useless) and the VM marked `Critical`. A `Starting` VM's worker may be
//!    restoring it (it answers once the VM is built): it gets `lifecycle::start_limit`, in
//!    the background under the VM's lock, so a large restore survives a vireod restart.
//! 4. Otherwise the worker is gone: its `exit.json` (for that pid) decides as if it had been
//!    watched; without one the VM is `Critical` "worker pid N gone while vireod was down".
//!
//! An adopted VM that was `Starting` is carried on to `Running` once the worker reports the
//! vCPUs running (or turned off after the start timeout); one that was `Stopping` gets the
//! default stop timeout again, then is turned off. Their jobs were failed at open. A VM that
//! arrived by migration and runs gets the network takeover the old vireod still owed it
//! (`migrate::network_owed`).
//!
//! Adoption completes before the API serves, so no client sees a half-recovered inventory.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vireo_api::rest::DEFAULT_STOP_TIMEOUT_SECS;
use vireo_api::worker::{MigrateState, WorkerExit, WorkerOp, WorkerRecord, WorkerReply};
use vireo_api::{Action, Vm, VmState};

use super::exit::Death;
use super::supervisor::apply_verdict;
use super::worker_client::WorkerConn;
use super::{files, lifecycle, procfs, sys, Daemon};

const HELLO_WAIT: Duration = Duration::from_secs(5);

pub async fn adopt_all(daemon: &Arc<Daemon>) {
    let vms = match daemon.store.list() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot list VMs for re-adoption");
            return;
        }
    };
    let mut tasks = Vec::new();
    for vm in vms.into_iter().filter(|v| v.state.has_worker()) {
        let d = daemon.clone();
        tasks.push(tokio::spawn(async move { adopt_one(&d, vm).await }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn adopt_one(daemon: &Arc<Daemon>, vm: Vm) {
    let id = vm.id();
    let dir = daemon.store.vm_dir(id);
    let record: Option<WorkerRecord> =
        files::read_json::<WorkerRecord>(&files::path(&dir, files::RECORD))
            .filter(|r| r.vm_id == id);
    let recorded_alive = record
        .as_ref()
        .is_some_and(|r| procfs::alive(r.pid, r.start_time_ticks));
    if record.is_some() && !recorded_alive {
        return gone(daemon, &vm, record.map(|r| r.pid), &dir);
    }
    // Without a record vireod may have died right after the spawn, the worker still binding
    // its socket: it gets the same time as a recorded one.
    let answer = hello(&dir, HELLO_WAIT).await;
    if answer.is_none() && vm.state == VmState::Starting {
        // A worker answers once its VM is built: restoring a large VM (a quick migration's
        // arrival, a saved VM's start) takes longer than HELLO_WAIT. It gets the start's time,
        // beside the API and the migration listener (a source asking where its VM is hears
        // `arriving` meanwhile); the VM's lock is held so no operation meets it half adopted.
        let d = daemon.clone();
        let guard = daemon.lock_vm(id).await;
        let limit = start_limit(daemon, &vm);
        tracing::info!(vm = %id, "the worker of a starting VM has not answered yet; waiting up to {}s", limit.as_secs());
        tokio::spawn(async move {
            let answer = hello(&dir, limit).await;
            drop(guard);
            adopt_answered(&d, vm, record, &dir, answer).await;
        });
        return;
    }
    adopt_answered(daemon, vm, record, &dir, answer).await;
}

/// Rules 1–3 once the worker's socket answered `answer` (or not).
async fn adopt_answered(
    daemon: &Arc<Daemon>,
    vm: Vm,
    record: Option<WorkerRecord>,
    dir: &Path,
    answer: Option<(Uuid, u32)>,
) {
    let id = vm.id();
    let dir = dir.to_path_buf();
    match answer {
        Some((vm_id, pid)) if vm_id == id && record.as_ref().is_none_or(|r| r.pid == pid) => {
            let record = match record {
                Some(r) => r,
                None => {
                    let Some(stat) = procfs::stat(pid) else {
                        return gone(daemon, &vm, Some(pid), &dir);
                    };
                    let r = WorkerRecord {
                        pid,
                        start_time_ticks: stat.start_time_ticks,
                        vm_id: id,
                    };
                    let _ = files::write_json_replace(&files::path(&dir, files::RECORD), &r);
                    r
                }
            };
            let worker = daemon.sup.adopt(daemon, record, &dir);
            let d = daemon.clone();
            match vm.state {
                VmState::Starting => {
                    let limit = start_limit(&d, &vm);
                    tokio::spawn(async move {
                        lifecycle::run_start(&d, &worker, None, limit).await;
                        // A restore's saved state is spent once the VM runs, as in the start
                        // that died with the old vireod (a plain start had none).
                        if d.store.get_by_id(id).is_ok_and(|v| v.state.has_worker()) {
                            super::save::discard(&d, id);
                        }
                        // A quick migration's arrival: the network follows the VM here.
                        super::migrate::network_owed::settle(&d, id).await;
                    });
                }
                // The stop's job died with the old vireod; its deadline is given again.
                VmState::Stopping => {
                    tokio::spawn(async move {
                        let limit = Duration::from_secs(DEFAULT_STOP_TIMEOUT_SECS.into());
                        if worker.exited_within(limit).await.is_none() {
                            worker.force_off().await;
                        }
                    });
                }
                // The worker knows whether the VM is paused (vireod may have died between a
                // worker's pause/resume and the state change).
                VmState::Running | VmState::Paused => {
                    reconcile_paused(&d, &worker.socket(), &vm).await;
                    // A storage move may have switched files while vireod was away.
                    super::move_storage::after_adopt(&d, worker.socket(), vm.id());
                    // An arrival whose takeover the old vireod did not finish.
                    tokio::spawn(async move { super::migrate::network_owed::settle(&d, id).await });
                }
                _ => {}
            }
        }
        answer => {
            let reason = match (&record, answer) {
                (Some(r), None) => {
                    let _ = sys::kill(r.pid, libc::SIGKILL);
                    format!(
                        "worker pid {} did not answer after vireod restarted; it was killed",
                        r.pid
                    )
                }
                (_, Some((other, pid))) => format!(
                    "the worker socket answered for VM {other} (pid {pid}), not this VM; that process was left alone"
                ),
                (None, None) => return gone(daemon, &vm, None, &dir),
            };
            critical(daemon, id, reason);
        }
    }
}

/// A `Starting` VM's start limit: a restore's while its saved state is there.
fn start_limit(daemon: &Daemon, vm: &Vm) -> Duration {
    lifecycle::start_limit(&vm.spec, super::save::has_saved_state(daemon, vm.id()))
}

/// Makes a re-adopted VM's state `paused` or `running` as its worker reports.
async fn reconcile_paused(daemon: &Daemon, sock: &Path, vm: &Vm) {
    let status = match WorkerConn::connect(sock).await {
        Ok(mut c) => c.status().await,
        Err(e) => Err(e),
    };
    let action = match (status, &vm.state) {
        // A migration's switch-over pauses the guest; the worker resumes it if the migration
        // fails, and exits if the VM moved: not the VM's state (found by
        // `crates/cli/tests/e2e/migrate_faults_real.rs`: the record stayed paused for good). In
        // post-copy the guest runs on the destination while this worker serves its pages
        // (`migrate_faults_real_modes.rs`: the record said `paused` here meanwhile).
        (Ok(s), VmState::Running) if s.paused && migrating(sock).await => return,
        (Ok(s), VmState::Running) if s.paused => Action::Pause,
        (Ok(s), VmState::Paused) if !s.paused => Action::Resume,
        (Ok(_), _) => return,
        (Err(e), _) => {
            tracing::warn!(vm = %vm.id(), error = %e, "no status from the re-adopted worker; state kept");
            return;
        }
    };
    tracing::info!(vm = %vm.id(), action = action.name(), "state corrected to the worker's");
    if let Err(e) = daemon.store.set_state(vm.id(), &action) {
        tracing::warn!(vm = %vm.id(), error = %e, "could not correct the state");
    }
}

/// Whether the worker is in the middle of migrating the VM out: pre-copy or switch-over (it
/// resumes the guest if the migration fails), or past the switch-over (post-copy, or done:
/// it exits `MigratedAway`, or `migration_lost` if the destination goes, and never resumes).
async fn migrating(sock: &Path) -> bool {
    matches!(
        super::worker_client::call_once(sock, WorkerOp::MigrateStatus).await,
        Ok(WorkerReply::Migrate(p)) if matches!(
            p.state,
            MigrateState::Precopy
                | MigrateState::Switching
                | MigrateState::Postcopy
                | MigrateState::Completed
                | MigrateState::Lost
        )
    )
}

/// `Hello` on the VM's socket, retried until `wait` has passed.
async fn hello(dir: &Path, wait: Duration) -> Option<(Uuid, u32)> {
    let sock = files::path(dir, files::SOCKET);
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(mut c) = WorkerConn::connect(&sock).await {
            if let Ok(answer) = c.hello().await {
                return Some(answer);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The worker is gone: exit.json for its pid decides, else Critical.
fn gone(daemon: &Daemon, vm: &Vm, pid: Option<u32>, dir: &Path) {
    let exit: Option<WorkerExit> = files::read_json(&files::path(dir, files::EXIT));
    let exit = exit.filter(|e| pid.is_none_or(|p| p == e.pid));
    files::remove(&files::path(dir, files::RECORD));
    let pid = pid.or(exit.as_ref().map(|e| e.pid));
    let Some(pid) = pid else {
        return critical(
            daemon,
            vm.id(),
            "worker gone while vireod was down (no record of it)".into(),
        );
    };
    let o = apply_verdict(
        daemon,
        vm.id(),
        pid,
        exit.map(|e| e.reason),
        Death::GoneWhileDown,
        false,
        None,
    );
    tracing::warn!(vm = %vm.id(), message = %o.message, state = ?o.state, "worker found gone at startup");
}

fn critical(daemon: &Daemon, id: Uuid, reason: String) {
    tracing::warn!(vm = %id, %reason, "marking critical");
    if let Err(e) = daemon.store.set_state(id, &Action::WorkerExited { reason }) {
        tracing::error!(vm = %id, error = %e, "cannot mark critical");
    }
}

/// VMs with `auto_start.enabled` that are off start `delay_secs` after vireod did.
pub fn schedule_auto_start(daemon: &Arc<Daemon>) {
    let Ok(vms) = daemon.store.list() else { return };
    for vm in vms {
        if !vm.spec.auto_start.enabled || vm.state != VmState::Off {
            continue;
        }
        let d = daemon.clone();
        let delay = Duration::from_secs(vm.spec.auto_start.delay_secs.into());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // The usual start, which refuses a VM no longer off.
            let current = match d.store.get_by_id(vm.id()) {
                Ok(v) => v,
                Err(_) => return,
            };
            match lifecycle::start(&d, &current).await {
                Ok(job) => {
                    tracing::info!(vm = %vm.id(), name = %vm.spec.name, job = %job.id, "automatic start")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.id(), error = %e.body.message, "automatic start refused")
                }
            }
        });
    }
}
