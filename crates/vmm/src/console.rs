//! Connects COM1 to the configured console: where output goes and which thread feeds input.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    Listener(UnixListener, SocketOut),
}

/// Opens the console: returns the output writer, the pending input source and, for a socket
/// console, the socket path to remove when the VM is gone.
pub(crate) fn open(
    config: ConsoleConfig,
) -> Result<(Box<dyn Write + Send>, InputSource, Option<PathBuf>)> {
    Ok(match config {
        ConsoleConfig::Stdio => (Box::new(std::io::stdout()), InputSource::Stdin, None),
        ConsoleConfig::Null => (Box::new(std::io::sink()), InputSource::None, None),
        ConsoleConfig::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(VmmError::Console)?;
            (Box::new(f), InputSource::None, None)
        }
        ConsoleConfig::Stream(s) => {
            let out = s.try_clone().map_err(VmmError::Console)?;
            (Box::new(out), InputSource::Stream(s), None)
        }
        ConsoleConfig::Socket(path) => {
            // A stale socket file from an earlier run would make bind fail.
            if std::fs::symlink_metadata(&path)
                .map(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                })
                .unwrap_or(false)
            {
                let _ = std::fs::remove_file(&path);
            }
            let listener = UnixListener::bind(&path).map_err(VmmError::Console)?;
            let out = SocketOut::default();
            (
                Box::new(out.clone()),
                InputSource::Listener(listener, out),
                Some(path),
            )
        }
    })
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
        InputSource::Listener(listener, out) => spawn(
            "console-socket",
            Box::new(move || {
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
