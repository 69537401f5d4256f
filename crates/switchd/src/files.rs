//! The switch's sockets: `switch.sock` for vireod and one vhost-user socket per VM NIC port.
//! Both are private (0600: only vireod's user may drive the switch or plug a VM into it), both
//! replace a stale socket a killed switch left behind, and neither ever replaces a file of
//! another kind or a socket some process still listens on.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::error::SwitchdError;

/// Makes way for a new socket at `path`: nothing there, or a stale socket (removed). A file of
/// another kind, or a socket somebody listens on, is refused and left alone.
pub fn clear_stale(path: &Path) -> Result<(), SwitchdError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(SwitchdError::SocketInTheWay {
            path: path.to_path_buf(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(SwitchdError::SocketInUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|source| SwitchdError::Socket {
        path: path.to_path_buf(),
        source,
    })
}

/// Owner-only access to a socket just bound. Between bind and chmod the socket has the umask's
/// mode; vireod keeps the switch's folder private, so nobody else can reach it in that window.
pub fn make_private(path: &Path) -> Result<(), SwitchdError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        SwitchdError::Socket {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Listens on `path` with mode 0600 (see [`clear_stale`] for what may be in the way).
pub fn bind_private(path: &Path) -> Result<UnixListener, SwitchdError> {
    clear_stale(path)?;
    let listener = UnixListener::bind(path).map_err(|source| SwitchdError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    make_private(path)?;
    Ok(listener)
}

/// Removes a socket this process created (nothing else of that name).
pub fn remove_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_go_live_ones_and_other_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            bind_private(&file),
            Err(SwitchdError::SocketInTheWay { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let sock = dir.path().join("s.sock");
        let live = bind_private(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            bind_private(&sock),
            Err(SwitchdError::SocketInUse { .. })
        ));
        drop(live);
        // The listener is gone but its file stays: stale, so it is replaced.
        let _again = bind_private(&sock).unwrap();
        remove_socket(&sock);
        assert!(!sock.exists());
        remove_socket(&file);
        assert!(file.exists(), "only sockets are removed");
    }
}
