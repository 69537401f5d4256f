//! `vireo disk`: create, inspect, check, convert, resize, merge and compact virtual disks.
//!
//! VHDX is the native format; VHD (v1) can be created, converted and inspected; raw files can be
//! converted. Formats are recognised by content, and by extension for new files.

pub(crate) mod progress;
mod rebase;
mod size;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use vireo_block::BlockBackend;
use vireo_vhdx::convert::{self, AnyDisk, ConvertOptions, Format, OutputType};
use vireo_vhdx::vhd::{self, Vhd, VhdCreateOptions};
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx, VhdxError};

use progress::{cancel_flag, Bar};
use size::human;
pub(crate) use size::parse_size;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Create a new disk: a dynamic (sparse) or fixed VHDX/VHD of --size, or a differencing
    /// VHDX on top of --parent (writes go to the new file, reads fall through to the parent).
    ///
    /// Examples:
    ///   vireo disk create data.vhdx --size 64G
    ///   vireo disk create db.vhdx --size 100G --type fixed --sector 4096
    ///   vireo disk create snap.avhdx --parent base.vhdx
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),
    /// Show a disk's format, type, sizes, block/sector sizes, allocation and parent chain.
    Info(InfoArgs),
    /// Check a VHDX's structures (headers, regions, metadata, BAT, log) and report problems;
    /// --repair fixes what the specification allows. Exit status 1 when problems remain.
    Check(CheckArgs),
    /// Convert between VHDX, VHD and raw, in any direction. Only allocated, non-zero data is
    /// copied, so sparse disks stay sparse. Ctrl-C stops and removes the partial destination.
    ///
    /// Examples:
    ///   vireo disk convert old.vhd new.vhdx
    ///   vireo disk convert disk.vhdx disk.img --format raw
    #[command(verbatim_doc_comment)]
    Convert(ConvertArgs),
    /// Grow or shrink a VHDX's virtual size. Shrinking over allocated data needs --force (the
    /// data beyond the new end is lost). Grow the partition/filesystem inside separately.
    Resize(ResizeArgs),
    /// Merge a differencing disk into its parent, then delete the child. The parent then holds
    /// the child's data. An interrupted merge (Ctrl-C, crash) leaves both files consistent and
    /// resumes when the same command is run again.
    Merge(MergeArgs),
    /// Reclaim unused space: blocks that are unmapped or entirely zero are released and the
    /// file is shortened.
    Compact(CompactArgs),
    /// Change a differencing disk's parent (--parent NEW) or remove it (--no-parent). Safe by
    /// default: data is copied into the child so its content stays the same; --unsafe only
    /// rewrites the link (for a moved or renamed parent). Ctrl-C leaves the child unchanged.
    ///
    /// Examples:
    ///   vireo disk rebase snap.avhdx --parent other-base.vhdx
    ///   vireo disk rebase snap.avhdx --no-parent
    ///   vireo disk rebase snap.avhdx --parent /new/place/base.vhdx --unsafe
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

pub use crate::output::OutputFormat as OutputArg;

#[derive(Args)]
pub struct CreateArgs {
    /// Path of the new disk; must not exist. The extension picks the format (.vhdx, .avhdx,
    /// .vhd) unless --format is given.
    pub path: PathBuf,
    /// Virtual size, e.g. 64G, 512M, 2T (binary units). Up to 64T for VHDX, 2040G for VHD.
    #[arg(long, value_parser = parse_size, required_unless_present = "parent")]
    pub size: Option<u64>,
    /// Parent disk: creates a differencing VHDX whose unwritten sectors read from the parent.
    #[arg(long, conflicts_with_all = ["size", "disk_type"])]
    pub parent: Option<PathBuf>,
    /// dynamic (sparse, the default) or fixed (fully allocated).
    #[arg(long = "type", value_enum, default_value = "dynamic", id = "disk_type")]
    pub disk_type: TypeArg,
    /// Block size: the allocation unit, a power of two from 1M to 256M for VHDX (default 32M;
    /// a differencing child's default is its parent's).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Logical sector size the guest sees: 512 (default) or 4096.
    #[arg(long, value_parser = parse_size)]
    pub sector: Option<u64>,
    /// Physical sector size reported to the guest: 512 or 4096 (default 4096).
    #[arg(long, value_parser = parse_size)]
    pub physical_sector: Option<u64>,
    /// Image format; default from the extension, else vhdx.
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
}

