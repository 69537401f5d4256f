//! `vireo run` hands itself to `vireo-run`, the slim foreground-VMM binary built beside `vireo`
//! (same package, same run code): a VM runs for hours, and in the full `vireo` binary the run
//! path's code is spread among every other command's, so the kernel's 64 KiB fault-around maps
//! far more of it (overhead at READY 7.2 MiB, against 4.2 MiB in the slim binary). exec keeps
//! the pid, stdio, environment and signal dispositions, so callers see no difference; when
//! `vireo-run` is missing or cannot be executed, `vireo` runs the VM itself.
//!
//! A `vireo-run` from another build (one binary updated, the other left behind) would run the
//! VM with other code than the `vireo` the user called, so `vireo` passes its build id along;
//! a `vireo-run` that differs execs back into that `vireo`, which then runs the VM itself.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The binary that serves `vireo run`, looked for next to `vireo`.
pub const SLIM_BINARY: &str = "vireo-run";

/// This build's id, the same in `vireo` and `vireo-run` when they were built together.
pub const BUILD_ID: &str = env!("VIREO_BUILD_ID");

/// The caller's build id, set on the exec into `vireo-run`.
const CALLER_BUILD: &str = "VIREO_RUN_CALLER_BUILD";
/// The caller's own executable, for the way back.
const CALLER_EXE: &str = "VIREO_RUN_CALLER_EXE";
/// Set on the way back: run the VM here, do not hand it over again.
const IN_PROCESS: &str = "VIREO_RUN_IN_PROCESS";

/// True when the first argument is `run` (options before it, such as `vireo --host X run`,
/// take the full parser, which handles them the same way).
pub fn wants_run(args: &[OsString]) -> bool {
    args.get(1).is_some_and(|a| a == "run")
}

/// Replaces this process with `vireo-run` and the same arguments (its argv[0] stays ours, so
/// usage lines still say `vireo run`). Returns only if that was impossible, with the reason.
pub fn exec_slim(args: &[OsString]) -> std::io::Error {
    if std::env::var_os(IN_PROCESS).is_some() {
        return std::io::Error::other(format!("{SLIM_BINARY} is from another build than vireo"));
    }
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => return e,
    };
    let mut cmd = Command::new(me.with_file_name(SLIM_BINARY));
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    cmd.env(CALLER_BUILD, BUILD_ID).env(CALLER_EXE, &me);
    cmd.args(args.iter().skip(1)).exec()
}

/// In `vireo-run`: when the `vireo` that exec'd this binary is another build, replaces this
/// process with that `vireo`, told to run the VM itself. Returns if there is nothing to do
/// (same build, or started directly), or with the reason the way back failed.
#[allow(dead_code)] // `vireo-run` only
pub fn return_to_other_build(args: &[OsString]) -> Option<std::io::Error> {
    let caller_build = std::env::var_os(CALLER_BUILD)?;
    if caller_build == BUILD_ID {
        return None;
    }
    let Some(caller) = std::env::var_os(CALLER_EXE) else {
        return Some(std::io::Error::other(
            "the calling vireo did not say where it is",
        ));
    };
    let mut cmd = Command::new(&caller);
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    cmd.env(IN_PROCESS, "1")
        .env_remove(CALLER_BUILD)
        .env_remove(CALLER_EXE);
    Some(cmd.args(args.iter().skip(1)).exec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_leading_run_is_handed_over() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert!(wants_run(&args(&["vireo", "run", "--kernel", "k"])));
        assert!(!wants_run(&args(&["vireo", "--host", "unix:/x", "run"])));
        assert!(!wants_run(&args(&["vireo", "disk", "run"])));
        assert!(!wants_run(&args(&["vireo"])));
    }
}
