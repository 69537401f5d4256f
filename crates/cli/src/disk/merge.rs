//! `vireo disk merge`: fold a differencing VHDX into its parent, then delete it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vireo_vhdx::{Vhdx, VhdxError};

use super::progress::{cancel_flag, Bar};
use super::{errors, require_vhdx, Result};
use crate::exit::CliError;

#[derive(Args)]
pub struct MergeArgs {
    /// The differencing disk to merge into its parent.
    pub child: PathBuf,
}

pub fn run(a: MergeArgs) -> Result<ExitCode> {
    require_vhdx(&a.child, "merge")?;
    let bar = Bar::new("merge");
    let result = Vhdx::merge_into_parent(
        &a.child,
        &|done, total| bar.update(done, total),
        cancel_flag(),
    );
    bar.finish();
    // A Ctrl-C that came after the last block changes nothing: the merge is done.
    if let Err(VhdxError::Cancelled) = result {
        return Err(CliError::interrupted(format!(
            "merge interrupted; both files are consistent. Run `vireo disk merge {}` again to \
             finish it",
            a.child.display()
        ))
        .into());
    }
    result.map_err(|e| errors::vhdx(&a.child, e))?;
    println!(
        "merged {} into its parent and removed it",
        a.child.display()
    );
    Ok(ExitCode::SUCCESS)
}
