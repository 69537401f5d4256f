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
#[allow(dead_code)]
mod run_exec;
mod run_only;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(why) = run_exec::return_to_other_build(&args) {
        eprintln!(
            "vireo: error: {} was built apart from the vireo that called it, and handing the \
             VM back failed: {why}; reinstall vireo and {0} from one build",
            run_exec::SLIM_BINARY
        );
        return ExitCode::from(2);
    }
    logging::init();
    let result = run::execute(run_only::parse(args));
    exit::report(result)
}
