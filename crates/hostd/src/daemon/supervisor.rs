//! The workers: one `vireo-vm` process per VM with a worker, each watched by one task that is
//! the only place a worker's end turns into a state change (`exit::decide`).
//!
//! Locking: `workers` (a std mutex, never held across an await) maps a VM id to its live
//! worker. The watcher removes its entry before it applies the exit to the store, so a new
//! start, which needs the state that the exit produces, always registers after the old entry is
//! gone (and removal checks it is the same worker).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;
use vireo_api::worker::{InheritedDisk, WorkerExit, WorkerLaunch, WorkerOp, WorkerRecord};
use vireo_api::{Action, Vm, VmState};

use super::exit::{decide, Death};
use super::{files, procfs, sys, worker_client, Daemon};

/// Workers run this much nicer than vireod (see `sys::worker_process_group`).
pub const DEFAULT_WORKER_NICE: i32 = 10;
/// How often an adopted worker (not our child, so no wait status) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// A turn-off: time for the worker to exit after `TurnOff`, then after SIGKILL.
pub const TURN_OFF_GRACE: Duration = Duration::from_secs(10);
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long a turn-off keeps trying to reach a worker's socket before it signals instead.
const DELIVERY_WAIT: Duration = Duration::from_secs(2);

/// What a worker's end did to its VM.
#[derive(Clone, Debug)]
pub struct ExitOutcome {
    pub message: String,
    /// The VM's state after the exit was applied (`None`: the store could not be read).
    pub state: Option<VmState>,
}

pub struct Worker {
    pub vm_id: Uuid,
    pub pid: u32,
    pub start_time_ticks: u64,
    pub dir: PathBuf,
    /// A turn-off is under way: the exit means Off whatever it looks like.
    forced: AtomicBool,
    done: watch::Receiver<Option<ExitOutcome>>,
}

impl Worker {
    pub fn socket(&self) -> PathBuf {
        files::path(&self.dir, files::SOCKET)
    }

    /// Waits for the worker's end to be applied.
    pub async fn exited(&self) -> ExitOutcome {
        let mut rx = self.done.clone();
        let r = rx.wait_for(Option::is_some).await;
        match r {
            Ok(v) => v.clone().expect("waited for Some"),
            // The watcher is gone without a word: only when the runtime shuts down.
            Err(_) => ExitOutcome {
                message: "vireod is shutting down".into(),
                state: None,
            },
        }
    }

    pub async fn exited_within(&self, limit: Duration) -> Option<ExitOutcome> {
        tokio::time::timeout(limit, self.exited()).await.ok()
    }

    pub fn is_alive(&self) -> bool {
        self.done.borrow().is_none() && procfs::alive(self.pid, self.start_time_ticks)
    }

    /// Turns the VM off: `TurnOff` (or SIGTERM, which the worker treats the same, when its
    /// socket does not answer within `DELIVERY_WAIT`, e.g. one still starting), then SIGKILL if
    /// it is still there after `TURN_OFF_GRACE`. Returns once the end is applied (`None`: it
    /// would not die).
    pub async fn force_off(&self) -> Option<ExitOutcome> {
        self.forced.store(true, Ordering::SeqCst);
        if self.done.borrow().is_none() {
            if let Err(e) = self.deliver_turn_off().await {
                tracing::info!(vm = %self.vm_id, error = %e, "turn-off request not delivered; SIGTERM");
                if procfs::alive(self.pid, self.start_time_ticks) {
                    let _ = sys::kill(self.pid, libc::SIGTERM);
                }
            }
            if let Some(o) = self.exited_within(TURN_OFF_GRACE).await {
                return Some(o);
            }
            if procfs::alive(self.pid, self.start_time_ticks) {
                tracing::warn!(vm = %self.vm_id, pid = self.pid, "worker ignored TurnOff; SIGKILL");
                let _ = sys::kill(self.pid, libc::SIGKILL);
            }
        }
        self.exited_within(KILL_GRACE).await
    }

