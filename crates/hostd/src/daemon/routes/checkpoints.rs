//! Checkpoints of a VM (docs/checkpoints.md): list, create (job), show, rename, apply (job),
//! delete (job, `merge`). The work is in `daemon::checkpoints`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use vireo_api::{
    validate_name, ApiError, ApplyCheckpointRequest, Checkpoint, CreateCheckpointRequest, Job,
    UpdateCheckpointRequest,
};

use super::St;
use crate::daemon::checkpoints::{self, apply, create, delete};
use crate::daemon::http_error::{optional_json, ApiJson, ApiPath, ApiQuery, HttpError};

/// `GET /v1/vms/{vm}/checkpoints`: oldest first; `current` marks the one the VM runs from.
pub async fn list(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<Vec<Checkpoint>>, HttpError> {
    let vm = d.find(&key)?;
    let mut cps = d.store.list_checkpoints(vm.id())?;
    cps.iter_mut()
        .for_each(|c| checkpoints::live::read_capture(&d, c));
    Ok(Json(cps))
}

pub async fn create(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let req: CreateCheckpointRequest = optional_json(&headers, &body)?;
    let vm = d.find(&key)?;
    let job = create::create(&d, &vm, req.name).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

pub async fn show(
    State(d): St,
    ApiPath((key, cp)): ApiPath<(String, String)>,
) -> Result<Json<Checkpoint>, HttpError> {
    let vm = d.find(&key)?;
    let mut found = checkpoints::find(&d, &vm, &cp)?;
    checkpoints::live::read_capture(&d, &mut found);
    Ok(Json(found))
}

/// `PATCH /v1/vms/{vm}/checkpoints/{cp}`: rename.
pub async fn update(
    State(d): St,
    ApiPath((key, cp)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<UpdateCheckpointRequest>,
) -> Result<Json<Checkpoint>, HttpError> {
    let vm = d.find(&key)?;
    let found = checkpoints::find(&d, &vm, &cp)?;
    validate_name("name", &req.name).map_err(|e| HttpError::from(ApiError::from(e)))?;
    if !d.store.rename_checkpoint(vm.id(), found.id, &req.name)? {
        return Err(HttpError::conflict(format!(
            "VM {:?} already has a checkpoint named {:?}; choose another name",
            vm.spec.name, req.name
        )));
    }
    Ok(Json(checkpoints::find(&d, &vm, &found.id.to_string())?))
}

pub async fn apply(
    State(d): St,
    ApiPath((key, cp)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let req: ApplyCheckpointRequest = optional_json(&headers, &body)?;
    let vm = d.find(&key)?;
    let job = apply::apply(&d, &vm, &cp, req).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// The checkpoint and every checkpoint below it.
    #[serde(default)]
    subtree: bool,
}

pub async fn remove(
    State(d): St,
    ApiPath((key, cp)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let vm = d.find(&key)?;
    let job = delete::delete(&d, &vm, &cp, q.subtree).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}
