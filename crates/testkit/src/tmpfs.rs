//! A small tmpfs mounted for a test (root only), to run a directory out of space.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Unmounted (lazily) when dropped, also when the test fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `16M`) on `dir`, creating it; `None`
    /// when the mount fails (not root).
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Tmpfs(dir.to_owned()))
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
