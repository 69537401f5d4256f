//! The disk handoff at the end of a live migration (docs/migration.md, "Switch-over"), on
//! stream 0 after its `Done`, one text line per message each way:
//!
//! ```text
//! source → destination   DISKS <json: one DiskGeometry per disk, in slot order>
//! destination → source   APPLIED                 (device state loaded; nothing runs)
//! source → destination   RELEASED                (disks flushed and closed: locks gone)
//! destination → source   RUNNING                 (disks opened, VM resumed)
//! either way             FAILED <why>            (the source keeps or takes back the VM)
//! ```
//!
//! A source with no disk to let go of sends `RELEASED` right behind `DISKS` (the destination
//! reads the lines in the same order either way, so it resumes without a round trip more).
//!
//! Until `RELEASED` the destination's disks are [`PendingDisk`]s: placeholders that answer
//! the geometry the source announced (the device state's features are checked against it)
//! and hold any request back until the real image is attached.

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vireo_block::{BlockBackend, BlockError};

/// Longest handoff line accepted.
const MAX_LINE: usize = 64 * 1024;

/// What the guest sees of a disk, sent so the destination's placeholder shows the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskGeometry {
    pub size: u64,
    pub read_only: bool,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
}

impl DiskGeometry {
    pub fn of(b: &dyn BlockBackend) -> DiskGeometry {
        DiskGeometry {
            size: b.size(),
            read_only: b.read_only(),
            logical_sector_size: b.logical_sector_size(),
            physical_sector_size: b.physical_sector_size(),
        }
    }
}

/// Writes one message line.
pub fn send(w: &mut impl Write, msg: &str) -> std::io::Result<()> {
    w.write_all(msg.as_bytes())?;
    w.write_all(b"\n")?;
    w.flush()
}

/// Reads one line (without its newline), a byte at a time: stream 0 must not be read past
/// the handoff's own bytes. Errors on EOF, an over-long line or the stream's timeout.
pub fn recv(r: &mut impl Read) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if r.read(&mut b)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the migration stream during the handoff",
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() == MAX_LINE {
            return Err(std::io::Error::other("handoff line too long"));
        }
        line.push(b[0]);
    }
}

/// Reads a line and insists it is `want` (a `FAILED` line or anything else is an error
/// naming what came).
pub fn expect(r: &mut impl Read, want: &str) -> Result<(), String> {
    let line = recv(r).map_err(|e| format!("waiting for {want}: {e}"))?;
    if line == want {
        return Ok(());
    }
    Err(match line.strip_prefix("FAILED ") {
        Some(why) => format!("the other side failed: {why}"),
        None => format!("expected {want}, got {line:?}"),
    })
}

/// Longest a request to a pending disk waits for the real disk.
const PENDING_WAIT: Duration = Duration::from_secs(60);

/// A destination disk before the handoff: the announced geometry, no data. Requests wait
/// (bounded) until [`PendingDisk::attach`] and then go to the real disk, so one the restored
/// device picks up from its ring before the VM runs is served, never failed.
#[derive(Default)]
pub struct PendingDisk {
    geometry: Mutex<DiskGeometry>,
    real: Mutex<Option<Arc<dyn BlockBackend>>>,
    attached: Condvar,
}

impl PendingDisk {
    pub fn new(read_only: bool) -> PendingDisk {
        PendingDisk {
            geometry: Mutex::new(DiskGeometry {
                read_only,
                logical_sector_size: 512,
                physical_sector_size: 512,
                size: 0,
            }),
            ..Default::default()
        }
    }

    pub fn set_geometry(&self, g: DiskGeometry) {
        *self.geometry.lock().unwrap_or_else(|p| p.into_inner()) = g;
    }

    fn geometry(&self) -> DiskGeometry {
        *self.geometry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The real disk is open: waiting requests go on to it.
    pub fn attach(&self, real: Arc<dyn BlockBackend>) {
        *self.real.lock().unwrap_or_else(|p| p.into_inner()) = Some(real);
        self.attached.notify_all();
    }

    fn real(&self) -> Result<Arc<dyn BlockBackend>, BlockError> {
        let guard = self.real.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .attached
            .wait_timeout_while(guard, PENDING_WAIT, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or_else(|| {
            BlockError::Refused("the disk was never handed over by the migration source".into())
        })
    }
}

impl BlockBackend for PendingDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.real()?.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.real()?.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), BlockError> {
        match self.real.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(r) => r.flush(),
            // Nothing was ever written through a disk never attached.
            None => Ok(()),
        }
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.real()?.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.real()?.write_zeroes(offset, len)
    }
    fn size(&self) -> u64 {
        self.geometry().size
    }
    fn resize(&self, _new_size: u64) -> Result<(), BlockError> {
        Err(BlockError::Refused(
            "the disk is being migrated; resize it afterwards".into(),
        ))
    }
    fn read_only(&self) -> bool {
        self.geometry().read_only
    }
    fn logical_sector_size(&self) -> u32 {
        self.geometry().logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.geometry().physical_sector_size
    }
    fn id(&self) -> String {
        "pending-migration".into()
    }
}

/// A source disk after `RELEASED`: the image is closed; nothing may reach it (the VM is
/// paused, and runs again here only after the disk was opened again).
pub struct ReleasedDisk(pub DiskGeometry);

impl ReleasedDisk {
    fn refused() -> BlockError {
        BlockError::Refused("the disk was handed over to the migration destination".into())
    }
}

impl BlockBackend for ReleasedDisk {
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), BlockError> {
        Err(Self::refused())
    }
    fn write_at(&self, _: &[u8], _: u64) -> Result<(), BlockError> {
        Err(Self::refused())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(Self::refused())
    }
    fn size(&self) -> u64 {
        self.0.size
    }
    fn resize(&self, _: u64) -> Result<(), BlockError> {
        Err(Self::refused())
    }
    fn read_only(&self) -> bool {
        self.0.read_only
    }
    fn logical_sector_size(&self) -> u32 {
        self.0.logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.0.physical_sector_size
    }
    fn id(&self) -> String {
        "released-by-migration".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_failures_are_named() {
        let mut buf = Vec::new();
        send(&mut buf, "APPLIED").unwrap();
        send(&mut buf, "FAILED disk locked").unwrap();
        let mut r = &buf[..];
        expect(&mut r, "APPLIED").unwrap();
        let e = expect(&mut r, "RUNNING").unwrap_err();
        assert!(e.contains("disk locked"), "{e}");
        assert!(expect(&mut r, "RUNNING").unwrap_err().contains("closed"));
    }

    #[test]
    fn a_pending_disk_shows_its_geometry_and_serves_once_attached() {
        let p = Arc::new(PendingDisk::new(false));
        p.set_geometry(DiskGeometry {
            size: 1 << 20,
            read_only: false,
            logical_sector_size: 512,
            physical_sector_size: 4096,
        });
        assert_eq!(p.size(), 1 << 20);
        assert_eq!(p.physical_sector_size(), 4096);
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 4];
                p.read_at(&mut b, 0).map(|()| b)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        std::fs::write(f.path(), [7u8; 4]).unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let raw = vireo_block::RawFile::open(f.path(), true).unwrap();
        p.attach(Arc::new(raw));
        assert_eq!(waiter.join().unwrap().unwrap(), [7u8; 4]);
    }
}
