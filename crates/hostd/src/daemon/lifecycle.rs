//! Start, stop, turn-off and job cancel: the requests that move a VM through its worker. Each
//! changes the state through the store first (`transition`: the loser of two conflicting
//! requests gets 409), under the VM's lock while it spawns or kills, and leaves the worker's
//! end to the supervisor's watcher.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vireo_api::rest::{DEFAULT_STOP_TIMEOUT_SECS, MAX_STOP_TIMEOUT_SECS};
use vireo_api::worker::WorkerOp;
use vireo_api::{transition, Action, ApiErrorCode, Job, JobKind, Vm, VmSpec, VmState};

use super::disk_locks;
use super::http_error::HttpError;
use super::jobs::cancelled;
use super::save;
use super::supervisor::Worker;
use super::worker_client::{call_once, WorkerConn};
use super::Daemon;
use crate::StoreError;

/// From spawn until the worker reports the vCPUs running (a start from saved state gets more:
/// [`start_limit`]).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest storage a saved VM's memory is assumed to come back from, bytes per second. A
/// worker that must read all of memory before the VM runs (an eager restore: a NIC on a
/// switch, RAM on the hugetlb pool) answers only once it has: read at 1 GB/s, 64 GiB alone
/// takes over a minute, and with `START_TIMEOUT` alone such a start (or a quick migration's
/// arrival) was turned off halfway.
const RESTORE_FLOOR_BYTES_PER_SEC: u64 = 64 << 20;

/// How long the start of `spec`'s VM may take, from the worker's spawn to its vCPUs running:
/// [`START_TIMEOUT`], plus its memory at [`RESTORE_FLOOR_BYTES_PER_SEC`] when it is restored
/// from saved state.
pub fn start_limit(spec: &VmSpec, restoring: bool) -> Duration {
    let base = start_base();
    if !restoring {
        return base;
    }
    base + Duration::from_secs(spec.memory_bytes / RESTORE_FLOOR_BYTES_PER_SEC)
}

/// Test hook: the start's limit in milliseconds instead of [`START_TIMEOUT`], so a test shows
/// a restore's extra time without waiting half a minute first.
pub const START_BASE_ENV: &str = "VIREOD_TEST_START_TIMEOUT_MS";

fn start_base() -> Duration {
    static BASE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        std::env::var(START_BASE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(START_TIMEOUT, Duration::from_millis)
    })
}

const POLL: Duration = Duration::from_millis(50);

/// `POST /vms/{vm}/start`: Starting, spawn, and a job that completes when the vCPUs run.
pub async fn start(daemon: &Arc<Daemon>, vm: &Vm) -> Result<Job, HttpError> {
    let _guard = daemon.try_lock_vm(vm)?;
    start_locked(daemon, vm).await
}

/// `start`, for a caller that holds the VM's lock (a migration restoring its VM here).
pub async fn start_locked(daemon: &Arc<Daemon>, vm: &Vm) -> Result<Job, HttpError> {
    // A saved VM continues from its saved state (docs/vm-state.md, "Through vireod").
    let restore = (daemon.store.get_by_id(vm.id())?.state == VmState::Saved)
        .then(|| save::saved_dir(daemon, vm.id()));
    let failed = match restore {
        Some(_) => Action::RestoreFailed,
        None => Action::StartFailed,
    };
    // A restore gets its disks' locks from vireod, which has held them since the save (or
    // takes them now); a disk locked by someone else stops it here, the VM still saved.
    let held = match restore {
        None => Vec::new(),
        Some(_) => {
            let current = daemon.store.get_by_id(vm.id())?;
            match disk_locks::acquire_missing(&current, daemon.disk_locks.take(vm.id())) {
                Ok(held) => held,
                Err((message, held)) => {
                    daemon.disk_locks.keep(vm.id(), held);
                    return Err(HttpError::conflict(message));
                }
            }
        }
    };
    let vm = match daemon.store.set_state(vm.id(), &Action::Start) {
        Ok(vm) => vm,
        Err(e) => {
            daemon.disk_locks.keep(vm.id(), held);
            return Err(e.into());
        }
    };
    if restore.is_none() {
        // Leftovers of a restore whose clean-up was cut short are never used.
        save::discard(daemon, vm.id());
    }
    let job = match daemon.store.create_job(Some(vm.id()), JobKind::Start) {
        Ok(job) => job,
        Err(e) => {
            // No job, no worker: the VM must not stay `starting`.
            let _ = daemon.store.set_state(vm.id(), &failed);
            daemon.disk_locks.keep(vm.id(), held);
            return Err(e.into());
        }
    };
    let restoring = restore.is_some();
    let limit = start_limit(&vm.spec, restoring);
    let spawned = daemon.sup.spawn_inheriting(daemon, &vm, restore, &held);
    // vireod keeps its copies until the restored VM runs (`save::discard`): a restore that
    // fails leaves the VM saved with its disks still locked.
    if restoring {
        daemon.disk_locks.keep(vm.id(), held);
    }
    let worker = match spawned {
        Ok(w) => w,
        Err(message) => {
            tracing::error!(vm = %vm.id(), %message, "start failed");
            let _ = daemon.store.set_state(vm.id(), &failed);
            return Ok(daemon.store.finish_job(job.id, Err(message))?);
        }
    };
    // The worker runs and is watched from here on: a failed progress update is no reason to
    // answer an error.
    let job = daemon.store.set_job_progress(job.id, 10).unwrap_or(job);
    let cancel = daemon.jobs.register(job.id);
    let d = daemon.clone();
    tokio::spawn(async move {
        let job_id = job.id;
        tokio::select! {
            () = run_start(&d, &worker, Some(job_id), limit) => {}
            () = cancelled(cancel) => {}
        }
        // The restored VM runs: its saved state is spent (a failed restore keeps it).
        if restoring
            && d.store
                .get_by_id(worker.vm_id)
                .is_ok_and(|v| v.state.has_worker())
        {
            save::discard(&d, worker.vm_id);
        }
        d.jobs.finished(job_id);
    });
    Ok(job)
}

