//! `vireo disk create`: a new VHDX (dynamic, fixed or differencing), VHD or raw file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vireo_vhdx::convert::{self, Format, OutputType};
use vireo_vhdx::vhd::{self, Vhd, VhdCreateOptions};
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};

use super::errors;
use super::size::{human, parse_size};
use super::{sector_arg, to_u32, FormatArg, Result, TypeArg};
use crate::exit::CliError;

#[derive(Args)]
pub struct CreateArgs {
    /// Path of the new disk; must not exist. The extension picks the format (.vhdx, .avhdx,
    /// .vhd, .img/.raw) unless --format is given.
    pub path: PathBuf,
    /// Virtual size, e.g. 64G, 512M, 1.5G, 2T (binary units). Up to 64T for VHDX, 2040G for VHD.
    #[arg(long, value_parser = parse_size, required_unless_present = "parent")]
    pub size: Option<u64>,
    /// Parent disk (a VHDX): creates a differencing VHDX whose unwritten sectors read from the
    /// parent.
    #[arg(long, conflicts_with_all = ["size", "disk_type"])]
    pub parent: Option<PathBuf>,
    /// dynamic (sparse, the default) or fixed (all space allocated now).
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

pub fn run(a: CreateArgs) -> Result<ExitCode> {
    errors::new_file(&a.path)?;
    let format = a
        .format
        .map(Format::from)
        .or_else(|| Format::from_extension(&a.path))
        .unwrap_or(Format::Vhdx);
    if let Some(parent) = &a.parent {
        if format != Format::Vhdx {
            return Err(CliError::bad_input(format!(
                "differencing {} files cannot be created; name the child .avhdx or .vhdx",
                format.name().to_uppercase()
            ))
            .into());
        }
        let parent_format = errors::detect(parent)?;
        if parent_format != Format::Vhdx {
            return Err(CliError::bad_input(format!(
                "{} is a {} image: {} parents are not supported; convert it first with \
                 `vireo disk convert {} BASE.vhdx` and use that as the parent",
                parent.display(),
                parent_format.name(),
                parent_format.name().to_uppercase(),
                parent.display()
            ))
            .into());
        }
    }
    let block_size = to_u32("--block-size", a.block_size)?;
    let logical = sector_arg("--sector", a.sector)?;
    let physical = sector_arg("--physical-sector", a.physical_sector)?;
    let kind = match (&a.parent, a.disk_type, format) {
        (Some(_), _, _) => "differencing",
        (None, TypeArg::Fixed, Format::Raw) => "fully allocated",
        (None, TypeArg::Dynamic, Format::Raw) => "sparse",
        (None, TypeArg::Fixed, _) => "fixed",
        (None, TypeArg::Dynamic, _) => "dynamic",
    };
    let size = match format {
        Format::Raw => create_raw(&a, logical.or(physical), block_size)?,
        Format::Vhd => create_vhd(&a, logical, block_size)?,
        Format::Vhdx => create_vhdx(&a, block_size, logical, physical)?,
    };
    println!(
        "created {} ({kind} {}, {})",
        a.path.display(),
        format.name().to_uppercase(),
        human(size)
    );
    Ok(ExitCode::SUCCESS)
}

fn create_raw(a: &CreateArgs, sector: Option<u32>, block_size: Option<u32>) -> Result<u64> {
    if sector.is_some() || block_size.is_some() {
        return Err(CliError::bad_input(
            "raw files have no block or sector size: drop --block-size/--sector, or pick .vhdx",
        )
        .into());
    }
    let size = a.size.unwrap_or(0);
    let output_type = match a.disk_type {
        TypeArg::Dynamic => OutputType::Dynamic,
        TypeArg::Fixed => OutputType::Fixed,
    };
    convert::create_raw(&a.path, size, output_type).map_err(|e| errors::convert(&a.path, e))?;
    Ok(size)
}

fn create_vhd(a: &CreateArgs, logical: Option<u32>, block_size: Option<u32>) -> Result<u64> {
    if logical.is_some_and(|s| s != 512) {
        return Err(CliError::bad_input("VHD has 512-byte sectors only; use VHDX for 4096").into());
    }
    let size = a.size.unwrap_or(0);
    if !size.is_multiple_of(512) {
        return Err(
            CliError::bad_input(format!("--size {size} is not a multiple of 512 bytes")).into(),
        );
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
    )
    .map_err(|e| errors::vhd(&a.path, e))?;
    Ok(vireo_block::BlockBackend::size(&disk))
}

fn create_vhdx(
    a: &CreateArgs,
    block_size: Option<u32>,
    logical: Option<u32>,
    physical: Option<u32>,
) -> Result<u64> {
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
    let disk = Vhdx::create(&a.path, &opts).map_err(|e| errors::vhdx(&a.path, e))?;
    Ok(vireo_block::BlockBackend::size(&disk))
}
