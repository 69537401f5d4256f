//! The `switch` benchmark.

#[derive(clap::Args)]
pub struct SwitchArgs {}

pub fn run(_args: SwitchArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("the switch benchmark is not built yet".into())
}