#[derive(Args)]
pub struct InfoArgs {
    /// The disk (VHDX, VHD or raw; recognised by content).
    pub path: PathBuf,
    /// text (default) or json.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputArg,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The VHDX to check.
    pub path: PathBuf,
    /// Fix what can be fixed safely (replay the log, rewrite a damaged header copy or region
    /// table, clear BAT entries pointing outside the file).
    #[arg(long)]
    pub repair: bool,
    /// text (default) or json.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputArg,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Source disk (VHDX, VHD or raw; recognised by content).
    pub src: PathBuf,
    /// Destination; must not exist.
    pub dst: PathBuf,
    /// Destination format; default from the destination's extension (.vhdx, .vhd, .img/.raw).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// dynamic (sparse, the default) or fixed.
    #[arg(long = "type", value_enum, default_value = "dynamic")]
    pub disk_type: TypeArg,
    /// Destination block size (VHD/VHDX), e.g. 2M or 32M.
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Destination logical sector size (VHDX): 512 or 4096; default the source's.
    #[arg(long, value_parser = parse_size)]
    pub sector: Option<u64>,
}

#[derive(Args)]
pub struct ResizeArgs {
    /// The VHDX to resize (VHD: fixed disks and dynamic ones within their BAT).
    pub path: PathBuf,
    /// New virtual size, e.g. 128G.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// Allow shrinking over allocated data (that data is lost).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    /// The differencing disk to merge into its parent.
    pub child: PathBuf,
}

#[derive(Args)]
pub struct CompactArgs {
    /// The dynamic or differencing VHDX to compact.
    pub path: PathBuf,
}

pub fn execute(cmd: DiskCommand) -> Result<ExitCode> {
    match cmd {
        DiskCommand::Create(a) => create(a),
        DiskCommand::Info(a) => info(a),
        DiskCommand::Check(a) => check(a),
        DiskCommand::Convert(a) => convert_cmd(a),
        DiskCommand::Resize(a) => resize(a),
        DiskCommand::Merge(a) => merge(a),
        DiskCommand::Compact(a) => compact(a),
        DiskCommand::Rebase(a) => rebase::rebase(a),
    }
}

fn to_u32(what: &str, v: Option<u64>) -> Result<Option<u32>> {
    v.map(|v| u32::try_from(v).map_err(|_| format!("{what} {v} is too large").into()))
        .transpose()
}

fn sector_arg(what: &str, v: Option<u64>) -> Result<Option<u32>> {
    match v {
        None => Ok(None),
        Some(512) => Ok(Some(512)),
        Some(4096) => Ok(Some(4096)),
        Some(other) => Err(format!("{what} {other} is not supported: use 512 or 4096").into()),
    }
}

