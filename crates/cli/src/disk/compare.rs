//! `vireo disk compare A B`: do two disks (any of VHDX, VHD, raw) read the same? What
//! `qemu-img compare` answers: exit 0 identical, 1 different (the first differing offset is
//! printed), 2 error.
//!
//! Only ranges allocated in either disk are read; everything else reads as zeroes in both.
//! Without --strict, disks of different virtual sizes are identical when the longer one's extra
//! tail reads as zeroes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Args;
use vireo_vhdx::convert::AnyDisk;

use super::progress::{cancel_flag, Bar};
use super::size::human;
use super::{errors, Result};
use crate::exit::{self, CliError};

/// Bytes compared per read: large enough that the per-call cost does not matter.
const CHUNK: u64 = 8 << 20;

#[derive(Args)]
pub struct CompareArgs {
    /// First disk (VHDX, VHD or raw; recognised by content).
    pub first: PathBuf,
    /// Second disk.
    pub second: PathBuf,
    /// Disks of different virtual sizes differ, whatever the longer one's tail holds.
    #[arg(long)]
    pub strict: bool,
}

pub fn run(a: CompareArgs) -> Result<ExitCode> {
    // As qemu-img compare and cmp: any error is status 2, so 1 always means "they differ".
    compare(&a).map_err(|e| {
        let e = match e.downcast::<CliError>() {
            Ok(c) if c.status == exit::INTERRUPTED => return c as Box<dyn std::error::Error>,
            Ok(c) => c.message,
            Err(other) => other.to_string(),
        };
        Box::new(CliError::bad_input(e)) as Box<dyn std::error::Error>
    })
}

fn open(path: &Path) -> Result<AnyDisk> {
    errors::existing(path)?;
    Ok(AnyDisk::open(path, true).map_err(|e| errors::convert(path, e))?)
}

fn compare(a: &CompareArgs) -> Result<ExitCode> {
    let (pa, pb) = (&a.first, &a.second);
    let (da, db) = (open(pa)?, open(pb)?);
    let (sa, sb) = (da.backend().size(), db.backend().size());
    let (na, nb) = (pa.display(), pb.display());
    if sa != sb {
        if a.strict {
            println!("{na} and {nb} differ: virtual sizes {sa} and {sb} (--strict)");
            return Ok(ExitCode::from(exit::FAILED));
        }
        eprintln!(
            "note: virtual sizes differ ({sa} and {sb}); the shorter reads as zeroes past its end"
        );
    }
    let ranges = union(
        &da.allocated_ranges().map_err(|e| errors::convert(pa, e))?,
        &db.allocated_ranges().map_err(|e| errors::convert(pb, e))?,
    );
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let bar = Bar::new("compare");
    let cancel = cancel_flag();
    let (mut ba, mut bb) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut done = 0;
    let mut result = None;
    'outer: for &(start, len) in &ranges {
        let mut pos = start;
        while pos < start + len {
            if cancel.load(Ordering::SeqCst) {
                bar.finish();
                return Err(
                    CliError::interrupted("compare interrupted; nothing was changed").into(),
                );
            }
            let n = CHUNK.min(start + len - pos) as usize;
            read_padded(&da, sa, &mut ba[..n], pos, pa)?;
            read_padded(&db, sb, &mut bb[..n], pos, pb)?;
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                result = Some(pos + i as u64);
                break 'outer;
            }
            pos += n as u64;
            done += n as u64;
            bar.update(done, total);
        }
    }
    bar.finish();
    match result {
        Some(at) => {
            println!(
                "{na} and {nb} differ: first difference at offset {at} ({})",
                human(at)
            );
            Ok(ExitCode::from(exit::FAILED))
        }
        None => {
            println!("{na} and {nb} are identical");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads `buf` at `pos`; bytes past the disk's `size` read as zeroes.
fn read_padded(d: &AnyDisk, size: u64, buf: &mut [u8], pos: u64, path: &Path) -> Result<()> {
    let inside = size.saturating_sub(pos).min(buf.len() as u64) as usize;
    buf[inside..].fill(0);
    if inside > 0 {
        d.backend()
            .read_at(&mut buf[..inside], pos)
            .map_err(|e| CliError::failed(format!("{}: reading at {pos}: {e}", path.display())))?;
    }
    Ok(())
}

/// The sorted, merged union of two sorted `(offset, length)` lists.
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().filter(|r| r.1 > 0).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, l) in all {
        match out.last_mut() {
            Some(last) if s <= last.0 + last.1 => last.1 = last.1.max(s + l - last.0),
            _ => out.push((s, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::union;

    #[test]
    fn union_merges_overlaps_and_neighbours() {
        assert_eq!(
            union(&[(0, 10), (50, 10)], &[(5, 10), (60, 5), (100, 1)]),
            [(0, 15), (50, 15), (100, 1)]
        );
        assert_eq!(union(&[], &[(3, 0)]), []);
    }
}