/// Waits up to `limit` ([`start_limit`]) for `worker` to report the VM running, then Started;
/// on failure, the job fails with the reason (and a worker that never ran is turned off). Also
/// used for a worker re-adopted in `Starting` (no job then).
pub async fn run_start(daemon: &Daemon, worker: &Worker, job: Option<Uuid>, limit: Duration) {
    let id = worker.vm_id;
    let outcome: Result<(), String> = tokio::select! {
        r = tokio::time::timeout(limit, wait_running(daemon, worker, job)) => match r {
            Ok(Ok(())) => Ok(()),
            // A worker that is on its way out says why in exit.json: prefer that.
            Ok(Err(message)) => match worker.exited_within(Duration::from_secs(1)).await {
                Some(o) => Err(o.message),
                None => {
                    worker.force_off().await;
                    Err(format!("{message}; the VM was turned off"))
                }
            },
            Err(_) => {
                worker.force_off().await;
                Err(format!("the worker did not report the VM running within {}s; the VM was turned off", limit.as_secs()))
            }
        },
        o = worker.exited() => Err(o.message),
    };
    let outcome = outcome.and_then(|()| {
        daemon
            .store
            .set_state(id, &Action::Started)
            .map(|_| ())
            .map_err(|e| match e {
                // The worker ended (or was turned off) in the meantime.
                StoreError::IllegalTransition(t) => format!("the VM is {} now", t.current),
                e => e.to_string(),
            })
    });
    if let Err(message) = &outcome {
        tracing::warn!(vm = %id, %message, "start failed");
    }
    if let Some(job) = job {
        // A cancel that came first has ended the job already; its turn-off follows.
        let _ = daemon.store.finish_job(job, outcome);
    }
}

/// Hello (must be this VM), then Status until running.
async fn wait_running(daemon: &Daemon, worker: &Worker, job: Option<Uuid>) -> Result<(), String> {
    let sock = worker.socket();
    let mut conn = loop {
        match WorkerConn::connect(&sock).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(POLL).await,
        }
    };
    let (vm_id, _) = conn.hello().await.map_err(|e| e.to_string())?;
    if vm_id != worker.vm_id {
        return Err(format!(
            "the worker at {} answers for VM {vm_id}, not {}",
            sock.display(),
            worker.vm_id
        ));
    }
    if let Some(job) = job {
        let _ = daemon.store.set_job_progress(job, 50);
    }
    loop {
        if conn.status().await.map_err(|e| e.to_string())?.running {
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `POST /vms/{vm}/stop`: Stopping, the shutdown line, and a turn-off after `timeout_secs`.
pub async fn stop(
    daemon: &Arc<Daemon>,
    vm: &Vm,
    timeout_secs: Option<u32>,
) -> Result<Job, HttpError> {
    let secs = timeout_secs.unwrap_or(DEFAULT_STOP_TIMEOUT_SECS);
    if secs > MAX_STOP_TIMEOUT_SECS {
        return Err(HttpError::new(
            ApiErrorCode::Invalid,
            format!("timeout_secs = {secs}: at most {MAX_STOP_TIMEOUT_SECS}"),
        ));
    }
    let _guard = daemon.try_lock_vm(vm)?;
    let vm = daemon.store.set_state(vm.id(), &Action::Stop)?;
    // `stopping` cannot go back to `running`: without a job row the stop still happens.
    let job = daemon.store.create_job(Some(vm.id()), JobKind::Stop);
    let worker = daemon.sup.get(vm.id());
    let d = daemon.clone();
    let has_line = vm.spec.shutdown_line.is_some();
    let job_id = job.as_ref().ok().map(|j| j.id);
    tokio::spawn(async move {
        let outcome = match worker {
            Some(w) => run_stop(&d, &w, job_id, has_line, Duration::from_secs(secs.into())).await,
            // Ended between the state change and here: its watcher is applying the exit.
            None => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while d
                    .store
                    .get_by_id(vm.id())
                    .is_ok_and(|v| v.state == VmState::Stopping)
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(POLL).await;
                }
                Ok(())
            }
        };
        let state = d.store.get_by_id(vm.id()).map(|v| v.state);
        let outcome = match (outcome, state) {
            (Ok(()), Ok(VmState::Off)) => Ok(()),
            (Err(e), _) => Err(e),
            (Ok(()), Ok(s)) => Err(format!("the VM is {s} after the stop")),
            (Ok(()), Err(e)) => Err(e.to_string()),
        };
        if let Some(job_id) = job_id {
            let _ = d.store.finish_job(job_id, outcome);
        }
    });
    Ok(job?)
}

