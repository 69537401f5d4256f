//! Checksums of `memory.bin` (`memory.crc` beside it, docs/vm-state.md "Files"): one CRC-32C
//! per 4 KiB page, so a corrupt or truncated memory file is refused or stops the restored VM
//! instead of running it on wrong memory.
//!
//! Per page rather than per larger block because of how the file is written and read: a live
//! save writes single dirty pages in its rounds (and the last ones while the guest is paused),
//! so a page's sum is computed from the bytes it writes, with no re-reading of a surrounding
//! block in the pause; and every reader of the file (fault blocks, readahead, the working set,
//! the background copy, an eager load) reads page-aligned ranges, which are then checked as they
//! are read, before any byte of them reaches guest RAM. The table costs 1/1024 of memory.
//!
//! Format (version 1): `VIREOMC1`, version (u32 LE), page size (u32 LE), memory size (u64 LE),
//! then one CRC-32C per page (u32 LE), then a CRC-32C of everything before it (u32 LE). The
//! state file records that trailer (`VmState::memory_sums`), which binds the table, and through
//! it `memory.bin`, to that one save: a table from another save is refused as well.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use super::StateError;
use crate::memory::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"VIREOMC1";
/// The table format this Vireo writes and reads.
pub const SUMS_VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8;

/// The CRC-32C of a page of zeros (holes in `memory.bin`, pages never written).
pub fn zero_page_sum() -> u32 {
    static ZERO: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| crc32c::crc32c(&[0u8; PAGE_SIZE as usize]))
}

/// The per-page checksums of one memory file.
#[derive(Debug, PartialEq, Eq)]
pub struct MemorySums {
    pub memory_bytes: u64,
    pub sums: Vec<u32>,
}

/// Why a range of `memory.bin` failed its check.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "memory.bin is corrupt: the page at offset {offset:#x} does not match its checksum \
     (stored {stored:#010x}, computed {computed:#010x}); restore from another save"
)]
pub struct Corrupt {
    pub offset: u64,
    pub stored: u32,
    pub computed: u32,
}

impl MemorySums {
    /// Checks `buf`, the bytes of the memory file at `offset` (page-aligned, whole pages).
    pub fn verify(&self, offset: u64, buf: &[u8]) -> Result<(), Corrupt> {
        for (i, page) in buf.chunks(PAGE_SIZE as usize).enumerate() {
            let at = offset + i as u64 * PAGE_SIZE;
            let stored = self.stored(at);
            let computed = crc32c::crc32c(page);
            if computed != stored {
                return Err(Corrupt {
                    offset: at,
                    stored,
                    computed,
                });
            }
        }
        Ok(())
    }

    /// Checks that `[offset, offset+len)`, a hole of the memory file (reads as zeros), was
    /// zeros when saved.
    pub fn verify_zeros(&self, offset: u64, len: u64) -> Result<(), Corrupt> {
        let zero = zero_page_sum();
        let mut at = offset;
        while at < offset + len {
            let stored = self.stored(at);
            if stored != zero {
                return Err(Corrupt {
                    offset: at,
                    stored,
                    computed: zero,
                });
            }
            at += PAGE_SIZE;
        }
        Ok(())
    }

    /// The stored sum of the page at `at`. Callers pass offsets inside the memory size (the
    /// file's length is checked against it first); a page past the table gets a sum that is
    /// not a zero page's, so it is never taken for a verified hole.
    fn stored(&self, at: u64) -> u32 {
        self.sums
            .get((at / PAGE_SIZE) as usize)
            .copied()
            .unwrap_or(!zero_page_sum())
    }

    /// The table file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 4 * self.sums.len() + 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SUMS_VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&self.memory_bytes.to_le_bytes());
        for s in &self.sums {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let trailer = crc32c::crc32c(&out);
        out.extend_from_slice(&trailer.to_le_bytes());
        out
    }

    /// The trailer of the encoded table: what the state file records.
    pub fn table_sum(&self) -> u32 {
        let bytes = self.encode();
        u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4 bytes"))
    }

