//! The client side of vireod's TCP listener: the TLS connector (trusting `--ca-cert`, else the
//! webpki root set) and the bearer token from `--token-file`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::exit::CliError;

/// What a TLS connection needs besides the address.
pub struct TlsSettings {
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
    pub token: String,
    pub token_file: PathBuf,
}

impl TlsSettings {
    pub fn new(
        host: &str,
        name: &str,
        token_file: Option<&Path>,
        ca_cert: Option<&Path>,
    ) -> Result<TlsSettings, CliError> {
        let Some(token_file) = token_file else {
            return Err(CliError::bad_input(format!(
                "--host {host} needs the token: pass --token-file FILE (or set VIREO_TOKEN_FILE)"
            )));
        };
        let token = read_token(token_file)?;
        let roots = match ca_cert {
            Some(path) => ca_roots(path)?,
            None => RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CliError::failed(format!("cannot set up TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(name.to_string()).map_err(|_| {
            CliError::bad_input(format!(
                "--host {host}: {name:?} is not a valid server name"
            ))
        })?;
        Ok(TlsSettings {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            token,
            token_file: token_file.to_owned(),
        })
    }
}

/// The token: the file's first line, trimmed.
fn read_token(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::bad_input(format!("--token-file {}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(CliError::bad_input(format!(
            "--token-file {}: the file is empty; copy vireod's token into it",
            path.display()
        )));
    }
    Ok(token.to_string())
}

fn ca_roots(path: &Path) -> Result<RootCertStore, CliError> {
    let bad = |what: String| CliError::bad_input(format!("--ca-cert {}: {what}", path.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM CERTIFICATE in the file".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    Ok(roots)
}
