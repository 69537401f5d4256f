//! A VM's checkpoint tree as files, for the storage-move tests: which files the tree names,
//! which VHDX files exist anywhere, and whether they check clean.

use std::path::{Path, PathBuf};

use vireo_api::Checkpoint;

use super::Daemon;

pub fn checkpoints(d: &Daemon, vm: &str) -> Vec<Checkpoint> {
    serde_json::from_str(&d.ok(&["checkpoint", "list", vm, "--output", "json"])).unwrap()
}

/// Every file a checkpoint names, and the VM's own disks: the files a move must not lose.
pub fn files_in_use(d: &Daemon, vm: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = d.vm(vm).spec.disks.iter().map(|s| s.path.clone()).collect();
    for cp in checkpoints(d, vm) {
        files.extend(cp.disks.iter().map(|f| f.frozen.clone()));
    }
    files.sort();
    files.dedup();
    files
}

/// Every VHDX file under `dir`, wherever it is: what must equal the files the tree names.
pub fn vhdx_on_disk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .is_some_and(|x| x == "vhdx" || x == "avhdx")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

pub fn all_check_clean(d: &Daemon, files: &[PathBuf]) {
    for f in files {
        assert!(f.exists(), "{} is gone", f.display());
        d.ok(&["disk", "check", f.to_str().unwrap()]);
    }
}
