//! `apply` with `keep_running` (docs/checkpoints.md, "Apply, keeping the worker"): the running
//! or paused VM goes back to a checkpoint in its own worker, which keeps running (QEMU's
//! `loadvm`). vireod plans the children (new differencing files of the checkpoint's frozen
//! files), records the intent, asks the worker (`WorkerOp::ApplyCheckpoint`: disks swapped,
//! memory and device state applied in one pause), and commits as an ordinary apply does:
//! spec on the children, "now" under the checkpoint, the VM's discarded files deleted. The VM's
//! run state does not change.
//!
//! Crash safety: the intent is `Apply { live: true }`. When the outcome is unknown (vireod
//! restarted, the worker died, errored or did not answer), `settle` decides from what exists:
//! - a live worker: wait until it no longer checkpoints, then ask which files its disks use:
//!   the children → commit (the guest runs from the checkpoint); the old files → roll back;
//! - no worker: every child a valid VHDX → commit (the worker was past its swap: the old files
//!   were flushed and closed, anything the guest wrote later is in the children, so no
//!   acknowledged write is lost; the VM is `critical` either way), else roll back (the old
//!   files are exactly the VM's disks).

use std::sync::Arc;

use uuid::Uuid;
use vireo_api::worker::{ApplyChild, WorkerOp, WorkerReply};
use vireo_api::{Checkpoint, VmSpec};

use super::super::worker_client::{WorkerCallError, WorkerConn};
use super::super::Daemon;
use super::fault_point;
use super::live::CAPTURE_LIMIT;
use crate::checkpoint_store::{Head, Intent, Top};

/// Why `cp` cannot be applied in the running VM with spec `vm`, if it cannot (pure; the
/// worker and the VMM check again). The message says what to do instead.
pub fn obstacle(vm: &VmSpec, cp: &Checkpoint) -> Option<String> {
    let instead = "apply it with --stop (the current state is lost) or --save-current \
                   (checkpointed first), which restart the VM from the checkpoint";
    if !cp.has_state {
        return Some(format!(
            "checkpoint {:?} has no memory state (it was taken while the VM was off), so there \
             is nothing to load into the running VM; {instead}",
            cp.name
        ));
    }
    let was = &cp.spec;
    let differs = if was.memory_bytes != vm.memory_bytes {
        Some(format!(
            "memory ({} MiB then, {} MiB now)",
            was.memory_bytes >> 20,
            vm.memory_bytes >> 20
        ))
    } else if was.vcpus != vm.vcpus {
        Some(format!("vCPUs ({} then, {} now)", was.vcpus, vm.vcpus))
    } else if was.kernel != vm.kernel || was.initrd != vm.initrd || was.cmdline != vm.cmdline {
        Some("kernel, initrd or command line".to_string())
    } else if !same_disks(was, vm) {
        Some(format!(
            "disks ({} then, {} now, compared by serial, read-only, queues and QoS)",
            was.disks.len(),
            vm.disks.len()
        ))
    } else {
        nic_difference(was, vm)
    };
    differs.map(|what| {
        format!(
            "checkpoint {:?} was taken with other hardware than VM {:?} has now: {what}; the \
             running VM cannot take its state; {instead}",
            cp.name, vm.name
        )
    })
}

/// How the NICs differ, if they do. The guest sees a NIC's MAC (the VMM refuses another one);
/// its port's switch, VLAN, policy and virtual subnet stay as they are now in an in-place
/// apply (the worker keeps its ports), while the committed spec is the checkpoint's, so any
/// difference is refused rather than leave the spec describing a port the VM is not on.
fn nic_difference(was: &VmSpec, now: &VmSpec) -> Option<String> {
    if was.nics.len() != now.nics.len() {
        return Some(format!(
            "NICs ({} then, {} now)",
            was.nics.len(),
            now.nics.len()
        ));
    }
    let (i, (a, b)) = was
        .nics
        .iter()
        .zip(&now.nics)
        .enumerate()
        .find(|(_, (a, b))| a != b)?;
    let name = b.name.clone().unwrap_or_else(|| format!("nic{i}"));
    if a.queues != b.queues {
        // The pair count is the guest's virtio-net device (its queues and config space).
        return Some(format!(
            "NIC {name:?} ({} queue pairs then, {} now)",
            a.queues.unwrap_or(1),
            b.queues.unwrap_or(1)
        ));
    }
    let what = if a.name != b.name || a.mac != b.mac {
        "name or MAC"
    } else if a.switch != b.switch {
        "switch"
    } else {
        "VLAN, policy or virtual subnet"
    };
    Some(format!("NIC {name:?} (its {what} changed since)"))
}

