//! `vm.json`, the manifest of an exported VM folder (docs/export.md): versioned, written last
//! (temp file, fsync, rename), so a folder with a manifest is complete. Every file it names is
//! a path relative to the folder, with its size, checked before an import trusts it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vireo_api::{VmIdentity, VmSpec};

use super::tree_manifest::{self, CheckpointEntry, TopEntry, TreeFileEntry};

pub const MANIFEST: &str = "vm.json";
/// The newest format version this vireod writes and reads: 2 carries the checkpoint tree.
pub const FORMAT_VERSION: u32 = 2;
/// The version written when the VM has no checkpoints (older vireods read it too).
pub const FORMAT_VERSION_PLAIN: u32 = 1;
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
    /// Version 2: the VM's checkpoints (always empty in version 1).
    #[serde(default)]
    pub checkpoints: Vec<CheckpointEntry>,
    /// Version 2: every disk file of the checkpoint tree, once (the VM's chains among them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tree: Vec<TreeFileEntry>,
    /// Version 2: each checkpointed disk's running top and the frozen file under it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tops: Vec<TopEntry>,
    /// Version 2: boot files of checkpoints other than the VM's own kernel and initrd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskEntry {
    /// The disk's chain, the file the VM opens first, then its parent, and so on.
    pub chain: Vec<FileEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the export folder.
    pub path: PathBuf,
    pub size: u64,
}

impl Manifest {
    /// Every file the manifest names, each once (a tree's files are also the VM's chains).
    pub fn files(&self) -> Vec<FileEntry> {
        let tree = self.tree.iter().map(|f| FileEntry {
            path: f.path.clone(),
            size: f.size,
        });
        let states = self
            .checkpoints
            .iter()
            .flat_map(|c| c.state.iter().cloned());
        let mut seen = std::collections::BTreeSet::new();
        std::iter::once(&self.kernel)
            .chain(&self.initrd)
            .chain(&self.boot)
            .chain(self.disks.iter().flat_map(|d| &d.chain))
            .chain(&self.saved)
            .cloned()
            .chain(tree)
            .chain(states)
            .filter(|f| seen.insert(f.path.clone()))
            .collect()
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
        if version != FORMAT_VERSION_PLAIN as u64 && version != FORMAT_VERSION as u64 {
            return Err(format!(
                "{}: export format version {version}; this vireod reads versions \
                 {FORMAT_VERSION_PLAIN} and {FORMAT_VERSION}: import it with the Vireo that \
                 exported it, or a newer one",
                path.display()
            ));
        }
        let m: Manifest =
            serde_json::from_value(head).map_err(|e| format!("{}: {e}", path.display()))?;
        m.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(m)
    }

    /// The manifest's own consistency (no file system access): every path inside the folder,
    /// and the checkpoint tree whole (`tree_manifest::check`).
    pub fn check(&self) -> Result<(), String> {
        for f in self.files() {
            if !tree_manifest::inside(&f.path) {
                return Err(format!(
                    "file {} is not a path inside the folder",
                    f.path.display()
                ));
            }
        }
        let has_tree = !(self.checkpoints.is_empty() && self.tree.is_empty());
        if self.version == FORMAT_VERSION_PLAIN && has_tree {
            return Err("version 1 has no checkpoint tree, yet this one lists one".into());
        }
        tree_manifest::check(self)
    }
}
