//! Host commands (`ip`, `tc`, `ping`, ...) as the namespace tests run them: quietly, as a
//! precondition that must hold, or for their output.

use std::process::{Command, Stdio};

/// Runs a command quietly; whether it succeeded.
pub fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command that must succeed (the test fails with its stderr otherwise).
pub fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command's stdout (empty if it could not run).
pub fn output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_report_success_failure_and_output() {
        assert!(run(&["true"]));
        assert!(!run(&["false"]));
        assert!(!run(&["/nonexistent/vireo-cmd"]));
        assert_eq!(output(&["echo", "hi"]), "hi\n");
        must(&["true"]);
        assert!(std::panic::catch_unwind(|| must(&["false"])).is_err());
    }
}
