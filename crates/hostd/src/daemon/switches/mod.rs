//! Switches: one `vireo-switch` process per stored switch, always on (`vireo_api::switch` has
//! the process model and the protocol). vireod starts each at startup (or re-adopts the one
//! still running from before: pid + start time from `switch-proc.json`, then `Hello` naming
//! this switch) and when a switch is created. One supervising task per switch restarts a
//! process that died (logged, after a short pause); VMs running at that moment lose their link
//! until their next start (a VM's vhost-user frontend does not reconnect by itself).
//!
//! Locking: `ops` gives each switch one async mutex, held by every change that must agree with
//! the process (a respawn builds its `switch.json` from the store under it; a port change
//! commits to the store and tells the process under it), so a restart never misses a port and
//! a port is never added twice.

pub mod client;
pub mod launch;
pub mod netvirt;
pub mod netvirt_move;
pub mod nic_meter;
pub mod nics;

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use vireo_api::switch::{SwitchOp, SwitchRecord, SwitchReply};
use vireo_api::switch_rest::SwitchProcessInfo;
use vireo_api::Vm;

use self::client::SwitchCallError;
use super::http_error::HttpError;
use super::{files, procfs, sys, Daemon};
use crate::switch_store::{SwitchRow, SwitchStoreError};

/// How long a new or adopted process has to answer `Hello`.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// How often an adopted process (not our child) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// Pause before restarting a process that died, and between failed restarts.
const RESTART_PAUSE: Duration = Duration::from_secs(1);
const RETRY_PAUSE: Duration = Duration::from_secs(5);

impl From<SwitchStoreError> for HttpError {
    fn from(e: SwitchStoreError) -> HttpError {
        vireo_api::ApiError::from(&e).into()
    }
}

/// A live switch process.
pub struct SwitchProc {
    pub switch_id: Uuid,
    pub pid: u32,
    pub start_time_ticks: u64,
    pub dir: PathBuf,
}

impl SwitchProc {
    pub fn socket(&self) -> PathBuf {
        self.dir.join(launch::SOCKET)
    }
}

#[derive(Default)]
struct Health {
    restarts: AtomicU32,
    error: Mutex<Option<String>>,
    /// Set by a removal: the process's end is not a crash.
    stopping: AtomicBool,
}

pub struct Switches {
    bin: Mutex<Option<PathBuf>>,
    default_bin: PathBuf,
    procs: Mutex<HashMap<Uuid, Arc<SwitchProc>>>,
    health: Mutex<HashMap<Uuid, Arc<Health>>>,
    ops: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Switches {
    /// `default_bin`: `vireo-switch` beside the worker binary, unless `set_bin` says otherwise.
    pub fn new(default_bin: PathBuf) -> Switches {
        Switches {
            bin: Mutex::new(None),
            default_bin,
            procs: Mutex::new(HashMap::new()),
            health: Mutex::new(HashMap::new()),
            ops: Mutex::new(HashMap::new()),
        }
    }

    /// `vireod --switch-bin`.
    pub fn set_bin(&self, bin: PathBuf) {
        *lock(&self.bin) = Some(bin);
    }

    fn bin(&self) -> PathBuf {
        lock(&self.bin)
            .clone()
            .unwrap_or_else(|| self.default_bin.clone())
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<SwitchProc>> {
        lock(&self.procs).get(&id).cloned()
    }

    fn health(&self, id: Uuid) -> Arc<Health> {
        lock(&self.health).entry(id).or_default().clone()
    }

    /// The switch's change lock (see the module's doc).
    pub async fn lock_ops(&self, id: Uuid) -> OwnedMutexGuard<()> {
        let m = lock(&self.ops).entry(id).or_default().clone();
        m.lock_owned().await
    }

    pub fn process_info(&self, id: Uuid) -> SwitchProcessInfo {
        let h = self.health(id);
        let p = self.get(id);
        let error = lock(&h.error).clone();
        SwitchProcessInfo {
            running: p.is_some(),
            pid: p.map(|p| p.pid),
            restarts: h.restarts.load(Ordering::SeqCst),
            error,
        }
    }

    /// Sends `op` to the switch's process. `Ok(None)`: no process runs (the change is in the
    /// store and reaches the process when it is started again).
    pub async fn call(
        &self,
        id: Uuid,
        op: SwitchOp,
    ) -> Result<Option<SwitchReply>, SwitchCallError> {
        let Some(p) = self.get(id) else {
            return Ok(None);
        };
        client::call(&p.socket(), op).await.map(Some)
    }
}

/// `<state-dir>/switches`.
pub fn switches_dir(daemon: &Daemon) -> PathBuf {
    // The store knows the VM folders (`<state-dir>/vms/<id>`); switches sit beside them.
    let vm = daemon.store.vm_dir(Uuid::nil());
    let state = vm.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
    state.join("switches")
}

pub fn switch_dir(daemon: &Daemon, id: Uuid) -> PathBuf {
    switches_dir(daemon).join(id.to_string())
}

/// The vhost-user socket of each of `vm`'s NICs (`WorkerLaunch.nic_sockets`), in spec order.
/// A NIC on a switch that no longer exists gets a path nothing serves: the worker's start
/// then fails naming it.
pub fn nic_sockets(daemon: &Daemon, vm: &Vm) -> Vec<PathBuf> {
    vm.spec
        .nics
        .iter()
        .map(|nic| {
            let dir = match daemon.store.find_switch(&nic.switch) {
                Ok(row) => switch_dir(daemon, row.id),
                Err(_) => switches_dir(daemon).join("missing"),
            };
            launch::port_socket(&dir, vm.id(), launch::nic_name(nic))
        })
        .collect()
}

/// Starts (or re-adopts) the process of every stored switch; at vireod's startup, before the
/// workers are re-adopted.
pub async fn start_all(daemon: &Arc<Daemon>) {
    let rows = match daemon.store.list_switches() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the switches; none started");
            return;
        }
    };
    for row in rows {
        start(daemon, &row).await;
    }
}

