//! This host's identity for host-to-host work (live migration) and the hosts it trusts:
//! `GET /v1/host/identity`, `GET|POST /v1/host/trusted`, `DELETE /v1/host/trusted/{fp}`.

use serde::{Deserialize, Serialize};

/// `GET /v1/host/identity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostIdentityInfo {
    /// `sha256:<64 hex digits>` of the host certificate: what another host's admin trusts.
    pub fingerprint: String,
    /// The certificate, PEM.
    pub certificate_pem: String,
    /// Where this vireod accepts migrations (`vireod --migration-listen`, the bound address
    /// when port 0 was asked); absent when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_listen: Option<String>,
}

/// One trusted host; also the body of `POST /v1/host/trusted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedHost {
    /// `sha256:<64 hex digits>`, as the other host's `vireo host identity` prints it.
    pub fingerprint: String,
    /// A name for messages and listings (1-64 letters, digits, '.', '_', '-').
    pub name: String,
}
