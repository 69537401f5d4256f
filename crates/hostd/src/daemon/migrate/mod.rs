//! Migration between vireods (docs/migration.md, "Between the vireods"):
//! - `listener`: the destination side, `vireod --migration-listen ADDR:PORT` (mutual TLS with
//!   trusted hosts only), one task per offered VM;
//! - `source`: the `migrate` job (`POST /v1/vms/{vm}/migrate`), live or quick;
//! - `peer`: the connection and its JSON-lines protocol;
//! - `recover`: at startup, VMs left `incoming` by a vireod that died mid-migration;
//! - `quick_note`, `quick_recover`: the source's record of a quick migration under way, and at
//!   startup the VMs a vireod that died after the save left `saved` with it (the destination
//!   is asked where they are);
//! - `storage`: shared-nothing migration's disk copies (describe, create, receive, remove);
//! - `source_files`: shared-nothing, the source's disk files deleted once the VM runs there;
//! - `netvirt_peers`: a moved VM's policy entries pushed to, and taken from, other hosts.
//! - `whereabouts`: a source (quick or live) asking where the VM is after a lost answer.
//! - `tree`: a quick migration carrying the VM's checkpoint tree (both sides).
//!
//! Locking: a migrating VM's lock (`Daemon::lock_vm`) is held by its job on the source and by
//! the listener's task on the destination for the whole migration, so no other request
//! changes it meanwhile (they answer 409 busy). `Migrations` holds only in-memory facts: the
//! per-host limit (a semaphore: the rest queue), the live progress of each job, and the
//! listener's bound address.

pub mod arriving;
pub mod boot_files;
pub mod listener;
pub mod netvirt_peers;
pub mod network_owed;
pub mod peer;
pub mod quick_note;
pub mod quick_recover;
pub mod recover;
pub mod source;
pub mod source_files;
pub mod storage;
pub mod tree;
pub mod whereabouts;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use uuid::Uuid;
use vireo_api::worker::{MigratePhase, MigrateProgress};

/// `vireod --max-migrations` default.
pub const DEFAULT_MAX_MIGRATIONS: usize = 2;
/// `vireod --migration-answer-wait` default: the destination's restore limit and then some.
pub const DEFAULT_ANSWER_WAIT: Duration = Duration::from_secs(150);

pub struct Migrations {
    /// One permit per migration running on this host (either direction).
    slots: Mutex<Arc<Semaphore>>,
    progress: Mutex<HashMap<Uuid, MigrateProgress>>,
    /// Each job's own phases, shown in front of its worker's (`progress`).
    phases: Mutex<HashMap<Uuid, JobPhases>>,
    listen: Mutex<Option<SocketAddr>>,
    /// `vireod --netvirt-peer`: the migration listeners of the hosts sharing virtual
    /// networks with this one (told where a VM that arrived here is now).
    netvirt_peers: Mutex<Vec<SocketAddr>>,
    /// `vireod --migration-answer-wait`: how long a source that lost the destination's word
    /// asks where the VM is before it gives up (`whereabouts::ask`).
    answer_wait: Mutex<Duration>,
    /// Destination: the disk copies of shared-nothing migrations arriving here.
    pub disk_targets: storage::Targets,
    /// Incoming VMs found in post-copy at start-up, settled in the background
    /// (`recover::recover_all`).
    settling_at_start: Mutex<std::collections::HashSet<Uuid>>,
}

