//! `Save` on worker.sock: pause, write memory and state (docs/vm-state.md), then the VM stops
//! and the worker exits `Saved`. A failed save leaves the VM as it was: running, or paused if
//! it was paused before.

use std::path::Path;

use vireo_vmm::state::Identity;

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
    s.vm.pause()
        .map_err(|e| format!("cannot pause the VM: {e}"))?;
    let identity = Identity {
        id: Some(s.vm_id.to_string()),
        name: Some(s.spec_name.clone()),
    };
    match s.vm.save(dir, identity, Some(s.spec_json.clone())) {
        Ok(()) => {
            tracing::info!("VM saved to {}", dir.display());
            *s.saved_to.lock().unwrap_or_else(|p| p.into_inner()) = Some(dir.to_path_buf());
            Ok(())
        }
        Err(e) => {
            if !was_paused {
                let _ = s.vm.resume();
            }
            Err(format!(
                "saving to {}: {e}; the VM {} as before",
                dir.display(),
                if was_paused {
                    "stays paused"
                } else {
                    "runs on"
                }
            ))
        }
    }
}
