//! The `vhdx` benchmark.

#[derive(clap::Args)]
pub struct VhdxArgs {}

pub fn run(_args: VhdxArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("the vhdx benchmark is not built yet".into())
}
