//! `vm.json`, the manifest of an exported VM folder (docs/export.md): versioned, written last
//! (temp file, fsync, rename), so a folder with a manifest is complete. Every file it names is
//! a path relative to the folder, with its size, checked before an import trusts it.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_api::{VmIdentity, VmSpec};

pub const MANIFEST: &str = "vm.json";
/// The one format version this vireod writes and reads.
pub const FORMAT_VERSION: u32 = 1;
pub const FORMAT_NAME: &str = "vireo-vm-export";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Unix time, milliseconds.
    pub exported_at: i64,
    /// The VM as it was stored; its file paths are the exporting host's (informational).
    pub spec: VmSpec,
    pub identity: VmIdentity,
    /// `off` or `saved`.
    pub state: String,
    pub kernel: FileEntry,
    #[serde(default)]
    pub initrd: Option<FileEntry>,
    /// One per spec disk, in spec order.
    pub disks: Vec<DiskEntry>,
    /// The saved state (`saved/memory.bin`, `saved/vm.state`) when `state` is `saved`.
    #[serde(default)]
    pub saved: Vec<FileEntry>,
    /// Reserved for checkpoints (not built yet): always empty in version 1.
    #[serde(default)]
    pub checkpoints: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskEntry {
    /// The disk's chain, the file the VM opens first, then its parent, and so on.
    pub chain: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the export folder.
    pub path: PathBuf,
    pub size: u64,
}

impl Manifest {
    /// Every file the manifest names.
    pub fn files(&self) -> impl Iterator<Item = &FileEntry> {
        std::iter::once(&self.kernel)
            .chain(&self.initrd)
            .chain(self.disks.iter().flat_map(|d| &d.chain))
            .chain(&self.saved)
    }

    /// Reads `dir/vm.json`: a problem (missing, unreadable, foreign, too new, a path that
    /// leaves the folder) is one line naming the file.
    pub fn read(dir: &Path) -> Result<Manifest, String> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read(&path).map_err(|e| {
            format!(
                "{}: {e}; is {} an exported VM folder (vireo vm export)?",
                path.display(),
                dir.display()
            )
        })?;
        let head: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| format!("{}: not JSON ({e})", path.display()))?;
        if head["format"] != FORMAT_NAME {
            return Err(format!(
                "{}: not a Vireo VM export (format {})",
                path.display(),
                head["format"]
            ));
        }
        let version = head["version"].as_u64().unwrap_or(0);
        if version != FORMAT_VERSION as u64 {
            return Err(format!(
                "{}: export format version {version}; this vireod reads version {FORMAT_VERSION}: \
                 import it with the Vireo that exported it, or a newer one",
                path.display()
            ));
        }
        let m: Manifest =
            serde_json::from_value(head).map_err(|e| format!("{}: {e}", path.display()))?;
        for f in m.files() {
            let inside = f
                .path
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
            if !inside || f.path.as_os_str().is_empty() {
                return Err(format!(
                    "{}: file {} is not a path inside the folder",
                    path.display(),
                    f.path.display()
                ));
            }
        }
        Ok(m)
    }
}
