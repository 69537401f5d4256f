//! [`VhostUserServer`]: the Unix socket a VMM connects to for one switch port, served by the
//! rust-vmm vhost-user daemon on its own thread for one VM session.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use super::{GuestMemoryMmap, VhostUserPort};

/// Serves one vhost-user-net connection on a socket; the session ends when the VMM
/// disconnects or the server is dropped.
pub struct VhostUserServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    session: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl VhostUserServer {
    /// Listens on `socket` (replacing a stale socket file) and returns the switch port the
    /// connecting VM's NIC will be. The socket exists when this returns. One VMM is served at
    /// a time; when it disconnects (the VM stopped or restarted) the next one may connect.
    pub fn listen(socket: &Path, name: &str) -> io::Result<(Arc<VhostUserPort>, VhostUserServer)> {
        let (port, _) = VhostUserPort::new(name)?;
        let mut listener = Listener::new(socket, true).map_err(io::Error::other)?;
        let stop = Arc::new(AtomicBool::new(false));
        let session = Arc::new(Mutex::new(None));
        let (stop_t, session_t, port_t) = (stop.clone(), session.clone(), port.clone());
        let name_t = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vhu-{name}"))
            .spawn(move || {
                while !stop_t.load(Ordering::SeqCst) {
                    // A fresh daemon per session: ring state must not leak from a dead VMM.
                    let mut daemon = VhostUserDaemon::new(
                        format!("vhost-user-{name_t}"),
                        port_t.backend().map_err(|e| e.to_string())?,
                        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                    )
                    .map_err(|e| e.to_string())?;
                    daemon.start(&mut listener).map_err(|e| e.to_string())?;
                    *session_t.lock().unwrap_or_else(|p| p.into_inner()) = daemon.shutdown_handle();
                    if stop_t.load(Ordering::SeqCst) {
                        daemon.request_shutdown();
                    }
                    // A VMM that goes away ends the session with a disconnect error: not a
                    // failure.
                    let _ = daemon.wait();
                    *session_t.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    // Its ring threads end (are joined) here, before the disconnect: a kick
                    // one of them handled late would otherwise hand the dead VMM's rings back
                    // to the port after it let go of them (seen once in CI under load: "port
                    // kept the rings").
                    drop(daemon);
                    // The VM is gone: its rings and memory must not be touched again.
                    port_t.disconnect();
                }
                Ok(())
            })?;
        Ok((
            port,
            VhostUserServer {
                path: socket.to_path_buf(),
                stop,
                session,
                thread: Some(thread),
            },
        ))
    }

    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Stops serving (disconnecting a VMM still attached) and returns how the daemon ended.
    pub fn stop(mut self) -> Result<(), String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.store(true, Ordering::SeqCst);
        match &*self.session.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(h) => h.shutdown(),
            // Still waiting in accept: a connection that closes at once ends the wait.
            None => drop(UnixStream::connect(&self.path)),
        }
        let r = thread
            .join()
            .unwrap_or_else(|_| Err("vhost-user thread panicked".into()));
        let _ = std::fs::remove_file(&self.path);
        r
    }
}

impl Drop for VhostUserServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
