//! Storage roots (`vireod --storage-root DIR`): the only places a VM's kernel, initrd and disks
//! may live. A client of the API must not make a worker (which runs as vireod's user) open
//! any file on the host, e.g. /etc/shadow as a raw disk. Paths are checked after resolving
//! symlinks and `..`, so a link inside a root that points outside is refused, and the spec is
//! stored with the resolved paths: what was checked is what the worker opens, even if the
//! link is later re-pointed.

use std::io;
use std::path::{Path, PathBuf};

use vireo_api::{ApiErrorCode, VmSpec};

use super::http_error::HttpError;

#[derive(Clone, Debug, Default)]
pub struct StorageRoots {
    /// Canonical directories; empty means no restriction (library callers, never vireod).
    roots: Vec<PathBuf>,
}

impl StorageRoots {
    /// Canonicalizes each root; a root that does not resolve is an error naming it.
    pub fn new(roots: &[PathBuf]) -> Result<StorageRoots, String> {
        let roots = roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r).map_err(|e| format!("--storage-root {}: {e}", r.display()))
            })
            .collect::<Result<_, _>>()?;
        Ok(StorageRoots { roots })
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `spec` with every file path resolved and inside a root, or 422 naming the path (and
    /// the roots). Relative paths are left for the spec's own validation to refuse.
    pub fn confine(&self, spec: &VmSpec) -> Result<VmSpec, HttpError> {
        if self.roots.is_empty() {
            return Ok(spec.clone());
        }
        let mut out = spec.clone();
        out.kernel = self.resolve("kernel", &spec.kernel)?;
        if let Some(initrd) = &spec.initrd {
            out.initrd = Some(self.resolve("initrd", initrd)?);
        }
        for (i, disk) in out.disks.iter_mut().enumerate() {
            disk.path = self.resolve(&format!("disks[{i}]"), &spec.disks[i].path)?;
        }
        Ok(out)
    }

    /// One path checked as `confine` checks a spec's (a disk added to an existing VM).
    pub fn confine_path(&self, field: &str, path: &Path) -> Result<PathBuf, HttpError> {
        if self.roots.is_empty() {
            return Ok(path.to_owned());
        }
        self.resolve(field, path)
    }

    fn resolve(&self, field: &str, path: &Path) -> Result<PathBuf, HttpError> {
        if !path.is_absolute() {
            return Ok(path.to_owned());
        }
        let real = std::fs::canonicalize(path).map_err(|e| {
            let why = if e.kind() == io::ErrorKind::NotFound {
                "no such file (it must exist before the VM is created)".to_string()
            } else {
                e.to_string()
            };
            invalid(format!("{field} {}: {why}", path.display()))
        })?;
        if self.roots.iter().any(|root| real.starts_with(root)) {
            return Ok(real);
        }
        let shown = if real == path {
            path.display().to_string()
        } else {
            format!("{} (which resolves to {})", path.display(), real.display())
        };
        Err(invalid(format!(
            "{field} {shown} is outside vireod's storage roots ({}); move it there or start \
             vireod with another --storage-root",
            self.roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_inside_and_refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let inside = root.path().join("k.elf");
        std::fs::write(&inside, b"k").unwrap();
        std::fs::write(outside.path().join("x"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("x"), root.path().join("link")).unwrap();
        let roots = StorageRoots::new(&[root.path().to_owned()]).unwrap();
        let real_root = std::fs::canonicalize(root.path()).unwrap();
        assert_eq!(
            roots.resolve("kernel", &inside).unwrap(),
            real_root.join("k.elf")
        );
        let dotdot = root.path().join("sub/../k.elf");
        assert!(
            roots.resolve("kernel", &dotdot).is_err(),
            "sub does not exist"
        );
        std::fs::create_dir(root.path().join("sub")).unwrap();
        assert_eq!(
            roots.resolve("kernel", &dotdot).unwrap(),
            real_root.join("k.elf")
        );
        let e = roots
            .resolve("disks[0]", &root.path().join("link"))
            .unwrap_err();
        assert_eq!(e.status.as_u16(), 422);
        assert!(e.body.message.contains("outside"), "{}", e.body.message);
        let e = roots
            .resolve("kernel", &root.path().join("none"))
            .unwrap_err();
        assert!(
            e.body.message.contains("no such file"),
            "{}",
            e.body.message
        );
    }
}
