//! The worker's COM1: output into a bounded ring (for `ConsoleLog`) and to the one client
//! attached to `console.sock`, input from that client (and from `Shutdown`) to the guest.
//!
//! The vmm gets one end of a socketpair as its console stream ([`ConsoleConfig::Stream`]); two
//! threads serve the other end:
//! - `console-out` reads what the guest wrote, appends it to the ring and hands it to the
//!   attached client with non-blocking writes. A client that does not keep up loses bytes
//!   (they stay in the ring): this thread must never wait for a client, or the socketpair would
//!   fill and the vCPU writing to COM1 would stall behind a stuck `vireo vm console`.
//! - `console-clients` waits (epoll) for a new client on the listening socket and for input from the
//!   attached one, and writes that input to the guest. A new client replaces the attached one,
//!   whose connection is shut down. Input may wait for the guest to drain its FIFO; only this
//!   thread waits then, never the guest's output.
//!
//! [`ConsoleConfig::Stream`]: vireo_vmm::ConsoleConfig::Stream

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use parking_lot::Mutex;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The last bytes the guest wrote, and how many it wrote in all.
pub struct Ring {
    bytes: VecDeque<u8>,
    capacity: usize,
    total: u64,
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        Ring {
            bytes: VecDeque::new(),
            capacity,
            total: 0,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.capacity)..];
        let over = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..over);
        self.bytes.extend(data);
    }

    /// The last `max` bytes (fewer if the ring holds fewer), oldest first.
    pub fn tail(&self, max: usize) -> Vec<u8> {
        let skip = self.bytes.len().saturating_sub(max);
        self.bytes.iter().skip(skip).copied().collect()
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

/// The console as the rest of the worker sees it.
pub struct Console {
    ring: Mutex<Ring>,
    /// The attached client's stream (non-blocking), for output.
    client: Mutex<Option<UnixStream>>,
    /// Our end of the socketpair, for input to the guest.
    to_guest: Mutex<UnixStream>,
    /// `console-out`, joined by `finish` so the guest's last output is not lost.
    output_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// How long input may wait for the guest to take it.
const INPUT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

const LISTENER: u64 = 0;
const CLIENT: u64 = 1;

impl Console {
    /// Starts serving `listener`; returns the console and the stream to give the vmm.
    pub fn start(
        listener: UnixListener,
        ring_bytes: usize,
    ) -> std::io::Result<(Arc<Console>, UnixStream)> {
        let (vmm_end, ours) = UnixStream::pair()?;
        // Input waits for the guest to drain COM1's FIFO. A guest that stops reading must not
        // hold up `Shutdown` or new clients forever: input it has not taken within this time
        // is dropped (with a warning). Only sends time out; reading output is unaffected.
        let to_guest = ours.try_clone()?;
        to_guest.set_write_timeout(Some(INPUT_TIMEOUT))?;
        let console = Arc::new(Console {
            ring: Mutex::new(Ring::new(ring_bytes)),
            client: Mutex::new(None),
            to_guest: Mutex::new(to_guest),
            output_thread: Mutex::new(None),
        });
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        let c = console.clone();
        let output = std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || c.pump_output(ours))?;
        *console.output_thread.lock() = Some(output);
        let c = console.clone();
        std::thread::Builder::new()
            .name("console-clients".into())
            .spawn(move || c.serve_clients(listener, epoll))?;
        Ok((console, vmm_end))
    }

    /// Once the guest can write no more (its vCPUs stopped, the serial output flushed): lets
    /// `console-out` take what is still queued in the socketpair — into the ring and to the
    /// attached client — and waits (at most `limit`) for it to end. Without this, the process
    /// could exit before that thread ran, and what the guest wrote last (the probe's `OK` to
    /// `POWEROFF`) would never reach the client. Reading is shut down, not the socket closed:
    /// queued bytes are still read, then the thread sees the end.
    pub fn finish(&self, limit: std::time::Duration) {
        if let Err(e) = self.to_guest.lock().shutdown(std::net::Shutdown::Read) {
            tracing::warn!("console: ending the output: {e}");
            return;
        }
        let Some(thread) = self.output_thread.lock().take() else {
            return;
        };
        let deadline = std::time::Instant::now() + limit;
        while !thread.is_finished() {
            if std::time::Instant::now() > deadline {
                tracing::warn!("console output not drained within {limit:?}; the rest is lost");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = thread.join();
    }

    /// Writes `bytes` to COM1 as if typed by a client.
    pub fn send_to_guest(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.to_guest.lock().write_all(bytes)
    }

    /// The last `max` bytes of output and the total written.
    pub fn log(&self, max: usize) -> (Vec<u8>, u64) {
        let ring = self.ring.lock();
        (ring.tail(max), ring.total())
    }

    fn pump_output(&self, mut from_guest: UnixStream) {
        let mut buf = [0u8; 4096];
        loop {
            let n = match from_guest.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("console output: {e}; the guest's output is no longer kept");
                    return;
                }
            };
            self.ring.lock().push(&buf[..n]);
            let mut client = self.client.lock();
            if let Some(c) = client.as_mut() {
                // Non-blocking: what the client's socket cannot take now is dropped for it.
                match c.write(&buf[..n]) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => *client = None,
                }
            }
        }
    }

    fn serve_clients(&self, listener: UnixListener, epoll: Epoll) {
        let mut reader: Option<UnixStream> = None;
        let mut events = [EpollEvent::default(); 2];
        let mut buf = [0u8; 1024];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("console: epoll failed, clients can no longer attach: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER => match listener.accept() {
                        Ok((client, _)) => {
                            if let Err(e) = self.attach(&epoll, &mut reader, client) {
                                tracing::warn!("console: attaching a client: {e}");
                            }
                        }
                        Err(e) => tracing::debug!("console: accept: {e}"),
                    },
                    _ => {
                        let Some(r) = reader.as_mut() else { continue };
                        match r.read(&mut buf) {
                            Ok(0) => self.detach(&epoll, &mut reader),
                            Ok(n) => {
                                if let Err(e) = self.send_to_guest(&buf[..n]) {
                                    tracing::warn!("console input: {e}");
                                }
                            }
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::Interrupted
                                ) => {}
                            Err(_) => self.detach(&epoll, &mut reader),
                        }
                    }
                }
            }
        }
    }

    /// Makes `client` the attached one; a previously attached client is disconnected.
    fn attach(
        &self,
        epoll: &Epoll,
        reader: &mut Option<UnixStream>,
        client: UnixStream,
    ) -> std::io::Result<()> {
        self.detach(epoll, reader);
        client.set_nonblocking(true)?;
        let writer = client.try_clone()?;
        epoll.ctl(
            ControlOperation::Add,
            client.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, CLIENT),
        )?;
        *self.client.lock() = Some(writer);
        *reader = Some(client);
        tracing::info!("console client attached");
        Ok(())
    }

    fn detach(&self, epoll: &Epoll, reader: &mut Option<UnixStream>) {
        let Some(old) = reader.take() else { return };
        // The output side holds a duplicate of the fd, so closing ours would not take it out
        // of the epoll set: remove it explicitly.
        let _ = epoll.ctl(
            ControlOperation::Delete,
            old.as_raw_fd(),
            EpollEvent::default(),
        );
        let _ = old.shutdown(std::net::Shutdown::Both);
        *self.client.lock() = None;
        tracing::info!("console client detached");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_bytes_and_counts_all() {
        let mut r = Ring::new(8);
        r.push(b"hello ");
        assert_eq!(r.tail(100), b"hello ");
        r.push(b"world");
        assert_eq!(r.tail(100), b"lo world");
        assert_eq!(r.tail(3), b"rld");
        r.push(b"0123456789abcdef");
        assert_eq!(r.tail(100), b"89abcdef");
        assert_eq!(r.total(), 27);
        assert_eq!(Ring::new(0).tail(5), b"");
    }

    #[test]
    fn output_reaches_ring_and_client_and_a_stuck_client_does_not_stall_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let (console, mut guest) =
            Console::start(UnixListener::bind(&path).unwrap(), 1 << 20).unwrap();
        // Nobody attached: only the ring gets it.
        guest.write_all(b"early\n").unwrap();
        let stuck = UnixStream::connect(&path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while console.client.lock().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "client never attached"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The attached client never reads: far more than any socket buffer still goes through.
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            guest.write_all(&chunk).unwrap();
        }
        guest.write_all(b"end\n").unwrap();
        while console.log(4).0 != b"end\n" {
            assert!(std::time::Instant::now() < deadline, "output stalled");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(console.log(0).1, 6 + 64 * 64 * 1024 + 4);
        drop(stuck);
    }

    #[test]
    fn finish_delivers_what_the_guest_wrote_last_to_ring_and_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let (console, mut guest) =
            Console::start(UnixListener::bind(&path).unwrap(), 1 << 20).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while console.client.lock().is_none() {
            assert!(std::time::Instant::now() < deadline, "never attached");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Written and at once finished, as when the guest prints and powers off; the guest's
        // end stays open (the vmm holds it), so only `finish` can end the output thread.
        guest.write_all(b"last words\r\n").unwrap();
        console.finish(std::time::Duration::from_secs(10));
        assert!(
            console.output_thread.lock().is_none(),
            "console-out not joined"
        );
        assert_eq!(console.log(100).0, b"last words\r\n");
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut got = [0u8; 12];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"last words\r\n");
        // Finishing twice is harmless.
        console.finish(std::time::Duration::from_secs(1));
    }

    #[test]
    fn input_the_guest_does_not_take_is_dropped_after_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("c.sock")).unwrap();
        // `_guest` is never read, as when the guest stops draining COM1.
        let (console, _guest) = Console::start(listener, 64).unwrap();
        let started = std::time::Instant::now();
        let e = console.send_to_guest(&vec![b'y'; 8 << 20]).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e}"
        );
        assert!(started.elapsed() < INPUT_TIMEOUT * 3);
    }
}
