//! `vireo disk rebase`: give a differencing VHDX another parent, or none (qemu-img rebase's
//! job). Safe by default: what the child shows does not change.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use clap::Args;
use vireo_vhdx::convert::Format;
use vireo_vhdx::{Rebase, Vhdx, VhdxError};

use super::progress::{cancel_flag, Bar};
use super::Result;
use crate::exit::CliError;

#[derive(Args)]
pub struct RebaseArgs {
    /// The differencing VHDX whose parent changes.
    pub child: PathBuf,
    /// The new parent (a VHDX of the child's virtual size). Wherever the child has no data of
    /// its own and the new parent differs from the old, the old data is copied into the child
    /// first, so its content stays the same.
    #[arg(
        long,
        required_unless_present = "no_parent",
        conflicts_with = "no_parent"
    )]
    pub parent: Option<PathBuf>,
    /// Remove the parent: the child becomes a standalone dynamic VHDX holding everything it
    /// showed.
    #[arg(long)]
    pub no_parent: bool,
    /// Only rewrite the link to the parent, for a parent that was moved or renamed: nothing is
    /// compared or copied, so the new parent must hold the old parent's data.
    #[arg(long = "unsafe", conflicts_with = "no_parent")]
    pub unsafe_: bool,
}

pub fn rebase(a: RebaseArgs) -> Result<ExitCode> {
    for p in std::iter::once(&a.child).chain(&a.parent) {
        if !p.exists() {
            return Err(CliError::bad_input(format!("{} does not exist", p.display())).into());
        }
    }
    super::require_vhdx(&a.child, "rebase")?;
    if let Some(p) = &a.parent {
        let format = Format::detect(p)?;
        if format != Format::Vhdx {
            return Err(CliError::bad_input(format!(
                "{} is a {} image; the parent of a VHDX must be a VHDX: convert it first with \
                 `vireo disk convert {} NEW.vhdx`",
                p.display(),
                format.name(),
                p.display()
            ))
            .into());
        }
    }
    let how = match (&a.parent, a.unsafe_) {
        (Some(p), false) => Rebase::Onto(p),
        (Some(p), true) => Rebase::Relink(p),
        (None, _) => Rebase::Standalone,
    };
    let bar = Bar::new("rebase");
    let result = Vhdx::rebase(
        &a.child,
        how,
        &|done, total| bar.update(done, total),
        cancel_flag(),
    );
    bar.finish();
    let child = a.child.display();
    if cancel_flag().load(Ordering::SeqCst) {
        return Err(CliError::interrupted(format!(
            "rebase interrupted; {child} is unchanged (still on its old parent)"
        ))
        .into());
    }
    if let Err(e) = result {
        return Err(explain(&a, e).into());
    }
    match &a.parent {
        Some(p) => println!("rebased {child} onto {}", p.display()),
        None => println!("{child} no longer has a parent"),
    }
    Ok(ExitCode::SUCCESS)
}

/// One line naming the file at fault and the way out; bad input (nothing changed) exits 2.
fn explain(a: &RebaseArgs, e: VhdxError) -> CliError {
    let child = a.child.display();
    match e {
        VhdxError::RebaseLoop { .. }
        | VhdxError::ParentSizeMismatch { .. }
        | VhdxError::ParentSectorMismatch { .. }
        | VhdxError::MergeUnfinished(_) => CliError::bad_input(e.to_string()),
        VhdxError::NotDifferencing(_) => CliError::bad_input(format!(
            "{child} has no parent to change; only differencing disks can be rebased"
        )),
        VhdxError::ParentNotFound { .. } | VhdxError::ParentLinkageMismatch { .. } => {
            CliError::failed(format!(
                "{e}; if the parent was moved or renamed, point {child} at it with \
                 `vireo disk rebase {child} --parent NEW --unsafe`"
            ))
        }
        e => CliError::failed(format!("rebasing {child}: {e}")),
    }
}
