//! `vireod --state-dir DIR [--listen unix:PATH|tcp:ADDR:PORT]... [--tls-cert F --tls-key F
//! --token-file F] [--storage-root DIR]... [--worker-bin PATH] [--switch-bin PATH]
//! [--worker-nice N] [--migration-listen ADDR:PORT] [--max-migrations N]`: the host
//! daemon. Serves the REST API (docs/api.md) until SIGTERM or SIGINT, then exits 0 leaving the
//! workers running (a restarted vireod re-adopts them). Exit 1: could not start (the store is
//! locked by another vireod, the socket is in use, ...); 2: bad arguments (including a TCP
//! listener without its certificate, key or a private, non-empty token file).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use vireo_hostd::daemon::server::Listener;
use vireo_hostd::daemon::storage::StorageRoots;
use vireo_hostd::daemon::{adopt, migrate, router, server, switches, tls, Daemon};
use vireo_hostd::{host_limits, Store};

#[derive(Parser)]
#[command(name = "vireod", version, about = "The Vireo host daemon")]
struct Args {
    /// The inventory and the VM folders.
    #[arg(long, default_value = "/var/lib/vireo")]
    state_dir: PathBuf,
    /// Where to serve the API, repeatable: `unix:PATH` (default `unix:<state-dir>/vireod.sock`;
    /// the socket's 0600 mode is its authentication) or `tcp:ADDR:PORT` (TLS with a bearer
    /// token; needs --tls-cert, --tls-key and --token-file). Only the addresses given are bound.
    #[arg(long, value_parser = parse_listen, value_name = "unix:PATH|tcp:ADDR:PORT")]
    listen: Vec<Listen>,
    /// PEM certificate chain served on the TCP listeners.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The bearer token TCP clients must send (first line of the file). The file must not be
    /// readable by group or others.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A directory under which VM kernels, initrds and disks may live (after resolving
    /// symlinks), repeatable. Default: the state directory.
    #[arg(long, value_name = "DIR")]
    storage_root: Vec<PathBuf>,
    /// The worker binary (default: `vireo-vm` beside this executable).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// The switch process binary (default: `vireo-switch` beside this executable).
    #[arg(long)]
    switch_bin: Option<PathBuf>,
    /// CPU priority of the VM workers relative to vireod (nice 0-19). Busy guests then share
    /// the CPUs among themselves while the API stays responsive; 0 treats them as equals.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    worker_nice: i32,
    /// Accept VMs migrated from trusted hosts here (mutual TLS with this host's identity;
    /// `vireo host trust add`). A literal IP; port 0 picks a free port (logged, and shown by
    /// `vireo host identity --output json`). Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    migration_listen: Option<SocketAddr>,
    /// Migrations this host runs at once, in and out; more queue (outgoing) or are refused
    /// (incoming, the source retries).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    max_migrations: u16,
    /// Seconds a source keeps asking a destination where a VM is when the destination's
    /// word on it was lost with the link (a quick migration's answer to the commit, a live
    /// one's switch-over): after that the VM stays saved (quick) or stopped here and the job
    /// says where it may be; it is never started here on a guess.
    #[arg(long, value_name = "SECONDS", default_value_t = 150,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    migration_answer_wait: u64,
    /// Another host's migration listener (its `--migration-listen`), repeatable: the hosts
    /// that share virtual networks with this one. When a VM on an overlay switch arrives
    /// here, each is told its customer addresses' new provider address over mutual TLS (both
    /// hosts must trust each other: `vireo host trust add`), and moves the policy entries it
    /// holds for them (docs/netvirt.md, "A VM that moves").
    #[arg(long, value_name = "ADDR:PORT")]
    netvirt_peer: Vec<SocketAddr>,
}

#[derive(Clone, Debug)]
enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if let Some(p) = s.strip_prefix("unix:") {
        if !p.is_empty() {
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
    }
    if let Some(a) = s.strip_prefix("tcp:") {
        return a.parse().map(Listen::Tcp).map_err(|_| {
            format!("{s:?}: expected tcp:ADDR:PORT with a literal IP, e.g. tcp:127.0.0.1:8443")
        });
    }
    Err(format!("{s:?}: expected unix:PATH or tcp:ADDR:PORT"))
}

/// A startup refusal caused by the arguments: exit 2, nothing started.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadArgs(String);

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
            ExitCode::from(if e.is::<BadArgs>() { 2 } else { 1 })
        }
    }
}

/// The TLS acceptor and token when a TCP listener is asked for; refuses a TCP listener without
/// all three files, and TLS files without a TCP listener (they would silently do nothing).
fn tcp_security(args: &Args) -> Result<Option<(tokio_rustls::TlsAcceptor, tls::Token)>, BadArgs> {
    let wants_tcp = args.listen.iter().any(|l| matches!(l, Listen::Tcp(_)));
    let given = [&args.tls_cert, &args.tls_key, &args.token_file];
    if !wants_tcp {
        if given.iter().any(|g| g.is_some()) {
            return Err(BadArgs(
                "--tls-cert/--tls-key/--token-file only apply to a --listen tcp:ADDR:PORT; add one"
                    .into(),
            ));
        }
        return Ok(None);
    }
    let (Some(cert), Some(key), Some(token)) = (&args.tls_cert, &args.tls_key, &args.token_file)
    else {
        return Err(BadArgs(
            "--listen tcp:... needs --tls-cert FILE, --tls-key FILE and --token-file FILE \
             (vireod never serves TCP without TLS and a token)"
                .into(),
        ));
    };
    let acceptor = tls::acceptor(cert, key).map_err(|e| BadArgs(e.to_string()))?;
    let token = tls::Token::load(token).map_err(|e| BadArgs(e.to_string()))?;
    Ok(Some((acceptor, token)))
}

