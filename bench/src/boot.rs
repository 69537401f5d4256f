//! The `boot` benchmark.

#[derive(clap::Args)]
pub struct BootArgs {}

pub fn run(_args: BootArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("the boot benchmark is not built yet".into())
}
