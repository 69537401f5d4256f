//! The state file and the memory file on disk (docs/vm-state.md, "Files").
//!
//! State file: `VIREOVMS` (8 bytes), format version (u32 LE), payload length (u64 LE), CRC-32C
//! of the payload (u32 LE), payload (the [`VmState`] as JSON). The version comes right after
//! the magic so any later reader can tell a file it does not know before trusting anything
//! else; the checksum covers every payload byte, so a flipped bit is an error and never a
//! half-right VM. Files are written to a temporary name, synced and renamed, so a crash leaves
//! the old file or the new one.
//!
//! Memory file: guest RAM as the memfd holds it (RAM below the MMIO hole, then above it), its
//! length exactly the VM's memory size; all-zero 1 MiB chunks are left as holes. Its per-page
//! checksums go to `memory.crc` (`checksums.rs`), and every read of it here checks them.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::checksums::{MemorySums, SumsBuilder};
use super::{StateError, VmState};
use crate::memory::GuestRam;

pub const MAGIC: &[u8; 8] = b"VIREOVMS";
/// The format this Vireo writes.
pub const STATE_VERSION: u32 = 1;
/// The oldest format this Vireo still reads.
pub const OLDEST_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// A state file is small (tens of KiB per vCPU); anything far larger is not one of ours.
const MAX_PAYLOAD: u64 = 64 << 20;
const CHUNK: usize = 1 << 20;

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The bytes of a state file holding `state`.
pub fn encode(state: &VmState) -> Vec<u8> {
    let payload = serde_json::to_vec(state).expect("VmState always serializes");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes a state file's bytes; `path` only names it in errors.
pub fn decode(bytes: &[u8], path: &Path) -> Result<VmState, StateError> {
    let path_s = || path.display().to_string();
    let truncated = |what: &str| StateError::Truncated {
        path: path_s(),
        what: what.into(),
    };
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(StateError::BadMagic { path: path_s() });
    }
    let version = u32::from_le_bytes(
        bytes
            .get(8..12)
            .ok_or_else(|| truncated("no version"))?
            .try_into()
            .expect("4 bytes"),
    );
    if !(OLDEST_VERSION..=STATE_VERSION).contains(&version) {
        return Err(StateError::UnsupportedVersion {
            path: path_s(),
            found: version,
            oldest: OLDEST_VERSION,
            newest: STATE_VERSION,
        });
    }
    let header = bytes
        .get(12..HEADER_LEN)
        .ok_or_else(|| truncated("header cut short"))?;
    let len = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
    let stored = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if len > MAX_PAYLOAD || payload.len() as u64 != len {
        return Err(truncated(&format!(
            "header says {len} payload bytes, the file has {}",
            payload.len()
        )));
    }
    let computed = crc32c::crc32c(payload);
    if computed != stored {
        return Err(StateError::Checksum {
            path: path_s(),
            stored,
            computed,
        });
    }
    // Version 1 is the only one so far; a later version converts older payloads here.
    serde_json::from_slice(payload).map_err(|e| StateError::Decode {
        path: path_s(),
        why: e.to_string(),
    })
}

/// Writes `state` to `path` (temporary file, fsync, rename).
pub fn write_state(path: &Path, state: &VmState) -> Result<(), StateError> {
    write_atomically(path, |f| f.write_all(&encode(state)))
}

/// Reads and checks a state file.
pub fn read_state(path: &Path) -> Result<VmState, StateError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.len() > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(StateError::BadMagic {
            path: path.display().to_string(),
        });
    }
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode(&bytes, path)
}

pub(crate) fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), StateError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Writes guest RAM to `path` (the VM must be paused, or the copy is torn); returns the
/// checksums of what it wrote.
pub(crate) fn write_memory(path: &Path, ram: &GuestRam) -> Result<MemorySums, StateError> {
    let sums = SumsBuilder::new(ram.size);
    write_atomically(path, |out| {
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        while off < ram.size {
            let n = CHUNK.min((ram.size - off) as usize);
            ram.memfd.read_exact_at(&mut buf[..n], off)?;
            if buf[..n].iter().any(|&b| b != 0) {
                out.write_all_at(&buf[..n], off)?;
                sums.wrote(off, &buf[..n]);
            }
            off += n as u64;
        }
        out.set_len(ram.size)
    })?;
    Ok(sums.finish())
}

/// Writes a memory file's checksum table to `path` (temporary file, fsync, rename).
pub(crate) fn write_sums(path: &Path, sums: &MemorySums) -> Result<(), StateError> {
    write_atomically(path, |f| f.write_all(&sums.encode()))
}

/// Loads a memory file into guest RAM, replacing everything in it; every chunk is checked
/// against `sums` (when the save has them) before it goes in.
pub(crate) fn read_memory(
    path: &Path,
    ram: &GuestRam,
    sums: Option<&MemorySums>,
) -> Result<(), StateError> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len != ram.size {
        return Err(StateError::Mismatch(format!(
            "memory file {} holds {len} bytes, the VM has {} bytes of memory",
            path.display(),
            ram.size
        )));
    }
    // The new VM's loader wrote the kernel; the saved memory replaces all of it.
    crate::reset::wipe_ram(ram)?;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < ram.size {
        let n = CHUNK.min((ram.size - off) as usize);
        f.read_exact_at(&mut buf[..n], off).map_err(io_err(path))?;
        if let Some(sums) = sums {
            sums.verify(off, &buf[..n]).map_err(|e| corrupt(path, e))?;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            ram.write_at(&buf[..n], off).map_err(io_err(path))?;
        }
        off += n as u64;
    }
    Ok(())
}

fn corrupt(path: &Path, e: super::checksums::Corrupt) -> StateError {
    StateError::Corrupt {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

/// Starts a lazy restore of `path` into guest RAM (`lazy.rs`): the length is checked, RAM
/// registered, pages come in on first touch and in the background (`hot`, the save's working
/// set, first). `ram` must be fresh (no page written: the loader of the VM being built writes
/// elsewhere, `Vm::build`), since only missing pages are filled. Returns `None` after loading
/// eagerly instead, when this host refuses userfaultfd.
pub(crate) fn restore_memory_lazily(
    path: &Path,
    ram: &GuestRam,
    hot: super::working_set::WorkingSet,
    sums: Option<std::sync::Arc<MemorySums>>,
    on_error: Box<dyn Fn(String) + Send + Sync>,
) -> Result<Option<super::lazy::LazyRestore>, StateError> {
    let f = File::open(path).map_err(io_err(path))?;
    let meta = f.metadata().map_err(io_err(path))?;
    if !meta.is_file() || meta.len() != ram.size {
        return Err(StateError::Mismatch(format!(
            "memory file {} holds {} bytes, the VM has {} bytes of memory; the save is \
             damaged or belongs to another VM",
            path.display(),
            meta.len(),
            ram.size
        )));
    }
    let mut maps = Vec::new();
    let mut file_offset = 0;
    for (_, len, host) in crate::memory::regions(&ram.memory) {
        maps.push(super::lazy::Mapping {
            host,
            len,
            file_offset,
        });
        file_offset += len;
    }
    match super::lazy::LazyRestore::start(f, maps, hot, sums.clone(), on_error) {
        Ok(l) => Ok(Some(l)),
        Err(e) => {
            tracing::warn!("lazy restore unavailable ({e}); reading all of memory first");
            read_memory(path, ram, sums.as_deref())?;
            Ok(None)
        }
    }
}
