//! Writing a new image file so that it never looks complete before it is.
//!
//! Every command that makes a new file (create, convert) builds it under a temporary name in the
//! destination's directory (`.NAME.vireo-tmp-PID`), flushes it, and only then renames it to
//! `NAME` — without replacing anything that appeared there meanwhile — and syncs the directory.
//! A crash, an error, Ctrl-C or a second Ctrl-C (`process::exit`) therefore leaves either no
//! `NAME` at all or the finished image: an empty-but-valid-looking disk can no longer pass for
//! a converted one. The temporary file is removed on error and on drop; a process that is killed
//! outright (SIGKILL) may leave it behind, under its temporary name only.
//!
//! Pending temporary files are also listed process-wide, so a signal handler that must exit at
//! once can remove them first ([`remove_pending`]).

use parking_lot::{Mutex, MutexGuard};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a new file could not be started or put in place. Each names the path and the way out.
#[derive(Debug, thiserror::Error)]
pub enum NewFileError {
    #[error("{0} already exists; choose another path or delete it first")]
    Exists(PathBuf),
    #[error("directory {0} does not exist; create it first (mkdir -p) or choose another path")]
    NoDirectory(PathBuf),
    #[error("{0} is not a directory, so {1} cannot be created in it")]
    NotADirectory(PathBuf, PathBuf),
    #[error("cannot create {path}: {source}; check the directory's permissions and free space")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Numbers temporary names so that each [`NewFile::begin`] in this process gets its own.
static SERIAL: AtomicU64 = AtomicU64::new(0);

/// Temporary files in progress in this process (see [`remove_pending`]).
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    PENDING.lock()
}

/// Removes every temporary file still being written by this process. For a signal handler that
/// is about to `exit` without unwinding; the writers may go on writing to the unlinked files.
pub fn remove_pending() {
    for p in pending().drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// A new file being built under a temporary name; see the module docs.
#[derive(Debug)]
pub struct NewFile {
    dst: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl NewFile {
    /// Checks that `dst` can be created (it does not exist; its directory does) and picks the
    /// temporary name. Nothing is created yet: the caller creates [`NewFile::temp_path`].
    pub fn begin(dst: &Path) -> Result<NewFile, NewFileError> {
        if dst.symlink_metadata().is_ok() {
            return Err(NewFileError::Exists(dst.to_path_buf()));
        }
        let dir = match dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(NewFileError::NotADirectory(dir, dst.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NewFileError::NoDirectory(dir))
            }
            Err(source) => {
                return Err(NewFileError::Io {
                    path: dst.to_path_buf(),
                    source,
                })
            }
        }
        let name = dst.file_name().ok_or_else(|| NewFileError::Io {
            path: dst.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
        })?;
        // Unique in this process (two new files of the same name at once never share one) and
        // never an existing file: one left by a killed process with the same PID is skipped,
        // not reused, and the caller creates it with `create_new`.
        let tmp = loop {
            let n = SERIAL.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".vireo-tmp-{}", std::process::id()));
            if n > 0 {
                tmp_name.push(format!("-{n}"));
            }
            let tmp = dir.join(tmp_name);
            if tmp.symlink_metadata().is_err() {
                break tmp;
            }
        };
        pending().push(tmp.clone());
        Ok(NewFile {
            dst: dst.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// Where to build the file.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// The name the file gets when it is complete.
    pub fn path(&self) -> &Path {
        &self.dst
    }

    /// Puts the finished file in place. The caller has flushed and closed it; this makes the
    /// data durable, renames without replacing, and makes the rename durable.
    pub fn commit(mut self) -> Result<(), NewFileError> {
        let io_err = |source| NewFileError::Io {
            path: self.dst.clone(),
            source,
        };
        File::open(&self.tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err)?;
        rename_no_replace(&self.tmp, &self.dst).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                NewFileError::Exists(self.dst.clone())
            } else {
                io_err(e)
            }
        })?;
        self.committed = true;
        pending().retain(|p| p != &self.tmp);
        let dir = match self.dst.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            pending().retain(|p| p != &self.tmp);
        }
    }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `rename(from, to)` that fails with `AlreadyExists` instead of replacing `to`: a file that
/// appeared at `to` after we checked is never overwritten.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (cstring(from)?, cstring(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call; AT_FDCWD makes them
    // relative to the working directory, as std's rename does.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE: a hard link also refuses an existing target.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `remove_pending` is process-wide: these tests must not run it under each other.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    #[test]
    fn commit_moves_into_place_and_never_replaces() {
        let _serial = ONE_AT_A_TIME.lock();
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("a.img");
        let nf = NewFile::begin(&dst).unwrap();
        std::fs::write(nf.temp_path(), b"new").unwrap();
        std::fs::write(&dst, b"racing").unwrap();
        assert!(matches!(nf.commit(), Err(NewFileError::Exists(_))));
        assert_eq!(std::fs::read(&dst).unwrap(), b"racing");
        // The failed commit dropped the temporary file.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

        let dst = tmp.path().join("b.img");
        let nf = NewFile::begin(&dst).unwrap();
        std::fs::write(nf.temp_path(), b"done").unwrap();
        assert!(!dst.exists(), "visible before commit");
        nf.commit().unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"done");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 2);
    }

    #[test]
    fn dropped_or_abandoned_files_leave_nothing() {
        let _serial = ONE_AT_A_TIME.lock();
        let tmp = tempfile::tempdir().unwrap();
        let nf = NewFile::begin(&tmp.path().join("c.img")).unwrap();
        std::fs::write(nf.temp_path(), b"partial").unwrap();
        drop(nf);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

        let nf = NewFile::begin(&tmp.path().join("d.img")).unwrap();
        std::fs::write(nf.temp_path(), b"partial").unwrap();
        remove_pending();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
        std::mem::forget(nf);
    }

    #[test]
    fn two_new_files_of_one_name_never_share_a_temporary_file() {
        let _serial = ONE_AT_A_TIME.lock();
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("e.img");
        let (a, b) = (NewFile::begin(&dst).unwrap(), NewFile::begin(&dst).unwrap());
        assert_ne!(a.temp_path(), b.temp_path());
        std::fs::write(a.temp_path(), b"a").unwrap();
        // A stale file under the next name (a killed process with our PID) is not reused.
        let stale = tmp.path().join(format!(
            ".e.img.vireo-tmp-{}-{}",
            std::process::id(),
            SERIAL.load(Ordering::Relaxed)
        ));
        std::fs::write(&stale, b"stale").unwrap();
        let c = NewFile::begin(&dst).unwrap();
        assert_ne!(c.temp_path(), stale);
        assert_eq!(std::fs::read(&stale).unwrap(), b"stale");
        std::fs::write(b.temp_path(), b"b").unwrap();
        b.commit().unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"b");
        assert!(matches!(a.commit(), Err(NewFileError::Exists(_))));
        drop(c);
    }

    #[test]
    fn begin_names_what_is_wrong() {
        let _serial = ONE_AT_A_TIME.lock();
        let tmp = tempfile::tempdir().unwrap();
        let e = NewFile::begin(&tmp.path().join("no/such/x.vhdx")).unwrap_err();
        assert!(e.to_string().contains("no/such"), "{e}");
        std::fs::write(tmp.path().join("f"), b"").unwrap();
        assert!(matches!(
            NewFile::begin(&tmp.path().join("f")),
            Err(NewFileError::Exists(_))
        ));
        assert!(matches!(
            NewFile::begin(&tmp.path().join("f/x.vhdx")),
            Err(NewFileError::NotADirectory(..))
        ));
    }
}
