//! `Save` on worker.sock: a live save of memory and state (docs/vm-state.md), then the VM stops
//! and the worker exits `Saved`. A failed save leaves the VM as it was: running, or paused if
//! it was paused before.

use std::path::Path;

use vireo_vmm::state::Identity;
use vireo_vmm::{AfterSave, LiveSaveOptions};

use crate::server::State;

/// Saves the VM into `dir`. Hot add/remove is held off meanwhile (the hot-plug lock), so the
/// disk layout in the state is the one the owner's spec describes.
pub fn save(s: &State, dir: &Path) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err(format!(
            "save needs an absolute directory, not {}",
            dir.display()
        ));
    }
    let _layout = s.hotplug.hold();
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
            Ok(())
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
