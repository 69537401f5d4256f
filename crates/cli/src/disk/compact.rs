//! `vireo disk compact`: give unused blocks back and shorten the file, in place.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vireo_vhdx::{Vhdx, VhdxError};

use super::progress::{cancel_flag, Bar};
use super::size::human;
use super::{errors, require_vhdx, Result};
use crate::exit::CliError;

#[derive(Args)]
pub struct CompactArgs {
    /// The dynamic or differencing VHDX to compact.
    pub path: PathBuf,
}

pub fn run(a: CompactArgs) -> Result<ExitCode> {
    require_vhdx(&a.path, "compact")?;
    let bar = Bar::new("compact");
    let result = Vhdx::compact(
        &a.path,
        &|done, total| bar.update(done, total),
        cancel_flag(),
    );
    bar.finish();
    // A Ctrl-C that came after the last step changes nothing: the compaction is done.
    if let Err(VhdxError::Cancelled) = result {
        return Err(CliError::interrupted(format!(
            "compact interrupted; {} is consistent, run the command again",
            a.path.display()
        ))
        .into());
    }
    let report = result.map_err(|e| errors::vhdx(&a.path, e))?;
    println!(
        "compacted {}: {} -> {}",
        a.path.display(),
        human(report.file_size_before),
        human(report.file_size_after)
    );
    Ok(ExitCode::SUCCESS)
}
