//! vireod over TCP: TLS (rustls on ring, no OpenSSL) and a bearer token. The Unix socket's
//! authentication is its file mode; a TCP peer has none, so every request on it must carry
//! `Authorization: Bearer <token>`, compared in constant time. Everything here is checked at
//! startup so a misconfigured daemon refuses to start instead of serving unprotected.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;
use vireo_api::ApiErrorCode;

use super::http_error::HttpError;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {}: is empty; write a long random token into it", .0.display())]
    EmptyToken(PathBuf),
    #[error(
        "token file {}: readable by group or others (mode {mode:o}); run chmod 600 on it",
        path.display()
    )]
    TokenNotPrivate { path: PathBuf, mode: u32 },
    #[error("{}: no PEM certificate in it ({what})", path.display())]
    Cert { path: PathBuf, what: String },
    #[error("{}: no PEM private key in it ({what})", path.display())]
    Key { path: PathBuf, what: String },
    #[error("--tls-cert/--tls-key: {0}")]
    Config(rustls::Error),
}

/// The token TCP clients must present. Not `Debug`: it must never reach a log.
#[derive(Clone)]
pub struct Token(Arc<Vec<u8>>);

impl Token {
    /// Reads the token file: private to its owner (no group/other bits) and not empty. The
    /// token is the file's first line, surrounding whitespace removed.
    pub fn load(path: &Path) -> Result<Token, TlsSetupError> {
        let read = |source| TlsSetupError::Read {
            path: path.into(),
            source,
        };
        let meta = fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsSetupError::TokenNotPrivate {
                path: path.into(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read)?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(TlsSetupError::EmptyToken(path.into()));
        }
        Ok(Token(Arc::new(token.as_bytes().to_vec())))
    }

    /// Whether `offered` is the token; the time taken depends only on the lengths, never on
    /// where the first differing byte is.
    pub fn matches(&self, offered: &[u8]) -> bool {
        let expected = self.0.as_slice();
        let mut diff = expected.len() ^ offered.len();
        for (i, e) in expected.iter().enumerate() {
            let o = offered.get(i).copied().unwrap_or(0);
            diff |= usize::from(e ^ o);
        }
        diff == 0
    }
}

/// The TLS acceptor from a PEM certificate chain and a PEM private key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsSetupError::Cert {
            path: cert.into(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Cert {
            path: cert.into(),
            what: "the file has no CERTIFICATE block".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::Key {
        path: key.into(),
        what: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(TlsSetupError::Config)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Middleware of the TCP router: 401 `unauthorized` unless the request carries the token.
/// It runs before any handler, so a refused request changes nothing (console upgrade too).
pub async fn require_token(State(token): State<Token>, req: Request, next: Next) -> Response {
    let offered = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()));
    match offered {
        Some(t) if token.matches(t) => next.run(req).await,
        Some(_) => unauthorized("the bearer token is not vireod's").into_response(),
        None => unauthorized("send Authorization: Bearer <token> (vireod's --token-file)")
            .into_response(),
    }
}

/// The credentials of `Bearer <token>` (the scheme name is case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

fn unauthorized(message: &str) -> HttpError {
    let mut e = HttpError::new(ApiErrorCode::Unauthorized, message);
    e.close = true;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_only_itself() {
        let t = Token(Arc::new(b"s3cret".to_vec()));
        assert!(t.matches(b"s3cret"));
        for bad in [&b""[..], b"s3cre", b"s3cret!", b"S3cret", b"\0\0\0\0\0\0"] {
            assert!(!t.matches(bad), "{bad:?}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    #[test]
    fn token_file_must_be_private_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        fs::write(&p, "abc\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Token::load(&p).err().unwrap().to_string();
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::load(&p).unwrap().matches(b"abc"));
        fs::write(&p, " \n").unwrap();
        let e = Token::load(&p).err().unwrap().to_string();
        assert!(e.contains("is empty"), "{e}");
    }
}
