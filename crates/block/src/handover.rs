//! Moving a disk's open, locked file between processes without a moment unlocked
//! (docs/vm-state.md, "Disk locks across a save").
//!
//! OFD locks (`lock.rs`) belong to the open file description, and every descriptor of it, in
//! any process, keeps them. So a lock moves by moving descriptors: the saving worker sends its
//! disks' descriptors to vireod over its unix socket (SCM_RIGHTS, [`send_line_with_files`] /
//! [`recv_line_with_files`]), vireod keeps them while the VM is saved, and the restoring worker
//! inherits them and takes them over by number ([`claim_inherited`]).
//!
//! Every received or claimed descriptor is close-on-exec at once (`MSG_CMSG_CLOEXEC` on
//! receipt): a multi-threaded daemon forks children all the time, and a descriptor that leaked
//! into one would keep the disk locked for that child's whole life.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The most descriptors one message carries (a VM has at most a handful of disks).
pub const MAX_FILES: usize = 32;

/// Why an inherited descriptor cannot be taken as a disk's file.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("descriptor {fd} named for disk {} is not open in this process", path.display())]
    NotOpen { fd: RawFd, path: PathBuf },
    #[error(
        "descriptor {fd} named for disk {} is another file (the disk was replaced or renamed \
         since it was locked)",
        path.display()
    )]
    OtherFile { fd: RawFd, path: PathBuf },
    #[error("descriptor {fd} for disk {} is open read-only but the disk is read-write", path.display())]
    ReadOnly { fd: RawFd, path: PathBuf },
    #[error("checking descriptor {fd} against disk {}: {source}", path.display())]
    Io {
        fd: RawFd,
        path: PathBuf,
        source: io::Error,
    },
}

/// Writes `line` on `sock` with `files` attached to its first byte (the receiver gets them
/// with whatever read returns that byte).
pub fn send_line_with_files(sock: &UnixStream, line: &[u8], files: &[File]) -> io::Result<()> {
    if files.len() > MAX_FILES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message; at most {MAX_FILES}",
                files.len()
            ),
        ));
    }
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FILES))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other(
            "descriptors do not fit the control buffer",
        ));
    }
    let sent = loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(line)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    // The descriptors went with the first byte; the rest is plain data.
    (&*sock).write_all(&line[sent..])
}

/// Reads one line (up to and including `\n`, at most `max` bytes) from `sock`, with the
/// descriptors sent along with it, each close-on-exec.
pub fn recv_line_with_files(sock: &UnixStream, max: usize) -> io::Result<(Vec<u8>, Vec<File>)> {
    let mut line = Vec::new();
    let mut files = Vec::new();
    let mut chunk = [0u8; 4096];
    while !line.ends_with(b"\n") {
        if line.len() >= max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply longer than {max} bytes"),
            ));
        }
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FILES))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = loop {
            match rustix::net::recvmsg(
                sock,
                &mut [IoSliceMut::new(&mut chunk)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r?,
            }
        };
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                files.extend(fds.map(File::from));
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_FILES} descriptors came with the reply"),
            ));
        }
        if got.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before a full reply",
            ));
        }
        line.extend_from_slice(&chunk[..got.bytes]);
    }
    Ok((line, files))
}

/// `file` is the file `path` names now (same device and inode).
pub fn is_same_file(file: &File, path: &Path) -> io::Result<bool> {
    let (a, b) = (file.metadata()?, std::fs::metadata(path)?);
    Ok((a.dev(), a.ino()) == (b.dev(), b.ino()))
}

/// Takes descriptor `fd`, inherited from the parent for disk `path`, as this process's own
/// file (close-on-exec from now on). It must be open, be the file `path` names, and be
/// writable unless `read_only`; otherwise it is left alone and the error says which.
///
/// The caller names each descriptor once: taking one twice would close it twice.
pub fn claim_inherited(fd: RawFd, path: &Path, read_only: bool) -> Result<File, HandoverError> {
    let io_err = |source| HandoverError::Io {
        fd,
        path: path.to_path_buf(),
        source,
    };
    // stdin/stdout/stderr are never a disk; anything negative is not a descriptor.
    if fd <= 2 {
        return Err(HandoverError::NotOpen {
            fd,
            path: path.to_path_buf(),
        });
    }
    // SAFETY: F_GETFD reads one entry of the descriptor table and touches no memory; a
    // descriptor that is not open gives EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(HandoverError::NotOpen {
            fd,
            path: path.to_path_buf(),
        });
    }
    // SAFETY: `fd` is open (checked just above) and is only borrowed for the checks below,
    // which end before anything in this function could close it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let held = rustix::fs::fstat(borrowed).map_err(|e| io_err(e.into()))?;
    let named = std::fs::metadata(path).map_err(io_err)?;
    if (held.st_dev, held.st_ino) != (named.dev(), named.ino()) {
        return Err(HandoverError::OtherFile {
            fd,
            path: path.to_path_buf(),
        });
    }
    let mode = rustix::fs::fcntl_getfl(borrowed).map_err(|e| io_err(e.into()))?;
    if !read_only && (mode & rustix::fs::OFlags::RWMODE) != rustix::fs::OFlags::RDWR {
        return Err(HandoverError::ReadOnly {
            fd,
            path: path.to_path_buf(),
        });
    }
    // SAFETY: the parent gave this descriptor to this process for this disk alone (the caller
    // names each once), and it is the disk's file (checked): nothing else here owns it, so
    // closing it when the File drops is right.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| io_err(e.into()))?;
    Ok(File::from(owned))
}

