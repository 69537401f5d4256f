//! Resource metering per VM: the report, enable, disable and reset (the billing cycle).

use axum::extract::State;
use axum::Json;
use vireo_api::VmMetrics;

use super::St;
use crate::daemon::http_error::{ApiPath, HttpError};
use crate::daemon::sampler;
use crate::store::now_ms;

/// `GET /vms/{vm}/metrics`: the current period, with a fresh reading of a running VM.
pub async fn show(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<VmMetrics>, HttpError> {
    let vm = d.find(&key)?;
    Ok(Json(sampler::report(&d, vm.id()).await?))
}

/// `POST /vms/{vm}/metrics/enable`: counting from now on (a first enable starts the period).
pub async fn enable(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<VmMetrics>, HttpError> {
    let vm = d.find(&key)?;
    // The reading before the enable is the baseline: nothing earlier counts.
    sampler::sample(&d, vm.id(), false).await;
    let now = now_ms();
    Ok(Json(d.meters.with(&d, vm.id(), true, |m| {
        m.enable(now);
        m.report()
    })?))
}

/// `POST /vms/{vm}/metrics/disable`: stops counting; the period's totals stay.
pub async fn disable(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<VmMetrics>, HttpError> {
    let vm = d.find(&key)?;
    // What ran up to now still counts.
    sampler::sample(&d, vm.id(), false).await;
    Ok(Json(d.meters.with(&d, vm.id(), true, |m| {
        m.disable();
        m.report()
    })?))
}

/// `POST /vms/{vm}/metrics/reset`: ends the period and answers its final report; a new
/// period starts now.
pub async fn reset(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<VmMetrics>, HttpError> {
    let vm = d.find(&key)?;
    sampler::sample(&d, vm.id(), false).await;
    let now = now_ms();
    Ok(Json(d.meters.with(&d, vm.id(), true, |m| m.reset(now))?))
}
