//! Advisory whole-file locks, so two writers (or a writer and a reader that would see metadata
//! mid-update) never have the same disk image open: read-write opens take an exclusive lock,
//! read-only opens (and parents of differencing disks) a shared one. Raw files and VHDX use the
//! same locks.
//!
//! Open-file-description locks (`F_OFD_SETLK`) are used rather than classic POSIX locks: they
//! belong to the open file, not the process, so two opens inside one process conflict too, and
//! closing some other descriptor of the same file never drops them. They are released when the
//! file is closed, including when the process dies. QEMU takes OFD locks on bytes of the same
//! file, so a whole-file lock here also keeps QEMU and Vireo from writing one image at once.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::BlockError;

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open (in this or another process) holds a conflicting lock.
    #[error("{}", crate::locked_message(path, *wanted))]
    Locked {
        path: std::path::PathBuf,
        wanted: LockKind,
    },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl From<LockError> for BlockError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Locked { path, wanted } => BlockError::Locked { path, wanted },
            LockError::Io(e) => BlockError::Io(e),
        }
    }
}

/// How long a conflicting lock may persist before the open gives up (doubling waits from
/// 1 ms, about half a second in all).
const CONFLICT_PATIENCE: std::time::Duration = std::time::Duration::from_millis(300);

/// Which lock an open takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Many readers at once; no writer.
    Shared,
    /// This open is the only one.
    Exclusive,
}

/// QEMU's lock protocol (file-posix.c): a read lock on byte 100 + perm means "I use perm", on
/// 200 + perm "I do not share perm"; before opening, QEMU probes the bytes that would conflict
/// with a write-lock test. Perms: 0 consistent read, 1 write, 3 resize.
const QEMU_USES: i64 = 100;
const QEMU_UNSHARES: i64 = 200;
const PERM_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

/// Takes `kind` on `file` (waiting only a moment). Another open holding a conflicting lock
/// (ours or QEMU's) gives [`LockError::Locked`]; filesystems without lock support are used unlocked (as
/// QEMU does).
///
/// Exclusive is a write lock on the whole file: it conflicts with every lock anyone holds, and
/// QEMU sees it as every permission used and unshared. Shared speaks QEMU's protocol as a
/// reader: "uses consistent read, shares neither write nor resize" (read locks on bytes 100,
/// 201, 203), after checking that nobody uses write or resize (bytes 101, 103). So our readers
/// and QEMU's readers coexist, and a writer of either kind is refused or refuses.
pub fn lock(file: &File, path: &Path, kind: LockKind) -> Result<(), LockError> {
    // (start, len); len 0 = to the end of the file, however long it grows.
    let (ranges, probes): (&[(i64, i64)], &[i64]) = match kind {
        LockKind::Exclusive => (&[(0, 0)], &[]),
        LockKind::Shared => (
            &[
                (QEMU_USES + PERM_READ, 1),
                (QEMU_UNSHARES + PERM_WRITE, 1),
                (QEMU_UNSHARES + PERM_RESIZE, 1),
            ],
            &[QEMU_USES + PERM_WRITE, QEMU_USES + PERM_RESIZE],
        ),
    };
    let ltype = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    // A conflict is retried for a moment before it counts: a lock whose file was just closed
    // lives on in any child process forked meanwhile (by any thread) until that child execs,
    // and such a false conflict lasts milliseconds where a real holder stays.
    let mut backoff = std::time::Duration::from_millis(1);
    loop {
        let attempt = ranges
            .iter()
            .try_for_each(|&(start, len)| fcntl_lock(file, libc::F_OFD_SETLK, ltype, start, len))
            // Locks first, probes second: a QEMU writer starting in between finds ours.
            .and_then(|()| {
                probes.iter().try_for_each(|&byte| {
                    fcntl_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte, 1)
                })
            });
        let Err(err) = attempt else {
            return Ok(());
        };
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) if backoff < CONFLICT_PATIENCE => {
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            Some(libc::EAGAIN) | Some(libc::EACCES) => {
                return Err(LockError::Locked {
                    path: path.to_path_buf(),
                    wanted: kind,
                })
            }
            // No lock support here (some network or FUSE filesystems): go on unlocked.
            Some(libc::ENOLCK) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => return Ok(()),
            _ => return Err(err.into()),
        }
    }
}

/// Drops every lock this open file description holds on `file` (never waits).
pub fn unlock(file: &File) -> io::Result<()> {
    set_now(file, libc::F_UNLCK, 0, 0)
}

/// Turns an exclusive lock held through `file` into a read lock on the whole file minus the
/// bytes whose holders a [`LockKind::Shared`] open refuses ("uses write", "uses resize"), so
/// another open of ours can take its shared lock next to it while writers stay out. Used to
/// hand a file back from a temporary read-write open to a reader without a moment unlocked.
pub fn downgrade_for_handover(file: &File) -> io::Result<()> {
    set_now(file, libc::F_RDLCK, 0, 0)?;
    set_now(
        file,
        libc::F_UNLCK,
        QEMU_USES + PERM_WRITE,
        PERM_RESIZE - PERM_WRITE + 1,
    )
}

/// A lock change that cannot conflict (dropping or downgrading what this open holds); no
/// lock support means the file was used unlocked in the first place.
fn set_now(file: &File, ltype: libc::c_int, start: i64, len: i64) -> io::Result<()> {
    match fcntl_lock(file, libc::F_OFD_SETLK, ltype, start, len) {
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOLCK) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// One OFD lock call on `start..start+len`. For `F_OFD_GETLK`, a conflicting lock held by
/// another open is reported as `EAGAIN`, like a refused `F_OFD_SETLK`.
fn fcntl_lock(
    file: &File,
    cmd: libc::c_int,
    ltype: libc::c_int,
    start: i64,
    len: i64,
) -> io::Result<()> {
    // SAFETY: an all-zero flock is a valid value; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ltype as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    // l_pid stays 0, as OFD locks require.
    loop {
        // SAFETY: fcntl on a descriptor we own with a pointer to a live, initialised flock.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
        if rc == 0 {
            if cmd == libc::F_OFD_GETLK && fl.l_type != libc::F_UNLCK as libc::c_short {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}
