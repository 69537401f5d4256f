//! `vireo vm ...`: VMs as objects vireod owns — create, list, show, set, rename, rm, start,
//! stop, turn-off, pause, resume, reset, metrics, console, disk — over its REST API (docs/api.md). Each verb that needs more than a
//! request and a print lives in its own file under `vm/`.

mod auto_checkpoint;
mod console;
mod create;
mod disk;
mod disk_arg;
mod export;
mod metrics;
mod migrate;
mod move_storage;
pub mod nic;
mod power;
mod set;
pub(crate) mod view;

use std::error::Error;
use std::process::ExitCode;

use clap::Subcommand;
use vireo_api::{RenameRequest, Vm};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Create a VM (off) and print it with the identity vireod gave it (id, MACs, serials)
    ///
    /// Examples:
    ///   vireo vm create web --kernel vmlinux --memory 1G --vcpus 2 --disk web.vhdx
    ///   vireo vm create probe --kernel probe.elf --memory 32M --shutdown-line POWEROFF
    #[command(verbatim_doc_comment)]
    Create(create::CreateArgs),
    /// List the VMs (sorted by name): name, state, vCPUs, memory, id.
    List {
        /// text (a table) or json (an array of the API's VM objects).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Show one VM: its configuration, identity, state and times.
    Show {
        /// The VM's name or id.
        vm: String,
        /// text or json (the API's VM object).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Change a VM's configuration (while it is off): memory, vCPUs, command line, disks,
    /// automatic start. Disks keep their serials; an added disk gets a new one.
    Set(set::SetArgs),
    /// Give a VM a new name (its id, MACs and serials stay).
    Rename {
        /// The VM's name or id.
        vm: String,
        /// The new name.
        new_name: String,
    },
    /// Remove a VM (it must be off); its disk files stay unless --delete-disks.
    Rm {
        /// The VM's name or id.
        vm: String,
        /// Delete the VM's disk files as well.
        #[arg(long)]
        delete_disks: bool,
    },
    /// Start a VM (a saved one continues from its saved state); waits until its vCPUs run,
    /// with a progress bar (--no-wait: print the job).
    Start(power::StartArgs),
    /// Save a running or paused VM: its memory and state go to its folder, its worker ends, it
    /// is `saved`; `vm start` continues it, `vm turn-off` discards the saved state. vireod
    /// keeps its disks locked meanwhile (another process cannot open them for writing). Waits
    /// with a progress bar (--no-wait: print the job).
    Save(power::StartArgs),
    /// Move every disk of a VM into another folder while it runs (storage live migration):
    /// copies, mirrors the guest's writes, switches in one step, deletes the old files.
    /// An off VM's checkpoints move with it (a running VM with checkpoints is refused).
    /// Progress bar; Ctrl-C cancels the move (the VM stays on its old files).
    ///
    /// Example:
    ///   vireo vm move-storage web --to /srv/fast/web
    #[command(verbatim_doc_comment)]
    MoveStorage(move_storage::MoveStorageArgs),
    /// Move a running VM to another vireod (live migration; --quick: save, send, restore).
    /// Both hosts must trust each other (`vireo host trust add`) and reach the VM's disks at
    /// the same paths. Progress bar; Ctrl-C cancels (the VM keeps running here).
    ///
    /// Example:
    ///   vireo vm migrate web --to 192.0.2.7:7070 --max-downtime 50ms --streams 2
    #[command(verbatim_doc_comment)]
    Migrate(migrate::MigrateArgs),
    /// Ask a VM's guest to power off (its shutdown line), and turn it off after --timeout;
    /// waits until it is off (--no-wait: print the job).
    Stop(power::StopArgs),
    /// Turn a VM off at once (vCPUs stopped, disks flushed): pulling the plug. A saved VM's
    /// saved state is discarded.
    TurnOff(power::TurnOffArgs),
    /// Pause a running VM (its vCPUs stop; memory and devices stay as they are).
    Pause(power::VmOpArgs),
    /// Let a paused VM run again.
    Resume(power::VmOpArgs),
    /// Reset (hard reboot) a running or paused VM; it runs again at once.
    Reset(power::VmOpArgs),
    /// Resource metering (Measure-VM): CPU, memory, disks and NICs used in the current period
    ///
    /// Metering is off for new VMs: --enable starts counting, --disable stops, --reset ends
    /// the period (printing its final report, the billing cycle) and starts a new one.
    ///   vireo vm metrics web --enable
    ///   vireo vm metrics web --output json
    ///   vireo vm metrics web --reset
    #[command(verbatim_doc_comment)]
    Metrics(metrics::MetricsArgs),
    /// Attach to a VM's serial console (COM1), both ways; --log prints its recent output
    ///
    /// On a terminal: raw mode, Ctrl-] detaches. With pipes: stdin goes to the guest and the
    /// guest's output to stdout; vireo exits once stdin ends and the guest has been quiet for
    /// 500 ms (at most 5 s), at --timeout, or when the VM stops.
    #[command(verbatim_doc_comment)]
    Console(console::ConsoleArgs),
    /// Export an off or saved VM to DIR/<name>/ (disks with their parent chains, the saved
    /// state, a manifest): a folder `vm import` takes on this or another host. Progress bar;
    /// Ctrl-C cancels and leaves nothing.
    Export(export::ExportArgs),
    /// Import an exported VM folder: in place, or --copy [--to DIR]; --new-id for a copy
    /// beside the original. Problems (name or id taken, a switch or memory this host lacks)
    /// are all listed with the flag that fixes each.
    Import(export::ImportArgs),
    /// Clone an off or saved VM: full copies of its disks, a new id, new MACs and serials.
    Clone(export::CloneArgs),
    /// A VM's disks: add, rm (hot add and remove while it runs), list.
    Disk {
        #[command(subcommand)]
        command: disk::DiskCommand,
    },
    /// A VM's network adapters on vireod switches: add, set (live), rm, list.
    #[command(subcommand)]
    Nic(nic::NicCommand),
}

pub fn execute(client: &Client, command: VmCommand) -> Result<ExitCode, Box<dyn Error>> {
    match command {
        VmCommand::Create(args) => {
            let spec = args.to_spec()?;
            let route = match &args.pool {
                Some(pool) => {
                    vireo_api::validate_name("pool", pool)
                        .map_err(|e| CliError::bad_input(format!("--pool {e}")))?;
                    format!("/v1/vms?pool={pool}")
                }
                None => "/v1/vms".to_string(),
            };
            let vm: Vm = client.post(&route, Some(&spec))?;
            emit(view::show(&vm, args.output))?;
        }
        VmCommand::List { output } => {
            let vms: Vec<Vm> = client.get("/v1/vms")?;
            emit(view::list(&vms, output))?;
        }
        VmCommand::Show { vm, output } => {
            let vm: Vm = client.get(&path(&vm)?)?;
            emit(view::show(&vm, output))?;
        }
        VmCommand::Set(args) => set::execute(client, args)?,
        VmCommand::Rename { vm, new_name } => {
            let path = path(&vm)?;
            check_new_name(&new_name)?;
            let body = RenameRequest { name: new_name };
            let renamed: Vm = client.post(&format!("{path}/rename"), Some(&body))?;
            emit(format!(
                "renamed VM {vm} to {} ({})\n",
                renamed.spec.name,
                renamed.id()
            ))?;
        }
        VmCommand::Rm { vm, delete_disks } => {
            let path = path(&vm)?;
            client.delete(&format!("{path}?delete_disks={delete_disks}"))?;
            if delete_disks {
                emit(format!("removed VM {vm} and deleted its disks\n"))?;
            } else {
                emit(format!("removed VM {vm} (its disk files stay)\n"))?;
            }
        }
        VmCommand::Start(args) => return power::start(client, args),
        VmCommand::Save(args) => return power::save(client, args),
        VmCommand::MoveStorage(args) => return move_storage::execute(client, args),
        VmCommand::Migrate(args) => return migrate::execute(client, args),
        VmCommand::Stop(args) => return power::stop(client, args),
        VmCommand::TurnOff(args) => power::turn_off(client, args)?,
        VmCommand::Pause(args) => power::vm_op(client, args, "pause")?,
        VmCommand::Resume(args) => power::vm_op(client, args, "resume")?,
        VmCommand::Reset(args) => power::vm_op(client, args, "reset")?,
        VmCommand::Metrics(args) => metrics::execute(client, args)?,
        VmCommand::Console(args) => return console::execute(client, args),
        VmCommand::Export(args) => return export::export(client, args),
        VmCommand::Import(args) => return export::import(client, args),
        VmCommand::Clone(args) => return export::clone(client, args),
        VmCommand::Disk { command } => disk::execute(client, command)?,
        VmCommand::Nic(cmd) => nic::execute(client, cmd)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `/v1/vms/{vm}` for a name or id given on the command line. Anything that is neither (a '/',
/// a space, ...) is refused here: it would otherwise change the URL's meaning.
pub fn path(vm: &str) -> Result<String, CliError> {
    vireo_api::validate_name("VM", vm).map_err(|e| {
        CliError::bad_input(format!(
            "{vm:?} is not a VM name or id: {}; `vireo vm list` shows the VMs",
            e.problem
        ))
    })?;
    Ok(format!("/v1/vms/{vm}"))
}

fn check_new_name(name: &str) -> Result<(), CliError> {
    vireo_api::validate_vm_name("name", name)
        .map_err(|e| CliError::bad_input(format!("new name {name:?}: {}", e.problem)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_make_paths_and_nothing_else_does() {
        assert_eq!(path("web-1").unwrap(), "/v1/vms/web-1");
        let id = "12345678-9abc-4def-8123-456789abcdef";
        assert_eq!(path(id).unwrap(), format!("/v1/vms/{id}"));
        for bad in [
            "",
            "a/b",
            "../x",
            "a b",
            "a?x=1",
            ".hidden",
            &"n".repeat(65),
        ] {
            let e = path(bad).unwrap_err();
            assert_eq!(e.status, crate::exit::BAD_INPUT, "{bad}");
            assert!(e.message.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(check_new_name("ok.2").is_ok());
        assert!(check_new_name("no/slash").is_err());
    }
}
