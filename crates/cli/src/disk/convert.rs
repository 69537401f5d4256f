//! `vireo disk convert`: any of VHDX, VHD and raw into a new file of any of them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vireo_vhdx::convert::{self, ConvertError, ConvertOptions, Format, OutputType};

use super::progress::{cancel_flag, Bar};
use super::size::{human, parse_size};
use super::{errors, sector_arg, to_u32, FormatArg, Result, TypeArg};
use crate::exit::CliError;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source disk (VHDX, VHD or raw; recognised by content).
    pub src: PathBuf,
    /// Destination; must not exist. It appears only once the copy is complete.
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
    /// Destination logical sector size (VHDX only): 512 or 4096; default the source's.
    #[arg(long, value_parser = parse_size)]
    pub sector: Option<u64>,
}

pub fn run(a: ConvertArgs) -> Result<ExitCode> {
    let format = match a.format {
        Some(f) => f.into(),
        None => Format::from_extension(&a.dst).ok_or_else(|| {
            CliError::bad_input(format!(
                "cannot tell the destination format from {:?}: add --format vhdx|vhd|raw or \
                 use a .vhdx, .vhd or .img extension",
                a.dst.display().to_string()
            ))
        })?,
    };
    let logical_sector = sector_arg("--sector", a.sector)?;
    let block_size = to_u32("--block-size", a.block_size)?;
    match format {
        Format::Vhd if logical_sector.is_some_and(|s| s != 512) => {
            return Err(CliError::bad_input(
                "VHD has 512-byte sectors only: drop --sector, or convert to .vhdx for 4096",
            )
            .into())
        }
        Format::Raw if logical_sector.is_some() || block_size.is_some() => {
            return Err(CliError::bad_input(
                "raw files have no block or sector size: drop --block-size/--sector",
            )
            .into())
        }
        _ => {}
    }
    errors::existing(&a.src)?;
    errors::new_file(&a.dst)?;
    let opts = ConvertOptions {
        format,
        output_type: match a.disk_type {
            TypeArg::Dynamic => OutputType::Dynamic,
            TypeArg::Fixed => OutputType::Fixed,
        },
        block_size,
        logical_sector,
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
    let report = result.map_err(|e| match e {
        // The copy reads one file and writes the other: name both.
        ConvertError::Io(_) | ConvertError::Block(_) => CliError::failed(format!(
            "converting {} to {}: {e}; {} was not created",
            a.src.display(),
            a.dst.display(),
            a.dst.display()
        )),
        e => errors::convert(&a.src, e),
    })?;
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
