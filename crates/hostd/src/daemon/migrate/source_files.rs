//! Shared-nothing migration, at the source: once the VM runs on the destination, the disk
//! files the migration copied are deleted here, as Hyper-V deletes a moved VM's files on the
//! source (docs/migration.md, "Shared-nothing migration"), unless `keep_source`. Never a file
//! another VM here uses or another process holds open (`unused_files::delete`); each file's
//! fate is a phase of the job, so `vireo job show` names what went and what stayed.

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;
use vireo_api::migrate::CheckpointTree;
use vireo_api::Vm;

use crate::daemon::unused_files::{self, Outcome};
use crate::daemon::Daemon;

/// The user's files the migration copies to the destination: each disk's file with its VHDX
/// parents (the copy flattens them into one file there) or, for a VM with checkpoints, the
/// user's files of its tree (the base disks the first checkpoint froze and their parents, sent
/// whole) and the disks in none of its checkpoints with their parents (flattened). vireod's
/// own files of the tree are not listed: they go with the VM's folder and
/// `tree::remove_outside`. The kernel and initrd are never listed: they are not copied (a
/// read-only image both hosts have).
pub fn copied(vm: &Vm, tree: Option<&CheckpointTree>) -> Vec<PathBuf> {
    // The chains do not change while the migration holds the VM's lock.
    let flattened: Vec<&vireo_api::DiskSpec> = match tree {
        Some(tree) => super::tree::outside_tree(tree, &vm.spec),
        None => vm.spec.disks.iter().collect(),
    };
    let tree_files = tree.into_iter().flat_map(|tree| {
        tree.files
            .iter()
            .filter(|f| super::tree::is_user_file(f))
            .map(|f| super::tree::source_path(f).to_path_buf())
    });
    let mut out: Vec<PathBuf> = tree_files.collect();
    for disk in flattened {
        for f in unused_files::with_chain(&disk.path) {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    out
}

/// After the VM runs on the destination: deletes `files` (from [`copied`]) unless `why_kept`
/// says why they stay. A file that cannot go stays and is named in the job with the reason;
/// the migration has succeeded whatever happens here.
pub async fn after_move(
    d: &Arc<Daemon>,
    vm: Uuid,
    job: Uuid,
    files: Vec<PathBuf>,
    why_kept: Option<&str>,
) {
    if files.is_empty() {
        return;
    }
    if let Some(why) = why_kept {
        tracing::info!(vm = %vm, "the source's disk files stay: {why}");
        d.migrations.mark(job, &format!("source files kept: {why}"));
        return;
    }
    let daemon = d.clone();
    let outcomes =
        match tokio::task::spawn_blocking(move || unused_files::delete(&daemon, vm, &files, &[]))
            .await
        {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(vm = %vm, "deleting the source's disk files: {e}");
                d.migrations.mark(
                    job,
                    &format!("source files kept: deleting them failed ({e})"),
                );
                return;
            }
        };
    for (file, outcome) in outcomes {
        let file = file.display();
        let mark = match outcome {
            Outcome::Deleted => {
                tracing::info!(vm = %vm, "deleted the source's {file}");
                format!("source file deleted: {file}")
            }
            Outcome::UsedByAnotherVm => {
                tracing::info!(vm = %vm, "the source's {file} stays: another VM here uses it");
                format!("source file kept: {file} (another VM here uses it)")
            }
            Outcome::Kept(why) => {
                tracing::warn!(vm = %vm, "the source's {file} stays: {why}");
                format!("source file kept: {file} ({why}); delete it by hand")
            }
        };
        d.migrations.mark(job, &mark);
    }
}
