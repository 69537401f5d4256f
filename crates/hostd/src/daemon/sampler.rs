//! Metering's I/O: every `INTERVAL` the worker of each VM is asked for `Metrics` and the reading
//! goes into the VM's `MeterState` (kept here, loaded from the store on first use); enabled
//! VMs' states are saved every `SAVE_EVERY` readings and at every enable/disable/reset, so a
//! vireod restart loses no counts of a worker that survives it (the next reading counts from
//! the saved one). A VM's route reading (`GET /vms/{vm}/metrics`) also samples first, so the
//! report is current.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use uuid::Uuid;
use vireo_api::worker::{WorkerMetrics, WorkerOp, WorkerReply};
use vireo_api::VmMetrics;

use super::meter::MeterState;
use super::worker_client::call_once;
use super::Daemon;
use crate::store::now_ms;

pub const INTERVAL: Duration = Duration::from_secs(2);
const SAVE_EVERY: u64 = 5;
/// A reading must not hold anything up: a worker that does not answer in time is skipped.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Meters {
    states: Mutex<HashMap<Uuid, MeterState>>,
}

impl Meters {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, MeterState>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on VM `id`'s state (loaded from the store the first time); `save` writes it
    /// back to the store afterwards.
    pub fn with<R>(
        &self,
        daemon: &Daemon,
        id: Uuid,
        save: bool,
        f: impl FnOnce(&mut MeterState) -> R,
    ) -> Result<R, crate::StoreError> {
        let mut map = self.map();
        let state = match map.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let loaded = match daemon.store.load_metering(id)? {
                    Some(text) => serde_json::from_str(&text).unwrap_or_else(|err| {
                        tracing::warn!(vm = %id, error = %err, "unreadable metering state; starting afresh");
                        MeterState::default()
                    }),
                    None => MeterState::default(),
                };
                e.insert(loaded)
            }
        };
        let r = f(state);
        if save {
            let text = serde_json::to_string(state).expect("meter state serializes");
            daemon.store.save_metering(id, &text, now_ms())?;
        }
        Ok(r)
    }

    /// The last worker reading of each VM that has one (for `/metrics`).
    pub fn last_readings(&self) -> HashMap<Uuid, WorkerMetrics> {
        self.map()
            .iter()
            .filter_map(|(id, s)| Some((*id, s.last.as_ref()?.metrics.clone())))
            .collect()
    }

    /// The last switch-port reading of each NIC of each VM that has one (for `/metrics`).
    pub fn last_nic_readings(
        &self,
    ) -> HashMap<Uuid, std::collections::BTreeMap<String, super::switches::nic_meter::NicReading>>
    {
        self.map()
            .iter()
            .map(|(id, s)| (*id, s.nics.last.clone()))
            .collect()
    }

    pub fn forget(&self, id: Uuid) {
        self.map().remove(&id);
    }
}

/// Reads VM `id`'s worker (if it has one) into its meter; `save_if_enabled` persists after.
pub async fn sample(daemon: &Daemon, id: Uuid, save_if_enabled: bool) {
    let Some(worker) = daemon.sup.get(id) else {
        return;
    };
    let reading =
        tokio::time::timeout(READ_TIMEOUT, call_once(&worker.socket(), WorkerOp::Metrics)).await;
    let metrics = match reading {
        Ok(Ok(WorkerReply::Metrics(m))) => m,
        Ok(Ok(other)) => {
            tracing::debug!(vm = %id, reply = ?other, "unexpected answer to Metrics");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(vm = %id, error = %e, "no metrics reading");
            return;
        }
        Err(_) => return,
    };
    let at = now_ms();
    let r = daemon.meters.with(daemon, id, false, |m| {
        m.record(worker.pid, at, metrics);
        m.enabled
    });
    super::switches::sample_nics(daemon, id).await;
    if matches!(r, Ok(true)) && save_if_enabled {
        let _ = daemon.meters.with(daemon, id, true, |_| ());
    }
}

/// `GET /vms/{vm}/metrics`: a fresh reading, then the period's report.
pub async fn report(daemon: &Daemon, id: Uuid) -> Result<VmMetrics, crate::StoreError> {
    sample(daemon, id, true).await;
    daemon.meters.with(daemon, id, false, |m| m.report())
}

/// The periodic sampler; ends when the daemon is dropped.
pub fn spawn(daemon: Weak<Daemon>) {
    tokio::spawn(async move {
        let mut tick: u64 = 0;
        loop {
            tokio::time::sleep(INTERVAL).await;
            let Some(d) = daemon.upgrade() else { return };
            tick += 1;
            let save = tick.is_multiple_of(SAVE_EVERY);
            let ids = d.sup.vm_ids();
            let reads: Vec<_> = ids
                .into_iter()
                .map(|id| {
                    let d: Arc<Daemon> = d.clone();
                    async move { sample(&d, id, save).await }
                })
                .collect();
            for r in reads {
                r.await;
            }
        }
    });
}
