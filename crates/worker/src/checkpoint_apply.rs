//! `ApplyCheckpoint` on worker.sock (docs/checkpoints.md, "Apply, keeping the worker"): the
//! running or paused VM goes back to a checkpoint in this process, as QEMU's `loadvm` does. In
//! one pause every checkpointed disk is flushed, closed and reopened as a new differencing
//! child of the checkpoint's frozen file (`checkpoint::swap_all`, as a live capture does), then
//! guest RAM and the vCPU and device state become the checkpoint's
//! (`VmHandle::apply_in_place_with`); then a running VM resumes, a paused one stays paused.
//!
//! The disks go first: a swap that fails is undone with nothing else touched yet, so the VM
//! goes on as it was. A failure after the swap ends the VM (the VMM's rule: its memory is no
//! one guest's then); its disks are on the children, which vireod's recovery commits.
//!
//! Locks, in this order, as for a capture: the hot-plug slots, the VMM's lifecycle lock (in
//! `apply_in_place_with`), each disk's park. Storage moves and live merges are kept out
//! throughout, and `Status.checkpointing` is set, so a restarted vireod waits for the end.
//!
//! Crash points (`VIREO_CHECKPOINT_FAULT`): `worker-child` (the first child made, as for a
//! capture), `worker-apply-switched` (every disk on its child, memory not yet applied),
//! `worker-apply-resumed` (the apply done, before the answer).

use std::path::Path;
use std::time::Instant;

use vireo_api::worker::{ApplyChild, ApplyReport};
use vireo_block::BlockBackend;
use vireo_vmm::{AfterApply, ApplyOptions, StateError};

use crate::checkpoint::{fault_point, plan, swap_all, Busy, ChildOf};
use crate::hotplug::SlotDisk;
use crate::server::State;

/// Applies the checkpoint whose state is in `dir` (see the module docs).
pub fn apply(s: &State, dir: &Path, children: &[ApplyChild]) -> Result<ApplyReport, String> {
    let started = Instant::now();
    if !dir.is_absolute() {
        return Err(format!(
            "apply needs the checkpoint's absolute directory, not {}",
            dir.display()
        ));
    }
    if s.vm.exited() {
        return Err("the VM is not running".into());
    }
    let _busy = Busy::enter(s)?;
    let mut slots = s.hotplug.hold_slots();
    let disks: Vec<SlotDisk> = slots.iter().flatten().cloned().collect();
    let wanted: Vec<ChildOf> = children
        .iter()
        .map(|c| ChildOf {
            serial: &c.serial,
            path: &c.path,
            parent: Some(&c.parent),
        })
        .collect();
    let plan = plan(&disks, &wanted)?;
    // A read-write disk left out would keep the data written since the checkpoint under a
    // guest that remembers the checkpoint's: a corrupt file system.
    if let Some(d) = disks.iter().find(|d| {
        !d.movable.read_only()
            && !children
                .iter()
                .any(|c| d.serial.as_deref() == Some(c.serial.as_str()))
    }) {
        return Err(format!(
            "disk {} ({}) of the VM has no file in the checkpoint; apply it with the VM stopped",
            d.serial.as_deref().unwrap_or("without a serial"),
            d.movable.image().0.display()
        ));
    }
    let opts = ApplyOptions {
        then: if s.vm.is_paused() {
            AfterApply::StayPaused
        } else {
            AfterApply::Resume
        },
        // Off: the guest runs at full speed at once; a later apply compares every page.
        track: false,
    };
    let meter = &s.meter;
    let mut swap = || -> Result<(), String> {
        swap_all(s, &mut slots, meter, &plan)?;
        fault_point("worker-apply-switched");
        Ok(())
    };
    let r =
        s.vm.apply_in_place_with(dir, &opts, &mut swap)
            .map_err(|e| match e {
                StateError::Checkpoint(why) => format!(
                "putting the disks on the checkpoint's files: {why}; the VM goes on as before, \
                 on its old files"
            ),
                e if s.vm.exited() => format!(
                    "applying {} in place failed after the disks were switched: {e}; the VM \
                 stopped",
                    dir.display()
                ),
                e => format!(
                    "cannot apply {} in place: {e}; the VM goes on as before",
                    dir.display()
                ),
            })?;
    drop(slots);
    fault_point("worker-apply-resumed");
    tracing::info!(
        "applied {} in place: {} pages copied, paused {:.1} ms, {} ms in all",
        dir.display(),
        r.pages_copied,
        r.paused.as_secs_f64() * 1e3,
        started.elapsed().as_millis()
    );
    Ok(ApplyReport {
        pause_us: r.paused.as_micros() as u64,
        pages_copied: r.pages_copied,
        pages_compared: r.pages_compared,
    })
}
