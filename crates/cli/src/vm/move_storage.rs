//! `vireo vm move-storage NAME --to DIR [--flatten]`: storage live migration
//! (docs/storage-migration.md). Follows the daemon's `move_storage` job with a progress bar;
//! unlike other jobs, Ctrl-C here *cancels* the move (the VM stays on its old files and the
//! copies are removed), then waits for the job to end; a second Ctrl-C stops waiting.

use std::error::Error;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vireo_api::storage_move::MoveStorageRequest;
use vireo_api::{Job, JobState};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};

#[derive(Args, Debug)]
pub struct MoveStorageArgs {
    /// The VM's name or id (running, paused or off).
    pub vm: String,
    /// Destination folder (absolute, inside one of vireod's storage roots; created if
    /// missing). None of the disks' file names may exist there.
    #[arg(long)]
    pub to: PathBuf,
    /// Copy each VHDX chain into one standalone VHDX instead of file by file.
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

const POLL: Duration = Duration::from_millis(200);
static CTRL_C: AtomicU32 = AtomicU32::new(0);

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
    let mut job: Job = client.post(&format!("{path}/move-storage"), Some(&body))?;
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
    let _ = ctrlc::set_handler(|| {
        CTRL_C.fetch_add(1, Ordering::SeqCst);
    });
    let bar = bar(&args.vm);
    let mut asked_cancel = false;
    let mut last_line = None;
    while job.state == JobState::Running {
        match &bar {
            Some(b) => b.set_position(job.progress.min(100).into()),
            None if last_line != Some(job.progress) => {
                eprintln!("move storage of {}: {}%", args.vm, job.progress);
                last_line = Some(job.progress);
            }
            None => {}
        }
        let next = Instant::now() + POLL;
        while Instant::now() < next {
            let presses = CTRL_C.load(Ordering::SeqCst);
            if presses >= 2 {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Err(CliError::interrupted(format!(
                    "stopped waiting; job {} is being cancelled: `vireo job show {}` follows it",
                    job.id, job.id
                ))
                .into());
            }
            if presses == 1 && !asked_cancel {
                asked_cancel = true;
                let msg = "cancelling: the VM stays on its old files, the copies are removed \
                           (Ctrl-C again to stop waiting)";
                match &bar {
                    Some(b) => b.set_message(msg),
                    None => eprintln!("{msg}"),
                }
                let _: Job = client.post(&format!("/v1/jobs/{}/cancel", job.id), None::<&()>)?;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        job = client.get(&format!("/v1/jobs/{}", job.id))?;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
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

fn bar(vm: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos:>3}% {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("move storage of {vm}"));
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}
