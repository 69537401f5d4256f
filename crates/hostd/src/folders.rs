//! The state directory's files: private directories (0700), the per-VM folder `vms/<id>/`, and
//! the cleanup of folders whose VM never committed (a crash between the folder and the commit,
//! or after a remove's commit). The rule: a VM exists iff its row exists; a folder alone is
//! debris and is removed at open.

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{io, StoreError};

/// Creates `dir` (and parents) if missing and makes it owner-only.
pub fn ensure_private_dir(dir: &Path) -> Result<(), StoreError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

pub fn vm_dir(vms_dir: &Path, id: Uuid) -> PathBuf {
    vms_dir.join(id.to_string())
}

/// Creates the VM's folder and makes its directory entry durable (fsync of `vms/`), so a
/// committed row never outlives its folder.
pub fn create_vm_dir(vms_dir: &Path, id: Uuid) -> Result<PathBuf, StoreError> {
    let dir = vm_dir(vms_dir, id);
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io(&dir))?;
    File::open(vms_dir)
        .and_then(|d| d.sync_all())
        .map_err(io(vms_dir))?;
    Ok(dir)
}

/// Removes the VM's folder; a failure is logged, the folder is then debris for the next open.
pub fn remove_vm_dir(vms_dir: &Path, id: Uuid) {
    let dir = vm_dir(vms_dir, id);
    if let Err(e) = fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove VM folder");
        }
    }
}

/// Removes every `vms/<uuid>/` whose id is not in `known`; leaves (and reports) anything that is
/// not named like a VM folder. Returns the ids removed.
pub fn remove_orphans(vms_dir: &Path, known: &HashSet<Uuid>) -> Result<Vec<Uuid>, StoreError> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(vms_dir).map_err(io(vms_dir))? {
        let entry = entry.map_err(io(vms_dir))?;
        let path = entry.path();
        let id = entry
            .file_name()
            .to_str()
            .and_then(|n| Uuid::parse_str(n).ok());
        match id {
            Some(id) if known.contains(&id) => {}
            Some(id) if path.is_dir() => {
                tracing::warn!(dir = %path.display(), "removing the folder of a VM that was never committed");
                fs::remove_dir_all(&path).map_err(io(&path))?;
                removed.push(id);
            }
            _ => {
                tracing::warn!(path = %path.display(), "unexpected entry in the VM folders; left alone")
            }
        }
    }
    Ok(removed)
}
