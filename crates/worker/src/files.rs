//! The worker's files in its VM folder: the sockets it listens on and `exit.json`.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use vireo_api::worker::{WorkerExit, WorkerExitReason};

use crate::error::WorkerError;

/// Listens on `path` with mode 0600 (only vireod's user may attach to the console or drive the
/// worker). A stale socket left by a killed worker is replaced; a socket somebody listens on,
/// or a file of another kind, is refused and left alone.
pub fn bind_private(path: &Path) -> Result<UnixListener, WorkerError> {
    let err = |source| WorkerError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(WorkerError::SocketInTheWay {
                path: path.to_path_buf(),
            });
        }
        if UnixStream::connect(path).is_ok() {
            return Err(WorkerError::SocketInUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // Between bind and chmod the socket has the umask's mode; vireod keeps the VM folder
    // itself private, so nobody else can reach it in that window.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Removes a socket this worker created (nothing else of that name).
pub fn remove_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Writes `<dir>/exit.json` atomically: a reader sees the whole record or none, also after a
/// host crash (file and folder are synced before and after the rename).
pub fn write_exit(dir: &Path, reason: WorkerExitReason) -> std::io::Result<()> {
    let record = WorkerExit {
        pid: std::process::id(),
        reason,
        at: crate::unix_millis(),
    };
    let tmp = dir.join(".exit.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, &record)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(crate::EXIT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}
