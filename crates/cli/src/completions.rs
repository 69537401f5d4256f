//! `vireo completions bash|zsh|fish`: the shell completion script for every command, generated
//! from the same clap definitions that parse them, so it cannot drift.

use clap::{Args, ValueEnum};
use clap_complete::Shell;

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

/// Writes the script for `cli` (the whole `vireo` command) to `out`.
pub fn generate(args: &CompletionsArgs, cli: &mut clap::Command, out: &mut dyn std::io::Write) {
    let shell = match args.shell {
        ShellArg::Bash => Shell::Bash,
        ShellArg::Zsh => Shell::Zsh,
        ShellArg::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, cli, "vireo", out);
}
