//! `vireo job ...`: the long operations vireod runs (start, stop; later save, export, ...) —
//! list, show, cancel — and [`wait::wait`], which `vm start`/`vm stop` use to follow theirs.

pub mod view;
pub mod wait;

use std::collections::HashMap;
use std::error::Error;
use std::process::ExitCode;

use clap::Subcommand;
use uuid::Uuid;
use vireo_api::{Job, Vm};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};

#[derive(Subcommand)]
pub enum JobCommand {
    /// List jobs, newest first: id, VM, kind, state, progress, error.
    List {
        /// Only the jobs of this VM (name or id).
        #[arg(long)]
        vm: Option<String>,
        /// text (a table) or json (an array of the API's job objects).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Show one job.
    Show {
        /// The job's id (as `vm start --no-wait` and `job list` print it).
        id: String,
        /// text or json (the API's job object).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Cancel a running job (a job that has ended cannot be: exit 1).
    Cancel {
        /// The job's id.
        id: String,
        /// text or json (the API's job object, as cancelled).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
}

pub fn execute(client: &Client, command: JobCommand) -> Result<ExitCode, Box<dyn Error>> {
    match command {
        JobCommand::List { vm, output } => {
            let path = match &vm {
                Some(vm) => {
                    crate::vm::path(vm)?;
                    format!("/v1/jobs?vm={vm}")
                }
                None => "/v1/jobs".to_string(),
            };
            let jobs: Vec<Job> = client.get(&path)?;
            let names = vm_names(client, output);
            emit(view::list(&jobs, &names, output))?;
        }
        JobCommand::Show { id, output } => {
            let job: Job = client.get(&path(&id)?)?;
            let names = vm_names(client, output);
            emit(view::show(&job, &names, output))?;
        }
        JobCommand::Cancel { id, output } => {
            let job: Job = client.post(&format!("{}/cancel", path(&id)?), None::<&()>)?;
            if output == OutputFormat::Json {
                emit(crate::vm::view::json(&job))?;
            } else {
                emit(format!(
                    "job {} is {}\n",
                    job.id,
                    wait::state_name(job.state)
                ))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `/v1/jobs/{id}`; an id that is not a UUID is bad input, refused before any request.
fn path(id: &str) -> Result<String, CliError> {
    let id: Uuid = id.parse().map_err(|_| {
        CliError::bad_input(format!(
            "{id:?} is not a job id (a UUID, as `vireo job list` prints it)"
        ))
    })?;
    Ok(format!("/v1/jobs/{id}"))
}

/// VM names by id, so a table shows `web`, not a UUID. Text output only: JSON keeps the API's
/// objects. Names are cosmetic, so a failure here falls back to the ids.
fn vm_names(client: &Client, output: OutputFormat) -> HashMap<Uuid, String> {
    if output == OutputFormat::Json {
        return HashMap::new();
    }
    client
        .get::<Vec<Vm>>("/v1/vms")
        .map(|vms| vms.into_iter().map(|vm| (vm.id(), vm.spec.name)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn job_ids_are_uuids() {
        let id = "12345678-9abc-4def-8123-456789abcdef";
        assert_eq!(super::path(id).unwrap(), format!("/v1/jobs/{id}"));
        for bad in ["", "42", "../vms", "12345678-9abc-4def-8123-456789abcdeg"] {
            let e = super::path(bad).unwrap_err();
            assert_eq!(e.status, crate::exit::BAD_INPUT);
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
