//! The listeners and the HTTP/1.1 connections on them. The Unix socket file is its own
//! authentication (0600); a stale one from a dead vireod is replaced, a live one refused. A TCP
//! listener speaks TLS only (see `tls`), its router demanding the bearer token. Connections are
//! independent tasks; the TLS handshake and the headers must each arrive within
//! `REQUEST_TIMEOUT` (the body's limit is the router's), and upgrades (the console) are enabled.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::router::REQUEST_TIMEOUT;
use super::sys;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{}: another vireod is listening there; stop it or choose another --listen", .0.display())]
    InUse(std::path::PathBuf),
    #[error("{} exists and is not a socket; remove it or choose another --listen", .0.display())]
    NotSocket(std::path::PathBuf),
    #[error("tcp:{addr}: {source}")]
    Tcp {
        addr: std::net::SocketAddr,
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: io::Error,
    },
}

/// Binds `path` owner-only.
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    let io_err = |source| ListenError::Io {
        path: path.into(),
        source,
    };
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotSocket(path.into()))
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.into()));
            }
            tracing::info!(path = %path.display(), "replacing a stale socket");
            fs::remove_file(path).map_err(io_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // Created 0600 (no window in which another user could connect), then made sure of.
    let std_listener =
        sys::with_umask(0o177, || std::os::unix::net::UnixListener::bind(path)).map_err(io_err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    std_listener.set_nonblocking(true).map_err(io_err)?;
    UnixListener::from_std(std_listener).map_err(io_err)
}

/// Binds a TCP address (exactly the one asked for).
pub async fn bind_tcp(addr: std::net::SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Tcp { addr, source })
}

/// A bound listener: the Unix socket, or TCP whose connections must complete a TLS handshake.
pub enum Listener {
    Unix(UnixListener),
    Tls(TcpListener, TlsAcceptor),
}

/// Serves `app` on `listener` until `shutdown` resolves; connections still open then are
/// dropped with the runtime.
pub async fn serve(listener: Listener, app: Router, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = accept(&listener) => accepted,
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        match conn {
            Accepted::Unix(stream) => {
                tokio::spawn(serve_connection(stream, app));
            }
            Accepted::Tcp(stream, acceptor) => {
                tokio::spawn(async move {
                    // A client that never finishes the handshake (plain HTTP on this port
                    // fails it at once) costs one task for at most REQUEST_TIMEOUT.
                    match tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => serve_connection(tls, app).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream, TlsAcceptor),
}

async fn accept(listener: &Listener) -> io::Result<Accepted> {
    match listener {
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        Listener::Tls(l, acceptor) => l
            .accept()
            .await
            .map(|(s, _)| Accepted::Tcp(s, acceptor.clone())),
    }
}

async fn serve_connection<S>(stream: S, app: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended");
    }
}