/// The same disks in the same order, files aside (the apply puts them on children).
fn same_disks(a: &VmSpec, b: &VmSpec) -> bool {
    a.disks.len() == b.disks.len()
        && a.disks.iter().zip(&b.disks).all(|(x, y)| {
            x.serial == y.serial
                && x.read_only == y.read_only
                && x.queues == y.queues
                && x.max_iops == y.max_iops
                && x.min_iops == y.min_iops
                && (!x.read_only || x.path == y.path)
        })
}

/// Applies `cp` to the running or paused VM `id` in its worker; the caller holds its lock.
pub async fn apply(d: &Arc<Daemon>, id: Uuid, cp: &Checkpoint, job: Uuid) -> Result<(), String> {
    let vm = d.store.get_by_id(id).map_err(|e| e.to_string())?;
    if !vm.state.has_worker() {
        return Err(format!("VM {:?} is {} now", vm.spec.name, vm.state));
    }
    if let Some(why) = obstacle(&vm.spec, cp) {
        return Err(why);
    }
    let worker = d
        .sup
        .get(id)
        .ok_or_else(|| format!("VM {:?} has no worker now; retry", vm.spec.name))?;
    let op = Uuid::new_v4();
    let children: Vec<ApplyChild> = cp
        .disks
        .iter()
        .map(|x| ApplyChild {
            serial: x.serial.clone(),
            path: super::child_path(d, id, &x.serial, op, &x.frozen),
            parent: x.frozen.clone(),
        })
        .collect();
    let discard = super::apply::discarded_files(d, &vm)?;
    let intent = Intent::Apply {
        checkpoint: cp.id,
        children: children.iter().map(|c| c.path.clone()).collect(),
        discard,
        staged: None,
        live: true,
    };
    super::begin_intent(d, &vm, &intent)?;
    fault_point("apply-live-intent");
    let _ = d.store.set_job_progress(job, 20);
    let request = WorkerOp::ApplyCheckpoint {
        dir: super::state_dir(d, id, cp.id),
        children,
    };
    let answer = match WorkerConn::connect(&worker.socket()).await {
        Ok(mut conn) => conn.call_within(request, CAPTURE_LIMIT).await,
        Err(e) => Err(e),
    };
    let _ = d.store.set_job_progress(job, 80);
    match answer {
        Ok(WorkerReply::Applied(r)) => {
            fault_point("apply-live-answered");
            commit(d, id, cp, &intent)?;
            tracing::info!(
                vm = %id, checkpoint = %cp.id,
                "checkpoint applied in place: guest paused {:.1} ms, {} pages copied",
                r.pause_us as f64 / 1e3, r.pages_copied
            );
            Ok(())
        }
        Err(WorkerCallError::Refused(m)) => {
            // Refused before the swap, or a swap undone: on the old files → rolled back. A
            // failure after the swap stopped the VM on the children → committed.
            let kept = settle(d, id, &intent).await?;
            Err(format!(
                "the worker could not apply the checkpoint: {m}{}",
                if kept {
                    "; the VM's disks are the checkpoint's now"
                } else {
                    ""
                }
            ))
        }
        other => {
            let why = match other {
                Ok(r) => format!("the worker answered the apply with {r:?}"),
                Err(e) => format!("the worker ended during the apply ({e})"),
            };
            let kept = settle(d, id, &intent).await?;
            let now = d
                .store
                .get_by_id(id)
                .map(|v| v.state.to_string())
                .unwrap_or_default();
            Err(if kept {
                format!("{why}; the checkpoint was applied to the disks, the VM is {now}")
            } else {
                format!("{why}; nothing was changed, the VM is {now}")
            })
        }
    }
}

/// The commit of a live apply: spec on the children, "now" under `cp`, the run state as it
/// is; then the discarded files go.
fn commit(d: &Daemon, id: Uuid, cp: &Checkpoint, intent: &Intent) -> Result<(), String> {
    let Intent::Apply { children, .. } = intent else {
        return Err("not an apply".into());
    };
    let mut spec = cp.spec.clone();
    let mut tops = std::collections::BTreeMap::new();
    for (x, child) in cp.disks.iter().zip(children) {
        for s in spec.disks.iter_mut() {
            if s.serial.as_deref() == Some(x.serial.as_str()) {
                s.path = child.clone();
            }
        }
        tops.insert(
            x.serial.clone(),
            Top {
                file: child.clone(),
                parent: x.frozen.clone(),
            },
        );
    }
    let head = Head {
        current: Some(cp.id),
        tops,
    };
    d.store
        .commit_checkpoint_apply(id, &spec, None, &head)
        .map_err(|e| e.to_string())?;
    fault_point("apply-live-commit");
    super::apply::finish(d, id, intent);
    Ok(())
}