/// Starts the supervision of a switch: re-adopts its running process if there is one, else
/// spawns one. Failures are recorded (shown by `GET /switches/{sw}`) and retried by the task.
pub async fn start(daemon: &Arc<Daemon>, row: &SwitchRow) {
    let guard = daemon.switches.lock_ops(row.id).await;
    let dir = switch_dir(daemon, row.id);
    let first = match adopt(&dir, row.id).await {
        Some(p) => Ok((p, None)),
        None => spawn(daemon, row.id, &dir),
    };
    let first = match first {
        Ok((p, child)) => match child {
            Some(child) => match await_hello(&p, child).await {
                Ok(child) => Ok((p, Some(child))),
                Err(e) => Err(e),
            },
            None => Ok((p, None)),
        },
        Err(e) => Err(e),
    };
    drop(guard);
    let d = daemon.clone();
    let id = row.id;
    let health = daemon.switches.health(id);
    health.stopping.store(false, Ordering::SeqCst);
    match first {
        Ok((p, child)) => {
            *lock(&health.error) = None;
            lock(&daemon.switches.procs).insert(id, p.clone());
            tokio::spawn(supervise(d, id, Some((p, child))));
        }
        Err(e) => {
            tracing::error!(switch = %row.spec.name, error = %e, "switch process not started");
            *lock(&health.error) = Some(e);
            tokio::spawn(supervise(d, id, None));
        }
    }
}

/// The process recorded in `switch-proc.json`, if it is still that process (start time) and
/// answers `Hello` for this switch. One that is alive but not answering is killed (verified
/// ours), so a fresh one can take its sockets.
async fn adopt(dir: &Path, id: Uuid) -> Option<Arc<SwitchProc>> {
    let record: SwitchRecord = files::read_json(&dir.join(launch::RECORD))?;
    if record.switch_id != id || !procfs::alive(record.pid, record.start_time_ticks) {
        return None;
    }
    let p = Arc::new(SwitchProc {
        switch_id: id,
        pid: record.pid,
        start_time_ticks: record.start_time_ticks,
        dir: dir.to_owned(),
    });
    let deadline = tokio::time::Instant::now() + HELLO_WAIT;
    loop {
        match client::call(&p.socket(), SwitchOp::Hello).await {
            Ok(SwitchReply::Hello { switch_id, pid, .. }) if switch_id == id && pid == p.pid => {
                tracing::info!(switch = %id, pid = p.pid, "switch process re-adopted");
                return Some(p);
            }
            Ok(other) => {
                tracing::warn!(switch = %id, reply = ?other, "the recorded switch process answers for something else");
                break;
            }
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                tracing::warn!(switch = %id, error = %e, "the recorded switch process does not answer");
                break;
            }
        }
    }
    if procfs::alive(p.pid, p.start_time_ticks) {
        let _ = sys::kill(p.pid, libc::SIGKILL);
        wait_gone(&p, Duration::from_secs(5)).await;
    }
    None
}