fn create(a: CreateArgs) -> Result<ExitCode> {
    if a.path.exists() {
        return Err(format!(
            "{} already exists; choose another path or delete it first",
            a.path.display()
        )
        .into());
    }
    let format = a
        .format
        .map(Format::from)
        .or_else(|| Format::from_extension(&a.path))
        .unwrap_or(Format::Vhdx);
    let block_size = to_u32("--block-size", a.block_size)?;
    let logical = sector_arg("--sector", a.sector)?;
    let physical = sector_arg("--physical-sector", a.physical_sector)?;
    match format {
        Format::Raw => {
            return Err(
                "raw files need no tool: use `truncate -s SIZE FILE`, or pick .vhdx/.vhd".into(),
            )
        }
        Format::Vhd => {
            if a.parent.is_some() {
                return Err("differencing VHDs cannot be created; use a .vhdx child".into());
            }
            if logical.is_some_and(|s| s != 512) {
                return Err("VHD has 512-byte sectors only; use VHDX for 4096".into());
            }
            let size = a.size.unwrap_or(0);
            if !size.is_multiple_of(512) {
                return Err(format!("--size {size} is not a multiple of 512 bytes").into());
            }
            let disk = Vhd::create(
                &a.path,
                &VhdCreateOptions {
                    size,
                    disk_type: match a.disk_type {
                        TypeArg::Dynamic => vhd::DiskType::Dynamic,
                        TypeArg::Fixed => vhd::DiskType::Fixed,
                    },
                    block_size,
                },
            )?;
            println!(
                "created {} ({} VHD, {})",
                a.path.display(),
                if a.disk_type == TypeArg::Fixed {
                    "fixed"
                } else {
                    "dynamic"
                },
                human(disk.size())
            );
        }
        Format::Vhdx => {
            let defaults = CreateOptions::default();
            let opts = CreateOptions {
                size: a.size.unwrap_or(0),
                disk_type: match (&a.parent, a.disk_type) {
                    (Some(_), _) => DiskType::Differencing,
                    (None, TypeArg::Dynamic) => DiskType::Dynamic,
                    (None, TypeArg::Fixed) => DiskType::Fixed,
                },
                block_size: block_size.unwrap_or(defaults.block_size),
                logical_sector: logical.unwrap_or(defaults.logical_sector),
                physical_sector: physical.unwrap_or(defaults.physical_sector),
                parent: a.parent.clone(),
            };
            let disk = Vhdx::create(&a.path, &opts)?;
            let kind = match opts.disk_type {
                DiskType::Differencing => "differencing",
                DiskType::Fixed => "fixed",
                _ => "dynamic",
            };
            println!(
                "created {} ({kind} VHDX, {})",
                a.path.display(),
                human(disk.size())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn info(a: InfoArgs) -> Result<ExitCode> {
    let format = Format::detect(&a.path)?;
    let value = match format {
        Format::Vhdx => {
            let ro = OpenOptions::read_only();
            let disk = match Vhdx::open(&a.path, &ro) {
                // A running VM holds its disks exclusively; looking must still be possible.
                Err(VhdxError::Locked { .. }) => {
                    eprintln!(
                        "note: {} is in use by another process; shown without a lock, so the \
                         figures may be mid-update",
                        a.path.display()
                    );
                    Vhdx::open(
                        &a.path,
                        &OpenOptions {
                            no_lock: true,
                            ..ro
                        },
                    )?
                }
                other => other?,
            };
            let mut v = serde_json::to_value(disk.info())?;
            if let Some(obj) = v.as_object_mut() {
                obj.insert("format".into(), json!("vhdx"));
            }
            v
        }
        Format::Vhd => {
            let disk = Vhd::open(&a.path, true)?;
            let i = disk.info()?;
            json!({
                "format": "vhd",
                "path": a.path,
                "disk_type": format!("{:?}", i.disk_type).to_lowercase(),
                "virtual_size": i.virtual_size,
                "file_size": i.file_size,
                "block_size": i.block_size,
                "allocated_blocks": i.allocated_blocks,
                "total_blocks": i.total_blocks,
                "creator": i.creator_app,
                "unique_id": i.unique_id,
                "parent": i.parent,
            })
        }
        Format::Raw => {
            let disk = AnyDisk::open_as(&a.path, Format::Raw, true)?;
            let allocated: u64 = disk.allocated_ranges()?.iter().map(|(_, len)| len).sum();
            json!({
                "format": "raw",
                "path": a.path,
                "virtual_size": disk.backend().size(),
                "allocated_bytes": allocated,
            })
        }
    };
    match a.output {
        OutputArg::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        OutputArg::Text => print_text(&value, ""),
    }
    Ok(ExitCode::SUCCESS)
}

/// Flat `key: value` lines; sizes in bytes also shown human-readable.
fn print_text(v: &serde_json::Value, indent: &str) {
    let Some(obj) = v.as_object() else {
        println!("{indent}{v}");
        return;
    };
    for (k, val) in obj {
        match val {
            serde_json::Value::Object(_) => {
                println!("{indent}{k}:");
                print_text(val, &format!("{indent}  "));
            }
            serde_json::Value::Array(items) if items.is_empty() => println!("{indent}{k}: none"),
            serde_json::Value::Array(items) => {
                println!("{indent}{k}:");
                for item in items {
                    match item {
                        serde_json::Value::Object(_) => {
                            print_text(item, &format!("{indent}  - "));
                        }
                        other => println!("{indent}  - {}", plain(other)),
                    }
                }
            }
            serde_json::Value::Number(n) if k.contains("size") || k.ends_with("bytes") => {
                let n = n.as_u64().unwrap_or(0);
                println!("{indent}{k}: {n} ({})", human(n));
            }
            other => println!("{indent}{k}: {}", plain(other)),
        }
    }
}

fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn require_vhdx(path: &Path, what: &str) -> Result<()> {
    match Format::detect(path)? {
        Format::Vhdx => Ok(()),
        other => Err(format!(
            "{} is a {} image; `vireo disk {what}` works on VHDX: convert it first with \
             `vireo disk convert {} NEW.vhdx`",
            path.display(),
            other.name(),
            path.display()
        )
        .into()),
    }
}

fn check(a: CheckArgs) -> Result<ExitCode> {
    require_vhdx(&a.path, "check")?;
    let report = Vhdx::check(&a.path, a.repair)?;
    let value = serde_json::to_value(&report)?;
    let clean = report.is_clean();
    match a.output {
        OutputArg::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        OutputArg::Text => {
            print_text(&value, "");
            println!(
                "{}: {}",
                a.path.display(),
                if clean {
                    "no problems found"
                } else {
                    "PROBLEMS FOUND"
                }
            );
        }
    }
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn convert_cmd(a: ConvertArgs) -> Result<ExitCode> {
    let format = match a.format {
        Some(f) => f.into(),
        None => Format::from_extension(&a.dst).ok_or_else(|| {
            format!(
                "cannot tell the destination format from {:?}: add --format vhdx|vhd|raw or \
                 use a .vhdx, .vhd or .img extension",
                a.dst.display().to_string()
            )
        })?,
    };
    let opts = ConvertOptions {
        format,
        output_type: match a.disk_type {
            TypeArg::Dynamic => OutputType::Dynamic,
            TypeArg::Fixed => OutputType::Fixed,
        },
        block_size: to_u32("--block-size", a.block_size)?,
        logical_sector: sector_arg("--sector", a.sector)?,
        physical_sector: None,
        threads: 0,
    };
    let bar = Bar::new("convert");
    let result = convert::convert(
        &a.src,
        &a.dst,
        &opts,
        &|done, total| bar.update(done, total),
        cancel_flag(),
    );
    bar.finish();
    let report = result?;
    println!(
        "converted {} ({}) -> {} ({}): {} virtual, {} of data written",
        a.src.display(),
        report.source_format.name(),
        a.dst.display(),
        report.format.name(),
        human(report.virtual_size),
        human(report.bytes_written)
    );
    Ok(ExitCode::SUCCESS)
}

fn resize(a: ResizeArgs) -> Result<ExitCode> {
    match Format::detect(&a.path)? {
        Format::Vhdx => {
            let disk = Vhdx::open(&a.path, &OpenOptions::default())?;
            let old = disk.size();
            match disk.resize(a.size, a.force) {
                Err(VhdxError::ShrinkOverData { data_at, .. }) => {
                    return Err(format!(
                        "shrinking {} to {} would discard data at virtual offset {data_at}; \
                         add --force to discard it",
                        a.path.display(),
                        a.size
                    )
                    .into())
                }
                other => other?,
            }
            disk.flush()?;
            println!(
                "resized {} from {} to {}",
                a.path.display(),
                human(old),
                human(a.size)
            );
        }
        Format::Vhd => {
            let disk = Vhd::open(&a.path, false)?;
            let old = disk.size();
            match disk.resize_to(a.size, a.force) {
                Err(vhd::VhdError::ShrinkOverData { data_at, .. }) => {
                    return Err(format!(
                        "shrinking {} to {} would discard data at virtual offset {data_at}; \
                         add --force to discard it",
                        a.path.display(),
                        a.size
                    )
                    .into())
                }
                other => other?,
            }
            disk.flush()?;
            println!(
                "resized {} from {} to {}",
                a.path.display(),
                human(old),
                human(a.size)
            );
        }
        Format::Raw => {
            return Err(format!(
                "{} is a raw file; resize it with `truncate -s {} {}`",
                a.path.display(),
                a.size,
                a.path.display()
            )
            .into())
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn merge(a: MergeArgs) -> Result<ExitCode> {
    require_vhdx(&a.child, "merge")?;
    let bar = Bar::new("merge");
    let result = Vhdx::merge_into_parent(
        &a.child,
        &|done, total| bar.update(done, total),
        cancel_flag(),
    );
    bar.finish();
    if cancel_flag().load(Ordering::SeqCst) {
        return Err(format!(
            "merge interrupted; both files are consistent. Run `vireo disk merge {}` again to \
             finish it",
            a.child.display()
        )
        .into());
    }
    result?;
    println!(
        "merged {} into its parent and removed it",
        a.child.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn compact(a: CompactArgs) -> Result<ExitCode> {
    require_vhdx(&a.path, "compact")?;
    let before = std::fs::metadata(&a.path)?.len();
    let bar = Bar::new("compact");
    let result = Vhdx::compact(
        &a.path,
        &|done, total| bar.update(done, total),
        cancel_flag(),
    );
    bar.finish();
    if cancel_flag().load(Ordering::SeqCst) {
        return Err("compact interrupted; the disk is consistent, run the command again".into());
    }
    result?;
    let after = std::fs::metadata(&a.path)?.len();
    println!(
        "compacted {}: {} -> {}",
        a.path.display(),
        human(before),
        human(after)
    );
    Ok(ExitCode::SUCCESS)
}
