//! Finishing or rolling back a checkpoint operation cut short (vireod or its worker killed,
//! disk full, an error half way). A *prepared* intent is rolled back: the files it made go
//! unless the VM's spec or a checkpoint uses them, the VM's record was never changed. A
//! *committed* one is finished: the clean-up and merges its commit made due. Both are
//! idempotent.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;

use super::super::Daemon;
use super::{disks, is_ours};
use crate::checkpoint_store::{Intent, Phase};

/// Every file the VM's spec or one of its checkpoints names (never deleted).
pub fn files_in_use(daemon: &Daemon, vm: Uuid) -> HashSet<PathBuf> {
    let mut used = HashSet::new();
    if let Ok(v) = daemon.store.get_by_id(vm) {
        used.extend(v.spec.disks.iter().map(|d| d.path.clone()));
    }
    for cp in daemon.store.list_checkpoints(vm).unwrap_or_default() {
        used.extend(cp.disks.iter().map(|d| d.frozen.clone()));
        used.extend(cp.disks.iter().filter_map(|d| d.parent_file.clone()));
        used.extend(cp.spec.disks.iter().map(|d| d.path.clone()));
    }
    if let Ok(head) = daemon.store.checkpoint_head(vm) {
        used.extend(head.tops.values().map(|t| t.file.clone()));
    }
    used
}

/// Undoes a prepared intent's files and drops the intent.
pub fn roll_back(daemon: &Daemon, vm: Uuid, intent: &Intent) {
    let used = files_in_use(daemon, vm);
    let drop_file = |f: &PathBuf| {
        if is_ours(daemon, vm, f) && !used.contains(f) {
            disks::remove(f);
        }
    };
    match intent {
        Intent::Create {
            children,
            state_dir,
            ..
        } => {
            children.iter().for_each(drop_file);
            disks::remove(state_dir);
        }
        Intent::Apply {
            children, staged, ..
        } => {
            children.iter().for_each(drop_file);
            if let Some(s) = staged {
                disks::remove(s);
            }
        }
        // A delete is committed with its intent: never rolled back.
        Intent::Delete { .. } => return,
        Intent::Move { files, .. } => {
            super::move_tree::roll_back(daemon, vm, files);
            tracing::info!(vm = %vm, "storage move of a checkpointed VM rolled back");
            return;
        }
    }
    if let Err(e) = daemon.store.clear_checkpoint_intent(vm) {
        tracing::warn!(vm = %vm, "cannot clear the checkpoint intent: {e}");
    }
    tracing::info!(vm = %vm, "checkpoint operation rolled back");
}

/// At startup, after the workers were re-adopted: every intent left in the store.
pub async fn recover_all(daemon: &Arc<Daemon>) {
    let intents = match daemon.store.checkpoint_intents() {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("cannot read checkpoint intents: {e}");
            return;
        }
    };
    for (vm, intent, phase) in intents {
        tracing::warn!(vm = %vm, ?phase, "finishing an interrupted checkpoint operation");
        if matches!((phase, &intent), (Phase::Committed, Intent::Delete { .. })) {
            let d = daemon.clone();
            tokio::spawn(async move {
                let _g = d.lock_vm(vm).await;
                if let Err(m) = super::delete::finish(&d, vm, &intent, None).await {
                    tracing::error!(vm = %vm, "finishing a checkpoint delete: {m}");
                }
            });
            continue;
        }
        let _g = daemon.lock_vm(vm).await;
        match (phase, &intent) {
            // A live capture: what the worker did decides (live.rs).
            (Phase::Prepared, Intent::Create { live: Some(_), .. }) => {
                match super::live::settle(daemon, vm, &intent).await {
                    Ok(kept) => tracing::warn!(vm = %vm, kept, "interrupted live checkpoint"),
                    Err(m) => tracing::error!(vm = %vm, "finishing a live checkpoint: {m}"),
                }
            }
            // An in-place apply in the worker: the same, by the files its disks use.
            (Phase::Prepared, Intent::Apply { live: true, .. }) => {
                match super::apply_live::settle(daemon, vm, &intent).await {
                    Ok(kept) => tracing::warn!(vm = %vm, kept, "interrupted in-place apply"),
                    Err(m) => tracing::error!(vm = %vm, "finishing an in-place apply: {m}"),
                }
            }
            // A running VM's tree move: what its worker switched to decides (move_live.rs).
            (
                Phase::Prepared,
                Intent::Move {
                    files,
                    live: Some(live),
                },
            ) => match super::move_live::settle(daemon, vm, files, live).await {
                Ok(moved) => tracing::warn!(vm = %vm, moved, "interrupted storage move"),
                Err(m) => tracing::error!(vm = %vm, "finishing a storage move: {m}"),
            },
            (Phase::Prepared, _) => roll_back(daemon, vm, &intent),
            (Phase::Committed, Intent::Create { .. }) => {
                let _ = daemon.store.clear_checkpoint_intent(vm);
            }
            (Phase::Committed, Intent::Apply { .. }) => {
                super::apply::finish(daemon, vm, &intent);
            }
            (Phase::Committed, Intent::Delete { .. }) => {}
            (Phase::Committed, Intent::Move { files, .. }) => {
                let keep = crate::daemon::move_storage::files_of_other_vms(daemon, vm);
                super::move_tree::finish(daemon, vm, files, &keep);
            }
        }
    }
}
