//! The working set of a save (`working-set.bin` beside `memory.bin`, docs/vm-state.md "Lazy
//! restore"): the pages the guest wrote while a live save ran, which are the pages it is most
//! likely to touch first after a restore. A lazy restore copies them in large batches before
//! anything else, so the guest does not wait for them one fault at a time.
//!
//! Only a hint: a missing, damaged or foreign file makes the restore fall back to faulting
//! those pages in, it never changes what guest memory holds (every byte still comes from
//! `memory.bin`). So it carries no checksum; a length that does not add up, runs out of order
//! or past the memory size make the whole file ignored.
//!
//! Format: `VIREOWS1`, the memory size (u64 LE), the run count (u64 LE), then per run its
//! offset in `memory.bin` and its length (u64 LE each, page-aligned, ascending, disjoint).

use std::io::Write;
use std::path::Path;

use crate::dirty::DirtyBitmap;
use crate::memory::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"VIREOWS1";
const HEADER: usize = 8 + 8 + 8;
/// A run list longer than every page of the largest memory alternating is not ours.
const MAX_RUNS: u64 = 1 << 24;

/// Page runs of `memory.bin`: `(file offset, length)`, page-aligned, ascending, disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    pub runs: Vec<(u64, u64)>,
}

impl WorkingSet {
    /// The pages of `dirty` (guest-physical, per RAM region) as runs of the memory file, whose
    /// layout is the regions one after the other (`ranges`: `(guest start, length)` each).
    pub fn from_dirty(dirty: &DirtyBitmap, ranges: &[(u64, u64)]) -> WorkingSet {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut file_base = 0;
        for &(start, len) in ranges {
            if let Some((_, words)) = dirty.regions.iter().find(|(s, _)| *s == start) {
                for (w, &word) in words.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let b = bits.trailing_zeros() as u64;
                        bits &= bits - 1;
                        let off = (w as u64 * 64 + b) * PAGE_SIZE;
                        if off >= len {
                            break;
                        }
                        let at = file_base + off;
                        match runs.last_mut() {
                            Some((s, l)) if *s + *l == at => *l += PAGE_SIZE,
                            _ => runs.push((at, PAGE_SIZE)),
                        }
                    }
                }
            }
            file_base += len;
        }
        WorkingSet { runs }
    }

    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// The file's bytes for a VM of `memory_bytes`.
    pub fn encode(&self, memory_bytes: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 16 * self.runs.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&memory_bytes.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for (off, len) in &self.runs {
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        out
    }

    /// Decodes a file for a VM of `memory_bytes`; why not, if it is not a usable one.
    pub fn decode(bytes: &[u8], memory_bytes: u64) -> Result<WorkingSet, String> {
        let u64_at =
            |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes, checked"));
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err("not a working-set file".into());
        }
        if u64_at(8) != memory_bytes {
            return Err(format!(
                "written for {} bytes of memory, the VM has {memory_bytes}",
                u64_at(8)
            ));
        }
        let count = u64_at(16);
        if count > MAX_RUNS || bytes.len() as u64 != HEADER as u64 + count * 16 {
            return Err(format!("{count} runs do not fit its {} bytes", bytes.len()));
        }
        let mut runs = Vec::with_capacity(count as usize);
        let mut end = 0u64;
        for i in 0..count as usize {
            let (off, len) = (u64_at(HEADER + 16 * i), u64_at(HEADER + 16 * i + 8));
            let fits = off.checked_add(len).is_some_and(|e| e <= memory_bytes);
            if len == 0 || off % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || off < end || !fits {
                return Err(format!(
                    "run {i} ({off:#x}+{len:#x}) is out of order or range"
                ));
            }
            end = off + len;
            runs.push((off, len));
        }
        Ok(WorkingSet { runs })
    }

    /// Writes the file (temporary name, rename: a reader sees the old file or the new one).
    pub fn write(&self, path: &Path, memory_bytes: u64) -> std::io::Result<()> {
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let result = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&self.encode(memory_bytes)))
            .and_then(|()| std::fs::rename(&tmp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Reads the file beside a save; `None` (logged) when it is missing or unusable.
    pub fn read(path: &Path, memory_bytes: u64) -> Option<WorkingSet> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(
                    "working set {} not read ({e}); pages fault in",
                    path.display()
                );
                return None;
            }
        };
        WorkingSet::decode(&bytes, memory_bytes)
            .inspect_err(|why| {
                tracing::warn!(
                    "working set {} ignored: {why}; pages fault in",
                    path.display()
                )
            })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_pages_become_file_runs_across_regions() {
        // Two regions: 1 MiB at 0 and 1 MiB at 4 GiB; the file holds them back to back.
        let mut low = vec![0u64; 4];
        low[0] = 0b1110; // pages 1..4
        low[3] = 1 << 63; // the region's last page (255)
        let mut high = vec![0u64; 4];
        high[0] = 1; // its first page: contiguous with the low region's last in the file
        let dirty = DirtyBitmap {
            regions: vec![(0, low), (4 << 30, high)],
        };
        let ws = WorkingSet::from_dirty(&dirty, &[(0, 1 << 20), (4 << 30, 1 << 20)]);
        assert_eq!(ws.runs, vec![(0x1000, 0x3000), (0xff000, 0x2000)]);
        assert_eq!(ws.bytes(), 0x5000);
    }

    #[test]
    fn round_trips_and_refuses_what_does_not_add_up() {
        let ws = WorkingSet {
            runs: vec![(0, 0x2000), (0x10000, 0x1000)],
        };
        let bytes = ws.encode(1 << 20);
        assert_eq!(WorkingSet::decode(&bytes, 1 << 20), Ok(ws.clone()));
        assert!(
            WorkingSet::decode(&bytes, 2 << 20).is_err(),
            "other memory size"
        );
        assert!(
            WorkingSet::decode(&bytes[..bytes.len() - 1], 1 << 20).is_err(),
            "cut"
        );
        assert!(WorkingSet::decode(b"VIREOWS", 1 << 20).is_err(), "short");
        let out_of_range = WorkingSet {
            runs: vec![(0xff000, 0x2000)],
        };
        assert!(WorkingSet::decode(&out_of_range.encode(1 << 20), 1 << 20).is_err());
        let unordered = WorkingSet {
            runs: vec![(0x10000, 0x1000), (0, 0x1000)],
        };
        assert!(WorkingSet::decode(&unordered.encode(1 << 20), 1 << 20).is_err());
        let unaligned = WorkingSet {
            runs: vec![(0x800, 0x1000)],
        };
        assert!(WorkingSet::decode(&unaligned.encode(1 << 20), 1 << 20).is_err());
    }
}
