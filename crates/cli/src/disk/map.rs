//! `vireo disk map DISK`: the allocated runs of a disk, as `qemu-img map` lists them. For a
//! VHDX chain each run names the file that holds it (to the sector); for VHD and raw, runs are
//! data or zero.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde_json::json;
use vireo_vhdx::convert::{AnyDisk, Format};
use vireo_vhdx::vhd::DiskType;
use vireo_vhdx::Extent;

use super::size::human;
use super::{errors, info, OutputArg, Result};

#[derive(Args)]
pub struct MapArgs {
    /// The disk (VHDX, VHD or raw; recognised by content).
    pub path: PathBuf,
    /// text (data runs, a table) or json (every run, data and zero).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputArg,
}

pub fn run(a: MapArgs) -> Result<ExitCode> {
    let extents = match errors::detect(&a.path)? {
        Format::Vhdx => info::open_vhdx_for_looking(&a.path)?
            .map()
            .map_err(|e| errors::vhdx(&a.path, e))?,
        _ => {
            let disk = AnyDisk::open(&a.path, true).map_err(|e| errors::convert(&a.path, e))?;
            // A differencing VHD's runs may live in any file of its chain: name none.
            let file = match &disk {
                AnyDisk::Vhd(d) if d.disk_type() == DiskType::Differencing => None,
                _ => Some(a.path.clone()),
            };
            let ranges = disk
                .allocated_ranges()
                .map_err(|e| errors::convert(&a.path, e))?;
            with_gaps(&ranges, disk.backend().size(), file)
        }
    };
    match a.output {
        OutputArg::Json => {
            let runs: Vec<_> = extents
                .iter()
                .map(|e| {
                    json!({
                        "start": e.start,
                        "length": e.length,
                        "data": e.data,
                        "zero": !e.data,
                        "depth": e.depth,
                        "file": e.file,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&runs)?);
        }
        OutputArg::Text => print_table(&extents),
    }
    Ok(ExitCode::SUCCESS)
}

/// Data runs at `ranges` (sorted, disjoint), zero runs between them, over `0..size`.
fn with_gaps(ranges: &[(u64, u64)], size: u64, file: Option<PathBuf>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |start: u64, length: u64, data: bool| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.data == data && last.start + last.length == start => {
                last.length += length
            }
            _ => out.push(Extent {
                start,
                length,
                data,
                depth: data.then_some(0),
                file: if data { file.clone() } else { None },
            }),
        }
    };
    let mut pos = 0;
    for &(s, l) in ranges {
        let (s, e) = (s.min(size), (s + l).min(size));
        if s > pos {
            push(pos, s - pos, false);
        }
        if e > s.max(pos) {
            push(s.max(pos), e - s.max(pos), true);
        }
        pos = pos.max(e);
    }
    push(pos, size.saturating_sub(pos), false);
    out
}

fn print_table(extents: &[Extent]) {
    println!("{:<20} {:<20} File", "Offset", "Length");
    for e in extents.iter().filter(|e| e.data) {
        let file = e
            .file
            .as_deref()
            .map_or_else(|| "data".to_string(), |p: &Path| p.display().to_string());
        println!(
            "{:<20} {:<20} {file}",
            format!("{:#x}", e.start),
            format!("{:#x} ({})", e.length, human(e.length))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_zero_runs_and_neighbours_merge() {
        let runs = with_gaps(&[(10, 10), (20, 5), (40, 100)], 60, None);
        let kinds: Vec<(u64, u64, bool)> =
            runs.iter().map(|e| (e.start, e.length, e.data)).collect();
        assert_eq!(
            kinds,
            [
                (0, 10, false),
                (10, 15, true),
                (25, 15, false),
                (40, 20, true)
            ]
        );
        assert_eq!(with_gaps(&[], 8, None).len(), 1);
    }
}
