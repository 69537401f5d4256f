//! `--output`: one vocabulary for every command that prints something a script may read.
//! `text` is for people (tables, aligned key/value lines); `json` is for programs and stable.

use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug, Default)]
pub enum OutputFormat {
    /// For people: tables and aligned lines. `table` is accepted as another name for it.
    #[default]
    #[value(alias = "table")]
    Text,
    /// For programs: one JSON document on stdout.
    Json,
}

/// Writes `text` to stdout. A reader that went away (`vireo vm list | head -1`) is not an
/// error: the output was simply not wanted any more. Any other write error is one line, exit 1
/// (`print!` would panic on both).
pub fn emit(text: impl AsRef<[u8]>) -> Result<(), crate::exit::CliError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_ref()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(crate::exit::CliError::failed(
            format!("writing to stdout: {e}"),
        )),
        _ => Ok(()),
    }
}
