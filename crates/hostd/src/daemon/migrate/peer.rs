//! The vireod-to-vireod connection (docs/migration.md, "Between the vireods"): mutual TLS 1.3
//! with pinned host certificates (`vireo_migration::hostauth`), then JSON lines
//! (`vireo_api::migrate::PeerMsg`), with a quick migration's files as raw bytes after their
//! `File` line. Every read is bounded in size and time, so a peer cannot make this side
//! allocate without limit or wait forever.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{ClientConfig, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use vireo_api::migrate::PeerMsg;
use vireo_migration::hostauth;

use crate::host_trust::HostTrust;

/// A protocol line at most (an offer carries a spec: a few KiB).
const MAX_LINE: u64 = 1 << 20;
/// Connect plus handshake.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// A saved-state file at most (guest RAM is bounded by the host's limits long before this).
pub const MAX_FILE: u64 = 1 << 40;

/// Why a file sent after a `File` line was not taken.
#[derive(Debug)]
pub enum FileError {
    /// This host could not store it; the connection is still in step.
    Store(String),
    /// The connection failed or the peer broke the protocol; it cannot be used further.
    Link(String),
}

/// A file the peer announces is refused before any byte of it is read when it is larger than
/// this host takes.
fn check_file_len(len: u64) -> Result<(), FileError> {
    if len > MAX_FILE {
        return Err(FileError::Link(format!(
            "a file of {len} bytes is more than this host takes"
        )));
    }
    Ok(())
}

