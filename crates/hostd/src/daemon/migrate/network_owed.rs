//! Destination: an arrival's network part (`listener::take_over_network`: this host's stale
//! entries for the VM's CAs dropped, the `--netvirt-peer` hosts told its new PAs, its ports
//! announced) is owed from the moment the VM may run here until it is done. `network-owed` in
//! the VM's folder says so: written before a quick migration's restore starts and before a
//! live arrival is recorded running, removed once the takeover is done. A vireod that dies in
//! between finds it at its restart and does the takeover once the VM runs (`adopt.rs`). Without
//! it a VM restored by a re-adopted worker ran here while the peers kept tunnelling its
//! traffic to the source's PA (found by the quick migration whose destination vireod was killed
//! mid-restore, `netvirt_migrate.rs`).
//!
//! An incoming VM whose live migration completed while vireod was down (`recover.rs`) always
//! gets the takeover: vireod died before it could write this file.

use std::sync::Arc;

use uuid::Uuid;
use vireo_api::{Vm, VmState};

use crate::daemon::{files, Daemon};

const NAME: &str = "network-owed";

fn path(d: &Daemon, vm: Uuid) -> std::path::PathBuf {
    files::path(&d.store.vm_dir(vm), NAME)
}

/// Records that VM `vm`'s takeover is owed. Not synced: a host that crashes takes the VM with
/// it, and no one then owes its network anything.
pub fn owe(d: &Daemon, vm: Uuid) {
    let p = path(d, vm);
    if let Err(e) = std::fs::write(&p, b"") {
        tracing::warn!(vm = %vm, "{}: {e} (a vireod restart before the VM runs will not announce it)", p.display());
    }
}

/// The takeover for `vm` is done.
pub fn paid(d: &Daemon, vm: Uuid) {
    files::remove(&path(d, vm));
}

/// After a restart: the takeover for `vm` if one is owed and the VM runs here now.
pub async fn settle(d: &Arc<Daemon>, vm: Uuid) {
    if !path(d, vm).exists() {
        return;
    }
    let Ok(vm) = d.store.get_by_id(vm) else {
        return;
    };
    if matches!(vm.state, VmState::Running | VmState::Paused) {
        tracing::info!(vm = %vm.id(), "taking over the network for a VM that arrived while vireod restarted");
        take_over(d, &vm).await;
    } else {
        // It never ran here (its restore failed): nothing to take over.
        paid(d, vm.id());
    }
}

/// The takeover, then the debt cleared.
pub async fn take_over(d: &Arc<Daemon>, vm: &Vm) {
    super::listener::take_over_network(d, vm).await;
    paid(d, vm.id());
}
