//! Resource pools: create, list, show, delete, membership, and the pool's metering report (the
//! sum of its members' reports, `PoolMetrics::aggregate`). The store keeps pools and members;
//! metering stays per VM (`sampler`), so a pool has no counters of its own to keep in step.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use vireo_api::{AddPoolMemberRequest, CreatePoolRequest, Pool, PoolMemberMetrics, PoolMetrics};

use super::St;
use crate::daemon::http_error::{ApiJson, ApiPath, ApiQuery, HttpError};
use crate::daemon::sampler;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only the pool this VM (id or name) is in.
    vm: Option<String>,
}

/// `GET /v1/pools[?vm=VM]`: by name.
pub async fn list(
    State(d): St,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Pool>>, HttpError> {
    match q.vm {
        Some(key) => {
            let vm = d.find(&key)?;
            Ok(Json(d.store.pool_of(vm.id())?.into_iter().collect()))
        }
        None => Ok(Json(d.store.list_pools()?)),
    }
}

pub async fn create(
    State(d): St,
    ApiJson(req): ApiJson<CreatePoolRequest>,
) -> Result<(StatusCode, Json<Pool>), HttpError> {
    Ok((StatusCode::CREATED, Json(d.store.create_pool(&req.name)?)))
}

pub async fn show(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Pool>, HttpError> {
    Ok(Json(d.store.find_pool(&key)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

/// `DELETE /v1/pools/{pool}[?force=true]`: 409 while it has members, unless forced (the VMs
/// stay, in no pool).
pub async fn remove(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, HttpError> {
    d.store.delete_pool(&key, q.force)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/pools/{pool}/vms` `{"vm": ...}`: the pool with its new member.
pub async fn add_vm(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(req): ApiJson<AddPoolMemberRequest>,
) -> Result<Json<Pool>, HttpError> {
    // The pool first, so a request naming neither says the pool is missing.
    d.store.find_pool(&key)?;
    let vm = d.find(&req.vm)?;
    Ok(Json(d.store.add_to_pool(&key, vm.id())?))
}

/// `DELETE /v1/pools/{pool}/vms/{vm}`: the pool without that member.
pub async fn remove_vm(
    State(d): St,
    ApiPath((key, vm)): ApiPath<(String, String)>,
) -> Result<Json<Pool>, HttpError> {
    d.store.find_pool(&key)?;
    let vm = d.find(&vm)?;
    Ok(Json(d.store.remove_from_pool(&key, vm.id())?))
}

/// `GET /v1/pools/{pool}/metrics`: each member's report (a fresh reading of each running
/// one first, as `GET /vms/{vm}/metrics` does) and their sum.
pub async fn metrics(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<PoolMetrics>, HttpError> {
    let pool = d.store.find_pool(&key)?;
    let mut members = Vec::with_capacity(pool.vms.len());
    for m in pool.vms {
        let metrics = sampler::report(&d, m.id).await?;
        members.push(PoolMemberMetrics {
            id: m.id,
            name: m.name,
            metrics,
        });
    }
    Ok(Json(PoolMetrics::aggregate(&pool.name, members)))
}