fn store_error(path: &Path, e: std::io::Error) -> String {
    format!("storing {} on this host: {e}", path.display())
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Peer {
    io: BufReader<Box<dyn Io>>,
    /// A line read in part: `recv` may be cancelled (a `select!`) and resumes here.
    pending: Vec<u8>,
    /// Who is on the other end (a name from the trust store, or the address).
    pub who: String,
}

pub fn server_config(host: &HostTrust) -> Result<Arc<ServerConfig>, String> {
    let id = host.identity().map_err(|e| e.to_string())?;
    let trusted = host.trusted().map_err(|e| e.to_string())?;
    hostauth::server_config(&id, &trusted).map_err(|e| e.to_string())
}

fn client_config(host: &HostTrust) -> Result<Arc<ClientConfig>, String> {
    let id = host.identity().map_err(|e| e.to_string())?;
    let trusted = host.trusted().map_err(|e| e.to_string())?;
    hostauth::client_config(&id, &trusted).map_err(|e| e.to_string())
}

/// One line for a failed TLS handshake. Only a TLS error proper (a certificate refused, an
/// alert: `InvalidData`) points at trust; a connection that broke or timed out mid-handshake
/// (a cut link, a daemon going down) says so, rather than sending the user to the trust list.
fn handshake_failed(to: SocketAddr, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::InvalidData {
        format!(
            "the TLS handshake with {to} failed ({e}): each host must trust the other (`vireo \
             host trust add` with the fingerprint `vireo host identity` prints on the other host)"
        )
    } else {
        format!(
            "the connection to {to} broke during the TLS handshake ({e}): check that the link is \
             up and a vireod listens there with --migration-listen"
        )
    }
}

impl Peer {
    /// The source's side: TCP, then TLS presenting this host's certificate and accepting only
    /// a trusted one. Every failure is one line naming `to` and the way out.
    pub async fn connect(host: &HostTrust, to: SocketAddr) -> Result<Peer, String> {
        let cfg = client_config(host)?;
        let work = async {
            let tcp = TcpStream::connect(to)
                .await
                .map_err(|e| format!("cannot reach the destination {to}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            TlsConnector::from(cfg)
                .connect(hostauth::peer_name(), tcp)
                .await
                .map_err(|e| handshake_failed(to, &e))
        };
        let tls = tokio::time::timeout(CONNECT_LIMIT, work)
            .await
            .map_err(|_| format!("no answer from {to} within {}s", CONNECT_LIMIT.as_secs()))??;
        Ok(Peer {
            io: BufReader::new(Box::new(tls)),
            pending: Vec::new(),
            who: to.to_string(),
        })
    }

    /// The destination's side of an accepted connection: the handshake refuses an untrusted
    /// client before anything is read.
    pub async fn accept(cfg: Arc<ServerConfig>, tcp: TcpStream) -> Result<Peer, String> {
        let from = tcp
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(CONNECT_LIMIT, TlsAcceptor::from(cfg).accept(tcp))
            .await
            .map_err(|_| {
                format!(
                    "{from}: no TLS handshake within {}s",
                    CONNECT_LIMIT.as_secs()
                )
            })?
            .map_err(|e| format!("{from}: TLS handshake refused: {e}"))?;
        Ok(Peer {
            io: BufReader::new(Box::new(tls)),
            pending: Vec::new(),
            who: from,
        })
    }

    pub async fn send(&mut self, msg: &PeerMsg) -> Result<(), String> {
        let mut line = serde_json::to_vec(msg).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let w = self.io.get_mut();
        w.write_all(&line)
            .await
            .map_err(|e| format!("sending to {}: {e}", self.who))?;
        w.flush()
            .await
            .map_err(|e| format!("sending to {}: {e}", self.who))
    }

    /// The next message, waiting at most `limit`. The connection closing is an error.
    /// Cancel-safe: a line read in part is kept for the next call.
    pub async fn recv(&mut self, limit: Duration) -> Result<PeerMsg, String> {
        let room = MAX_LINE.saturating_sub(self.pending.len() as u64);
        let mut limited = (&mut self.io).take(room);
        let read = limited.read_until(b'\n', &mut self.pending);
        tokio::time::timeout(limit, read)
            .await
            .map_err(|_| format!("{} said nothing for {}s", self.who, limit.as_secs()))?
            .map_err(|e| read_failed(&self.who, &e))?;
        if self.pending.last() != Some(&b'\n') {
            if self.pending.len() as u64 >= MAX_LINE {
                return Err(format!(
                    "{} sent a line longer than {MAX_LINE} bytes",
                    self.who
                ));
            }
            return Err(format!("{} closed the connection", self.who));
        }
        let line = std::mem::take(&mut self.pending);
        serde_json::from_slice(&line).map_err(|e| format!("{} sent a bad message: {e}", self.who))
    }

    /// Exactly `buf.len()` raw bytes (a shared-nothing migration's disk records), within
    /// `limit`.
    pub async fn read_exact(&mut self, buf: &mut [u8], limit: Duration) -> Result<(), String> {
        tokio::time::timeout(limit, self.io.read_exact(buf))
            .await
            .map_err(|_| format!("{} said nothing for {}s", self.who, limit.as_secs()))?
            .map(|_| ())
            .map_err(|e| read_failed(&self.who, &e))
    }

    /// Raw bytes, flushed.
    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), String> {
        let w = self.io.get_mut();
        w.write_all(bytes)
            .await
            .map_err(|e| format!("sending to {}: {e}", self.who))?;
        w.flush()
            .await
            .map_err(|e| format!("sending to {}: {e}", self.who))
    }

    /// `File` then the bytes of `path`.
    pub async fn send_file(&mut self, name: &Path, path: &Path) -> Result<u64, String> {
        self.send_file_counted(name, path, |_| {}).await
    }

    /// [`Peer::send_file`], telling `sent` the bytes of the file sent so far after each
    /// chunk, so a job's progress moves while a large file (a quick migration's 64 MiB
    /// `memory.bin`) crosses, not only once it is whole.
    pub async fn send_file_counted(
        &mut self,
        name: &Path,
        path: &Path,
        mut sent: impl FnMut(u64),
    ) -> Result<u64, String> {
        const CHUNK: usize = 1 << 20;
        let mut f = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let len = f
            .metadata()
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        self.send(&PeerMsg::File {
            name: name.to_owned(),
            len,
        })
        .await?;
        let w = self.io.get_mut();
        let mut buf = vec![0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            // Whole chunks (a short read is read on): the records a file goes out in are the
            // same every time, which the fault runs' byte-counted cut points rely on.
            let n = (len - done).min(CHUNK as u64) as usize;
            f.read_exact(&mut buf[..n])
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => {
                        format!("{} shrank while being sent", path.display())
                    }
                    _ => format!("{}: {e}", path.display()),
                })?;
            w.write_all(&buf[..n])
                .await
                .map_err(|e| format!("sending {} to {}: {e}", path.display(), self.who))?;
            done += n as u64;
            sent(done);
        }
        w.flush()
            .await
            .map_err(|e| format!("sending to {}: {e}", self.who))?;
        Ok(len)
    }

    /// The `len` bytes after a `File` line, into `path` (created; synced), or discarded when
    /// `path` is `None`; each read waits at most `silence`. A failure to store them (the file
    /// cannot be created or written: a full disk) still reads every byte, so the connection
    /// stays in step and the source gets this side's answer to its commit instead of a reset
    /// connection: that is [`FileError::Store`].
    pub async fn recv_file(
        &mut self,
        path: Option<&Path>,
        len: u64,
        silence: Duration,
    ) -> Result<(), FileError> {
        check_file_len(len)?;
        let stored = match path {
            None => Ok(None),
            Some(p) => tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p)
                .await
                .map(Some)
                .map_err(|e| store_error(p, e)),
        };
        self.recv_into(stored, path, len, silence).await
    }

    /// `recv_file` into a file this host created empty for it beforehand (a shared-nothing
    /// migration claims the names of the user's files in `dest_dir` at the offer, so the
    /// discard after a failure removes only what the migration made).
    pub async fn recv_claimed_file(
        &mut self,
        path: &Path,
        len: u64,
        silence: Duration,
    ) -> Result<(), FileError> {
        check_file_len(len)?;
        let stored = tokio::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .await
            .map(Some)
            .map_err(|e| store_error(path, e));
        self.recv_into(stored, Some(path), len, silence).await
    }

    async fn recv_into(
        &mut self,
        mut stored: Result<Option<tokio::fs::File>, String>,
        path: Option<&Path>,
        len: u64,
        silence: Duration,
    ) -> Result<(), FileError> {
        let mut buf = vec![0u8; (256 << 10).min(len.max(1) as usize)];
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match tokio::time::timeout(silence, self.io.read(&mut buf[..want])).await {
                Err(_) => {
                    return Err(FileError::Link(format!(
                        "{} sent nothing for {}s with {left} of {len} bytes of a file to come",
                        self.who,
                        silence.as_secs()
                    )))
                }
                Ok(Err(e)) => return Err(FileError::Link(read_failed(&self.who, &e))),
                Ok(Ok(0)) => {
                    return Err(FileError::Link(format!(
                        "{} closed the connection after {} of {len} bytes of a file",
                        self.who,
                        len - left
                    )))
                }
                Ok(Ok(n)) => n,
            };
            left -= n as u64;
            if let (Ok(Some(f)), Some(p)) = (&mut stored, path) {
                if let Err(e) = f.write_all(&buf[..n]).await {
                    stored = Err(store_error(p, e));
                }
            }
        }
        match (stored, path) {
            (Ok(Some(mut f)), Some(p)) => {
                // tokio's file hands writes to a thread: their errors surface here at the latest.
                let synced = match f.flush().await {
                    Ok(()) => f.sync_all().await,
                    Err(e) => Err(e),
                };
                synced.map_err(|e| FileError::Store(store_error(p, e)))
            }
            (Err(e), _) => Err(FileError::Store(e)),
            _ => Ok(()),
        }
    }
}

/// A read from the peer that failed, in one line. A connection that ended without TLS's
/// `close_notify` (the peer died or the link broke) says just that: rustls's own words carry a
/// link to its manual, no help to someone reading a job's error.
fn read_failed(who: &impl std::fmt::Display, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format!("{who} closed the connection"),
        _ => format!("reading from {who}: {e}"),
    }
}
