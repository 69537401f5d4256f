//! The slim parser for `vireo run ...`. Building the full command tree (`main.rs`'s `Cli`) runs
//! the argument code of every subcommand and allocates all their help text; a foreground VMM
//! then keeps those code and data pages resident for its whole life (the kernel maps a binary's
//! pages 64 KiB at a time). This parser has the same name, global options and `run` subcommand,
//! so `vireo run`'s help, errors and exit statuses are the same; it only leaves the rest out.

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

/// True when the first argument is `run` (options before it, such as `vireo --host X run`,
/// take the full parser, which handles them the same way).
pub fn wants_run(args: &[OsString]) -> bool {
    args.get(1).is_some_and(|a| a == "run")
}

/// Parses `vireo run ...`; on bad input prints clap's message and exits 2, as the full parser does.
pub fn parse(args: Vec<OsString>) -> run::RunArgs {
    let RunOnlyCommand::Run(run) = RunOnlyCli::parse_from(args).command;
    run
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The slim parser must describe `vireo run` exactly as the full one does: same options in
    /// the same order, same help text.
    #[test]
    fn run_help_matches_the_full_parser() {
        let mut slim = RunOnlyCli::command();
        let mut full = crate::Cli::command();
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

    #[test]
    fn only_a_leading_run_takes_the_slim_parser() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(wants_run(&args(&["vireo", "run", "--kernel", "k"])));
        assert!(!wants_run(&args(&["vireo", "--host", "unix:/x", "run"])));
        assert!(!wants_run(&args(&["vireo", "disk", "run"])));
        assert!(!wants_run(&args(&["vireo"])));
    }
}