async fn wait_gone(p: &SwitchProc, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while procfs::alive(p.pid, p.start_time_ticks) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Writes `switch.json` from the store and spawns the process (own process group, so it
/// outlives vireod; output appended to `switch.log`), then records it. The caller holds the
/// switch's ops lock.
fn spawn(
    daemon: &Daemon,
    id: Uuid,
    dir: &Path,
) -> Result<(Arc<SwitchProc>, Option<tokio::process::Child>), String> {
    let row = daemon
        .store
        .find_switch(&id.to_string())
        .map_err(|e| e.to_string())?;
    let vms = daemon.store.list().map_err(|e| e.to_string())?;
    let ifaces = daemon
        .store
        .interface_ports(id)
        .map_err(|e| e.to_string())?;
    let ports_dir = dir.join(launch::PORTS);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&ports_dir)
        .map_err(|e| format!("cannot create {}: {e}", ports_dir.display()))?;
    let spec = launch::launch(id, &row.spec, dir, &vms, &ifaces);
    let launch_path = dir.join(launch::LAUNCH);
    files::write_json_atomic(&launch_path, &spec)
        .map_err(|e| format!("cannot write {}: {e}", launch_path.display()))?;
    files::remove(&dir.join(launch::RECORD));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(launch::LOG))
        .map_err(|e| format!("cannot open {}: {e}", dir.join(launch::LOG).display()))?;
    let log2 = log.try_clone().map_err(|e| format!("switch.log: {e}"))?;
    let bin = daemon.switches.bin();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(false);
    // Its own process group, like a worker (it outlives vireod); not niced: it carries every
    // VM's traffic on the switch.
    sys::worker_process_group(&mut cmd, 0, Vec::new());
    let child = cmd.spawn().map_err(|e| {
        format!(
            "cannot run the switch process {}: {e}; pass --switch-bin",
            bin.display()
        )
    })?;
    let pid = child.id().ok_or("the switch process exited at once")?;
    let start_time_ticks = procfs::stat(pid).map_or(0, |s| s.start_time_ticks);
    let record = SwitchRecord {
        pid,
        start_time_ticks,
        switch_id: id,
    };
    if let Err(e) = files::write_json_atomic(&dir.join(launch::RECORD), &record) {
        tracing::error!(switch = %id, error = %e, "cannot write the switch process record");
    }
    tracing::info!(switch = %row.spec.name, pid, "switch process spawned");
    let p = Arc::new(SwitchProc {
        switch_id: id,
        pid,
        start_time_ticks,
        dir: dir.to_owned(),
    });
    Ok((p, Some(child)))
}

/// Waits for a new process's `Hello`; one that exits or stays silent is an error quoting its
/// log (and is killed).
async fn await_hello(
    p: &SwitchProc,
    mut child: tokio::process::Child,
) -> Result<tokio::process::Child, String> {
    let deadline = tokio::time::Instant::now() + HELLO_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = last_line(&p.dir);
            return Err(format!(
                "the switch process exited ({status}) at start{log}"
            ));
        }
        match client::call(&p.socket(), SwitchOp::Hello).await {
            Ok(SwitchReply::Hello { switch_id, .. }) if switch_id == p.switch_id => {
                return Ok(child)
            }
            Ok(other) => {
                let _ = child.kill().await;
                return Err(format!("the switch process answered {other:?} to Hello"));
            }
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                let _ = child.kill().await;
                return Err(format!("{e}{}", last_line(&p.dir)));
            }
        }
    }
}

fn last_line(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join(launch::LOG)).unwrap_or_default();
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => format!("; switch.log: {}", l.trim()),
        None => String::new(),
    }
}

