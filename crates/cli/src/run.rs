//! `vireo run`: boots one VM in the foreground.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct RunArgs {}

pub fn execute(_args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    Err("`vireo run` is not built yet".into())
}
