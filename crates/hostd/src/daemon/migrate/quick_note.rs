//! Source, quick: `quick-migration.json` in the VM's folder says that a quick migration of the
//! VM to a destination is under way. It is written (and synced) before the VM is saved and
//! removed when the job ends, whichever way; the folder goes with the record when the VM
//! moved. A vireod that dies in between finds it at its restart beside a VM left `saved`, and
//! asks the destination where the VM is instead of leaving it saved for the user
//! (`quick_recover.rs`).
//!
//! In the folder rather than the store's record: the folder is where vireod already keeps what
//! concerns one VM's processes and files (`worker.json`, `exit.json`, `saved/`), it is removed
//! with the record (a completed migration needs no step of its own), and the record's schema
//! and its API shape stay as they are.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vireo_api::migrate::SwitchProviderAddresses;

use crate::daemon::{files, Daemon};

const NAME: &str = "quick-migration.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuickNote {
    /// The destination's migration listener, as the job was given it.
    pub to: SocketAddr,
    /// The migration job.
    pub job: Uuid,
    /// The destination's provider addresses (its answer to the offer): where the VM's CAs
    /// point here once it moved (`netvirt_move::vm_moved_away`).
    pub dest_pas: Vec<SwitchProviderAddresses>,
}

fn path(d: &Daemon, vm: Uuid) -> std::path::PathBuf {
    files::path(&d.store.vm_dir(vm), NAME)
}

/// Written durably (file and folder synced): it must outlive a crash of the host too.
pub fn write(d: &Daemon, vm: Uuid, note: &QuickNote) -> Result<(), String> {
    let p = path(d, vm);
    files::write_json_atomic(&p, note)
        .map_err(|e| format!("recording the quick migration in {}: {e}", p.display()))
}

/// The VM's note, if a quick migration of it is under way (or was, when vireod died).
pub fn read(d: &Daemon, vm: Uuid) -> Option<QuickNote> {
    files::read_json(&path(d, vm))
}

/// The migration ended (or never reached the save).
pub fn remove(d: &Daemon, vm: Uuid) {
    files::remove(&path(d, vm));
}
