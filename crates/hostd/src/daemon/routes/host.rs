//! `GET /v1/host`, and the host's identity and trusted hosts for migration
//! (`/v1/host/identity`, `/v1/host/trusted`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use vireo_api::{ApiErrorCode, HostIdentityInfo, HostInfo, TrustedHost, VmState};
use vireo_migration::hostauth::Fingerprint;

use super::St;
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};
use crate::host_trust::HostTrustError;

pub async fn show(State(d): St) -> Result<Json<HostInfo>, HttpError> {
    let vms = d.store.list()?;
    let running = vms.iter().filter(|v| v.state == VmState::Running).count();
    Ok(Json(HostInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        vms: vms.len() as u32,
        running: running as u32,
        max_vcpus: d.limits.max_vcpus,
        max_memory_bytes: d.limits.max_memory_bytes,
    }))
}

impl From<HostTrustError> for HttpError {
    fn from(e: HostTrustError) -> HttpError {
        tracing::error!(error = %e, "host identity or trust file");
        HttpError::internal(e.to_string())
    }
}

pub async fn identity(State(d): St) -> Result<Json<HostIdentityInfo>, HttpError> {
    let id = d.host.identity()?;
    Ok(Json(HostIdentityInfo {
        fingerprint: id.fingerprint().to_string(),
        certificate_pem: id.cert_pem(),
        migration_listen: d.migrations.listen_addr().map(|a| a.to_string()),
    }))
}

pub async fn trusted(State(d): St) -> Result<Json<Vec<TrustedHost>>, HttpError> {
    let t = d.host.trusted()?;
    Ok(Json(
        t.entries()
            .map(|(fp, name)| TrustedHost {
                fingerprint: fp.to_string(),
                name: name.to_string(),
            })
            .collect(),
    ))
}

fn fingerprint(text: &str) -> Result<Fingerprint, HttpError> {
    text.parse().map_err(|e: String| {
        HttpError::new(
            ApiErrorCode::Invalid,
            format!("{e}; `vireo host identity` on the other host prints its fingerprint"),
        )
    })
}

/// 201 when the host is new, 200 when it was listed (its name is then updated).
pub async fn trust(
    State(d): St,
    ApiJson(req): ApiJson<TrustedHost>,
) -> Result<(StatusCode, Json<TrustedHost>), HttpError> {
    let fp = fingerprint(&req.fingerprint)?;
    vireo_api::validate_name("name", &req.name)
        .map_err(|e| HttpError::new(ApiErrorCode::Invalid, format!("host {e}")))?;
    if fp == d.host.identity()?.fingerprint() {
        return Err(HttpError::new(
            ApiErrorCode::Invalid,
            format!("{fp} is this host's own fingerprint; trust the other host's"),
        ));
    }
    let new = d.host.trust(fp, &req.name)?;
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(TrustedHost {
            fingerprint: fp.to_string(),
            name: req.name,
        }),
    ))
}

pub async fn untrust(State(d): St, ApiPath(fp): ApiPath<String>) -> Result<StatusCode, HttpError> {
    let fp = fingerprint(&fp)?;
    if d.host.untrust(&fp)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(HttpError::new(
            ApiErrorCode::NotFound,
            format!("{fp} is not a trusted host; `vireo host trust list` shows them"),
        ))
    }
}