impl Default for Migrations {
    fn default() -> Self {
        Migrations {
            slots: Mutex::new(Arc::new(Semaphore::new(DEFAULT_MAX_MIGRATIONS))),
            progress: Mutex::new(HashMap::new()),
            phases: Mutex::new(HashMap::new()),
            listen: Mutex::new(None),
            netvirt_peers: Mutex::new(Vec::new()),
            answer_wait: Mutex::new(DEFAULT_ANSWER_WAIT),
            disk_targets: storage::Targets::default(),
            settling_at_start: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Migrations {
    /// At startup, before any migration.
    pub fn set_max(&self, n: usize) {
        *lock(&self.slots) = Arc::new(Semaphore::new(n.max(1)));
    }

    pub fn slots(&self) -> Arc<Semaphore> {
        lock(&self.slots).clone()
    }

    pub fn set_listen(&self, addr: SocketAddr) {
        *lock(&self.listen) = Some(addr);
    }

    pub fn listen_addr(&self) -> Option<SocketAddr> {
        *lock(&self.listen)
    }

    /// At startup.
    pub fn set_netvirt_peers(&self, peers: Vec<SocketAddr>) {
        *lock(&self.netvirt_peers) = peers;
    }

    pub fn netvirt_peers(&self) -> Vec<SocketAddr> {
        lock(&self.netvirt_peers).clone()
    }

    /// At startup.
    pub fn set_answer_wait(&self, wait: Duration) {
        *lock(&self.answer_wait) = wait;
    }

    pub fn answer_wait(&self) -> Duration {
        *lock(&self.answer_wait)
    }

    /// Marks an incoming VM as settled in the background since start-up (or no longer).
    pub fn settling_at_start(&self, vm: Uuid, settling: bool) {
        let mut s = lock(&self.settling_at_start);
        if settling {
            s.insert(vm);
        } else {
            s.remove(&vm);
        }
    }

    pub fn is_settling_at_start(&self, vm: Uuid) -> bool {
        lock(&self.settling_at_start).contains(&vm)
    }

    pub fn set_progress(&self, job: Uuid, p: MigrateProgress) {
        lock(&self.progress).insert(job, p);
    }

    pub fn update_progress(&self, job: Uuid, f: impl FnOnce(&mut MigrateProgress)) {
        f(lock(&self.progress).entry(job).or_default());
    }

    /// The job's progress; its phases are vireod's (from the job's start) with the source
    /// worker's in between, moved onto the job's clock.
    pub fn progress(&self, job: Uuid) -> Option<MigrateProgress> {
        let mut p = lock(&self.progress).get(&job).cloned()?;
        if let Some(j) = lock(&self.phases).get(&job) {
            p.phases = j.merged(std::mem::take(&mut p.phases));
        }
        Some(p)
    }

    /// The job's clock starts (its phases are timed from here).
    pub fn start_phases(&self, job: Uuid) {
        lock(&self.phases).insert(
            job,
            JobPhases {
                start: Instant::now(),
                own: Vec::new(),
                worker_from_us: None,
            },
        );
    }

    /// `name` happened now in the job.
    pub fn mark(&self, job: Uuid, name: &str) {
        if let Some(j) = lock(&self.phases).get_mut(&job) {
            let at_us = j.start.elapsed().as_micros() as u64;
            j.own.push(MigratePhase {
                name: name.to_string(),
                at_us,
            });
        }
    }

    /// The worker's phases count from now (it was just asked to migrate).
    pub fn worker_clock_starts(&self, job: Uuid) {
        if let Some(j) = lock(&self.phases).get_mut(&job) {
            j.worker_from_us = Some(j.start.elapsed().as_micros() as u64);
        }
    }

    /// The job's phases as one line (for the log once it ended; they stay in its progress,
    /// as its other figures do).
    pub fn phases_line(&self, job: Uuid) -> Option<String> {
        Some(
            self.progress(job)?
                .phases
                .iter()
                .map(|p| format!("{} +{:.1} ms", p.name, p.at_us as f64 / 1e3))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }
}

/// A migration job's phases on its own clock.
struct JobPhases {
    start: Instant,
    own: Vec<MigratePhase>,
    /// When the worker's clock started on the job's (its phases are shifted by it).
    worker_from_us: Option<u64>,
}

impl JobPhases {
    fn merged(&self, worker: Vec<MigratePhase>) -> Vec<MigratePhase> {
        let mut all = self.own.clone();
        if let Some(from) = self.worker_from_us {
            all.extend(worker.into_iter().map(|p| MigratePhase {
                name: format!("worker: {}", p.name),
                at_us: from + p.at_us,
            }));
        }
        // Stable: a worker's phase and vireod's at the same microsecond keep their order.
        all.sort_by_key(|p| p.at_us);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_phases_put_the_workers_on_the_jobs_clock() {
        let m = Migrations::default();
        let job = Uuid::new_v4();
        m.set_progress(job, MigrateProgress::default());
        m.start_phases(job);
        m.mark(job, "peer connected");
        std::thread::sleep(std::time::Duration::from_millis(2));
        m.worker_clock_starts(job);
        m.set_progress(
            job,
            MigrateProgress {
                phases: vec![MigratePhase {
                    name: "pre-copy".into(),
                    at_us: 500,
                }],
                ..Default::default()
            },
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        m.mark(job, "destination running");
        let p = m.progress(job).unwrap().phases;
        let names: Vec<_> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["peer connected", "worker: pre-copy", "destination running"]
        );
        assert!(p[1].at_us >= 2000 + 500, "{p:?}");
        let line = m.phases_line(job).unwrap();
        assert!(line.starts_with("peer connected +0."), "{line}");
        assert!(line.contains(", worker: pre-copy +"), "{line}");
    }
}