/// The processes holding a lock on the file `path` names, with their command names (for an
/// error message: "locked by pid 1234 (qemu-system-x86)"). Empty when none is found.
///
/// /proc/locks shows OFD locks with pid -1, so this looks the other way round: every open
/// descriptor of every process that names the file and whose fdinfo lists a lock. Only for
/// error paths: it reads the whole descriptor table of the host.
pub fn lock_holders(path: &Path) -> Vec<(u32, String)> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| holds_lock_on(pid, meta.dev(), meta.ino()))
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_string())
        })
        .collect()
}

/// `pid` has a descriptor of device `dev`, inode `ino` that holds a lock (its fdinfo has a
/// `lock:` line; a process that only waits for one has none).
fn holds_lock_on(pid: u32, dev: u64, ino: u64) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let same = std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == (dev, ino));
        same && std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .is_ok_and(|info| info.lines().any(|l| l.starts_with("lock:")))
    })
}

/// "pid 1234 (qemu-system-x86), pid 99 (vireo-vm)" for an error message; `None` when no
/// holder was found.
pub fn describe_holders(path: &Path) -> Option<String> {
    let holders = lock_holders(path);
    (!holders.is_empty()).then(|| {
        holders
            .iter()
            .map(|(pid, comm)| format!("pid {pid} ({comm})"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_lock_travels_with_its_descriptor_and_stays_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        crate::lock(&file, &path, crate::LockKind::Exclusive).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_line_with_files(&a, b"{\"reply\":\"ok\"}\n", &[file]).unwrap();
        let (line, mut files) = recv_line_with_files(&b, 1 << 16).unwrap();
        assert_eq!(line, b"{\"reply\":\"ok\"}\n");
        assert_eq!(files.len(), 1);
        let got = files.pop().unwrap();
        assert!(is_same_file(&got, &path).unwrap());
        // SAFETY-free check: the received descriptor is close-on-exec.
        let flags = rustix::io::fcntl_getfd(&got).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // The sender's descriptor is closed; the lock lives on in the received one.
        let other = std::fs::File::open(&path).unwrap();
        assert!(crate::lock(&other, &path, crate::LockKind::Shared).is_err());
        // Taking the lock again on the same open file is how a receiver proves it holds it.
        crate::lock(&got, &path, crate::LockKind::Exclusive).unwrap();
        drop(got);
        crate::lock(&other, &path, crate::LockKind::Shared).unwrap();
    }

    #[test]
    fn claim_refuses_closed_foreign_and_read_only_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let elsewhere = dir.path().join("other.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        std::fs::write(&elsewhere, [0u8; 512]).unwrap();
        assert!(matches!(
            claim_inherited(1, &path, false),
            Err(HandoverError::NotOpen { .. })
        ));
        let other = File::open(&elsewhere).unwrap();
        let e = claim_inherited(other.as_raw_fd(), &path, true).unwrap_err();
        assert!(matches!(e, HandoverError::OtherFile { .. }), "{e}");
        let ro = File::open(&path).unwrap();
        let e = claim_inherited(ro.as_raw_fd(), &path, false).unwrap_err();
        assert!(e.to_string().contains("open read-only"), "{e}");
        // Claimed: the descriptor now belongs to the returned File (`ro` gives it up).
        let fd = std::os::fd::IntoRawFd::into_raw_fd(ro);
        let claimed = claim_inherited(fd, &path, true).unwrap();
        assert!(is_same_file(&claimed, &path).unwrap());
    }

    #[test]
    fn lock_holders_names_this_process_for_its_own_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        crate::lock(&f, &path, crate::LockKind::Exclusive).unwrap();
        let holders = lock_holders(&path);
        assert!(
            holders.iter().any(|(pid, _)| *pid == std::process::id()),
            "{holders:?}"
        );
        drop(f);
        let f = File::open(&path).unwrap();
        assert!(
            lock_holders(&path).is_empty(),
            "open but unlocked is no holder"
        );
        drop(f);
    }
}
