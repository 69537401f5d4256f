//! `vireo disk`: virtual disk operations.

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum DiskCommand {}

pub fn execute(cmd: DiskCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cmd {}
}
