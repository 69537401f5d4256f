//! `vireod --state-dir DIR [--listen unix:PATH] [--worker-bin PATH] [--worker-nice N]`: the
//! host daemon. Serves
//! the REST API (docs/api.md) until SIGTERM or SIGINT, then exits 0 leaving the workers
//! running (a restarted vireod re-adopts them). Exit 1: could not start (the store is locked by
//! another vireod, the socket is in use, ...); 2: bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use vireo_hostd::daemon::{adopt, router, server, Daemon};
use vireo_hostd::{host_limits, Store};

#[derive(Parser)]
#[command(name = "vireod", version, about = "The Vireo host daemon")]
struct Args {
    /// The inventory and the VM folders.
    #[arg(long, default_value = "/var/lib/vireo")]
    state_dir: PathBuf,
    /// Where to serve the API: `unix:PATH` (default `unix:<state-dir>/vireod.sock`).
    #[arg(long, value_parser = parse_listen)]
    listen: Option<PathBuf>,
    /// The worker binary (default: `vireo-vm` beside this executable).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// CPU priority of the VM workers relative to vireod (nice 0-19). Busy guests then share
    /// the CPUs among themselves while the API stays responsive; 0 treats them as equals.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    worker_nice: i32,
}

fn parse_listen(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(format!(
            "{s:?}: expected unix:PATH (TCP with TLS is not served yet)"
        )),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vireod: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(mut args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Absolute, so the workers (given their folder) and the logs name real places whatever
    // the working directory.
    let absolute =
        |p: &PathBuf| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
    args.state_dir = absolute(&args.state_dir)?;
    let worker_bin = match &args.worker_bin {
        Some(p) => absolute(p)?,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find vireod's own executable ({e}); pass --worker-bin"))?
            .with_file_name("vireo-vm"),
    };
    let limits = host_limits();
    let store = Store::open_with(&args.state_dir, limits)?;
    let listen = args
        .listen
        .unwrap_or_else(|| args.state_dir.join("vireod.sock"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = server::bind(&listen)?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let daemon = Daemon::with_worker_nice(store, limits, worker_bin, args.worker_nice);
        adopt::adopt_all(&daemon).await;
        adopt::schedule_auto_start(&daemon);
        tracing::info!(socket = %listen.display(), state_dir = %args.state_dir.display(), "serving");
        let shutdown = async {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        server::serve(listener, router::router(daemon), shutdown).await;
        tracing::info!("stopping; workers keep running");
        let _ = std::fs::remove_file(&listen);
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    // Pending tasks (watchers, jobs) end with the runtime; the workers do not.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}
