//! Jobs: list (optionally of one VM), show, cancel.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use uuid::Uuid;
use vireo_api::{ApiErrorCode, Job};

use super::St;
use crate::daemon::http_error::{ApiPath, ApiQuery, HttpError};
use crate::daemon::lifecycle;
use crate::StoreError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    vm: Option<String>,
}

pub async fn list(
    State(d): St,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<Job>>, HttpError> {
    let vm = q.vm.map(|k| d.find(&k)).transpose()?;
    Ok(Json(d.store.list_jobs(vm.map(|v| v.id()))?))
}

/// A job id that is not a UUID names no job: 404 like any unknown id.
fn job_id(key: &str) -> Result<Uuid, HttpError> {
    Uuid::parse_str(key).map_err(|_| no_job(key))
}

pub fn no_job(key: &str) -> HttpError {
    HttpError::new(ApiErrorCode::NotFound, format!("no job {key:?}"))
}

pub async fn show(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Job>, HttpError> {
    match d.store.get_job(job_id(&key)?) {
        Err(StoreError::NotFound { .. }) => Err(no_job(&key)),
        r => {
            let mut job = r?;
            job.migration = d.migrations.progress(job.id);
            Ok(Json(job))
        }
    }
}

pub async fn cancel(State(d): St, ApiPath(key): ApiPath<String>) -> Result<Json<Job>, HttpError> {
    Ok(Json(lifecycle::cancel(&d, job_id(&key)?).await?))
}
