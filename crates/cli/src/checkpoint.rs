//! `vireo checkpoint ...`: Hyper-V standard checkpoints through vireod (docs/checkpoints.md) —
//! create, list (the tree, "now" marked), show, apply, rename, rm. Create, apply and rm are
//! jobs, followed to their end with progress (a delete's merge can take a while).

use std::error::Error;
use std::process::ExitCode;

use clap::Subcommand;
use vireo_api::checkpoint::tree_order;
use vireo_api::{
    ApplyCheckpointRequest, Checkpoint, CreateCheckpointRequest, Job, JobState,
    UpdateCheckpointRequest,
};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::job::wait;
use crate::output::{emit, OutputFormat};
use crate::table::utc;
use crate::vm::view::json;

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Checkpoint a VM (off, saved, running or paused): its spec, its disks (each VHDX disk
    /// goes on in a new differencing child) and, unless it is off, its state and memory
    ///
    ///   vireo checkpoint create web before-upgrade
    ///   vireo checkpoint create web            # named web-YYYYMMDD-HHMMSS
    #[command(verbatim_doc_comment)]
    Create {
        /// The VM's name or id.
        vm: String,
        /// The checkpoint's name (unique within the VM).
        name: Option<String>,
        /// text, or json (the job as it ended).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// The VM's checkpoints as a tree; "now" marks where the VM runs from.
    List {
        vm: String,
        /// text (the tree), or json (an array of the API's checkpoint objects).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// One checkpoint.
    Show {
        vm: String,
        /// The checkpoint's name or id.
        checkpoint: String,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Revert the VM to a checkpoint: its spec, its disks and (if captured) its state — the VM
    /// ends saved (start continues from that moment) or off. The VM's current state is lost
    /// unless --save-current; a running VM needs --save-current, --stop or --keep-running.
    Apply {
        vm: String,
        checkpoint: String,
        /// Checkpoint the VM's current state first.
        #[arg(long)]
        save_current: bool,
        /// Turn a running VM off first (its current state is lost).
        #[arg(long)]
        stop: bool,
        /// Revert a running or paused VM in place, keeping its worker process (like QEMU's
        /// loadvm): disks, memory and device state become the checkpoint's in one short
        /// pause and the guest carries on from that moment (a paused VM stays paused). The
        /// current state is lost. Needs a checkpoint with state and the same memory, vCPUs,
        /// disks and NICs (switch, MAC, VLAN, policy) as the VM has now; otherwise refused
        /// with nothing changed (use --stop or --save-current then). Switch NICs stay
        /// connected; a frame arriving during the pause may be lost.
        #[arg(long, conflicts_with_all = ["save_current", "stop"])]
        keep_running: bool,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Rename a checkpoint.
    Rename {
        vm: String,
        checkpoint: String,
        new_name: String,
    },
    /// Delete a checkpoint (its disk data merges into the VM's files; a running VM keeps
    /// running), or with --subtree it and every checkpoint below it.
    Rm {
        vm: String,
        checkpoint: String,
        #[arg(long)]
        subtree: bool,
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
}

/// `/v1/vms/{vm}/checkpoints[/{cp}]`, the keys checked before any request.
fn path(vm: &str, cp: Option<&str>) -> Result<String, CliError> {
    let base = format!("{}/checkpoints", crate::vm::path(vm)?);
    match cp {
        None => Ok(base),
        Some(cp) => {
            vireo_api::validate_name("checkpoint", cp).map_err(|e| {
                CliError::bad_input(format!(
                    "{cp:?} is not a checkpoint name or id: {}; `vireo checkpoint list {vm}` \
                     shows them",
                    e.problem
                ))
            })?;
            Ok(format!("{base}/{cp}"))
        }
    }
}

pub fn execute(client: &Client, command: CheckpointCommand) -> Result<ExitCode, Box<dyn Error>> {
    match command {
        CheckpointCommand::Create { vm, name, output } => {
            if let Some(n) = &name {
                vireo_api::validate_name("checkpoint name", n)
                    .map_err(|e| CliError::bad_input(e.to_string()))?;
            }
            let job: Job =
                client.post(&path(&vm, None)?, Some(&CreateCheckpointRequest { name }))?;
            follow(client, job, &format!("checkpoint {vm}"), output)?;
            if output == OutputFormat::Text {
                let cps: Vec<Checkpoint> = client.get(&path(&vm, None)?)?;
                if let Some(c) = cps.iter().find(|c| c.current) {
                    emit(format!("checkpoint {} of VM {vm} created\n", c.name))?;
                }
            }
        }
        CheckpointCommand::List { vm, output } => {
            let cps: Vec<Checkpoint> = client.get(&path(&vm, None)?)?;
            emit(if output == OutputFormat::Json {
                json(&cps)
            } else {
                tree(&cps)
            })?;
        }
        CheckpointCommand::Show {
            vm,
            checkpoint,
            output,
        } => {
            let c: Checkpoint = client.get(&path(&vm, Some(&checkpoint))?)?;
            emit(show(&c, output))?;
        }
        CheckpointCommand::Apply {
            vm,
            checkpoint,
            save_current,
            stop,
            keep_running,
            output,
        } => {
            let job: Job = client.post(
                &format!("{}/apply", path(&vm, Some(&checkpoint))?),
                Some(&ApplyCheckpointRequest {
                    save_current,
                    stop,
                    keep_running,
                }),
            )?;
            follow(client, job, &format!("apply {checkpoint} to {vm}"), output)?;
            if output == OutputFormat::Text {
                let v: vireo_api::Vm = client.get(&crate::vm::path(&vm)?)?;
                emit(format!(
                    "VM {vm} is at checkpoint {checkpoint} ({})\n",
                    v.state
                ))?;
            }
        }
        CheckpointCommand::Rename {
            vm,
            checkpoint,
            new_name,
        } => {
            vireo_api::validate_name("checkpoint name", &new_name)
                .map_err(|e| CliError::bad_input(e.to_string()))?;
            let c: Checkpoint = client.patch(
                &path(&vm, Some(&checkpoint))?,
                &UpdateCheckpointRequest { name: new_name },
            )?;
            emit(format!(
                "checkpoint {checkpoint} of VM {vm} is {}\n",
                c.name
            ))?;
        }
        CheckpointCommand::Rm {
            vm,
            checkpoint,
            subtree,
            output,
        } => {
            let job: Job = client.delete_json(&format!(
                "{}?subtree={subtree}",
                path(&vm, Some(&checkpoint))?
            ))?;
            follow(client, job, &format!("delete {checkpoint} of {vm}"), output)?;
            if output == OutputFormat::Text {
                emit(format!("checkpoint {checkpoint} of VM {vm} deleted\n"))?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for the job (progress on stderr); a failed or cancelled one is an error.
fn follow(client: &Client, job: Job, what: &str, output: OutputFormat) -> Result<(), CliError> {
    let job = wait::wait(client, job, what)?;
    if output == OutputFormat::Json {
        emit(json(&job))?;
    }
    match job.state {
        JobState::Completed => Ok(()),
        _ => Err(CliError::failed(format!(
            "{what} failed: {} (job {})",
            job.error.as_deref().unwrap_or("cancelled"),
            job.id
        ))),
    }
}

/// `list`: the tree, children indented under their parent, "now" below the current one.
fn tree(cps: &[Checkpoint]) -> String {
    if cps.is_empty() {
        return "no checkpoints\n".into();
    }
    let mut out = String::new();
    let mut now_shown = false;
    for (depth, c) in tree_order(cps) {
        let pad = "  ".repeat(depth);
        out.push_str(&format!(
            "{pad}{}  ({}{}{})\n",
            c.name,
            utc(c.created_at),
            if c.has_state { ", with state" } else { "" },
            if c.automatic { ", automatic" } else { "" }
        ));
        if c.current {
            out.push_str(&format!("{pad}  └─ now\n"));
            now_shown = true;
        }
    }
    if !now_shown {
        out.push_str("now (not below any checkpoint)\n");
    }
    out
}

fn show(c: &Checkpoint, output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return json(c);
    }
    let mut out = format!(
        "name:      {}\nid:        {}\ncreated:   {}\nparent:    {}\nstate:     {}\ncurrent:   {}\n\
         memory:    {} MiB\nvcpus:     {}\n",
        c.name,
        c.id,
        utc(c.created_at),
        c.parent.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        if c.has_state {
            "captured (apply leaves the VM saved)"
        } else {
            "none (apply leaves the VM off)"
        },
        if c.current { "yes (the VM runs from it)" } else { "no" },
        c.spec.memory_bytes >> 20,
        c.spec.vcpus
    );
    if c.automatic {
        out.push_str("taken:     automatically, before a risky operation (deleted when older than the VM keeps)\n");
    }
    if let Some(cap) = &c.capture {
        out.push_str(&format!(
            "capture:   {}, guest paused {:.1} ms ({} ms in all)\n",
            if cap.live {
                "live (the VM kept its worker)"
            } else {
                "save and restore"
            },
            cap.pause_us as f64 / 1e3,
            cap.total_ms
        ));
    }
    for d in &c.disks {
        out.push_str(&format!("disk {}:  {}\n", d.serial, d.frozen.display()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn cp(n: u128, parent: Option<u128>, current: bool) -> Checkpoint {
        Checkpoint {
            id: Uuid::from_u128(n),
            vm_id: Uuid::nil(),
            name: format!("c{n}"),
            parent: parent.map(Uuid::from_u128),
            created_at: n as i64,
            spec: serde_json::from_str(
                r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k"}"#,
            )
            .unwrap(),
            disks: vec![],
            has_state: n == 2,
            current,
            automatic: n == 3,
            capture: None,
        }
    }

    #[test]
    fn the_tree_marks_now() {
        let text = tree(&[
            cp(1, None, false),
            cp(2, Some(1), true),
            cp(3, Some(1), false),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("c1  ("), "{text}");
        assert!(lines[1].starts_with("  c2  (") && lines[1].ends_with(", with state)"));
        assert_eq!(lines[2], "    └─ now");
        assert!(lines[3].starts_with("  c3  (") && lines[3].ends_with(", automatic)"));
        assert_eq!(tree(&[]), "no checkpoints\n");
    }

    #[test]
    fn bad_keys_are_refused_before_any_request() {
        assert_eq!(
            path("web", Some("c1")).unwrap(),
            "/v1/vms/web/checkpoints/c1"
        );
        assert!(path("web", Some("a/b")).is_err());
        assert!(path("x y", None).is_err());
    }
}
