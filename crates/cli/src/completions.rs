//! `vireo completions bash|zsh|fish`: the shell completion script for every command, generated
//! from the same clap definitions that parse them, so it cannot drift.

use clap::{Args, ValueEnum};
use clap_complete::Shell;

use crate::exit::CliError;
use crate::output::emit;

#[derive(Args)]
#[command(after_help = "\
Install, e.g.:
  vireo completions bash > /etc/bash_completion.d/vireo
  vireo completions zsh > \"${fpath[1]}/_vireo\"
  vireo completions fish > ~/.config/fish/completions/vireo.fish")]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    #[arg(value_enum)]
    shell: ShellArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum ShellArg {
    Bash,
    Zsh,
    Fish,
}

/// Prints the script for `cli` (the whole `vireo` command). Generated into memory first:
/// clap_complete panics on a write error, and `| head` is a fine way to read a script.
pub fn print(args: &CompletionsArgs, cli: &mut clap::Command) -> Result<(), CliError> {
    let shell = match args.shell {
        ShellArg::Bash => Shell::Bash,
        ShellArg::Zsh => Shell::Zsh,
        ShellArg::Fish => Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, cli, "vireo", &mut script);
    emit(script)
}
