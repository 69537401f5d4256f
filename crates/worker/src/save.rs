//! `Save` on worker.sock: a live save of memory and state (docs/vm-state.md), then the VM stops
//! and the worker exits `Saved`. A failed save leaves the VM as it was: running, or paused if
//! it was paused before.
//!
//! Asked to hand over its disks, the save also gives back a new descriptor of every disk's
//! open, locked file (taken under the hot-plug lock, so it is the saved layout's): the caller
//! sends them to vireod with the reply, and the locks outlive this process.

use std::fs::File;
use std::path::Path;

use vireo_api::worker::HandedOverDisk;
use vireo_block::BlockBackend;

use vireo_vmm::state::Identity;
use vireo_vmm::{AfterSave, LiveSaveOptions};

use crate::server::State;

/// The disks' locked files a save hands over, in slot order.
pub type HandedOver = Vec<(HandedOverDisk, File)>;

/// Saves the VM into `dir`. Hot add/remove is held off meanwhile (the hot-plug lock), so the
/// disk layout in the state is the one the owner's spec describes. With `hand_over`, returns
/// the disks' locked files (see the module header); else none.
pub fn save(s: &State, dir: &Path, hand_over: bool) -> Result<HandedOver, String> {
    if !dir.is_absolute() {
        return Err(format!(
            "save needs an absolute directory, not {}",
            dir.display()
        ));
    }
    let layout = s.hotplug.hold_slots();
    let was_paused = s.vm.is_paused();
    let identity = Identity {
        id: Some(s.vm_id.to_string()),
        name: Some(s.spec_name.clone()),
    };
    // Live: memory goes out while the guest runs; the VM ends paused (the worker stops it).
    let opts = LiveSaveOptions {
        then: AfterSave::StayPaused,
        ..Default::default()
    };
    match s
        .vm
        .save_live(dir, identity, Some(s.spec_json.clone()), &opts)
    {
        Ok(r) => {
            tracing::info!(
                "VM saved to {}: {} rounds, {} MiB, paused {:.1} ms",
                dir.display(),
                r.rounds,
                r.bytes_written >> 20,
                r.pause.as_secs_f64() * 1e3
            );
            *s.saved_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
            if !hand_over {
                return Ok(Vec::new());
            }
            Ok(layout
                .iter()
                .flatten()
                .filter_map(|d| match d.movable.dup_locked_file()? {
                    Ok(file) => Some((
                        HandedOverDisk {
                            path: d.path.clone(),
                            read_only: d.movable.read_only(),
                        },
                        file,
                    )),
                    // The save is complete; this disk is locked again by path later.
                    Err(e) => {
                        tracing::warn!("disk {}: not handed over: {e}", d.path.display());
                        None
                    }
                })
                .collect())
        }
        // save_live leaves the VM as it was on any error.
        Err(e) => Err(format!(
            "saving to {}: {e}; the VM {} as before",
            dir.display(),
            if was_paused {
                "stays paused"
            } else {
                "runs on"
            }
        )),
    }
}
