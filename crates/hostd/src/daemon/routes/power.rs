//! Start, stop (jobs) and turn-off.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use vireo_api::{Action, Job, StopRequest, Vm};

use super::St;
use crate::daemon::http_error::{optional_json, ApiPath, HttpError};
use crate::daemon::{lifecycle, pause, save};

pub async fn start(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let vm = d.find(&key)?;
    Ok((StatusCode::ACCEPTED, Json(lifecycle::start(&d, &vm).await?)))
}

pub async fn stop(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let req: StopRequest = optional_json(&headers, &body)?;
    let vm = d.find(&key)?;
    let job = lifecycle::stop(&d, &vm, req.timeout_secs).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

pub async fn turn_off(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Vm>, HttpError> {
    let vm = d.find(&key)?;
    Ok(Json(lifecycle::turn_off(&d, &vm).await?))
}

pub async fn pause(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Vm>, HttpError> {
    let vm = d.find(&key)?;
    Ok(Json(pause::worker_action(&d, &vm, Action::Pause).await?))
}

pub async fn resume(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Vm>, HttpError> {
    let vm = d.find(&key)?;
    Ok(Json(pause::worker_action(&d, &vm, Action::Resume).await?))
}

pub async fn reset(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Vm>, HttpError> {
    let vm = d.find(&key)?;
    Ok(Json(pause::worker_action(&d, &vm, Action::Reset).await?))
}

pub async fn save_vm(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<(StatusCode, Json<Job>), HttpError> {
    let vm = d.find(&key)?;
    Ok((StatusCode::ACCEPTED, Json(save::save(&d, &vm).await?)))
}
