//! A switch's overlay gateways (`/v1/switches/{sw}/gateways`, `docs/netvirt.md` "Gateway"):
//! forward or NAT routing domains to a physical network on the uplink. Add one (refused if
//! the name is taken), replace one by name, remove one, list them with their NAT
//! connections (from the switch process; the stored configurations when it does not answer).
//!
//! Like the policy table: every change holds the switch's ops lock, is checked against the
//! stored overlay (the whole overlay validated with the change, so the message names the
//! offending value), told to the process (its refusal is the 422), then stored in the spec
//! (`overlay.gateways`); a failed store undoes the process's change.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use vireo_api::switch::{SwitchOp, SwitchReply, SwitchSpec};
use vireo_api::ApiErrorCode;
use vireo_netconfig::{GatewayConfig, GatewayStatus, OverlayConfig};

use super::policies::{call_error, invalid};
use super::St;
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};
use crate::daemon::Daemon;
use crate::switch_store::SwitchRow;

fn overlay_of(row: &SwitchRow) -> Result<&OverlayConfig, HttpError> {
    row.spec.overlay.as_ref().ok_or_else(|| {
        invalid(format!(
            "switch {:?} has no overlay; gateways belong to a switch created with one (vireo switch create --overlay-pa ...)",
            row.spec.name
        ))
    })
}

/// The spec with `gateways` in place of the stored ones.
fn with_gateways(spec: &SwitchSpec, gateways: Vec<GatewayConfig>) -> SwitchSpec {
    let mut s = spec.clone();
    if let Some(o) = &mut s.overlay {
        o.gateways = gateways;
    }
    s
}

/// The stored gateways with `g` added or replacing its namesake, checked as a whole.
fn checked(row: &SwitchRow, g: &GatewayConfig) -> Result<Vec<GatewayConfig>, HttpError> {
    let mut o = overlay_of(row)?.clone();
    match o.gateways.iter_mut().find(|x| x.name == g.name) {
        Some(x) => *x = g.clone(),
        None => o.gateways.push(g.clone()),
    }
    o.validate()
        .map_err(|e| invalid(format!("switch {:?}: {e}", row.spec.name)))?;
    Ok(o.gateways)
}

/// Tells the process and stores (the caller checked and holds the ops lock).
async fn store(
    d: &Daemon,
    row: &SwitchRow,
    op: SwitchOp,
    undo: SwitchOp,
    gateways: Vec<GatewayConfig>,
) -> Result<(), HttpError> {
    d.switches
        .call(row.id, op)
        .await
        .map_err(|e| call_error(row, e))?;
    if let Err(e) = d
        .store
        .set_switch_spec(row.id, &with_gateways(&row.spec, gateways))
    {
        let _ = d.switches.call(row.id, undo).await;
        return Err(e.into());
    }
    Ok(())
}

fn undo_of(old: Option<&GatewayConfig>, name: &str) -> SwitchOp {
    match old {
        Some(g) => SwitchOp::SetGateway { gateway: g.clone() },
        None => SwitchOp::RemoveGateway {
            name: name.to_owned(),
        },
    }
}

pub async fn list(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<Vec<GatewayStatus>>, HttpError> {
    let row = d.store.find_switch(&key)?;
    overlay_of(&row)?;
    match d.switches.call(row.id, SwitchOp::ListGateways).await {
        Ok(Some(SwitchReply::Gateways { gateways })) => return Ok(Json(gateways)),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(switch = %row.spec.name, error = %e, "no gateways from the switch process; listing the stored ones")
        }
    }
    let stored = overlay_of(&row)?
        .gateways
        .iter()
        .map(|g| GatewayStatus {
            config: g.clone(),
            mac: g.gateway_mac(),
            neighbors: 0,
            connections: Vec::new(),
        })
        .collect();
    Ok(Json(stored))
}

pub async fn add(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(g): ApiJson<GatewayConfig>,
) -> Result<(StatusCode, Json<GatewayConfig>), HttpError> {
    let id = d.store.find_switch(&key)?.id;
    let _ops = d.switches.lock_ops(id).await;
    let row = d.store.find_switch(&id.to_string())?;
    if overlay_of(&row)?.gateways.iter().any(|x| x.name == g.name) {
        return Err(invalid(format!(
            "switch {:?} already has a gateway {:?}; replace it with PUT (vireo netvirt gateway set) or remove it first",
            row.spec.name, g.name
        )));
    }
    let all = checked(&row, &g)?;
    let op = SwitchOp::SetGateway { gateway: g.clone() };
    store(&d, &row, op, undo_of(None, &g.name), all).await?;
    Ok((StatusCode::CREATED, Json(g)))
}

pub async fn set(
    State(d): St,
    ApiPath((key, name)): ApiPath<(String, String)>,
    ApiJson(g): ApiJson<GatewayConfig>,
) -> Result<Json<GatewayConfig>, HttpError> {
    if g.name != name {
        return Err(invalid(format!(
            "the body's name {:?} differs from the path's {name:?}; a gateway is replaced in place",
            g.name
        )));
    }
    let id = d.store.find_switch(&key)?.id;
    let _ops = d.switches.lock_ops(id).await;
    let row = d.store.find_switch(&id.to_string())?;
    let old = overlay_of(&row)?
        .gateways
        .iter()
        .find(|x| x.name == name)
        .cloned();
    let all = checked(&row, &g)?;
    let op = SwitchOp::SetGateway { gateway: g.clone() };
    store(&d, &row, op, undo_of(old.as_ref(), &name), all).await?;
    Ok(Json(g))
}

pub async fn remove(
    State(d): St,
    ApiPath((key, name)): ApiPath<(String, String)>,
) -> Result<StatusCode, HttpError> {
    let id = d.store.find_switch(&key)?.id;
    let _ops = d.switches.lock_ops(id).await;
    let row = d.store.find_switch(&id.to_string())?;
    let mut all = overlay_of(&row)?.gateways.clone();
    let Some(i) = all.iter().position(|x| x.name == name) else {
        return Err(HttpError::new(
            ApiErrorCode::NotFound,
            format!(
                "switch {:?} has no gateway {name:?}; `vireo netvirt gateway list` shows them",
                row.spec.name
            ),
        ));
    };
    let old = all.remove(i);
    let op = SwitchOp::RemoveGateway { name: name.clone() };
    store(&d, &row, op, undo_of(Some(&old), &name), all).await?;
    Ok(StatusCode::NO_CONTENT)
}