    /// `TurnOff`, retried while the socket is not there yet (a worker still starting).
    async fn deliver_turn_off(&self) -> Result<(), worker_client::WorkerCallError> {
        let deadline = tokio::time::Instant::now() + DELIVERY_WAIT;
        loop {
            match worker_client::call_once(&self.socket(), WorkerOp::TurnOff).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(worker_client::WorkerCallError::Connect { .. }) if self.is_alive() => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How the watcher learns of the end.
enum Waiter {
    Child(tokio::process::Child),
    Adopted,
}

pub struct Supervisor {
    worker_bin: PathBuf,
    worker_nice: i32,
    workers: Mutex<HashMap<Uuid, Arc<Worker>>>,
}

impl Supervisor {
    pub fn new(worker_bin: PathBuf) -> Supervisor {
        Supervisor {
            worker_bin,
            worker_nice: DEFAULT_WORKER_NICE,
            workers: Mutex::new(HashMap::new()),
        }
    }

    pub fn get(&self, vm_id: Uuid) -> Option<Arc<Worker>> {
        self.map().get(&vm_id).cloned()
    }

    /// The VMs that have a worker now.
    pub fn vm_ids(&self) -> Vec<Uuid> {
        self.map().keys().copied().collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Worker>>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// CPU priority of the workers (`vireod --worker-nice`).
    pub fn set_worker_nice(&mut self, nice: i32) {
        self.worker_nice = nice;
    }

    /// Writes `spec.json`, spawns the worker in its own process group (stdin /dev/null, output
    /// appended to `worker.log`), records it in `worker.json` and starts watching it. The VM
    /// must already be `Starting` (the caller holds its lock).
    pub fn spawn(
        &self,
        daemon: &Arc<Daemon>,
        vm: &Vm,
        restore_from: Option<PathBuf>,
    ) -> Result<Arc<Worker>, String> {
        self.spawn_with(daemon, vm, restore_from, None)
    }

    /// `spawn` of a restore that inherits `held`, its disks' open locked files: the worker
    /// gets them as descriptors (named in `WorkerLaunch::inherited_disks`) and opens its disks
    /// from them. They stay close-on-exec for every other child.
    pub fn spawn_inheriting(
        &self,
        daemon: &Arc<Daemon>,
        vm: &Vm,
        restore_from: Option<PathBuf>,
        held: &[super::disk_locks::HeldDisk],
    ) -> Result<Arc<Worker>, String> {
        self.spawn_full(daemon, vm, restore_from, None, held)
    }

    /// `spawn`, for a VM arriving by live migration when `incoming` is given (its state is
    /// `incoming`, not `starting`: docs/migration.md).
    pub fn spawn_with(
        &self,
        daemon: &Arc<Daemon>,
        vm: &Vm,
        restore_from: Option<PathBuf>,
        incoming: Option<vireo_api::worker::IncomingMigration>,
    ) -> Result<Arc<Worker>, String> {
        self.spawn_full(daemon, vm, restore_from, incoming, &[])
    }

    fn spawn_full(
        &self,
        daemon: &Arc<Daemon>,
        vm: &Vm,
        restore_from: Option<PathBuf>,
        incoming: Option<vireo_api::worker::IncomingMigration>,
        held: &[super::disk_locks::HeldDisk],
    ) -> Result<Arc<Worker>, String> {
        let dir = daemon.store.vm_dir(vm.id());
        files::remove(&files::path(&dir, files::EXIT));
        files::remove(&files::path(&dir, files::RECORD));
        let launch = WorkerLaunch {
            vm_id: vm.id(),
            spec: vm.spec.clone(),
            nic_sockets: super::switches::nic_sockets(daemon, vm),
            restore_from,
            inherited_disks: held
                .iter()
                .map(|h| InheritedDisk {
                    path: h.path.clone(),
                    fd: h.file.as_raw_fd(),
                })
                .collect(),
            incoming,
        };
        let spec_path = files::path(&dir, files::SPEC);
        files::write_json_replace(&spec_path, &launch)
            .map_err(|e| format!("cannot write {}: {e}", spec_path.display()))?;
        let log = files::open_log(&dir)
            .map_err(|e| format!("cannot open {}: {e}", dir.join(files::LOG).display()))?;
        let log2 = log.try_clone().map_err(|e| format!("worker.log: {e}"))?;
        let mut cmd = tokio::process::Command::new(&self.worker_bin);
        cmd.arg("--vm-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false);
        let inherit: Vec<RawFd> = held.iter().map(|h| h.file.as_raw_fd()).collect();
        sys::worker_process_group(&mut cmd, self.worker_nice, inherit);
        let child = cmd.spawn().map_err(|e| {
            format!(
                "cannot run the worker {}: {e}; pass --worker-bin",
                self.worker_bin.display()
            )
        })?;
        let pid = child.id().ok_or("the worker exited at once")?;
        // Our child cannot be reaped before we wait for it, so its stat is there (maybe Z).
        let start_time_ticks = procfs::stat(pid).map_or(0, |s| s.start_time_ticks);
        let record = WorkerRecord {
            pid,
            start_time_ticks,
            vm_id: vm.id(),
        };
        let record_path = files::path(&dir, files::RECORD);
        if let Err(e) = files::write_json_replace(&record_path, &record) {
            // Without the record a restarted vireod would still find it through Hello.
            tracing::error!(path = %record_path.display(), error = %e, "cannot write the worker record");
        }
        tracing::info!(vm = %vm.id(), name = %vm.spec.name, pid, "worker spawned");
        Ok(self.watch(daemon, vm.id(), dir, record, Waiter::Child(child)))
    }

    /// Watches a worker found alive at startup (verified by the caller).
    pub fn adopt(&self, daemon: &Arc<Daemon>, record: WorkerRecord, dir: &Path) -> Arc<Worker> {
        tracing::info!(vm = %record.vm_id, pid = record.pid, "worker re-adopted");
        self.watch(
            daemon,
            record.vm_id,
            dir.to_owned(),
            record,
            Waiter::Adopted,
        )
    }

    fn watch(
        &self,
        daemon: &Arc<Daemon>,
        vm_id: Uuid,
        dir: PathBuf,
        record: WorkerRecord,
        waiter: Waiter,
    ) -> Arc<Worker> {
        let (tx, rx) = watch::channel(None);
        let worker = Arc::new(Worker {
            vm_id,
            pid: record.pid,
            start_time_ticks: record.start_time_ticks,
            dir,
            forced: AtomicBool::new(false),
            done: rx,
        });
        self.map().insert(vm_id, worker.clone());
        let daemon = daemon.clone();
        let w = worker.clone();
        tokio::spawn(async move {
            let adopted = matches!(waiter, Waiter::Adopted);
            let death = match waiter {
                Waiter::Child(mut child) => match child.wait().await {
                    Ok(status) => death_of(status),
                    Err(_) => Death::Unknown,
                },
                Waiter::Adopted => {
                    while procfs::alive(w.pid, w.start_time_ticks) {
                        tokio::time::sleep(ADOPTED_POLL).await;
                    }
                    Death::Unknown
                }
            };
            let outcome = daemon.sup.apply_exit(&daemon, &w, death);
            tracing::info!(vm = %w.vm_id, pid = w.pid, message = %outcome.message, state = ?outcome.state, "worker ended");
            let _ = tx.send(Some(outcome));
            let migrated_away = files::read_json::<WorkerExit>(&files::path(&w.dir, files::EXIT))
                .is_some_and(|e| {
                    e.pid == w.pid
                        && matches!(
                            e.reason,
                            vireo_api::worker::WorkerExitReason::MigratedAway { .. }
                        )
                });
            if adopted && migrated_away {
                crate::daemon::migrate::recover::adopted_worker_migrated_away(&daemon, w.vm_id)
                    .await;
            }
        });
        worker
    }

    fn apply_exit(&self, daemon: &Daemon, w: &Arc<Worker>, death: Death) -> ExitOutcome {
        {
            let mut map = self.map();
            if map.get(&w.vm_id).is_some_and(|cur| Arc::ptr_eq(cur, w)) {
                map.remove(&w.vm_id);
            }
        }
        let exit: Option<WorkerExit> = files::read_json(&files::path(&w.dir, files::EXIT));
        let exit = exit.filter(|e| e.pid == w.pid);
        let log_line = files::last_log_line(&w.dir);
        let forced = w.forced.load(Ordering::SeqCst);
        let outcome = apply_verdict(
            daemon,
            w.vm_id,
            w.pid,
            exit.map(|e| e.reason),
            death,
            forced,
            log_line,
        );
        // After the state: a crash in between leaves a record of a dead pid, which the next
        // start replaces; the other order could leave a worker state without any record.
        files::remove(&files::path(&w.dir, files::RECORD));
        outcome
    }
}

/// Decides and applies what a worker's end means for `vm_id` (also used at adoption for a
/// worker found gone).
pub fn apply_verdict(
    daemon: &Daemon,
    vm_id: Uuid,
    pid: u32,
    exit: Option<vireo_api::worker::WorkerExitReason>,
    death: Death,
    forced: bool,
    log_line: Option<String>,
) -> ExitOutcome {
    let Ok(vm) = daemon.store.get_by_id(vm_id) else {
        // Removed meanwhile (only possible without a worker state): nothing to apply.
        return ExitOutcome {
            message: format!("worker pid {pid} ended; its VM is gone"),
            state: None,
        };
    };
    let verdict = decide(
        &vm.state,
        pid,
        exit.as_ref(),
        death,
        forced,
        log_line.as_deref(),
    );
    // A start from a saved state that failed keeps the state (the VM goes back to Saved).
    let action = verdict.action.map(|a| match a {
        Action::StartFailed if super::save::has_saved_state(daemon, vm_id) => Action::RestoreFailed,
        a => a,
    });
    let state = match action {
        None => Some(vm.state),
        Some(action) => match daemon.store.set_state(vm_id, &action) {
            Ok(vm) => Some(vm.state),
            Err(e) => {
                tracing::warn!(vm = %vm_id, action = action.name(), error = %e, "worker exit not applied");
                daemon.store.get_by_id(vm_id).ok().map(|v| v.state)
            }
        },
    };
    ExitOutcome {
        message: verdict.message,
        state,
    }
}

fn death_of(status: ExitStatus) -> Death {
    match (status.signal(), status.code()) {
        (Some(s), _) => Death::Signal(s),
        (None, Some(c)) => Death::Code(c),
        _ => Death::Unknown,
    }
}
