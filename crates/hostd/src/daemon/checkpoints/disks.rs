//! The disk files of checkpoints, through the vhdx crate: which disks can be checkpointed, a
//! file's parent, new differencing children, the offline merge. Blocking I/O: callers run it
//! on a blocking thread.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use vireo_api::{DiskSpec, VmSpec};
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

/// The disks a checkpoint differences: the read-write ones (a read-only disk never changes,
/// so it stays as it is in every checkpoint). Refuses a VM with a read-write disk that is not
/// a VHDX, naming it: a raw or VHD file cannot have a VHDX differencing child.
pub fn checkpointed(spec: &VmSpec) -> Result<Vec<&DiskSpec>, String> {
    let mut out = Vec::new();
    for d in spec.disks.iter().filter(|d| !d.read_only) {
        if !is_vhdx(&d.path) {
            return Err(format!(
                "disk {} is not a VHDX image: checkpoints need VHDX disks (a raw or VHD file \
                 cannot have a differencing child); convert it with `vireo disk convert {} \
                 NEW.vhdx` and put that in the VM, or attach it read-only",
                d.path.display(),
                d.path.display()
            ));
        }
        if d.serial.is_none() {
            return Err(format!("disk {} has no serial", d.path.display()));
        }
        out.push(d);
    }
    Ok(out)
}

/// The file starts with the VHDX signature (read without a lock: a running VM holds one).
pub fn is_vhdx(path: &Path) -> bool {
    let mut sig = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut sig))
        .is_ok()
        && &sig == b"vhdxfile"
}

/// The file `path` is a differencing child of, if any.
pub fn parent_of(path: &Path) -> Result<Option<PathBuf>, String> {
    let v = Vhdx::open(path, &OpenOptions::read_only())
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    Ok(v.info().parent.map(|p| p.path))
}

/// [`parent_of`] for a file a worker has open read-write (locked): its header is read
/// without a lock (the parent locator does not change while the VM runs).
pub fn parent_of_in_use(path: &Path) -> Result<Option<PathBuf>, String> {
    let opts = OpenOptions {
        no_lock: true,
        ..OpenOptions::read_only()
    };
    let v = Vhdx::open(path, &opts).map_err(|e| format!("opening {}: {e}", path.display()))?;
    Ok(v.info().parent.map(|p| p.path))
}

/// Creates `child`, a differencing VHDX of `parent` (complete on disk or absent).
pub fn make_child(parent: &Path, child: &Path) -> Result<(), String> {
    if let Some(dir) = child.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let opts = CreateOptions {
        disk_type: DiskType::Differencing,
        parent: Some(parent.to_path_buf()),
        ..CreateOptions::default()
    };
    let v = Vhdx::create(child, &opts)
        .map_err(|e| format!("creating the differencing disk {}: {e}", child.display()))?;
    v.flush()
        .map_err(|e| format!("flushing {}: {e}", child.display()))?;
    Ok(())
}

/// Merges `top` into its parent with no VM using them (resumes an interrupted merge).
pub fn merge_offline(top: &Path) -> Result<(), String> {
    Vhdx::merge_into_parent(top, &|_, _| {}, &AtomicBool::new(false))
        .map_err(|e| format!("merging {} into its parent: {e}", top.display()))
}

/// Removes a file or folder vireod made; gone already is fine.
pub fn remove(path: &Path) {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Ok(()) => tracing::info!("removed {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
    }
}

/// Links (or copies, across file systems) a save's files (`store::SAVED_FILES`: working set,
/// checksum table, `memory.bin`, then `vm.state`) from `from` into `to`: the state file last,
/// so a folder with a state file is complete. The optional ones are skipped when missing.
pub fn link_state(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    for name in crate::store::SAVED_FILES {
        let (src, dst) = (from.join(name), to.join(name));
        let _ = std::fs::remove_file(&dst);
        if crate::store::saved_file_optional(name) && !src.exists() {
            continue;
        }
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)
                .map_err(|e| format!("copying {} to {}: {e}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}
