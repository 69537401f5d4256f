//! Migration between vireods (docs/migration.md, "Between the vireods"):
//! - `listener`: the destination side, `vireod --migration-listen ADDR:PORT` (mutual TLS with
//!   trusted hosts only), one task per offered VM;
//! - `source`: the `migrate` job (`POST /v1/vms/{vm}/migrate`), live or quick;
//! - `peer`: the connection and its JSON-lines protocol;
//! - `recover`: at startup, VMs left `incoming` by a vireod that died mid-migration;
//! - `storage`: shared-nothing migration's disk copies (describe, create, receive, remove);
//! - `netvirt_peers`: a moved VM's policy entries pushed to, and taken from, other hosts.
//! - `whereabouts`: a source (quick or live) asking where the VM is after a lost answer.
//!
//! Locking: a migrating VM's lock (`Daemon::lock_vm`) is held by its job on the source and by
//! the listener's task on the destination for the whole migration, so no other request
//! changes it meanwhile (they answer 409 busy). `Migrations` holds only in-memory facts: the
//! per-host limit (a semaphore: the rest queue), the live progress of each job, and the
//! listener's bound address.

pub mod listener;
pub mod netvirt_peers;
pub mod peer;
pub mod recover;
pub mod source;
pub mod storage;
pub mod whereabouts;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use uuid::Uuid;
use vireo_api::worker::MigrateProgress;

/// `vireod --max-migrations` default.
pub const DEFAULT_MAX_MIGRATIONS: usize = 2;

pub struct Migrations {
    /// One permit per migration running on this host (either direction).
    slots: Mutex<Arc<Semaphore>>,
    progress: Mutex<HashMap<Uuid, MigrateProgress>>,
    listen: Mutex<Option<SocketAddr>>,
    /// `vireod --netvirt-peer`: the migration listeners of the hosts sharing virtual
    /// networks with this one (told where a VM that arrived here is now).
    netvirt_peers: Mutex<Vec<SocketAddr>>,
    /// Destination: the disk copies of shared-nothing migrations arriving here.
    pub disk_targets: storage::Targets,
}

impl Default for Migrations {
    fn default() -> Self {
        Migrations {
            slots: Mutex::new(Arc::new(Semaphore::new(DEFAULT_MAX_MIGRATIONS))),
            progress: Mutex::new(HashMap::new()),
            listen: Mutex::new(None),
            netvirt_peers: Mutex::new(Vec::new()),
            disk_targets: storage::Targets::default(),
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

    pub fn set_progress(&self, job: Uuid, p: MigrateProgress) {
        lock(&self.progress).insert(job, p);
    }

    pub fn update_progress(&self, job: Uuid, f: impl FnOnce(&mut MigrateProgress)) {
        f(lock(&self.progress).entry(job).or_default());
    }

    pub fn progress(&self, job: Uuid) -> Option<MigrateProgress> {
        lock(&self.progress).get(&job).cloned()
    }
}