/// Watches the process and restarts it when it dies, until the switch is removed.
async fn supervise(
    daemon: Arc<Daemon>,
    id: Uuid,
    mut current: Option<(Arc<SwitchProc>, Option<tokio::process::Child>)>,
) {
    let health = daemon.switches.health(id);
    loop {
        if let Some((p, child)) = current.take() {
            let how = match child {
                Some(mut c) => match c.wait().await {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                },
                None => {
                    while procfs::alive(p.pid, p.start_time_ticks) {
                        tokio::time::sleep(ADOPTED_POLL).await;
                    }
                    "gone".to_string()
                }
            };
            {
                let mut procs = lock(&daemon.switches.procs);
                if procs.get(&id).is_some_and(|cur| Arc::ptr_eq(cur, &p)) {
                    procs.remove(&id);
                }
            }
            if health.stopping.load(Ordering::SeqCst) {
                return;
            }
            tracing::warn!(switch = %id, pid = p.pid, how, log = %last_line(&p.dir), "switch process died; restarting it (running VMs on it reconnect at their next start)");
            *lock(&health.error) = Some(format!("process pid {} died ({how})", p.pid));
            tokio::time::sleep(RESTART_PAUSE).await;
        } else {
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        if health.stopping.load(Ordering::SeqCst) {
            return;
        }
        let guard = daemon.switches.lock_ops(id).await;
        if health.stopping.load(Ordering::SeqCst)
            || matches!(
                daemon.store.find_switch(&id.to_string()),
                Err(SwitchStoreError::NotFound(_))
            )
        {
            return;
        }
        let dir = switch_dir(&daemon, id);
        let started = match spawn(&daemon, id, &dir) {
            Ok((p, Some(child))) => await_hello(&p, child).await.map(|c| (p, Some(c))),
            Ok((p, None)) => Ok((p, None)),
            Err(e) => Err(e),
        };
        match started {
            Ok((p, child)) => {
                health.restarts.fetch_add(1, Ordering::SeqCst);
                *lock(&health.error) = None;
                lock(&daemon.switches.procs).insert(id, p.clone());
                current = Some((p, child));
            }
            Err(e) => {
                tracing::error!(switch = %id, error = %e, "switch process restart failed; retrying");
                *lock(&health.error) = Some(e);
            }
        }
        drop(guard);
    }
}

/// Stops the switch's process for good (`Shutdown`, then SIGKILL after 5 s) and removes its
/// folder. The caller has removed the switch from the store and holds its ops lock.
pub async fn stop(daemon: &Daemon, id: Uuid) {
    let health = daemon.switches.health(id);
    health.stopping.store(true, Ordering::SeqCst);
    if let Some(p) = daemon.switches.get(id) {
        if let Err(e) = client::call(&p.socket(), SwitchOp::Shutdown).await {
            tracing::warn!(switch = %id, error = %e, "Shutdown not delivered; SIGKILL");
            if procfs::alive(p.pid, p.start_time_ticks) {
                let _ = sys::kill(p.pid, libc::SIGKILL);
            }
        }
        if !wait_gone(&p, Duration::from_secs(5)).await {
            let _ = sys::kill(p.pid, libc::SIGKILL);
            wait_gone(&p, Duration::from_secs(2)).await;
        }
        lock(&daemon.switches.procs).remove(&id);
    }
    let dir = switch_dir(daemon, id);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "switch folder not removed");
        }
    }
    lock(&daemon.switches.health).remove(&id);
}

/// Reads the switch ports of VM `vm_id`'s NICs (one `Status` per switch, 1 s at most) into its
/// meter (`nic_meter`). A switch that does not answer is skipped this time.
pub async fn sample_nics(daemon: &Daemon, vm_id: Uuid) {
    let Ok(vm) = daemon.store.get_by_id(vm_id) else {
        return;
    };
    let mut by_switch: HashMap<Uuid, Vec<&str>> = HashMap::new();
    for nic in &vm.spec.nics {
        if let Ok(row) = daemon.store.find_switch(&nic.switch) {
            by_switch
                .entry(row.id)
                .or_default()
                .push(launch::nic_name(nic));
        }
    }
    for (sw, nics) in by_switch {
        let Some(p) = daemon.switches.get(sw) else {
            continue;
        };
        let reply = tokio::time::timeout(
            Duration::from_secs(1),
            client::call(&p.socket(), SwitchOp::Status),
        )
        .await;
        let Ok(Ok(SwitchReply::Status { ports })) = reply else {
            continue;
        };
        for nic in nics {
            let port = launch::port_name(vm_id, nic);
            let Some(r) = ports.iter().find(|r| r.config.name == port) else {
                continue;
            };
            let _ = daemon.meters.with(daemon, vm_id, false, |m| {
                let enabled = m.enabled;
                m.nics.record(enabled, nic, p.pid, r.meters.clone());
            });
        }
    }
}
