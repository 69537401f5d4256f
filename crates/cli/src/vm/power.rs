//! `vireo vm start|stop|save|turn-off|pause|resume|reset`. Start, stop and save are jobs in the daemon: the command follows
//! the job to its end (`job::wait`) unless `--no-wait`, and exits 1 with the job's error when it
//! fails. Turn-off, pause, resume and reset answer at once with the VM.

use std::error::Error;
use std::process::ExitCode;

use clap::Args;
use vireo_api::{Job, JobState, StopRequest, Vm};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::job::wait;
use crate::output::{emit, OutputFormat};

#[derive(Args, Debug)]
pub struct StartArgs {
    /// The VM's name or id.
    pub vm: String,
    /// Print the job and return at once; `vireo job show ID` follows it.
    #[arg(long)]
    pub no_wait: bool,
    /// text, or json (the API's job object, as it ended or, with --no-wait, as it began).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The VM's name or id.
    pub vm: String,
    /// Seconds the guest gets to power off after its shutdown line; then it is turned off.
    #[arg(long, value_name = "SECS", default_value_t = vireo_api::rest::DEFAULT_STOP_TIMEOUT_SECS)]
    pub timeout: u32,
    /// Print the job and return at once; `vireo job show ID` follows it.
    #[arg(long)]
    pub no_wait: bool,
    /// text, or json (the API's job object, as it ended or, with --no-wait, as it began).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct TurnOffArgs {
    /// The VM's name or id.
    pub vm: String,
    /// text, or json (the API's VM object, now off).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

pub fn start(client: &Client, args: StartArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&args.vm)?;
    let job: Job = client.post(&format!("{path}/start"), None::<&()>)?;
    follow(
        client,
        job,
        &args.vm,
        "start",
        "running",
        args.no_wait,
        args.output,
    )
}

/// `vireo vm save NAME`: state + memory into the VM's folder, the worker ends, the VM is
/// `saved`; `vireo vm start` continues it (`turn-off` discards the saved state).
pub fn save(client: &Client, args: StartArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&args.vm)?;
    let job: Job = client.post(&format!("{path}/save"), None::<&()>)?;
    follow(
        client,
        job,
        &args.vm,
        "save",
        "saved",
        args.no_wait,
        args.output,
    )
}

pub fn stop(client: &Client, args: StopArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&args.vm)?;
    let body = StopRequest {
        timeout_secs: Some(args.timeout),
    };
    let job: Job = client.post(&format!("{path}/stop"), Some(&body))?;
    follow(
        client,
        job,
        &args.vm,
        "stop",
        "off",
        args.no_wait,
        args.output,
    )
}

pub fn turn_off(client: &Client, args: TurnOffArgs) -> Result<(), CliError> {
    let path = super::path(&args.vm)?;
    let vm: Vm = client.post(&format!("{path}/turn-off"), None::<&()>)?;
    if args.output == OutputFormat::Json {
        emit(super::view::json(&vm))?;
    } else {
        emit(format!("VM {} is {}\n", vm.spec.name, vm.state))?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct VmOpArgs {
    /// The VM's name or id.
    pub vm: String,
    /// text, or json (the API's VM object, as the operation left it).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// `vireo vm pause|resume|reset`: `op` is the route's last segment.
pub fn vm_op(client: &Client, args: VmOpArgs, op: &str) -> Result<(), CliError> {
    let path = super::path(&args.vm)?;
    let vm: Vm = client.post(&format!("{path}/{op}"), None::<&()>)?;
    if args.output == OutputFormat::Json {
        emit(super::view::json(&vm))?;
    } else {
        emit(format!("VM {} is {}\n", vm.spec.name, vm.state))?;
    }
    Ok(())
}

/// Waits for `job` (unless `no_wait`) and reports how it ended.
fn follow(
    client: &Client,
    job: Job,
    vm: &str,
    verb: &str,
    goal: &str,
    no_wait: bool,
    output: OutputFormat,
) -> Result<ExitCode, Box<dyn Error>> {
    // A job that ended at once (a worker that could not even be spawned) is reported as
    // ended, --no-wait or not.
    if no_wait && job.state == JobState::Running {
        if output == OutputFormat::Json {
            emit(super::view::json(&job))?;
        } else {
            emit(format!(
                "job {} ({verb} {vm}) is running; `vireo job show {}` follows it\n",
                job.id, job.id
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let job = wait::wait(client, job, &format!("{verb} {vm}"))?;
    if output == OutputFormat::Json {
        emit(super::view::json(&job))?;
    }
    match job.state {
        JobState::Completed => {
            if output == OutputFormat::Text {
                emit(format!("VM {vm} is {goal}\n"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobState::Failed => Err(CliError::failed(format!(
            "{verb} of VM {vm} failed: {} (job {})",
            job.error.as_deref().unwrap_or("no reason given"),
            job.id
        ))
        .into()),
        JobState::Cancelled => Err(CliError::failed(format!(
            "{verb} of VM {vm} was cancelled (job {})",
            job.id
        ))
        .into()),
        JobState::Running => unreachable!("wait returns ended jobs"),
    }
}
