//! `vireo-run`: the foreground VMM behind `vireo run` (`vireo` execs it, see `run_exec.rs`).
//! It holds only the run command's code, so a long-running VM maps little besides what it uses.
//! Invoked as `vireo-run run OPTIONS...`, it parses, helps and fails exactly as `vireo run`.
#![forbid(unsafe_code)]

// Shared with `vireo`, which uses all of these; the run command needs only part of them.
#[allow(dead_code)]
mod exit;
#[allow(dead_code)]
mod global_args;
mod logging;
mod run;
mod run_only;

use std::process::ExitCode;

fn main() -> ExitCode {
    logging::init();
    let result = run::execute(run_only::parse(std::env::args_os().collect()));
    exit::report(result)
}
