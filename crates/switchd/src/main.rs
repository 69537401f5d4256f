//! `vireo-switch --dir DIR`: runs one virtual switch for vireod (see the library's documentation
//! and docs/switchd.md). Everything for a person goes to stderr (vireod keeps it in
//! `DIR/switch.log`); `VIREO_LOG` sets the detail, as for `vireo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vireo-switch",
    version,
    about = "Runs one virtual switch for vireod: builds it from DIR/switch.json, serves \
             DIR/switch.sock and the ports' vhost-user sockets until told to shut down",
    after_help = "Exit status: 0 shut down (Shutdown request, SIGTERM or SIGINT); 1 the switch \
                  could not be started (stderr says why); 2 bad arguments. Set VIREO_LOG=debug \
                  for diagnostics on stderr."
)]
struct Args {
    /// The switch's folder (switch.json in it; switch.sock is created there).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
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
    match vireo_switchd::launch::run(&args.dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("the switch could not be started: {e}");
            ExitCode::FAILURE
        }
    }
}
