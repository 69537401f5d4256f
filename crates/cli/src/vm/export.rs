//! `vireo vm export|import|clone` (docs/export.md): jobs in vireod, followed with a progress
//! bar; Ctrl-C cancels the job (vireod removes what it wrote). Paths are vireod's: a relative
//! one is made absolute from the current directory, as for `vm create`.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use vireo_api::{CloneRequest, ExportRequest, ImportReply, ImportRequest, Job, JobState};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::job::wait;
use crate::output::{emit, OutputFormat};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The VM's name or id (a running or paused VM is exported from a temporary live
    /// checkpoint, deleted afterwards). Its checkpoints go with it (the whole tree).
    pub vm: String,
    /// An existing directory inside vireod's storage roots; the VM goes to DIR/<name>/.
    pub dir: PathBuf,
    /// Export this checkpoint (name or id) instead of the VM as it is now, without the
    /// checkpoint tree.
    #[arg(long, value_name = "CP")]
    pub checkpoint: Option<String>,
    /// text, or json (the API's job object as it ended).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The exported VM's folder (the one holding vm.json).
    pub dir: PathBuf,
    /// Copy the files instead of using them where they are.
    #[arg(long)]
    pub copy: bool,
    /// Where the copy goes (DIR/<name>/); default <first storage root>/vireo-vms/.
    #[arg(long, value_name = "DIR", requires = "copy")]
    pub to: Option<PathBuf>,
    /// A new VM id, new MACs and new disk serials (a saved state is then dropped, and the
    /// checkpoints keep their disks but not their memory state).
    #[arg(long)]
    pub new_id: bool,
    /// Another name than the exported one.
    #[arg(long)]
    pub name: Option<String>,
    /// Put the NICs on switch OLD onto switch NEW (repeatable).
    #[arg(long = "switch", value_name = "OLD=NEW", value_parser = parse_switch)]
    pub switches: Vec<(String, String)>,
    /// Another memory size: bytes or with a K, M, G suffix.
    #[arg(long, value_name = "SIZE", value_parser = crate::disk::parse_size)]
    pub memory: Option<u64>,
    /// text, or json (the API's job object as it ended).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct CloneArgs {
    /// The VM to clone (a running or paused one from a temporary live checkpoint). The clone
    /// has no checkpoints.
    pub vm: String,
    /// The clone's name.
    pub new_name: String,
    /// Where the clone's files go (DIR/<name>/); default <first storage root>/vireo-vms/.
    #[arg(long, value_name = "DIR")]
    pub to: Option<PathBuf>,
    /// text, or json (the API's job object as it ended).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

fn parse_switch(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.is_empty() && !new.is_empty() => {
            Ok((old.to_string(), new.to_string()))
        }
        _ => Err(format!("{s:?} is not OLD=NEW (two switch names)")),
    }
}

fn absolute(p: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(p).map_err(|e| CliError::bad_input(format!("{}: {e}", p.display())))
}

pub fn export(client: &Client, a: ExportArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&a.vm)?;
    let body = ExportRequest {
        dir: absolute(&a.dir)?,
        checkpoint: a.checkpoint,
    };
    let job: Job = client.post(&format!("{path}/export"), Some(&body))?;
    let what = format!("export {}", a.vm);
    let done = finish(client, job, &what, a.output)?;
    if a.output == OutputFormat::Text && done {
        emit(format!(
            "exported VM {} to {}\n",
            a.vm,
            body.dir.join(&a.vm).display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn import(client: &Client, a: ImportArgs) -> Result<ExitCode, Box<dyn Error>> {
    if let Some(n) = &a.name {
        vireo_api::validate_name("name", n)
            .map_err(|e| CliError::bad_input(format!("--name {n:?}: {}", e.problem)))?;
    }
    let body = ImportRequest {
        dir: absolute(&a.dir)?,
        copy: a.copy,
        to: a.to.as_deref().map(absolute).transpose()?,
        new_id: a.new_id,
        name: a.name,
        switches: a.switches.into_iter().collect::<BTreeMap<_, _>>(),
        memory_bytes: a.memory,
    };
    let reply: ImportReply = client.post("/v1/vms/import", Some(&body))?;
    report(client, reply, "import", a.output)
}

pub fn clone(client: &Client, a: CloneArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&a.vm)?;
    let body = CloneRequest {
        name: a.new_name,
        to: a.to.as_deref().map(absolute).transpose()?,
    };
    let reply: ImportReply = client.post(&format!("{path}/clone"), Some(&body))?;
    report(client, reply, &format!("clone {}", a.vm), a.output)
}

fn report(
    client: &Client,
    reply: ImportReply,
    verb: &str,
    output: OutputFormat,
) -> Result<ExitCode, Box<dyn Error>> {
    for w in &reply.warnings {
        eprintln!("warning: {w}");
    }
    let what = format!("{verb} as {}", reply.name);
    if finish(client, reply.job, &what, output)? && output == OutputFormat::Text {
        emit(format!(
            "VM {} is in the inventory; its files are in {}\n",
            reply.name,
            reply.dir.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows the job (Ctrl-C cancels it); true when it completed, an error when it did not.
fn finish(client: &Client, job: Job, what: &str, output: OutputFormat) -> Result<bool, CliError> {
    let job = wait::wait_or_cancel(client, job, what)?;
    if output == OutputFormat::Json {
        emit(super::view::json(&job))?;
    }
    match job.state {
        JobState::Completed => Ok(true),
        JobState::Failed => Err(CliError::failed(format!(
            "{what} failed: {} (job {})",
            job.error.as_deref().unwrap_or("no reason given"),
            job.id
        ))),
        JobState::Cancelled => Err(CliError::failed(format!(
            "{what} was cancelled (job {})",
            job.id
        ))),
        JobState::Running => unreachable!("wait returns ended jobs"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn switch_maps_are_old_equals_new() {
        assert_eq!(
            super::parse_switch("lab=prod").unwrap(),
            ("lab".into(), "prod".into())
        );
        for bad in ["lab", "=x", "x=", ""] {
            assert!(super::parse_switch(bad).is_err(), "{bad}");
        }
    }
}
