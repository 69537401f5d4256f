//! `vireo disk`: create, inspect, check, convert, compare, map, resize, merge and compact
//! virtual disks.
//!
//! VHDX is the native format; VHD (v1) can be created, converted and inspected; raw files can be
//! created and converted. Formats are recognised by content, and by extension for new files.
//! Each subcommand lives in its own file under `disk/`; errors go through `disk/errors.rs`, so
//! every one names its file and exits with the status of `crate::exit`.

mod check;
mod compact;
mod compare;
mod convert;
mod create;
mod errors;
mod info;
mod map;
mod merge;
pub(crate) mod progress;
mod rebase;
mod resize;
mod size;

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use vireo_vhdx::convert::Format;

pub(crate) use size::{human, parse_size};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub use crate::output::OutputFormat as OutputArg;

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Create a new disk: a dynamic (sparse) or fixed VHDX/VHD/raw file of --size, or a
    /// differencing VHDX on top of --parent (writes go to the new file, reads fall through to
    /// the parent).
    ///
    /// Examples:
    ///   vireo disk create data.vhdx --size 64G
    ///   vireo disk create db.vhdx --size 100G --type fixed --sector 4096
    ///   vireo disk create snap.avhdx --parent base.vhdx
    ///   vireo disk create scratch.img --size 1.5G
    #[command(verbatim_doc_comment)]
    Create(create::CreateArgs),
    /// Show a disk's format, sizes, block size, parent chain, type and allocation.
    Info(info::InfoArgs),
    /// Check a VHDX's structures (headers, regions, metadata, BAT, log) and report problems;
    /// --repair fixes what the specification allows. Exit status 1 when problems remain.
    Check(check::CheckArgs),
    /// Convert between VHDX, VHD and raw, in any direction. Only allocated, non-zero data is
    /// copied, so sparse disks stay sparse. The destination appears only once complete;
    /// Ctrl-C stops and removes the partial copy.
    ///
    /// Examples:
    ///   vireo disk convert old.vhd new.vhdx
    ///   vireo disk convert disk.vhdx disk.img --format raw
    ///
    /// Exit status: 0 converted, 1 failed (nothing left at DST), 2 bad input, 130 Ctrl-C.
    #[command(verbatim_doc_comment)]
    Convert(convert::ConvertArgs),
    /// Compare two disks' contents (any of VHDX, VHD, raw), as `qemu-img compare` does.
    ///
    /// Examples:
    ///   vireo disk compare old.vhd new.vhdx
    ///   vireo disk compare --strict a.img b.vhdx
    ///
    /// Exit status: 0 identical, 1 different (the first differing offset is printed),
    /// 2 error, 130 Ctrl-C.
    #[command(verbatim_doc_comment)]
    Compare(compare::CompareArgs),
    /// List a disk's allocated runs (offset, length, and which file of a VHDX chain holds
    /// them), as `qemu-img map` does; --output json lists zero runs too.
    Map(map::MapArgs),
    /// Grow or shrink a VHDX's or VHD's virtual size. Shrinking over data needs --force (the
    /// data beyond the new end is lost; data in a parent counts). Grow the partition/filesystem inside separately.
    Resize(resize::ResizeArgs),
    /// Merge a differencing disk into its parent, then delete the child. The parent then holds
    /// the child's data. An interrupted merge (Ctrl-C, crash) leaves both files consistent and
    /// resumes when the same command is run again.
    ///
    /// Exit status: 0 merged, 1 failed, 2 bad input, 130 Ctrl-C (run it again to finish).
    #[command(verbatim_doc_comment)]
    Merge(merge::MergeArgs),
    /// Reclaim unused space: blocks that are unmapped or entirely zero are released and the
    /// file is shortened.
    ///
    /// Exit status: 0 compacted, 1 failed, 2 bad input, 130 Ctrl-C (the disk stays valid).
    #[command(verbatim_doc_comment)]
    Compact(compact::CompactArgs),
    /// Change a differencing disk's parent (--parent NEW) or remove it (--no-parent). Safe by
    /// default: data is copied into the child so its content stays the same; --unsafe only
    /// rewrites the link (for a moved or renamed parent). Ctrl-C leaves the child unchanged.
    ///
    /// Examples:
    ///   vireo disk rebase snap.avhdx --parent other-base.vhdx
    ///   vireo disk rebase snap.avhdx --no-parent
    ///   vireo disk rebase snap.avhdx --parent /new/place/base.vhdx --unsafe
    ///
    /// Exit status: 0 rebased, 1 failed, 2 bad input, 130 Ctrl-C (the child is unchanged).
    #[command(verbatim_doc_comment)]
    Rebase(rebase::RebaseArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum TypeArg {
    /// Sparse: space is allocated as data is written.
    Dynamic,
    /// All space allocated up front (predictable performance, no growth).
    Fixed,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum FormatArg {
    Vhdx,
    Vhd,
    Raw,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Vhdx => Format::Vhdx,
            FormatArg::Vhd => Format::Vhd,
            FormatArg::Raw => Format::Raw,
        }
    }
}

pub fn execute(cmd: DiskCommand) -> Result<ExitCode> {
    match cmd {
        DiskCommand::Create(a) => create::run(a),
        DiskCommand::Info(a) => info::run(a),
        DiskCommand::Check(a) => check::run(a),
        DiskCommand::Convert(a) => convert::run(a),
        DiskCommand::Compare(a) => compare::run(a),
        DiskCommand::Map(a) => map::run(a),
        DiskCommand::Resize(a) => resize::run(a),
        DiskCommand::Merge(a) => merge::run(a),
        DiskCommand::Compact(a) => compact::run(a),
        DiskCommand::Rebase(a) => rebase::rebase(a),
    }
}

/// `--block-size` and friends as the `u32` the formats store.
fn to_u32(what: &str, v: Option<u64>) -> std::result::Result<Option<u32>, crate::exit::CliError> {
    v.map(|v| {
        u32::try_from(v)
            .map_err(|_| crate::exit::CliError::bad_input(format!("{what} {v} is too large")))
    })
    .transpose()
}

/// `--sector`/`--physical-sector`: 512 or 4096.
fn sector_arg(
    what: &str,
    v: Option<u64>,
) -> std::result::Result<Option<u32>, crate::exit::CliError> {
    match v {
        None => Ok(None),
        Some(512) => Ok(Some(512)),
        Some(4096) => Ok(Some(4096)),
        Some(other) => Err(crate::exit::CliError::bad_input(format!(
            "{what} {other} is not supported: use 512 or 4096"
        ))),
    }
}

/// For commands that work on VHDX only: the one line that says how to get there.
fn require_vhdx(
    path: &std::path::Path,
    what: &str,
) -> std::result::Result<(), crate::exit::CliError> {
    match errors::detect(path)? {
        Format::Vhdx => Ok(()),
        other => Err(crate::exit::CliError::bad_input(format!(
            "{} is a {} image; `vireo disk {what}` works on VHDX: convert it first with \
             `vireo disk convert {} NEW.vhdx`",
            path.display(),
            other.name(),
            path.display()
        ))),
    }
}
