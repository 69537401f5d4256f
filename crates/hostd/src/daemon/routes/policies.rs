//! A switch's network-virtualization policy table (`/v1/switches/{sw}/policies`): where each
//! remote VM's customer address lives (`docs/netvirt.md`). Modelled on Hyper-V's lookup
//! records: add one (refused if the CA has one), replace one (a VM that moved: new PA), remove
//! one, list the table (local VMs' entries included, from the switch process when it answers).
//!
//! Every change holds the switch's ops lock, is checked (`switches::netvirt`), told to the
//! process (its refusal is the 422), then stored in the switch's spec; a failed store undoes the
//! process's change.

use std::net::IpAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use vireo_api::switch::{SwitchOp, SwitchReply};
use vireo_api::ApiErrorCode;
use vireo_netconfig::PolicyEntry;

use super::St;
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};
use crate::daemon::switches::client::SwitchCallError;
use crate::daemon::switches::netvirt;
use crate::daemon::Daemon;
use crate::switch_store::SwitchRow;

pub(super) fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

/// The switch's refusal is the user's (422); a process that does not answer is a conflict.
pub(super) fn call_error(row: &SwitchRow, e: SwitchCallError) -> HttpError {
    match e {
        SwitchCallError::Refused(m) => invalid(format!("switch {:?} refused: {m}", row.spec.name)),
        other => HttpError::conflict(format!(
            "switch {:?}: {other}; see `vireo switch show`",
            row.spec.name
        )),
    }
}

fn parse_ca(ca: &str) -> Result<IpAddr, HttpError> {
    ca.parse().map_err(|_| {
        invalid(format!(
            "{ca:?} in the path is not an IP address (a customer address such as 10.0.0.5)"
        ))
    })
}

pub async fn list(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<Vec<PolicyEntry>>, HttpError> {
    let row = d.store.find_switch(&key)?;
    match d.switches.call(row.id, SwitchOp::ListPolicies).await {
        Ok(Some(SwitchReply::Policies { entries })) => return Ok(Json(entries)),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(switch = %row.spec.name, error = %e, "no policy table from the switch process; listing the stored one")
        }
    }
    let table = netvirt::table_from_store(&d, &row).map_err(HttpError::internal)?;
    Ok(Json(table))
}

/// Tells the process and stores `entry` (the caller checked it and holds the ops lock).
async fn set_entry(d: &Daemon, row: &SwitchRow, entry: &PolicyEntry) -> Result<(), HttpError> {
    let old = netvirt::stored(&row.spec, &entry.routing_domain, entry.ca).cloned();
    let op = SwitchOp::SetPolicy {
        entry: entry.clone(),
    };
    d.switches
        .call(row.id, op)
        .await
        .map_err(|e| call_error(row, e))?;
    if let Err(e) = d
        .store
        .set_switch_spec(row.id, &netvirt::with_entry(&row.spec, entry))
    {
        let undo = match old {
            Some(entry) => SwitchOp::SetPolicy { entry },
            None => SwitchOp::RemovePolicy {
                routing_domain: entry.routing_domain.clone(),
                ca: entry.ca,
            },
        };
        let _ = d.switches.call(row.id, undo).await;
        return Err(e.into());
    }
    Ok(())
}

pub async fn add(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(entry): ApiJson<PolicyEntry>,
) -> Result<(StatusCode, Json<PolicyEntry>), HttpError> {
    let id = d.store.find_switch(&key)?.id;
    let _ops = d.switches.lock_ops(id).await;
    let row = d.store.find_switch(&id.to_string())?;
    netvirt::check_entry(&d, &row, &entry)
        .map_err(|e| invalid(format!("switch {:?}: {e}", row.spec.name)))?;
    if let Some(old) = netvirt::stored(&row.spec, &entry.routing_domain, entry.ca) {
        return Err(invalid(format!(
            "switch {:?} already has an entry for CA {} in routing domain {:?} (at PA {}); \
             replace it with PUT (vireo netvirt policy set) or remove it first",
            row.spec.name, entry.ca, entry.routing_domain, old.pa
        )));
    }
    set_entry(&d, &row, &entry).await?;
    Ok((StatusCode::CREATED, Json(entry)))
}

pub async fn set(
    State(d): St,
    ApiPath((key, rd, ca)): ApiPath<(String, String, String)>,
    ApiJson(entry): ApiJson<PolicyEntry>,
) -> Result<Json<PolicyEntry>, HttpError> {
    let ca = parse_ca(&ca)?;
    if entry.routing_domain != rd || entry.ca != ca {
        return Err(invalid(format!(
            "the body's routing_domain {:?} and ca {} differ from the path's {rd:?} and {ca}; \
             an entry is replaced in place",
            entry.routing_domain, entry.ca
        )));
    }
    let id = d.store.find_switch(&key)?.id;
    let _ops = d.switches.lock_ops(id).await;
    let row = d.store.find_switch(&id.to_string())?;
    netvirt::check_entry(&d, &row, &entry)
        .map_err(|e| invalid(format!("switch {:?}: {e}", row.spec.name)))?;
    set_entry(&d, &row, &entry).await?;
    Ok(Json(entry))
}

pub async fn remove(
    State(d): St,
    ApiPath((key, rd, ca)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, HttpError> {
    let ca = parse_ca(&ca)?;
    let id = d.store.find_switch(&key)?.id;
    let _ops = d.switches.lock_ops(id).await;
    let row = d.store.find_switch(&id.to_string())?;
    let Some(old) = netvirt::stored(&row.spec, &rd, ca).cloned() else {
        return Err(HttpError::new(
            ApiErrorCode::NotFound,
            format!(
                "switch {:?} has no stored entry for CA {ca} in routing domain {rd:?} \
                 (a local VM's entry goes with its NIC); `vireo netvirt policy list` shows them",
                row.spec.name
            ),
        ));
    };
    let op = SwitchOp::RemovePolicy {
        routing_domain: rd.clone(),
        ca,
    };
    d.switches
        .call(row.id, op)
        .await
        .map_err(|e| call_error(&row, e))?;
    if let Err(e) = d
        .store
        .set_switch_spec(row.id, &netvirt::without_entry(&row.spec, &rd, ca))
    {
        let _ = d
            .switches
            .call(row.id, SwitchOp::SetPolicy { entry: old })
            .await;
        return Err(e.into());
    }
    Ok(StatusCode::NO_CONTENT)
}
