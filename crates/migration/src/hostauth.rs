//! Mutual host authentication for migration channels. Each vireod has a host identity (a
//! self-signed certificate and key, made once in its state directory) and a list of the hosts
//! it trusts, by certificate fingerprint, as SSH's `known_hosts` does. Both ends of a
//! migration stream present their certificate; a peer whose fingerprint is not listed is
//! refused **during the TLS handshake**, before a single byte of VM data moves.
//!
//! Why pinning and not a CA: a CA needs someone to run it, and what an admin wants to say is
//! "these two hosts may move VMs between them" (Hyper-V's "trust this computer for
//! delegation"). Expiry is therefore not checked — removing a line from the trust file
//! revokes a host, as deleting a key from `authorized_keys` does.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    ring as provider, verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{
    self, CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
pub use tokio_rustls::rustls::{ClientConfig, ServerConfig};

pub const CERT_FILE: &str = "host.crt";
pub const KEY_FILE: &str = "host.key";

#[derive(Debug, thiserror::Error)]
pub enum HostAuthError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem { path: PathBuf, what: String },
    #[error("host key {}: readable by group or others (mode {mode:o}); run chmod 600 on it", path.display())]
    KeyNotPrivate { path: PathBuf, mode: u32 },
    #[error("could not make a host certificate: {0}")]
    Generate(String),
    #[error("{}: line {line}: {what}", path.display())]
    TrustLine {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// SHA-256 of a certificate's DER bytes, written `sha256:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
        Fingerprint(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{s:?}: a fingerprint starts with sha256:"))?;
        if hex.len() != 64 {
            return Err(format!("{s:?}: sha256: must be followed by 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16)
                .map_err(|_| format!("{s:?}: not hexadecimal"))?;
        }
        Ok(Fingerprint(out))
    }
}

/// This host's certificate and key.
pub struct HostIdentity {
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

/// Only the fingerprint: the key must never reach a log.
impl fmt::Debug for HostIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostIdentity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl HostIdentity {
    /// Loads `dir/host.crt` and `dir/host.key`, making them first if neither exists (the key
    /// file is created 0600). A key others can read is refused.
    pub fn load_or_create(dir: &Path, host_name: &str) -> Result<HostIdentity, HostAuthError> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if !cert_path.exists() && !key_path.exists() {
            let ck = rcgen::generate_simple_self_signed(vec![host_name.to_string()])
                .map_err(|e| HostAuthError::Generate(e.to_string()))?;
            write_new(&key_path, ck.signing_key.serialize_pem().as_bytes(), 0o600)?;
            write_new(&cert_path, ck.cert.pem().as_bytes(), 0o644)?;
        }
        HostIdentity::load(&cert_path, &key_path)
    }

    /// Loads an identity from its two files (a worker gets them from vireod's launch). A key
    /// others can read is refused.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<HostIdentity, HostAuthError> {
        let (cert_path, key_path) = (cert_path.to_path_buf(), key_path.to_path_buf());
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HostAuthError::Io { path, source }
        };
        let mode = fs::metadata(&key_path)
            .map_err(io(&key_path))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(HostAuthError::KeyNotPrivate {
                path: key_path,
                mode,
            });
        }
        let cert = CertificateDer::from_pem_file(&cert_path).map_err(|e| HostAuthError::Pem {
            path: cert_path.clone(),
            what: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| HostAuthError::Pem {
            path: key_path.clone(),
            what: e.to_string(),
        })?;
        Ok(HostIdentity { cert, key })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// The certificate as PEM, to show or hand to another host's admin.
    pub fn cert_pem(&self) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.cert.as_ref());
        let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
        pem
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HostAuthError> {
    let io = |source| HostAuthError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The hosts this one exchanges VMs with: fingerprint → a name for messages.
#[derive(Clone, Debug, Default)]
pub struct TrustStore {
    hosts: BTreeMap<Fingerprint, String>,
}

impl TrustStore {
    pub fn new() -> TrustStore {
        TrustStore::default()
    }

    pub fn trust(&mut self, fp: Fingerprint, name: &str) {
        self.hosts.insert(fp, name.to_string());
    }

    pub fn name_of(&self, fp: &Fingerprint) -> Option<&str> {
        self.hosts.get(fp).map(String::as_str)
    }

    /// Whether the host was listed.
    pub fn remove(&mut self, fp: &Fingerprint) -> bool {
        self.hosts.remove(fp).is_some()
    }

    /// `(fingerprint, name)` in fingerprint order.
    pub fn entries(&self) -> impl Iterator<Item = (&Fingerprint, &str)> {
        self.hosts.iter().map(|(f, n)| (f, n.as_str()))
    }

    /// Writes the trust file in [`TrustStore::load`]'s format: to a temporary name, synced,
    /// then renamed, so a crash leaves the old list or the new one.
    pub fn save(&self, path: &Path) -> Result<(), HostAuthError> {
        let mut text = String::from(
            "# Hosts this vireod migrates VMs with: sha256:<certificate fingerprint> <name>\n",
        );
        for (fp, name) in self.entries() {
            text.push_str(&format!("{fp} {name}\n"));
        }
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, text.as_bytes(), 0o600)?;
        fs::rename(&tmp, path).map_err(|source| HostAuthError::Io {
            path: path.into(),
            source,
        })?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| HostAuthError::Io {
                    path: dir.into(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Reads a trust file: one `sha256:<hex> <name>` per line; blank lines and `#` comments
    /// are skipped. A missing file trusts nobody.
    pub fn load(path: &Path) -> Result<TrustStore, HostAuthError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TrustStore::new()),
            Err(source) => {
                return Err(HostAuthError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let mut store = TrustStore::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (fp, name) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let fp = fp.parse().map_err(|what| HostAuthError::TrustLine {
                path: path.into(),
                line: i + 1,
                what,
            })?;
            store.trust(fp, name.trim());
        }
        Ok(store)
    }
}

/// Accepts exactly the pinned certificates, in either direction.
#[derive(Debug)]
struct Pinned {
    trusted: TrustStore,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.trusted.hosts.contains_key(&Fingerprint::of(cert)) {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    // Both directions check a handshake signature the same way (the verifier traits of the
    // server and the client side each ask for it).
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn algorithms(&self) -> &rustls::crypto::WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// ring's suites with AES-128-GCM first. The default order puts AES-256-GCM first; with
/// AES-NI both are far from the link's limit in a benchmark, but on the migration path the
/// cipher runs over every byte of guest RAM on both hosts, and AES-128 does 10 rounds per
/// block against AES-256's 14 (docs/migration.md, "Host authentication").
fn migration_provider() -> CryptoProvider {
    let mut p = provider::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    };
    p.cipher_suites.sort_by_key(rank);
    p
}

fn pinned(trusted: &TrustStore) -> (Arc<Pinned>, Arc<CryptoProvider>) {
    let provider = Arc::new(migration_provider());
    let p = Arc::new(Pinned {
        trusted: trusted.clone(),
        provider: provider.clone(),
    });
    (p, provider)
}

/// The migration listener's TLS: this host's certificate; clients must present a trusted one.
pub fn server_config(
    id: &HostIdentity,
    trusted: &TrustStore,
) -> Result<Arc<ServerConfig>, HostAuthError> {
    let (verifier, provider) = pinned(trusted);
    let cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())?;
    let mut cfg = cfg;
    // After the handshake a migration stream seals and opens its records itself
    // (`tls_records`), with the traffic secrets rustls hands over.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// A migration stream's TLS towards another host: it must present a trusted certificate, and
/// so do we.
pub fn client_config(
    id: &HostIdentity,
    trusted: &TrustStore,
) -> Result<Arc<ClientConfig>, HostAuthError> {
    let (verifier, provider) = pinned(trusted);
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())?;
    let mut cfg = cfg;
    // After the handshake a migration stream seals and opens its records itself
    // (`tls_records`), with the traffic secrets rustls hands over.
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// A migration stream, source end: TLS 1.3 over TCP, blocking, its records sealed and opened
/// by the stream itself (`tls_records`).
pub type ClientStream = crate::tls_records::RecordStream;
/// A migration stream, destination end.
pub type ServerStream = crate::tls_records::RecordStream;

/// Connects to `addr` and completes the handshake (the server's certificate checked against
/// the pins); every read and write of the stream then times out after `timeout`.
pub fn connect(
    addr: std::net::SocketAddr,
    cfg: Arc<ClientConfig>,
    timeout: std::time::Duration,
) -> std::io::Result<ClientStream> {
    let tcp = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    tcp.set_nodelay(true)?;
    crate::tls_records::client(tcp, cfg, peer_name())
}

/// Completes the server side of the handshake on an accepted connection (the client's
/// certificate checked against the pins), with the same timeouts as [`connect`].
pub fn accept(
    tcp: std::net::TcpStream,
    cfg: Arc<ServerConfig>,
    timeout: std::time::Duration,
) -> std::io::Result<ServerStream> {
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    tcp.set_nodelay(true)?;
    crate::tls_records::server(tcp, cfg)
}

/// The name a client puts in its hello. Pinning checks the certificate itself, so the name
/// only has to be syntactically valid.
pub fn peer_name() -> ServerName<'static> {
    ServerName::try_from("vireo-host").expect("a valid DNS name")
}
