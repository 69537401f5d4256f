//! The client of vireod's REST API (docs/api.md): JSON over HTTP/1.1 on its Unix socket, or
//! over TLS on its TCP listener with a bearer token (`tls`).
//!
//! The rest of `vireo` is synchronous, so the client owns a current-thread tokio runtime and
//! each call blocks on it. One connection per request: a CLI makes a handful, and a fresh
//! connection can never be left half-read by an earlier error. Every request is bounded by
//! [`REQUEST_TIMEOUT`], so a stuck daemon cannot hang the command. `vm console` uses
//! [`Client::upgrade`] inside [`Client::block_on`] to get the raw byte stream after `101`.

mod error;
mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Runtime;

pub use error::ClientError;

use crate::host::Host;

/// Longest wait for one answer. Turn-off flushes the disks before it answers, which takes
/// seconds on a slow disk, never a minute.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The client for `--host` (`unix:PATH` or `https://HOST:PORT` with the token and, for a
/// self-signed certificate, the CA); a host vireo cannot serve is bad input.
pub fn connect(
    host: &str,
    token_file: Option<&Path>,
    ca_cert: Option<&Path>,
) -> Result<Client, crate::exit::CliError> {
    let host = Host::parse(host)?;
    let tls = match &host {
        Host::Unix(_) => None,
        Host::Tls { name, .. } => Some(tls::TlsSettings::new(
            &host.to_string(),
            name,
            token_file,
            ca_cert,
        )?),
    };
    Client::new(&host, tls)
        .map_err(|e| crate::exit::CliError::failed(format!("cannot start the API client: {e}")))
}

/// The raw byte stream of an upgraded connection (`vm console`).
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

pub struct Client {
    transport: Transport,
    /// `unix:PATH` or `https://HOST:PORT`, for messages.
    host: String,
    rt: Runtime,
}

enum Transport {
    Unix(PathBuf),
    Tls {
        authority: String,
        settings: tls::TlsSettings,
    },
}

impl Client {
    fn new(host: &Host, tls: Option<tls::TlsSettings>) -> std::io::Result<Client> {
        let transport = match (host, tls) {
            (Host::Unix(socket), _) => Transport::Unix(socket.clone()),
            (Host::Tls { authority, .. }, Some(settings)) => Transport::Tls {
                authority: authority.clone(),
                settings,
            },
            (Host::Tls { .. }, None) => unreachable!("connect builds the TLS settings"),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        Ok(Client {
            transport,
            host: host.to_string(),
            rt,
        })
    }

    /// Runs async work (the console pump) on the client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.call(Method::GET, path, None)?;
        self.decode(&body)
    }

    /// A GET whose answer is bytes, not JSON (the console ring).
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        Ok(self.call(Method::GET, path, None)?.to_vec())
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("API types serialize"));
        let answer = self.call(Method::POST, path, body)?;
        self.decode(&answer)
    }

    pub fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("API types serialize");
        let answer = self.call(Method::PUT, path, Some(body))?;
        self.decode(&answer)
    }

    /// A POST without a body answered 204 (no body either).
    pub fn post_no_content(&self, path: &str) -> Result<(), ClientError> {
        self.call(Method::POST, path, None).map(drop)
    }

    pub fn patch<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("API types serialize");
        let answer = self.call(Method::PATCH, path, Some(body))?;
        self.decode(&answer)
    }

    /// A DELETE answered with a body (a job).
    pub fn delete_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let answer = self.call(Method::DELETE, path, None)?;
        self.decode(&answer)
    }

    pub fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, path, None).map(drop)
    }

    /// `GET path` with `Connection: Upgrade` and `Upgrade: protocol`; the stream once the
    /// daemon answered 101. Any other answer is the usual error (e.g. 409: the VM is off).
    pub async fn upgrade(&self, path: &str, protocol: &str) -> Result<Upgraded, ClientError> {
        let request = self
            .request(Method::GET, path)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, protocol)
            .body(Full::new(Bytes::new()))
            .expect("a valid request");
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.send(request))
            .await
            .map_err(|_| self.timeout())??;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let body = self.collect(response).await?;
            return Err(self.error_of(status, &body));
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| self.connection(format!("the upgrade to {protocol} failed: {e}")))?;
        Ok(TokioIo::new(upgraded))
    }

    /// One request and its whole answer; an error status becomes the error.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let mut builder = self.request(method, path);
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("a valid request");
        self.rt.block_on(async {
            let exchange = async {
                let response = self.send(request).await?;
                let status = response.status();
                let body = self.collect(response).await?;
                if status.is_success() {
                    Ok(body)
                } else {
                    Err(self.error_of(status, &body))
                }
            };
            tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .map_err(|_| self.timeout())?
        })
    }

    fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        // HTTP/1.1 wants a Host header; on a Unix socket any name will do.
        let builder = Request::builder().method(method).uri(path);
        match &self.transport {
            Transport::Unix(_) => builder.header(HOST, "localhost"),
            Transport::Tls {
                authority,
                settings,
            } => builder
                .header(HOST, authority.as_str())
                .header(AUTHORIZATION, format!("Bearer {}", settings.token)),
        }
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            host: self.host.clone(),
            source,
        };
        match &self.transport {
            Transport::Unix(socket) => {
                let stream = UnixStream::connect(socket).await.map_err(unreachable)?;
                self.exchange(stream, request).await
            }
            Transport::Tls {
                authority,
                settings,
            } => {
                let tcp = TcpStream::connect(authority.as_str())
                    .await
                    .map_err(unreachable)?;
                let stream = settings
                    .connector
                    .connect(settings.name.clone(), tcp)
                    .await
                    .map_err(|e| ClientError::Tls {
                        host: self.host.clone(),
                        what: e.to_string(),
                    })?;
                self.exchange(stream, request).await
            }
        }
    }

    async fn exchange<S>(
        &self,
        stream: S,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.connection(e.to_string()))?;
        // The connection is driven by its own task; with upgrades so `upgrade` can take the
        // socket over after a 101.
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        sender
            .send_request(request)
            .await
            .map_err(|e| self.connection(e.to_string()))
    }

    async fn collect(&self, response: Response<Incoming>) -> Result<Bytes, ClientError> {
        Ok(response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.connection(format!("reading the answer: {e}")))?
            .to_bytes())
    }

    /// An error status: the API's error shape if the body is one.
    fn error_of(&self, status: StatusCode, body: &[u8]) -> ClientError {
        if let (StatusCode::UNAUTHORIZED, Transport::Tls { settings, .. }) =
            (status, &self.transport)
        {
            return ClientError::Refused {
                host: self.host.clone(),
                token_file: settings.token_file.clone(),
            };
        }
        match serde_json::from_slice(body) {
            Ok(error) => ClientError::Api {
                status: status.as_u16(),
                error,
            },
            Err(_) => ClientError::Status {
                host: self.host.clone(),
                status: status.as_u16(),
                body: snippet(body),
            },
        }
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, ClientError> {
        serde_json::from_slice(body).map_err(|e| ClientError::Unexpected {
            host: self.host.clone(),
            what: format!(
                "{:?}, which is not the documented JSON ({e})",
                snippet(body)
            ),
        })
    }

    fn connection(&self, what: String) -> ClientError {
        ClientError::Connection {
            host: self.host.clone(),
            what,
        }
    }

    fn timeout(&self) -> ClientError {
        ClientError::Timeout {
            host: self.host.clone(),
            secs: REQUEST_TIMEOUT.as_secs(),
        }
    }
}

/// At most 200 characters of a body, for an error line.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}