async fn run_stop(
    daemon: &Daemon,
    worker: &Worker,
    job: Option<Uuid>,
    has_line: bool,
    limit: Duration,
) -> Result<(), String> {
    if has_line {
        if let Err(e) = call_once(&worker.socket(), WorkerOp::Shutdown).await {
            tracing::warn!(vm = %worker.vm_id, error = %e, "shutdown request failed; waiting for the timeout");
        }
    }
    if let Some(job) = job {
        let _ = daemon.store.set_job_progress(job, 50);
    }
    if worker.exited_within(limit).await.is_some() {
        return Ok(());
    }
    tracing::info!(vm = %worker.vm_id, "guest did not power off in time; turning off");
    match worker.force_off().await {
        Some(_) => Ok(()),
        None => Err(format!(
            "worker pid {} would not exit, even after SIGKILL",
            worker.pid
        )),
    }
}

/// `POST /vms/{vm}/turn-off`: stops the worker now and returns the VM, `off`.
pub async fn turn_off(daemon: &Arc<Daemon>, vm: &Vm) -> Result<Vm, HttpError> {
    let _guard = daemon.try_lock_vm(vm)?;
    turn_off_locked(daemon, vm.id()).await
}

async fn turn_off_locked(daemon: &Daemon, id: Uuid) -> Result<Vm, HttpError> {
    let vm = daemon.store.get_by_id(id)?;
    transition(&vm.state, &Action::TurnOff)?;
    if vm.state == VmState::Saved {
        // Turning off a saved VM discards its saved state (docs/api.md).
        let off = daemon.store.set_state(id, &Action::TurnOff)?;
        save::discard(daemon, id);
        return Ok(off);
    }
    if let Some(w) = daemon.sup.get(id) {
        if w.force_off().await.is_none() {
            return Err(HttpError::internal(format!(
                "worker pid {} of VM {:?} would not exit, even after SIGKILL",
                w.pid, vm.spec.name
            )));
        }
    }
    // The watcher has applied the exit (Off); a VM without a worker (critical, or one whose
    // worker ended just now) is turned off here.
    match daemon.store.set_state(id, &Action::TurnOff) {
        Ok(vm) => Ok(vm),
        Err(StoreError::IllegalTransition(t)) if t.current == VmState::Off => {
            Ok(daemon.store.get_by_id(id)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /jobs/{id}/cancel`: a start is cancelled (its VM turned off); a stop cannot be.
pub async fn cancel(daemon: &Arc<Daemon>, id: Uuid) -> Result<Job, HttpError> {
    let job = match daemon.store.get_job(id) {
        Err(StoreError::NotFound { .. }) => {
            return Err(super::routes::jobs::no_job(&id.to_string()))
        }
        r => r?,
    };
    if job.state != vireo_api::JobState::Running {
        return Err(StoreError::JobEnded {
            id,
            state: job.state,
        }
        .into());
    }
    match job.kind {
        JobKind::Start => {}
        JobKind::Export | JobKind::Import | JobKind::Clone => {
            return super::export::cancel(daemon, id);
        }
        JobKind::MoveStorage => return Ok(super::move_storage::cancel(daemon, &job)),
        JobKind::Migrate => return super::migrate::source::cancel(daemon, &job),
        JobKind::Stop => {
            return Err(HttpError::conflict(
                "a stop job cannot be cancelled; turn-off forces a stop",
            ))
        }
        kind => {
            return Err(HttpError::conflict(format!(
                "a {kind:?} job cannot be cancelled"
            )))
        }
    }
    let vm_id = job
        .vm_id
        .ok_or_else(|| HttpError::conflict("the job's VM is gone"))?;
    let _guard = daemon.lock_vm(vm_id).await;
    // The store decides the race with the job's own end: whichever ends it first wins.
    let job = daemon.store.cancel_job(id)?;
    daemon.jobs.cancel(id);
    if let Err(e) = turn_off_locked(daemon, vm_id).await {
        // Already off (the start failed meanwhile) is fine; anything else is reported.
        if e.body.code != ApiErrorCode::Conflict {
            return Err(e);
        }
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_gets_time_for_its_memory_from_slow_storage() {
        let spec = |memory_bytes: u64| {
            let mut s: VmSpec = serde_json::from_str(
                r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k"}"#,
            )
            .unwrap();
            s.memory_bytes = memory_bytes;
            s
        };
        assert_eq!(start_limit(&spec(64 << 30), false), START_TIMEOUT);
        assert_eq!(
            start_limit(&spec(64 << 20), true),
            START_TIMEOUT + Duration::from_secs(1)
        );
        assert_eq!(
            start_limit(&spec(64 << 30), true),
            START_TIMEOUT + Duration::from_secs(1024)
        );
    }
}
