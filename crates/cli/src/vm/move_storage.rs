//! `vireo vm move-storage NAME --to DIR [--flatten]`: storage live migration
//! (docs/storage-migration.md). Follows the daemon's `move_storage` job with a progress bar;
//! unlike other jobs, Ctrl-C here *cancels* the move (the VM stays on its old files and the
//! copies are removed), then waits for the job to end; a second Ctrl-C stops waiting.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vireo_api::storage_move::MoveStorageRequest;
use vireo_api::{Job, JobState};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};

#[derive(Args, Debug)]
pub struct MoveStorageArgs {
    /// The VM's name or id (running, paused or off). A VM with checkpoints moves its whole
    /// checkpoint tree with it, also while it runs (frozen files into DIR, vireod's own into
    /// DIR/vireo-checkpoints-<vm id>/, where new checkpoints' files go from then on); the
    /// checkpoints' saved state stays with vireod. Checkpoint operations of the VM are
    /// refused while the move runs.
    pub vm: String,
    /// Destination folder (absolute, inside one of vireod's storage roots; created if
    /// missing). None of the disks' file names may exist there.
    #[arg(long)]
    pub to: PathBuf,
    /// Copy each VHDX chain into one standalone VHDX instead of file by file. Refused for a
    /// VM with checkpoints (their frozen files would be lost).
    #[arg(long)]
    pub flatten: bool,
    /// Print the job and return at once; `vireo job show ID` follows it, `vireo job cancel
    /// ID` cancels it.
    #[arg(long)]
    pub no_wait: bool,
    /// text, or json (the job as it ended).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

pub fn execute(client: &Client, args: MoveStorageArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&args.vm)?;
    let to = if args.to.is_absolute() {
        args.to.clone()
    } else {
        std::env::current_dir()?.join(&args.to)
    };
    let body = MoveStorageRequest {
        to,
        flatten: args.flatten,
    };
    let job: Job = client.post(&format!("{path}/move-storage"), Some(&body))?;
    if args.no_wait {
        if args.output == OutputFormat::Json {
            emit(super::view::json(&job))?;
        } else {
            emit(format!(
                "job {} (move storage of {}) is running; `vireo job show {}` follows it\n",
                job.id, args.vm, job.id
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let job = crate::job::wait::follow_cancellable(
        client,
        job,
        &format!("move storage of {}", args.vm),
        "the VM stays on its old files, the copies are removed",
        &|_: &Job| None,
    )?;
    if args.output == OutputFormat::Json {
        emit(super::view::json(&job))?;
    }
    match job.state {
        JobState::Completed => {
            if args.output == OutputFormat::Text {
                emit(format!(
                    "moved the disks of VM {} to {}\n",
                    args.vm,
                    body.to.display()
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobState::Cancelled => Err(CliError::failed(format!(
            "the storage move of VM {} was cancelled; it runs on its old files (job {})",
            args.vm, job.id
        ))
        .into()),
        _ => Err(CliError::failed(format!(
            "the storage move of VM {} failed: {}; it runs on its old files (job {})",
            args.vm,
            job.error.as_deref().unwrap_or("no reason given"),
            job.id
        ))
        .into()),
    }
}
