//! Resource metering per VM: the report, enable, disable and reset (the billing cycle).

use axum::extract::State;
use axum::Json;
use vireo_api::VmMetrics;

use super::St;
use crate::daemon::http_error::{ApiPath, HttpError};
use crate::daemon::meter::MeterState;
use crate::daemon::sampler;
use crate::daemon::Daemon;
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
    change(&d, &key, |m, now| {
        m.enable(now);
        m.report()
    })
    .await
}

/// `POST /vms/{vm}/metrics/disable`: stops counting; the period's totals stay.
pub async fn disable(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<VmMetrics>, HttpError> {
    change(&d, &key, |m, _| {
        m.disable();
        m.report()
    })
    .await
}

/// `POST /vms/{vm}/metrics/reset`: ends the period and answers its final report; a new
/// period starts now.
pub async fn reset(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<VmMetrics>, HttpError> {
    change(&d, &key, |m, now| m.reset(now)).await
}

/// A fresh reading first — what ran up to now still counts, and for an enable it is the
/// baseline nothing earlier goes into — then `f` changes the meter (saved) at `now`.
async fn change(
    d: &Daemon,
    key: &str,
    f: impl FnOnce(&mut MeterState, i64) -> VmMetrics,
) -> Result<Json<VmMetrics>, HttpError> {
    let vm = d.find(key)?;
    sampler::sample(d, vm.id(), false).await;
    let now = now_ms();
    Ok(Json(d.meters.with(d, vm.id(), true, |m| f(m, now))?))
}
