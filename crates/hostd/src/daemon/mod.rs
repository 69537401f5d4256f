//! The daemon process (`vireod`): the REST server over the store, the worker supervisor, jobs,
//! re-adoption and automatic start. See `docs/hostd.md` for the process model.
//!
//! Shared state is one `Daemon` behind an `Arc`. Locking: the store serializes its own
//! transactions; `vm_locks` gives each VM one async mutex held by the multi-step requests that
//! must not interleave on that VM (start's state change + spawn, turn-off, cancel, spec
//! update, remove). A request finding it taken answers 409 (busy) instead of queueing. Workers'
//! exits are applied by the supervisor's watchers through the store alone (never the VM lock,
//! which a turn-off holds while it waits for that exit).

pub mod adopt;
pub mod checkpoints;
pub mod disk_locks;
pub mod exit;
pub mod export;
pub mod files;
pub mod http_error;
pub mod jobs;
pub mod lifecycle;
pub mod meter;
pub mod migrate;
pub mod move_storage;
pub mod pause;
pub mod procfs;
pub mod prom;
pub mod prom_pools;
pub mod router;
pub mod routes;
pub mod sampler;
pub mod save;
pub mod server;
pub mod storage;
pub mod supervisor;
pub mod switch_record;
pub mod switches;
pub mod sys;
pub mod tls;
pub mod unused_files;
pub mod worker_client;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use vireo_api::{Limits, Vm};

use self::http_error::HttpError;
use self::jobs::JobRegistry;
use self::storage::StorageRoots;
use self::supervisor::Supervisor;
use crate::Store;

pub struct Daemon {
    pub store: Store,
    pub sup: Supervisor,
    pub jobs: JobRegistry,
    pub limits: Limits,
    /// Where specs' files may live (see `storage`).
    pub storage: StorageRoots,
    pub meters: sampler::Meters,
    pub prom: prom::RequestCounts,
    /// The switch processes (`switches`).
    pub switches: switches::Switches,
    /// The host identity and trusted hosts for migration (`host_trust`).
    pub host: crate::host_trust::HostTrust,
    /// Migrations between vireods (`migrate`).
    pub migrations: migrate::Migrations,
    /// Saved VMs' disk locks, held while no worker holds them (`disk_locks`).
    pub disk_locks: disk_locks::DiskLocks,
    vm_locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

impl Daemon {
    pub fn new(store: Store, limits: Limits, worker_bin: PathBuf) -> Arc<Daemon> {
        Self::with_worker_nice(store, limits, worker_bin, supervisor::DEFAULT_WORKER_NICE)
    }

    pub fn with_worker_nice(
        store: Store,
        limits: Limits,
        worker_bin: PathBuf,
        worker_nice: i32,
    ) -> Arc<Daemon> {
        Self::configured(
            store,
            limits,
            worker_bin,
            worker_nice,
            StorageRoots::default(),
        )
    }

    /// Everything vireod's flags set; `storage` empty only for library callers.
    pub fn configured(
        store: Store,
        limits: Limits,
        worker_bin: PathBuf,
        worker_nice: i32,
        storage: StorageRoots,
    ) -> Arc<Daemon> {
        let switches = switches::Switches::new(worker_bin.with_file_name("vireo-switch"));
        let mut sup = Supervisor::new(worker_bin);
        sup.set_worker_nice(worker_nice);
        let host = crate::host_trust::HostTrust::new(store.state_dir());
        let daemon = Arc::new(Daemon {
            host,
            store,
            sup,
            jobs: JobRegistry::default(),
            limits,
            storage,
            meters: sampler::Meters::default(),
            prom: prom::RequestCounts::default(),
            switches,
            migrations: migrate::Migrations::default(),
            disk_locks: disk_locks::DiskLocks::default(),
            vm_locks: Mutex::new(HashMap::new()),
        });
        // Metering samples the workers from here on (inside a runtime, as vireod and the
        // tests are).
        if tokio::runtime::Handle::try_current().is_ok() {
            sampler::spawn(Arc::downgrade(&daemon));
        }
        daemon
    }

    fn vm_mutex(&self, id: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id).or_default().clone()
    }

    /// The VM's lock, or 409 when another request holds it.
    pub fn try_lock_vm(&self, vm: &Vm) -> Result<OwnedMutexGuard<()>, HttpError> {
        self.vm_mutex(vm.id()).try_lock_owned().map_err(|_| {
            HttpError::conflict(format!(
                "VM {:?} is busy with another request; retry once it has finished",
                vm.spec.name
            ))
        })
    }

    /// The VM's lock, waiting for it (internal callers: cancel, automatic start).
    pub async fn lock_vm(&self, id: Uuid) -> OwnedMutexGuard<()> {
        self.vm_mutex(id).lock_owned().await
    }

    pub fn forget_vm_lock(&self, id: Uuid) {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(&id);
    }

    /// `{vm}` of a route: an id or a name.
    pub fn find(&self, key: &str) -> Result<Vm, HttpError> {
        Ok(self.store.find(key)?)
    }
}
