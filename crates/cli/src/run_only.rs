//! The slim parser for `vireo run ...`. Building the full command tree (`main.rs`'s `Cli`) runs
//! the argument code of every subcommand and allocates all their help text; a foreground VMM
//! then keeps those code and heap pages resident for its whole life. This parser has the same
//! name, global options and `run` subcommand, so `vireo run`'s help, errors and exit statuses
//! are the same (`main.rs` tests that); it only leaves the rest out.

use std::ffi::OsString;

use clap::{Parser, Subcommand};

use crate::global_args::GlobalArgs;
use crate::run;

#[derive(Parser)]
#[command(name = "vireo", version)]
pub struct RunOnlyCli {
    #[command(flatten)]
    _global: GlobalArgs,
    #[command(subcommand)]
    command: RunOnlyCommand,
}

#[derive(Subcommand)]
enum RunOnlyCommand {
    #[command(about = run::ABOUT)]
    Run(run::RunArgs),
}

/// Parses `vireo run ...` (argv[0] first); on bad input prints clap's message and exits 2, as
/// the full parser does.
pub fn parse(args: Vec<OsString>) -> run::RunArgs {
    let RunOnlyCommand::Run(run) = RunOnlyCli::parse_from(args).command;
    run
}
