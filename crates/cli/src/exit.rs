//! The exit statuses every `vireo` command uses, defined once so scripts can rely on them.
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the operation was attempted and failed (locked, I/O error, refused, corrupt image), or `disk check` found problems |
//! | 2 | bad input: a wrong argument or option, a missing or unreadable file, an unsupported format — nothing was changed |
//! | 130 | interrupted by Ctrl-C (SIGINT); the operation stopped at a safe point |
//! | 143 | stopped by SIGTERM |
//!
//! `vireo run` exits with the guest's power-off status instead of 0 when the guest chooses one.

use std::fmt;

/// The help text's table (shown by `vireo --help`).
pub const HELP_TABLE: &str = "\
Exit status (every command):
  0    success
  1    the operation failed (locked, I/O error, refused, corrupt image), or check found problems
  2    bad input: wrong argument, missing or unreadable file, unsupported format; nothing changed
  130  interrupted by Ctrl-C; stopped at a safe point
  143  stopped by SIGTERM
  vireo run: the guest's power-off status (see vireo run --help)";

pub const FAILED: u8 = 1;
pub const BAD_INPUT: u8 = 2;
pub const INTERRUPTED: u8 = 130;
pub const TERMINATED: u8 = 143;

/// An error that reaches the user: one line, and the status it exits with.
#[derive(Debug)]
pub struct CliError {
    pub status: u8,
    pub message: String,
}

impl CliError {
    /// The operation was attempted and failed.
    pub fn failed(message: impl Into<String>) -> CliError {
        CliError {
            status: FAILED,
            message: message.into(),
        }
    }

    /// The command was given something it cannot use; nothing was changed.
    pub fn bad_input(message: impl Into<String>) -> CliError {
        CliError {
            status: BAD_INPUT,
            message: message.into(),
        }
    }

    /// Ctrl-C stopped the operation at a safe point.
    pub fn interrupted(message: impl Into<String>) -> CliError {
        CliError {
            status: INTERRUPTED,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The status for an error that reached `main`: its own if it is a [`CliError`], else 1 (an
/// operation failed). Argument errors never get here: clap exits 2 for them itself.
pub fn status_of(e: &(dyn std::error::Error + 'static)) -> u8 {
    e.downcast_ref::<CliError>().map_or(FAILED, |c| c.status)
}

/// The process's status for a command's result; an error becomes one `vireo: error:` line.
pub fn report(
    result: Result<std::process::ExitCode, Box<dyn std::error::Error>>,
) -> std::process::ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vireo: error: {e}");
            std::process::ExitCode::from(status_of(e.as_ref()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let boxed: Box<dyn std::error::Error> = Box::new(CliError::bad_input("x"));
        assert_eq!(status_of(boxed.as_ref()), 2);
        let boxed: Box<dyn std::error::Error> = Box::new(CliError::interrupted("x"));
        assert_eq!(status_of(boxed.as_ref()), 130);
        let boxed: Box<dyn std::error::Error> = "plain".into();
        assert_eq!(status_of(boxed.as_ref()), 1);
    }
}