fn run(mut args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Absolute, so the workers (given their folder) and the logs name real places whatever
    // the working directory.
    let absolute =
        |p: &PathBuf| std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()));
    args.state_dir = absolute(&args.state_dir)?;
    let security = tcp_security(&args)?;
    let worker_bin = match &args.worker_bin {
        Some(p) => absolute(p)?,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find vireod's own executable ({e}); pass --worker-bin"))?
            .with_file_name("vireo-vm"),
    };
    let switch_bin = match &args.switch_bin {
        Some(p) => absolute(p)?,
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find vireod's own executable ({e}); pass --switch-bin"))?
            .with_file_name("vireo-switch"),
    };
    let limits = host_limits();
    let store = Store::open_with(&args.state_dir, limits)?;
    // After the store: it creates the state directory, the default root.
    let roots = if args.storage_root.is_empty() {
        vec![args.state_dir.clone()]
    } else {
        args.storage_root.clone()
    };
    let storage = StorageRoots::new(&roots).map_err(BadArgs)?;
    let mut listen = args.listen.clone();
    if listen.is_empty() {
        listen.push(Listen::Unix(args.state_dir.join("vireod.sock")));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut listeners = Vec::new();
        for l in &listen {
            listeners.push(match l {
                Listen::Unix(path) => Listener::Unix(server::bind(path)?),
                Listen::Tcp(addr) => {
                    let (acceptor, _) = security.as_ref().expect("checked by tcp_security");
                    Listener::Tls(server::bind_tcp(*addr).await?, acceptor.clone())
                }
            });
        }
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let daemon = Daemon::configured(store, limits, worker_bin, args.worker_nice, storage);
        daemon.switches.set_bin(switch_bin);
        daemon.migrations.set_max(args.max_migrations.into());
        daemon
            .migrations
            .set_answer_wait(std::time::Duration::from_secs(args.migration_answer_wait));
        daemon
            .migrations
            .set_netvirt_peers(args.netvirt_peer.clone());
        let migration_listener = match args.migration_listen {
            Some(a) => Some(migrate::listener::bind(&daemon, a).await?),
            None => None,
        };
        // Switches first: a worker adopted or started next needs its NICs' sockets.
        switches::start_all(&daemon).await;
        adopt::adopt_all(&daemon).await;
        // VMs a migration left half-arrived: kept if their worker runs them, else removed.
        migrate::recover::recover_all(&daemon).await;
        // Copies a shared-nothing arrival made in its dest_dir, if it never ran here.
        migrate::arriving::recover_all(&daemon);
        // Checkpoint operations cut short by a crash: finished or rolled back before any
        // request can touch their VMs' files.
        vireo_hostd::daemon::checkpoints::recover::recover_all(&daemon).await;
        // Storage moves whose worker switched, then ended while vireod was down: the copies
        // hold the guest's last writes, so the spec takes them.
        vireo_hostd::daemon::switch_record::recover_all(&daemon).await;
        // Saved VMs' disk locks ended with the previous vireod: taken again before any
        // request (or the automatic start) can restore one.
        vireo_hostd::daemon::disk_locks::relock_saved(&daemon);
        // Quick migrations whose vireod died after the save: the destination is asked where
        // each VM is, in tasks holding the VMs' locks (taken here, before the API serves, and
        // after the steps above, which wait for VM locks).
        migrate::quick_recover::recover_all(&daemon).await;
        adopt::schedule_auto_start(&daemon);
        if let Some(l) = migration_listener {
            tokio::spawn(migrate::listener::serve(daemon.clone(), l));
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut servers = Vec::new();
        for (l, listener) in listen.iter().zip(listeners) {
            let app = router::router(daemon.clone());
            let app = match (&listener, &security) {
                (Listener::Tls(..), Some((_, token))) => app.layer(
                    axum::middleware::from_fn_with_state(token.clone(), tls::require_token),
                ),
                _ => app,
            };
            match l {
                Listen::Unix(p) => tracing::info!(socket = %p.display(), "serving"),
                Listen::Tcp(a) => tracing::info!(tcp = %a, "serving (TLS, bearer token)"),
            }
            let mut rx = stop_rx.clone();
            servers.push(tokio::spawn(server::serve(listener, app, async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })));
        }
        tracing::info!(state_dir = %args.state_dir.display(), "ready");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(true);
        for s in servers {
            let _ = s.await;
        }
        tracing::info!("stopping; workers keep running");
        for l in &listen {
            if let Listen::Unix(p) = l {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    // Pending tasks (watchers, jobs) end with the runtime; the workers do not.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}
