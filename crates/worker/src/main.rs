//! `vireo-vm --vm-dir DIR`: runs one VM for vireod (see the library's documentation and
//! docs/worker.md). Everything for a person goes to stderr (vireod keeps it in
//! `DIR/worker.log`); `VIREO_LOG` sets the detail, as for `vireo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vireo-vm",
    version,
    about = "Runs one VM for vireod: builds it from DIR/spec.json, serves DIR/worker.sock, \
             DIR/console.sock and DIR/control.sock, and writes DIR/exit.json when it ends",
    after_help = "Exit status: 0 the VM powered off, reset or was turned off (TurnOff, SIGTERM, \
                  SIGINT); 1 it could not be started or a vCPU failed (exit.json says which and \
                  why); 2 bad arguments. Set VIREO_LOG=debug for diagnostics on stderr."
)]
struct Args {
    /// The VM's folder (spec.json in it; sockets and exit.json are created there).
    #[arg(long, value_name = "DIR")]
    vm_dir: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIREO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args = Args::parse();
    match vireo_worker::launch::run(&args.vm_dir) {
        Ok(reason) => ExitCode::from(vireo_worker::launch::exit_status(&reason)),
        Err(e) => {
            tracing::error!(
                "cannot write {}: {e}",
                args.vm_dir.join(vireo_worker::EXIT_FILE).display()
            );
            ExitCode::FAILURE
        }
    }
}