    /// Decodes a table for a VM of `memory_bytes` whose state recorded `expected` as the
    /// table's trailer; `path` names it in errors.
    pub fn decode(
        bytes: &[u8],
        memory_bytes: u64,
        expected: u32,
        path: &Path,
    ) -> Result<MemorySums, StateError> {
        let path_s = || path.display().to_string();
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            return Err(StateError::BadMagic { path: path_s() });
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
        if bytes.len() < HEADER + 4 {
            return Err(StateError::Truncated {
                path: path_s(),
                what: "header cut short".into(),
            });
        }
        let version = u32_at(8);
        if version != SUMS_VERSION {
            return Err(StateError::UnsupportedVersion {
                path: path_s(),
                found: version,
                oldest: SUMS_VERSION,
                newest: SUMS_VERSION,
            });
        }
        let page = u32_at(12) as u64;
        let size = u64::from_le_bytes(bytes[16..24].try_into().expect("8"));
        let pages = size.div_ceil(PAGE_SIZE);
        let want = HEADER as u64 + 4 * pages + 4;
        if page != PAGE_SIZE || size != memory_bytes || bytes.len() as u64 != want {
            return Err(StateError::Mismatch(format!(
                "memory checksum table {} is for {size} bytes in {page}-byte pages and holds {} \
                 bytes; this VM has {memory_bytes} bytes of memory: the save is damaged",
                path.display(),
                bytes.len()
            )));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes(tail.try_into().expect("4"));
        let computed = crc32c::crc32c(body);
        if computed != stored {
            return Err(StateError::Checksum {
                path: path_s(),
                stored,
                computed,
            });
        }
        if stored != expected {
            return Err(StateError::Mismatch(format!(
                "memory checksum table {} belongs to another save (its checksum is {stored:#010x}, \
                 the state file expects {expected:#010x})",
                path.display()
            )));
        }
        let sums = body[HEADER..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        Ok(MemorySums { memory_bytes, sums })
    }

    /// Reads and checks the table at `path` (see [`MemorySums::decode`]). A missing table is
    /// an error: the state file says the save has one.
    pub fn read(path: &Path, memory_bytes: u64, expected: u32) -> Result<MemorySums, StateError> {
        let bytes = std::fs::read(path).map_err(|source| StateError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::decode(&bytes, memory_bytes, expected, path)
    }
}

/// Per-page sums collected while a memory file is written (by several writers at once).
/// Pages never written keep the sum of a zero page, which is what a fresh file holds there.
pub struct SumsBuilder {
    memory_bytes: u64,
    sums: Vec<AtomicU32>,
}

impl SumsBuilder {
    pub fn new(memory_bytes: u64) -> SumsBuilder {
        let zero = zero_page_sum();
        SumsBuilder {
            memory_bytes,
            sums: (0..memory_bytes.div_ceil(PAGE_SIZE))
                .map(|_| AtomicU32::new(zero))
                .collect(),
        }
    }

    /// Records `buf`, written to the memory file at `offset` (page-aligned, whole pages).
    pub fn wrote(&self, offset: u64, buf: &[u8]) {
        for (i, page) in buf.chunks(PAGE_SIZE as usize).enumerate() {
            if let Some(s) = self.sums.get((offset / PAGE_SIZE) as usize + i) {
                s.store(crc32c::crc32c(page), Ordering::Relaxed);
            }
        }
    }

    pub fn finish(&self) -> MemorySums {
        MemorySums {
            memory_bytes: self.memory_bytes,
            sums: self
                .sums
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize) -> Vec<u8> {
        (0..n * PAGE_SIZE as usize)
            .map(|i| (i / 4096 * 7 + i % 13) as u8)
            .collect()
    }

    #[test]
    fn sums_of_written_pages_verify_and_a_flipped_byte_does_not() {
        let b = SumsBuilder::new(8 * PAGE_SIZE);
        let data = pages(4);
        b.wrote(2 * PAGE_SIZE, &data);
        let sums = b.finish();
        sums.verify(2 * PAGE_SIZE, &data).unwrap();
        sums.verify_zeros(0, 2 * PAGE_SIZE).unwrap();
        sums.verify_zeros(6 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        let mut bad = data.clone();
        bad[PAGE_SIZE as usize + 100] ^= 1;
        let e = sums.verify(2 * PAGE_SIZE, &bad).unwrap_err();
        assert_eq!(e.offset, 3 * PAGE_SIZE);
        assert!(e.to_string().contains("0x3000"), "{e}");
        // A data page that reads as a hole (punched or lost) is caught too.
        assert_eq!(
            sums.verify_zeros(2 * PAGE_SIZE, PAGE_SIZE)
                .unwrap_err()
                .offset,
            2 * PAGE_SIZE
        );
        // Rewriting a page replaces its sum.
        b.wrote(2 * PAGE_SIZE, &bad[..PAGE_SIZE as usize]);
        b.finish()
            .verify(2 * PAGE_SIZE, &bad[..PAGE_SIZE as usize])
            .unwrap();
    }

    #[test]
    fn the_table_round_trips_and_refuses_damage() {
        let b = SumsBuilder::new(16 * PAGE_SIZE);
        b.wrote(0, &pages(3));
        let sums = b.finish();
        let bytes = sums.encode();
        let expected = sums.table_sum();
        let p = Path::new("memory.crc");
        assert_eq!(
            MemorySums::decode(&bytes, 16 * PAGE_SIZE, expected, p).unwrap(),
            sums
        );
        // Flipped bit anywhere: the trailer catches it.
        for at in [20, HEADER + 5, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(MemorySums::decode(&bad, 16 * PAGE_SIZE, expected, p).is_err());
        }
        // Truncated, another memory size, another save's table, not a table.
        assert!(matches!(
            MemorySums::decode(&bytes[..bytes.len() - 8], 16 * PAGE_SIZE, expected, p),
            Err(StateError::Mismatch(_))
        ));
        assert!(matches!(
            MemorySums::decode(&bytes, 32 * PAGE_SIZE, expected, p),
            Err(StateError::Mismatch(_))
        ));
        let e = MemorySums::decode(&bytes, 16 * PAGE_SIZE, expected ^ 1, p).unwrap_err();
        assert!(e.to_string().contains("another save"), "{e}");
        assert!(matches!(
            MemorySums::decode(b"VIREOVMS....", 16 * PAGE_SIZE, expected, p),
            Err(StateError::BadMagic { .. })
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert!(matches!(
            MemorySums::decode(&v2, 16 * PAGE_SIZE, expected, p),
            Err(StateError::UnsupportedVersion { found: 2, .. })
        ));
    }
}
