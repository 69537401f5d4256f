//! `vireo disk resize`: change a VHDX's (or VHD's) virtual size.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use vireo_block::BlockBackend;
use vireo_vhdx::convert::Format;
use vireo_vhdx::vhd::{self, Vhd};
use vireo_vhdx::{OpenOptions, Vhdx, VhdxError};

use super::size::{human, parse_size};
use super::{errors, Result};
use crate::exit::CliError;

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

pub fn run(a: ResizeArgs) -> Result<ExitCode> {
    let path = &a.path;
    let old = match errors::detect(path)? {
        Format::Vhdx => {
            let disk =
                Vhdx::open(path, &OpenOptions::default()).map_err(|e| errors::vhdx(path, e))?;
            let old = disk.size();
            match disk.resize(a.size, a.force) {
                Err(VhdxError::ShrinkOverData { data_at, .. }) => {
                    return Err(shrink_over_data(path, a.size, data_at).into())
                }
                other => other.map_err(|e| errors::vhdx(path, e))?,
            }
            disk.flush().map_err(|e| errors::vhdx(path, e))?;
            old
        }
        Format::Vhd => {
            let disk = Vhd::open(path, false).map_err(|e| errors::vhd(path, e))?;
            let old = disk.size();
            match disk.resize_to(a.size, a.force) {
                Err(vhd::VhdError::ShrinkOverData { data_at, .. }) => {
                    return Err(shrink_over_data(path, a.size, data_at).into())
                }
                other => other.map_err(|e| CliError::failed(format!("{}: {e}", path.display())))?,
            }
            disk.flush()
                .map_err(|e| CliError::failed(format!("{}: {e}", path.display())))?;
            old
        }
        Format::Raw => {
            return Err(CliError::bad_input(format!(
                "{} is a raw file; resize it with `truncate -s {} {}`",
                path.display(),
                a.size,
                path.display()
            ))
            .into())
        }
    };
    println!(
        "resized {} from {} to {}",
        path.display(),
        human(old),
        human(a.size)
    );
    Ok(ExitCode::SUCCESS)
}

/// The refusal of a shrink that would drop data, the same for every format.
fn shrink_over_data(path: &Path, size: u64, data_at: u64) -> CliError {
    CliError::failed(format!(
        "shrinking {} to {size} would discard data at virtual offset {data_at}; add --force to \
         discard it",
        path.display()
    ))
}
