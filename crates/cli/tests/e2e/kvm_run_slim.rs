//! `vireo run` hands the VM to `vireo-run`, the slim binary beside `vireo` (src/run_exec.rs):
//! the running VM is that binary under the same pid, and a `vireo` without it beside runs the
//! VM itself, with the same help and statuses.

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// The file name of the program a process runs now (after any exec).
fn program_of(pid: u32) -> String {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    exe.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn kvm_run_is_served_by_vireo_run_under_the_same_pid() {
    if !kvm_usable() {
        return;
    }
    let mut vm = ProbeVm::start(&[], &["--memory", "32M"]);
    // READY came from the guest, so the exec (which happens before the VM is built) is done.
    assert_eq!(program_of(vm.child.id()), "vireo-run");
    assert_eq!(vm.ok("PING"), "OK PONG");
    assert_eq!(vm.poweroff(7), Some(7));
}

#[test]
fn kvm_run_without_vireo_run_beside_it_runs_in_vireo() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("vireo");
    std::fs::copy(env!("CARGO_BIN_EXE_vireo"), &alone).unwrap();
    let mut vm = ProbeVm::start_with(&alone, &["--memory", "32M"]);
    assert_eq!(program_of(vm.child.id()), "vireo");
    assert_eq!(vm.ok("PING"), "OK PONG");
    assert_eq!(vm.poweroff(5), Some(5));
}

/// A `vireo-run` left from another build than the `vireo` that called it gives the VM back:
/// that `vireo` runs it itself, under the same pid.
#[test]
fn kvm_a_vireo_run_from_another_build_hands_the_vm_back_to_vireo() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let caller = dir.path().join("vireo");
    std::fs::copy(env!("CARGO_BIN_EXE_vireo"), &caller).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vireo-run"));
    cmd.env("VIREO_RUN_CALLER_BUILD", "0.0.0-another-build")
        .env("VIREO_RUN_CALLER_EXE", &caller);
    let mut vm = ProbeVm::start_from(cmd, &["--memory", "32M"]);
    assert_eq!(program_of(vm.child.id()), "vireo");
    assert_eq!(vm.ok("PING"), "OK PONG");
    assert_eq!(vm.poweroff(3), Some(3));
}

/// When the way back fails too, `vireo-run` says so in one line instead of running other code.
#[test]
fn a_vireo_run_from_another_build_that_cannot_hand_back_fails_in_one_line() {
    let out = spawn_when_not_busy(
        Command::new(env!("CARGO_BIN_EXE_vireo-run"))
            .args(["run", "--help"])
            .env("VIREO_RUN_CALLER_BUILD", "0.0.0-another-build")
            .env("VIREO_RUN_CALLER_EXE", "/nonexistent/vireo")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("vireo: error: vireo-run was built apart"),
        "{err}"
    );
    assert!(err.contains("reinstall"), "{err}");
    assert!(out.stdout.is_empty());
}

/// Help and a bad option read the same whichever binary parses them.
#[test]
fn run_help_and_errors_are_the_same_without_vireo_run() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("vireo");
    std::fs::copy(env!("CARGO_BIN_EXE_vireo"), &alone).unwrap();
    let run = |program: &Path, args: &[&str]| {
        let out = spawn_when_not_busy(
            Command::new(program)
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .wait_with_output()
        .unwrap();
        (out.status.code(), out.stdout, out.stderr)
    };
    let beside = Path::new(env!("CARGO_BIN_EXE_vireo"));
    for (args, status) in [
        (&["run", "--help"][..], 0),
        (&["run", "--kernel"], 2),
        (&["run", "--bogus"], 2),
        (&["run", "--kernel", "/nonexistent/kernel"], 2),
    ] {
        let (a, b) = (run(beside, args), run(&alone, args));
        assert_eq!(
            a.0,
            Some(status),
            "vireo {args:?}: {}",
            String::from_utf8_lossy(&a.2)
        );
        assert_eq!(a, b, "vireo {args:?}");
    }
}
