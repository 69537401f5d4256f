//! This vireod's host identity and the hosts it trusts for migration, kept in
//! `<state-dir>/host/` (`host.crt`, `host.key` 0600, `trusted-hosts`). The identity is made on
//! first use; the formats and the TLS rules are `vireo_migration::hostauth`'s
//! (docs/migration.md, "Host authentication").

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use vireo_migration::hostauth::{Fingerprint, HostAuthError, HostIdentity, TrustStore};

use crate::folders::ensure_private_dir;

pub const TRUST_FILE: &str = "trusted-hosts";

pub struct HostTrust {
    dir: PathBuf,
    /// Serialises read-modify-write of the trust file.
    edit: Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum HostTrustError {
    #[error(transparent)]
    Auth(#[from] HostAuthError),
    #[error("{0}")]
    Dir(String),
}

impl HostTrust {
    pub fn new(state_dir: &Path) -> HostTrust {
        HostTrust {
            dir: state_dir.join("host"),
            edit: Mutex::new(()),
        }
    }

    fn ensure_dir(&self) -> Result<(), HostTrustError> {
        ensure_private_dir(&self.dir).map_err(|e| HostTrustError::Dir(e.to_string()))
    }

    /// This host's identity, made on first use.
    pub fn identity(&self) -> Result<HostIdentity, HostTrustError> {
        self.ensure_dir()?;
        let _g = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        Ok(HostIdentity::load_or_create(&self.dir, &host_name())?)
    }

    pub fn trusted(&self) -> Result<TrustStore, HostTrustError> {
        Ok(TrustStore::load(&self.dir.join(TRUST_FILE))?)
    }

    /// Lists `fp` under `name` (renaming it when already listed). `true` when it is new.
    pub fn trust(&self, fp: Fingerprint, name: &str) -> Result<bool, HostTrustError> {
        self.edit_store(|t| {
            let new = t.name_of(&fp).is_none();
            t.trust(fp, name);
            new
        })
    }

    /// `true` when `fp` was listed.
    pub fn untrust(&self, fp: &Fingerprint) -> Result<bool, HostTrustError> {
        self.edit_store(|t| t.remove(fp))
    }

    fn edit_store(&self, f: impl FnOnce(&mut TrustStore) -> bool) -> Result<bool, HostTrustError> {
        self.ensure_dir()?;
        let _g = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(TRUST_FILE);
        let mut t = TrustStore::load(&path)?;
        let changed = f(&mut t);
        t.save(&path)?;
        Ok(changed)
    }
}

/// The kernel's host name, for the certificate's subject (the fingerprint is what counts).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "vireo-host".into())
}

impl HostTrust {
    /// The identity and trust files as a worker opens them (`MigrateOut`, `incoming`). The
    /// identity is made first if needed.
    pub fn worker_tls(&self) -> Result<vireo_api::worker::MigrationTls, HostTrustError> {
        self.identity()?;
        Ok(vireo_api::worker::MigrationTls {
            cert: self.dir.join(vireo_migration::hostauth::CERT_FILE),
            key: self.dir.join(vireo_migration::hostauth::KEY_FILE),
            trusted: self.dir.join(TRUST_FILE),
        })
    }
}
