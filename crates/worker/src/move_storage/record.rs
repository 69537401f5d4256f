//! The switch record: `<vm-dir>/storage-switch.json`, the worker's durable word that its disks
//! moved to their copies. Written inside the switch's park (no guest request runs) once every
//! copy is complete and flushed, before the first disk switches, so no guest write can reach
//! a new file before the record is on disk. vireod reads it when it cannot ask the worker (the
//! worker ended while vireod was down, or went silent during the move): a record whose copies
//! all exist means the new layout is the whole one, the guest's later writes are in it.
//! vireod removes it once it has recorded the move (spec, checkpoint records).
//!
//! A record is only ever written at the point of no return, so there is no "not switched"
//! record: its absence means the old files are the whole layout.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's name in the VM folder.
pub const SWITCH_RECORD: &str = "storage-switch.json";

/// One disk's switch: the file the VM left, the copy it runs on from now on, and the old
/// files the worker deletes after the switch (vireod deletes whichever are still there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchedDisk {
    pub serial: Option<String>,
    pub from: PathBuf,
    pub to: PathBuf,
    #[serde(default)]
    pub old_files: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchRecord {
    pub disks: Vec<SwitchedDisk>,
}

impl SwitchRecord {
    /// Every copy the record names exists: the switch's layout is whole. A record whose copies
    /// are gone (a failed move's clean-up after a half-written record) says nothing.
    pub fn copies_exist(&self) -> bool {
        !self.disks.is_empty() && self.disks.iter().all(|d| d.to.is_file())
    }
}

/// Writes the record durably: temporary file, fsync, rename, fsync of the folder.
pub fn write(vm_dir: &Path, record: &SwitchRecord) -> std::io::Result<()> {
    let tmp = vm_dir.join(".storage-switch.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, record)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, vm_dir.join(SWITCH_RECORD))?;
    std::fs::File::open(vm_dir)?.sync_all()
}

/// The record, if one is there and readable (a torn one cannot exist: it is renamed in whole).
pub fn read(vm_dir: &Path) -> Option<SwitchRecord> {
    let text = std::fs::read(vm_dir.join(SWITCH_RECORD)).ok()?;
    match serde_json::from_slice(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(
                "{} is malformed ({e}); ignored",
                vm_dir.join(SWITCH_RECORD).display()
            );
            None
        }
    }
}

/// Removes the record (and a temporary one a killed write left), durably.
pub fn remove(vm_dir: &Path) {
    let mut removed = false;
    for name in [SWITCH_RECORD, ".storage-switch.json.tmp"] {
        match std::fs::remove_file(vm_dir.join(name)) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing {}: {e}", vm_dir.join(name).display()),
        }
    }
    if removed {
        if let Ok(d) = std::fs::File::open(vm_dir) {
            let _ = d.sync_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let copy = dir.path().join("new.vhdx");
        let r = SwitchRecord {
            disks: vec![SwitchedDisk {
                serial: Some("s0".into()),
                from: dir.path().join("old.vhdx"),
                to: copy.clone(),
                old_files: vec![dir.path().join("old.vhdx")],
            }],
        };
        write(dir.path(), &r).unwrap();
        assert_eq!(read(dir.path()), Some(r.clone()));
        assert!(!r.copies_exist(), "the copy is not there yet");
        std::fs::write(&copy, b"x").unwrap();
        assert!(r.copies_exist());
        remove(dir.path());
        assert_eq!(read(dir.path()), None);
        assert!(!dir.path().join(".storage-switch.json.tmp").exists());
    }

    #[test]
    fn a_malformed_record_is_no_record() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SWITCH_RECORD), b"{\"disks\": [").unwrap();
        assert_eq!(read(dir.path()), None);
        assert!(!SwitchRecord { disks: vec![] }.copies_exist());
    }
}
