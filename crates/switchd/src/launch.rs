//! One switch process's life: read `switch.json`, build the switch and its ports, serve
//! `switch.sock` until `Shutdown`, SIGTERM or SIGINT, then take everything down again.
//!
//! Nothing here watches the parent: vireod may exit, crash or restart while the switch keeps
//! forwarding (a restarted vireod says `Hello` and carries on).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_api::switch::SwitchLaunch;

use crate::error::SwitchdError;
use crate::ports::Ports;
use crate::{files, server, signals, LAUNCH_FILE, SWITCH_SOCKET};

/// How often the main thread looks for a shutdown request or signal.
const POLL: Duration = Duration::from_millis(50);

fn read_launch(dir: &Path) -> Result<SwitchLaunch, SwitchdError> {
    let path = dir.join(LAUNCH_FILE);
    let text = std::fs::read(&path).map_err(|source| SwitchdError::LaunchRead {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| SwitchdError::LaunchJson { path, source })
}

/// Runs the switch of `dir` until it is told to stop. `Err` when it could not be started
/// (nothing is left behind then).
pub fn run(dir: &Path) -> Result<(), SwitchdError> {
    // Absolute, so relative socket paths and log lines do not depend on the start directory.
    let dir = &std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let launch = read_launch(dir)?;
    signals::install().map_err(SwitchdError::Signals)?;
    let sock = dir.join(SWITCH_SOCKET);
    // Bound first: a second process for the same switch stops here, before touching any
    // interface. Requests wait in the backlog until the ports are up.
    let listener = files::bind_private(&sock)?;
    let ports = match start_ports(&launch, dir) {
        Ok(p) => p,
        Err(e) => {
            files::remove_socket(&sock);
            return Err(e);
        }
    };
    let state = Arc::new(server::State {
        switch_id: launch.switch_id,
        ports: Mutex::new(Some(ports)),
        shutdown: AtomicBool::new(false),
    });
    if let Err(e) = server::start(listener, state.clone()) {
        if let Some(p) = state.take_ports() {
            p.shutdown();
        }
        files::remove_socket(&sock);
        return Err(SwitchdError::Thread(e));
    }
    tracing::info!(
        "switch {} ({}) serving {}",
        launch.config.name,
        launch.switch_id,
        sock.display()
    );
    while !state.shutdown.load(Ordering::SeqCst) && !signals::terminated() {
        std::thread::sleep(POLL);
    }
    if signals::terminated() {
        tracing::info!("signal received: shutting down");
    }
    // The socket goes first, so nobody connects to a switch that is going away.
    files::remove_socket(&sock);
    if let Some(p) = state.take_ports() {
        p.shutdown();
    }
    tracing::info!("switch {} stopped", launch.switch_id);
    Ok(())
}

/// The switch with its implied ports and the launch file's ports. A listed port that cannot
/// be attached (its interface is gone, a file is in the way of its socket) is logged and left
/// out rather than failing the whole switch: the other ports' VMs keep their network, and
/// `Status` shows vireod which ports exist.
fn start_ports(launch: &SwitchLaunch, dir: &Path) -> Result<Ports, SwitchdError> {
    let mut ports = Ports::start(launch.config.clone(), dir)?;
    for p in &launch.ports {
        let name = p.config.name.clone();
        if let Err(e) = ports.add(p.clone()) {
            tracing::error!("port {name:?} left out: {e}");
        }
    }
    if let Some(m) = launch.uplink_mirror {
        if let Err(e) = ports.set_uplink_mirror(&m) {
            tracing::error!("uplink mirror {m:?} left out: {e}");
        }
    }
    Ok(ports)
}
