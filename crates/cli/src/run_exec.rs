//! `vireo run` hands itself to `vireo-run`, the slim foreground-VMM binary built beside `vireo`
//! (same package, same run code): a VM runs for hours, and in the full `vireo` binary the run
//! path's code is spread among every other command's, so the kernel's 64 KiB fault-around maps
//! far more of it (overhead at READY 7.2 MiB, against 4.2 MiB in the slim binary). exec keeps
//! the pid, stdio, environment and signal dispositions, so callers see no difference; when
//! `vireo-run` is missing or cannot be executed, `vireo` runs the VM itself.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The binary that serves `vireo run`, looked for next to `vireo`.
pub const SLIM_BINARY: &str = "vireo-run";

/// True when the first argument is `run` (options before it, such as `vireo --host X run`,
/// take the full parser, which handles them the same way).
pub fn wants_run(args: &[OsString]) -> bool {
    args.get(1).is_some_and(|a| a == "run")
}

/// Replaces this process with `vireo-run` and the same arguments (its argv[0] stays ours, so
/// usage lines still say `vireo run`). Returns only if that was impossible, with the reason.
pub fn exec_slim(args: &[OsString]) -> std::io::Error {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(SLIM_BINARY),
        Err(e) => return e,
    };
    let mut cmd = Command::new(&exe);
    if let Some(arg0) = args.first() {
        cmd.arg0(arg0);
    }
    cmd.args(args.iter().skip(1)).exec()
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
