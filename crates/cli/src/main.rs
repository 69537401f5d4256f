//! `vireo`: the command-line front end. Each subcommand lives in its own module; this file only
//! parses arguments and turns an error into one line for the user; `vireo run` is handed to the
//! slim `vireo-run` binary first (`run_exec.rs`).
#![forbid(unsafe_code)]

mod api_client;
mod checkpoint;
mod completions;
mod control_client;
mod disk;
mod exit;
mod global_args;
mod host;
mod hostcmd;
mod job;
mod logging;
mod netvirt;
mod netvirt_gateway;
mod output;
mod pool;
mod run;
mod run_exec;
mod run_only;
mod switch;
mod switch_mirror;
mod switch_team;
mod table;
mod vm;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vireo",
    version,
    about = "Vireo: virtualization for Linux hosts",
    after_help = exit::HELP_TABLE
)]
struct Cli {
    #[command(flatten)]
    global: global_args::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(about = run::ABOUT)]
    Run(run::RunArgs),
    /// Create, inspect, check, convert, compare, map, resize, merge, rebase and compact virtual
    /// disks (VHDX, VHD, raw).
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Talk to a running VM's control socket (`vireo run --control PATH`): list its disks,
    /// live-merge a differencing disk, resize a disk while the guest runs.
    Control(control_client::ControlArgs),
    /// Manage VMs through vireod: create, list, show, set, rename, rm, start, stop, turn-off,
    /// console.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Checkpoints of a VM through vireod (Hyper-V standard checkpoints): create, list (the
    /// tree), show, apply, rename, rm.
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCommand),
    /// Resource pools through vireod: create, list, show, rm, add/remove a VM, and the
    /// pool's metering (the sum of its VMs').
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Manage vireod's virtual switches: create, list, show, rm, port add|set|rm, reset-meters.
    #[command(subcommand)]
    Switch(switch::SwitchCommand),
    /// Network virtualization on a switch with an overlay: the policy table of remote VMs'
    /// customer addresses (policy add|set|rm|list).
    #[command(subcommand)]
    Netvirt(netvirt::NetvirtCommand),
    /// Follow vireod's long operations (start, stop, ...): list, show, cancel.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// This host's identity for migration, and the hosts it trusts: identity, trust
    /// list|add|rm.
    #[command(subcommand)]
    Host(hostcmd::HostCommand),
    /// Print a shell completion script (bash, zsh or fish) for every vireo command.
    Completions(completions::CompletionsArgs),
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // Before anything else: exec discards whatever this process set up.
    let handover_failed = run_exec::wants_run(&args).then(|| run_exec::exec_slim(&args));
    logging::init();
    let result = match handover_failed {
        Some(why) => {
            tracing::debug!(
                "running the VM in vireo itself: {}: {why}",
                run_exec::SLIM_BINARY
            );
            run::execute(run_only::parse(args))
        }
        None => dispatch(Cli::parse_from(args)),
    };
    exit::report(result)
}

fn dispatch(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let global = &cli.global;
    let connect = || {
        api_client::connect(
            &global.host,
            global.token_file.as_deref(),
            global.ca_cert.as_deref(),
        )
    };
    match cli.command {
        Command::Run(args) => run::execute(args),
        Command::Disk(cmd) => disk::execute(cmd),
        Command::Control(args) => control_client::execute(args).map_err(Into::into),
        Command::Vm(cmd) => connect()
            .map_err(Into::into)
            .and_then(|client| vm::execute(&client, cmd)),
        Command::Checkpoint(cmd) => connect()
            .map_err(Into::into)
            .and_then(|client| checkpoint::execute(&client, cmd)),
        Command::Pool(cmd) => connect()
            .map_err(Into::into)
            .and_then(|client| pool::execute(&client, cmd)),
        Command::Switch(cmd) => connect()
            .map_err(Into::into)
            .and_then(|client| switch::execute(&client, cmd)),
        Command::Netvirt(cmd) => connect()
            .map_err(Into::into)
            .and_then(|client| netvirt::execute(&client, cmd)),
        Command::Job(cmd) => connect()
            .map_err(Into::into)
            .and_then(|client| job::execute(&client, cmd)),
        Command::Host(cmd) => connect()
            .map_err(Into::into)
            .and_then(|client| hostcmd::execute(&client, cmd)),
        Command::Completions(args) => completions::print(&args, &mut Cli::command())
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// `vireo run` is parsed by the slim run-only tree (`run_only.rs`, also in `vireo-run`): it
    /// must describe the command exactly as the full tree does, options in the same order.
    #[test]
    fn the_run_only_parser_matches_the_full_one() {
        let mut slim = crate::run_only::RunOnlyCli::command();
        let mut full = Cli::command();
        slim.build();
        full.build();
        let slim_run = slim.find_subcommand_mut("run").unwrap();
        let full_run = full.find_subcommand_mut("run").unwrap();
        assert_eq!(
            slim_run.render_long_help().to_string(),
            full_run.render_long_help().to_string()
        );
        assert_eq!(
            slim_run.render_help().to_string(),
            full_run.render_help().to_string()
        );
        assert_eq!(
            slim_run.render_usage().to_string(),
            full_run.render_usage().to_string()
        );
    }

    /// Every command that takes `--output` speaks the same vocabulary (`text`, `json`), so a
    /// script never has to know which command wants `table`.
    #[test]
    fn every_output_option_is_text_or_json() {
        fn walk(cmd: &clap::Command, path: &str, found: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_long() == Some("output") {
                    let values: Vec<String> = arg
                        .get_possible_values()
                        .iter()
                        .map(|v| v.get_name().to_string())
                        .collect();
                    assert_eq!(values, ["text", "json"], "{path} --output");
                    assert_eq!(
                        arg.get_default_values(),
                        ["text"],
                        "{path} --output default"
                    );
                    found.push(path.to_string());
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), found);
            }
        }
        let mut found = vec![];
        walk(&Cli::command(), "vireo", &mut found);
        for want in [
            "vireo disk info",
            "vireo disk check",
            "vireo disk map",
            "vireo control disks",
            "vireo vm list",
            "vireo vm show",
            "vireo vm create",
            "vireo job list",
            "vireo job show",
            "vireo pool list",
            "vireo pool show",
            "vireo pool metrics",
            "vireo switch show",
            "vireo netvirt policy list",
            "vireo netvirt policy add",
            "vireo netvirt policy set",
        ] {
            assert!(
                found.iter().any(|f| f == want),
                "{want} has no --output: {found:?}"
            );
        }
    }
}
