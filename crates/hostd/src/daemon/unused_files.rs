//! Deleting the files a VM left behind on this host (the old files of a storage move, the
//! source's files of a shared-nothing migration), never one another VM here uses or another
//! process holds open.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::Daemon;

/// Whether `a` and `b` name one file (as spelled, or once resolved: a parent locator may spell
/// a file `<dir>/../base.vhdx`).
pub fn same(a: &Path, b: &Path) -> bool {
    a == b || resolved(a) == resolved(b)
}

fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// `path` and, when it is a VHDX, its parents (top first), read without taking its lock: a
/// running worker holds it.
pub fn with_chain(path: &Path) -> Vec<PathBuf> {
    let unlocked = vireo_vhdx::OpenOptions {
        read_only: true,
        no_lock: true,
        ..Default::default()
    };
    match vireo_vhdx::Vhdx::open(path, &unlocked) {
        Ok(v) => v.chain_paths(),
        Err(_) => vec![path.to_path_buf()],
    }
}

/// What [`delete`] did with one file.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Deleted,
    /// Another VM of this host uses it (its disks, their chains, its checkpoints).
    UsedByAnotherVm,
    /// The deletion failed or was refused (another process holds the file open).
    Kept(String),
}

/// Deletes each of `files` that exists, but never one of `keep`, one the disks or checkpoints
/// of a VM other than `vm` use (`move_storage::files_of_other_vms`, chains included), or one
/// another process holds open (`delete_if_unused` takes its lock first). Each file that
/// existed and is not in `keep`, once (whatever its spelling), with what became of it.
/// Blocking.
pub fn delete(
    d: &Daemon,
    vm: Uuid,
    files: &[PathBuf],
    keep: &[PathBuf],
) -> Vec<(PathBuf, Outcome)> {
    let others: Vec<PathBuf> = super::move_storage::files_of_other_vms(d, vm)
        .iter()
        .map(|p| resolved(p))
        .collect();
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut out = Vec::new();
    for f in files {
        if !f.exists() {
            continue;
        }
        let real = resolved(f);
        if seen.contains(&real) || keep.iter().any(|k| same(k, f)) {
            continue;
        }
        seen.push(real.clone());
        let outcome = if others.contains(&real) {
            Outcome::UsedByAnotherVm
        } else {
            match vireo_worker::move_storage::delete_if_unused(f) {
                Ok(()) => Outcome::Deleted,
                Err(why) => Outcome::Kept(why),
            }
        };
        out.push((f.clone(), outcome));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vireo_api::{Checkpoint, CheckpointDisk, VmSpec};
    use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

    use super::*;
    use crate::checkpoint_store::Head;
    use crate::{Store, DEFAULT_LIMITS};

    fn vhdx(path: &Path, parent: Option<&Path>) {
        let opts = match parent {
            Some(p) => CreateOptions {
                disk_type: DiskType::Differencing,
                parent: Some(p.to_path_buf()),
                ..Default::default()
            },
            None => CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        };
        drop(Vhdx::create(path, &opts).unwrap());
    }

    fn spec(name: &str, disks: &[&Path]) -> VmSpec {
        serde_json::from_value(serde_json::json!({
            "version": 1, "name": name, "vcpus": 1, "memory_bytes": 33554432, "kernel": "/k",
            "disks": disks.iter().map(|p| serde_json::json!({"path": p})).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn only_files_no_other_vm_uses_and_no_process_holds_go() {
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| dir.path().join(n);
        let store = Store::open_with(&f("state"), DEFAULT_LIMITS).unwrap();
        let d = Daemon::new(store, DEFAULT_LIMITS, f("vireo-vm"));
        // Ours: top on base. Another VM's: its disk on `shared`, and a checkpoint of it that
        // still names `old`, a file its disk no longer reaches.
        vhdx(&f("base.vhdx"), None);
        vhdx(&f("top.vhdx"), Some(&f("base.vhdx")));
        vhdx(&f("shared.vhdx"), None);
        vhdx(&f("o.vhdx"), Some(&f("shared.vhdx")));
        vhdx(&f("old.vhdx"), None);
        let me = d.store.create_vm(&spec("me", &[&f("top.vhdx")])).unwrap();
        let other = d.store.create_vm(&spec("other", &[&f("o.vhdx")])).unwrap();
        let cp = Checkpoint {
            id: Uuid::from_u128(1),
            vm_id: other.id(),
            name: "before".into(),
            parent: None,
            created_at: 0,
            spec: spec("other", &[&f("old.vhdx")]),
            disks: vec![CheckpointDisk {
                serial: "d0".into(),
                frozen: f("old.vhdx"),
                parent_file: None,
            }],
            has_state: false,
            current: false,
            automatic: false,
            capture: None,
        };
        let head = Head {
            current: None,
            tops: BTreeMap::new(),
        };
        d.store
            .import_checkpoints(other.id(), &[cp], &head)
            .unwrap();
        // Held by another open file (the lock `delete_if_unused` needs is taken).
        std::fs::write(f("held.img"), [0u8; 512]).unwrap();
        let holder = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f("held.img"))
            .unwrap();
        vireo_block::lock(&holder, &f("held.img"), vireo_block::LockKind::Exclusive).unwrap();
        std::fs::write(f("keep.img"), [0u8; 512]).unwrap();
        std::fs::create_dir(f("sub")).unwrap();

        let files = [
            f("top.vhdx"),
            f("base.vhdx"),
            f("shared.vhdx"),
            // The same file spelled as a parent locator may: reported once.
            f("sub/../shared.vhdx"),
            f("old.vhdx"),
            f("held.img"),
            f("missing.vhdx"),
            f("keep.img"),
        ];
        let out = delete(&d, me.id(), &files, &[f("keep.img")]);
        assert_eq!(
            out,
            vec![
                (f("top.vhdx"), Outcome::Deleted),
                (f("base.vhdx"), Outcome::Deleted),
                (f("shared.vhdx"), Outcome::UsedByAnotherVm),
                (f("old.vhdx"), Outcome::UsedByAnotherVm),
                (
                    f("held.img"),
                    Outcome::Kept("in use by another process".into())
                ),
            ]
        );
        for kept in ["shared.vhdx", "o.vhdx", "old.vhdx", "held.img", "keep.img"] {
            assert!(f(kept).exists(), "{kept}");
        }
        assert!(!f("top.vhdx").exists() && !f("base.vhdx").exists());
    }
}
