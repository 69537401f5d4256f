//! `vireo-bench`: each subcommand measures Vireo and a peer in the same run and prints the ratio on
//! its last line, so numbers in docs/SPECIFICATION.md can be re-checked with one command.

mod boot;
mod checkpoint;
mod density;
mod guestio;
mod migrate;
mod netlab;
mod overlay;
mod switch;
mod team;
mod vhdx;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vireo-bench", about = "Side-by-side benchmarks against peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot time and memory overhead: `vireo run` vs QEMU microvm on the probe guest.
    Boot(boot::BootArgs),
    /// Checkpoint pause, save and restore of a 256 MiB probe with a 64 MiB hot set, vs QEMU
    /// savevm/loadvm and migrate to file.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Switch pipeline frames/s, and TCP through our switch vs a Linux bridge (iperf3).
    Switch(switch::SwitchArgs),
    /// NIC teaming: aggregation of 2 tbf-capped members vs 1 (iperf3), and the failover gap.
    Team(team::TeamArgs),
    /// Many probe VMs under one vireod: time until all are ready, API latency under load,
    /// per-VM worker memory and vireod's RSS.
    Density(density::DensityArgs),
    /// I/O from inside the guest: disk IOPS/latency and VM-to-VM frames/s, vs QEMU.
    Guestio(guestio::GuestioArgs),
    /// VHDX I/O and convert throughput vs `qemu-img bench`/`convert` and a raw file.
    Vhdx(vhdx::VhdxArgs),
    /// TCP over VXLAN through two Vireo switches vs the kernel's vxlan devices + bridges; TCP
    /// through ports with ACLs, a VLAN and a rate limit vs a bridge + nftables; and the team
    /// figures, on one last line.
    Overlay(overlay::OverlayArgs),
    /// Live migration of a 256 MiB probe with a hot set, worker to worker vs QEMU multifd.
    Migrate(migrate::MigrateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot(args) => boot::run(args),
        Command::Checkpoint(args) => checkpoint::run(args).map_err(Into::into),
        Command::Switch(args) => switch::run(args),
        Command::Vhdx(args) => vhdx::run(args),
        Command::Guestio(args) => guestio::run(args),
        Command::Density(args) => density::run(args),
        Command::Overlay(args) => overlay::run(args),
        Command::Team(args) => team::run(args),
        Command::Migrate(args) => migrate::run(args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vireo-bench: error: {e}");
            ExitCode::from(2)
        }
    }
}