/// Finishes a live apply whose outcome is unknown (module docs): `Ok(true)` committed,
/// `Ok(false)` rolled back. The caller holds the VM's lock.
pub async fn settle(d: &Arc<Daemon>, id: Uuid, intent: &Intent) -> Result<bool, String> {
    let Intent::Apply {
        checkpoint,
        children,
        ..
    } = intent
    else {
        super::recover::roll_back(d, id, intent);
        return Ok(false);
    };
    let Some(cp) = d
        .store
        .list_checkpoints(id)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|c| c.id == *checkpoint)
    else {
        super::recover::roll_back(d, id, intent);
        return Ok(false);
    };
    let mut on_children = None;
    if let Some(w) = d.sup.get(id) {
        on_children = super::live::disk_files_when_done(&w.socket())
            .await
            .map(|files| files.iter().any(|f| children.contains(f)));
        if on_children.is_none() {
            // Not answering: let its end be applied before the files are judged.
            let _ = w.exited_within(std::time::Duration::from_secs(10)).await;
        }
    }
    let commit_it = match on_children {
        Some(on) => on,
        None => {
            let kids = children.clone();
            tokio::task::spawn_blocking(move || {
                !kids.is_empty()
                    && kids.iter().all(|c| {
                        vireo_vhdx::Vhdx::open(c, &vireo_vhdx::OpenOptions::read_only()).is_ok()
                    })
            })
            .await
            .unwrap_or(false)
        }
    };
    if !commit_it {
        super::recover::roll_back(d, id, intent);
        tracing::warn!(vm = %id, "interrupted in-place apply rolled back");
        return Ok(false);
    }
    commit(d, id, &cp, intent)?;
    tracing::warn!(vm = %id, checkpoint = %cp.id, "interrupted in-place apply kept");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(spec: VmSpec, has_state: bool) -> Checkpoint {
        Checkpoint {
            id: Uuid::nil(),
            vm_id: Uuid::nil(),
            name: "cp1".into(),
            parent: None,
            created_at: 0,
            spec,
            disks: Vec::new(),
            has_state,
            current: false,
            automatic: false,
            capture: None,
        }
    }

    fn spec() -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "version": 1, "name": "w", "vcpus": 1, "memory_bytes": 33554432u64,
            "kernel": "/k", "disks": [{"path": "/a.vhdx", "serial": "s0"}]
        }))
        .unwrap()
    }

    #[test]
    fn the_same_hardware_on_other_files_can_be_applied_in_place() {
        let now = spec();
        let mut then = spec();
        then.disks[0].path = "/frozen.vhdx".into();
        assert_eq!(obstacle(&now, &cp(then, true)), None);
    }

    #[test]
    fn other_hardware_or_no_state_is_refused_with_the_way_out() {
        let now = spec();
        let mut more = spec();
        more.memory_bytes *= 2;
        let why = obstacle(&now, &cp(more, true)).unwrap();
        assert!(why.contains("memory (64 MiB then, 32 MiB now)"), "{why}");
        assert!(
            why.contains("--stop") && why.contains("--save-current"),
            "{why}"
        );
        let mut cpus = spec();
        cpus.vcpus = 2;
        assert!(obstacle(&now, &cp(cpus, true)).unwrap().contains("vCPUs"));
        let mut disk = spec();
        disk.disks[0].serial = Some("other".into());
        assert!(obstacle(&now, &cp(disk, true)).unwrap().contains("disks"));
        let why = obstacle(&now, &cp(spec(), false)).unwrap();
        assert!(why.contains("no memory state"), "{why}");
    }

    #[test]
    fn nics_must_be_as_they_were_at_the_checkpoint() {
        let mut now = spec();
        now.nics = serde_json::from_value(serde_json::json!(
            [{"switch": "lan", "name": "nic0", "mac": "52:54:00:00:00:01"}]
        ))
        .unwrap();
        assert_eq!(
            obstacle(&now, &cp(now.clone(), true)),
            None,
            "a NIC as it was"
        );
        let why = obstacle(&now, &cp(spec(), true)).unwrap();
        assert!(why.contains("NICs (0 then, 1 now)"), "{why}");
        let mut mac = now.clone();
        mac.nics[0].mac = Some("52:54:00:00:00:02".parse().unwrap());
        let why = obstacle(&now, &cp(mac, true)).unwrap();
        assert!(why.contains("\"nic0\" (its name or MAC"), "{why}");
        let mut other = now.clone();
        other.nics[0].switch = "wan".into();
        let why = obstacle(&now, &cp(other, true)).unwrap();
        assert!(
            why.contains("its switch changed") && why.contains("--stop"),
            "{why}"
        );
        let mut vlan = now.clone();
        vlan.nics[0].vlan = Some(7);
        let why = obstacle(&now, &cp(vlan, true)).unwrap();
        assert!(why.contains("VLAN, policy"), "{why}");
        let mut mq = now.clone();
        mq.nics[0].queues = Some(2);
        let why = obstacle(&now, &cp(mq, true)).unwrap();
        assert!(
            why.contains("\"nic0\" (2 queue pairs then, 1 now)") && why.contains("--stop"),
            "{why}"
        );
    }
}
