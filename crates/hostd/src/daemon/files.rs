//! The supervisor's files in a VM folder (see `vireo_api::worker`): `spec.json` and
//! `worker.json` replaced atomically (temp file, rename) so a vireod that dies leaves the old
//! version or the new one; `exit.json` and `worker.log` read back. Other state vireod keeps in
//! files is also made durable (`write_json_atomic`: fsyncs of the file and its folder).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

pub const SPEC: &str = "spec.json";
pub const RECORD: &str = "worker.json";
pub const EXIT: &str = "exit.json";
pub const LOG: &str = "worker.log";
pub const SOCKET: &str = "worker.sock";

pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// `write_json_atomic` without the fsyncs, for files that only describe a running process (a
/// worker's launch spec and its pid record): a host that crashes takes the process with them,
/// so they need not survive it. Under a busy disk a migration's destination worker once took
/// 8.6 s to spawn (load 13), most likely in these fsyncs.
pub fn write_json_replace<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_json(path, value, false)
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_json(path, value, true)
}

/// Temp file, rename; `durable`: the file synced before the rename and its folder after.
fn write_json<T: Serialize>(path: &Path, value: &T, durable: bool) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    let text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    f.write_all(&text)?;
    if durable {
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let (true, Some(dir)) = (durable, path.parent()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `None` when missing; an unreadable or malformed file is logged and also `None` (it cannot
/// be trusted either way).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "unreadable");
            return None;
        }
    };
    match serde_json::from_slice(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "malformed");
            None
        }
    }
}

pub fn remove(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "could not remove");
        }
    }
}

/// The last non-empty line of `worker.log` (from its last 4 KiB) that is not a routine log
/// record (tracing's INFO/DEBUG/TRACE: a boot narrative explains no death), at most 300 bytes,
/// control characters (terminal escapes) dropped: it ends up in a VM's reason, shown by every
/// client. Warnings, errors and panic messages qualify.
pub fn last_log_line(dir: &Path) -> Option<String> {
    let mut f = File::open(dir.join(LOG)).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let text = String::from_utf8_lossy(&tail);
    let clean: Vec<String> = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect())
        .collect();
    let line = clean
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty() && !is_routine(l))?;
    let mut end = line.len().min(300);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    Some(line[..end].to_owned())
}

/// `2026-12-04T17:49:05.631536Z  INFO target: message` and the like.
fn is_routine(line: &str) -> bool {
    matches!(
        line.split_whitespace().nth(1),
        Some("INFO" | "DEBUG" | "TRACE")
    )
}

/// `worker.log`, opened for appending (created 0600), for the worker's stdout and stderr.
pub fn open_log(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.join(LOG))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_log_line_is_the_last_printable_line_bounded() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_log_line(dir.path()), None);
        let long = "é".repeat(400);
        let text = format!("first\n\x1b[31mred\x1b[0m\n{long}\n  \n");
        std::fs::write(dir.path().join(LOG), text).unwrap();
        let line = last_log_line(dir.path()).unwrap();
        assert!(line.len() <= 300 && line.starts_with("éé"), "{line}");
        std::fs::write(dir.path().join(LOG), "a\n\x1b[31mred\x1b[0m\n\n").unwrap();
        assert_eq!(last_log_line(dir.path()).unwrap(), "[31mred[0m");
        let log = "2026-12-04T17:49:05.6Z  WARN vireo_worker: disk slow\n\
                   2026-12-04T17:49:05.7Z  INFO vireo_vmm::vm: kernel loaded\n";
        std::fs::write(dir.path().join(LOG), log).unwrap();
        assert!(last_log_line(dir.path())
            .unwrap()
            .ends_with("WARN vireo_worker: disk slow"));
        std::fs::write(
            dir.path().join(LOG),
            "2026-12-04T17:49:05.7Z  INFO x: booted\n",
        )
        .unwrap();
        assert_eq!(last_log_line(dir.path()), None);
    }
}
