//! Connects COM1 to the configured console: where output goes and which thread feeds input.
//!
//! A socket console is a listening Unix socket, as QEMU's `server`: by default the VM waits
//! (vCPUs not started) until the first client connects, so nothing the guest prints is lost;
//! with `wait: false` the guest starts at once and output before a client connects is dropped.
//! The socket file is ours from bind to drop: a stale socket is replaced, anything else at the
//! path (a regular file, a socket another process listens on) is refused and left alone.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::ConsoleConfig;
use crate::devices::serial::{pump_input, SerialDevice};
use crate::error::{Result, VmmError};
use crate::exit::ExitState;

/// Output half of a socket console: goes to the connected client, if any.
#[derive(Clone, Default)]
pub(crate) struct SocketOut(Arc<Mutex<Option<UnixStream>>>);

impl Write for SocketOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = client.as_mut() {
            if s.write_all(buf).is_err() {
                *client = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How input will reach the guest once the serial device exists.
pub(crate) enum InputSource {
    None,
    Stdin,
    Stream(UnixStream),
    Listener {
        listener: UnixListener,
        out: SocketOut,
        /// Hold the guest until a client connects.
        wait: bool,
        /// The client that connected while the guest was held.
        first: Option<UnixStream>,
    },
}

impl InputSource {
    /// The guest may not run until a console client connects (`wait_for_client`).
    pub(crate) fn holds_guest(&self) -> bool {
        matches!(self, InputSource::Listener { wait: true, .. })
    }
}

/// The socket file a socket console bound; removed when dropped (the VM is gone, or building
/// it failed after the bind).
#[derive(Debug)]
pub(crate) struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_socket());
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Makes `path` free for a listening socket: nothing there, or a stale socket (removed). A file
/// of another kind, or a socket somebody listens on, is refused untouched.
fn claim_socket_path(path: &Path) -> Result<()> {
    let refuse = |why: &str| VmmError::ConsoleSocket {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(refuse(
            "a file that is not a socket is in the way; remove it or choose another path",
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(VmmError::ConsoleSocketInUse(path.to_path_buf()));
    }
    std::fs::remove_file(path).map_err(|e| refuse(&format!("removing the stale socket: {e}")))
}

/// Opens the console: returns the output writer, the pending input source and, for a socket
/// console, the socket file to remove when the VM is gone.
pub(crate) fn open(
    config: ConsoleConfig,
) -> Result<(Box<dyn Write + Send>, InputSource, Option<SocketFile>)> {
    Ok(match config {
        ConsoleConfig::Stdio => (Box::new(std::io::stdout()), InputSource::Stdin, None),
        ConsoleConfig::Null => (Box::new(std::io::sink()), InputSource::None, None),
        ConsoleConfig::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| VmmError::ConsoleFile { path, source })?;
            (Box::new(f), InputSource::None, None)
        }
        ConsoleConfig::Stream(s) => {
            let out = s.try_clone().map_err(VmmError::Console)?;
            (Box::new(out), InputSource::Stream(s), None)
        }
        ConsoleConfig::Socket { path, wait } => {
            claim_socket_path(&path)?;
            let listener = UnixListener::bind(&path).map_err(|e| VmmError::ConsoleSocket {
                path: path.clone(),
                why: e.to_string(),
            })?;
            let file = SocketFile(path);
            let out = SocketOut::default();
            let input = InputSource::Listener {
                listener,
                out: out.clone(),
                wait,
                first: None,
            };
            (Box::new(out), input, Some(file))
        }
    })
}

/// For a socket console that holds the guest: blocks until the first client connects (it then
/// gets the guest's output from the first byte) or `stop()` turns true (checked every 20 ms).
/// Returns false when stopped. Every other console returns true at once.
pub(crate) fn wait_for_client(source: &mut InputSource, stop: impl Fn() -> bool) -> Result<bool> {
    let InputSource::Listener {
        listener,
        out,
        wait: true,
        first,
    } = source
    else {
        return Ok(true);
    };
    listener.set_nonblocking(true)?;
    let client = loop {
        match listener.accept() {
            Ok((client, _)) => break client,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop() {
                    return Ok(false);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(VmmError::Console(e)),
        }
    };
    listener.set_nonblocking(false)?;
    // An accepted socket does not inherit the listener's O_NONBLOCK on Linux; be explicit.
    client.set_nonblocking(false)?;
    *out.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.try_clone()?);
    *first = Some(client);
    Ok(true)
}

/// Starts the thread that feeds input to the guest (detached: it may block on stdin forever;
/// it stops touching the device once the VM has exited).
pub(crate) fn start_input(
    source: InputSource,
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<ExitState>,
) -> Result<()> {
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(|_| ())
            .map_err(VmmError::Thread)
    };
    match source {
        InputSource::None => Ok(()),
        InputSource::Stdin => spawn(
            "console-in",
            Box::new(move || pump_input(serial, std::io::stdin().lock(), exit)),
        ),
        InputSource::Stream(s) => {
            spawn("console-in", Box::new(move || pump_input(serial, s, exit)))
        }
        InputSource::Listener {
            listener,
            out,
            first,
            ..
        } => spawn(
            "console-socket",
            Box::new(move || {
                if let Some(client) = first {
                    pump_input(serial.clone(), client, exit.clone());
                }
                for client in listener.incoming() {
                    if exit.is_set() {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(writer) = client.try_clone() else {
                        continue;
                    };
                    *out.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
                    pump_input(serial.clone(), client, exit.clone());
                }
            }),
        ),
    }
}
