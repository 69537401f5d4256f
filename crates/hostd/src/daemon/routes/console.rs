//! COM1 through the worker: the recent output (`/console/log`, from the worker's ring) and a
//! live attach (`/console` with `Upgrade: vireo-console`: after 101 the connection is spliced
//! with the worker's console socket, raw bytes both ways, until either side closes).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;
use vireo_api::worker::{WorkerOp, WorkerReply};
use vireo_api::Vm;

use super::St;
use crate::daemon::http_error::{ApiPath, ApiQuery, HttpError};
use crate::daemon::supervisor::Worker;
use crate::daemon::worker_client::WorkerConn;
use crate::daemon::Daemon;

pub const UPGRADE_PROTOCOL: &str = "vireo-console";

fn worker_of(d: &Daemon, vm: &Vm) -> Result<std::sync::Arc<Worker>, HttpError> {
    d.sup
        .get(vm.id())
        .filter(|_| vm.state.has_worker())
        .ok_or_else(|| {
            HttpError::conflict(format!(
                "VM {:?} is {}: it has no console without a worker; start it first",
                vm.spec.name, vm.state
            ))
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    max_bytes: Option<u32>,
}

pub async fn log(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, HttpError> {
    let vm = d.find(&key)?;
    let worker = worker_of(&d, &vm)?;
    let max_bytes = q.max_bytes.unwrap_or(vm.spec.console_ring_bytes);
    let unreachable = |e: String| {
        HttpError::conflict(format!(
            "VM {:?}: its worker is not answering: {e}",
            vm.spec.name
        ))
    };
    let mut conn = WorkerConn::connect(&worker.socket())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let reply = conn
        .call(WorkerOp::ConsoleLog { max_bytes })
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let WorkerReply::ConsoleLog { data_base64, .. } = reply else {
        return Err(HttpError::internal(
            conn.unexpected("console_log", &reply).to_string(),
        ));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data_base64)
        .map_err(|e| HttpError::internal(format!("worker sent bad base64: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from(bytes),
    )
        .into_response())
}

fn wants_console_upgrade(headers: &HeaderMap) -> bool {
    let has = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, UPGRADE_PROTOCOL)
}

pub async fn attach(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    mut req: Request,
) -> Result<Response, HttpError> {
    if !wants_console_upgrade(req.headers()) {
        return Err(HttpError::bad_request(format!(
            "the console is an upgrade: send Connection: Upgrade and Upgrade: {UPGRADE_PROTOCOL}"
        )));
    }
    let vm = d.find(&key)?;
    let worker = worker_of(&d, &vm)?;
    let busy =
        |e: String| HttpError::conflict(format!("VM {:?}: console unavailable: {e}", vm.spec.name));
    let status = WorkerConn::connect(&worker.socket())
        .await
        .map_err(|e| busy(e.to_string()))?
        .status()
        .await
        .map_err(|e| busy(e.to_string()))?;
    // Connected before the 101, so a dead console is an error response, not a closed stream.
    let mut console = UnixStream::connect(&status.console_socket)
        .await
        .map_err(|e| busy(format!("{}: {e}", status.console_socket.display())))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let name = vm.spec.name.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut console).await {
                    tracing::debug!(vm = %name, error = %e, "console session ended");
                }
            }
            Err(e) => tracing::warn!(vm = %name, error = %e, "console upgrade failed"),
        }
    });
    let mut r = StatusCode::SWITCHING_PROTOCOLS.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    Ok(r)
}
