//! The route table — the one list of (method, path, handler) the server serves and the
//! OpenAPI test compares with `docs/openapi.yaml` — and the request rules every route shares:
//! a body of at most 1 MiB (413), complete within 10 s (408), JSON errors for unknown routes
//! (404) and methods (405).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put, MethodRouter};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::http_error::HttpError;
use super::routes::{
    checkpoints, console, disk_resize, disks, gateways, host, jobs, metrics, nics, policies, pools,
    power, switches, uplink_mirror, vms,
};
use super::{export, prom, Daemon};

pub const MAX_BODY_BYTES: usize = 1 << 20;
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Handler = MethodRouter<Arc<Daemon>>;

fn routes() -> Vec<(Method, &'static str, Handler)> {
    vec![
        (Method::GET, "/v1/host", get(host::show)),
        (Method::GET, "/v1/host/identity", get(host::identity)),
        (Method::GET, "/v1/host/trusted", get(host::trusted)),
        (Method::POST, "/v1/host/trusted", post(host::trust)),
        (
            Method::DELETE,
            "/v1/host/trusted/{fingerprint}",
            delete(host::untrust),
        ),
        (Method::GET, "/v1/vms", get(vms::list)),
        (Method::POST, "/v1/vms", post(vms::create)),
        (Method::GET, "/v1/vms/{vm}", get(vms::show)),
        (Method::DELETE, "/v1/vms/{vm}", delete(vms::remove)),
        (Method::PUT, "/v1/vms/{vm}/spec", put(vms::put_spec)),
        (Method::POST, "/v1/vms/{vm}/rename", post(vms::rename)),
        (Method::GET, "/v1/vms/{vm}/disks", get(disks::list)),
        (Method::POST, "/v1/vms/{vm}/disks", post(disks::add)),
        (
            Method::DELETE,
            "/v1/vms/{vm}/disks/{disk}",
            delete(disks::remove),
        ),
        (
            Method::POST,
            "/v1/vms/{vm}/disks/{disk}/resize",
            post(disk_resize::resize),
        ),
        (Method::POST, "/v1/vms/{vm}/start", post(power::start)),
        (Method::POST, "/v1/vms/{vm}/stop", post(power::stop)),
        (Method::POST, "/v1/vms/{vm}/turn-off", post(power::turn_off)),
        (Method::POST, "/v1/vms/{vm}/pause", post(power::pause)),
        (Method::POST, "/v1/vms/{vm}/resume", post(power::resume)),
        (Method::POST, "/v1/vms/{vm}/reset", post(power::reset)),
        (Method::POST, "/v1/vms/{vm}/save", post(power::save_vm)),
        (Method::POST, "/v1/vms/{vm}/export", post(export::export)),
        (Method::POST, "/v1/vms/{vm}/clone", post(export::clone)),
        (Method::POST, "/v1/vms/import", post(export::import)),
        (
            Method::GET,
            "/v1/vms/{vm}/checkpoints",
            get(checkpoints::list),
        ),
        (
            Method::POST,
            "/v1/vms/{vm}/checkpoints",
            post(checkpoints::create),
        ),
        (
            Method::GET,
            "/v1/vms/{vm}/checkpoints/{cp}",
            get(checkpoints::show),
        ),
        (
            Method::PATCH,
            "/v1/vms/{vm}/checkpoints/{cp}",
            patch(checkpoints::update),
        ),
        (
            Method::DELETE,
            "/v1/vms/{vm}/checkpoints/{cp}",
            delete(checkpoints::remove),
        ),
        (
            Method::POST,
            "/v1/vms/{vm}/checkpoints/{cp}/apply",
            post(checkpoints::apply),
        ),
        (
            Method::POST,
            "/v1/vms/{vm}/move-storage",
            post(super::move_storage::route),
        ),
        (
            Method::POST,
            "/v1/vms/{vm}/migrate",
            post(super::migrate::source::route),
        ),
        (Method::GET, "/v1/vms/{vm}/metrics", get(metrics::show)),
        (
            Method::POST,
            "/v1/vms/{vm}/metrics/enable",
            post(metrics::enable),
        ),
        (
            Method::POST,
            "/v1/vms/{vm}/metrics/disable",
            post(metrics::disable),
        ),
        (
            Method::POST,
            "/v1/vms/{vm}/metrics/reset",
            post(metrics::reset),
        ),
        (Method::GET, "/v1/vms/{vm}/console/log", get(console::log)),
        (Method::GET, "/v1/vms/{vm}/console", get(console::attach)),
        (Method::POST, "/v1/vms/{vm}/nics", post(nics::add)),
        (Method::PUT, "/v1/vms/{vm}/nics/{nic}", put(nics::set)),
        (
            Method::DELETE,
            "/v1/vms/{vm}/nics/{nic}",
            delete(nics::remove),
        ),
        (Method::GET, "/v1/switches", get(switches::list)),
        (Method::POST, "/v1/switches", post(switches::create)),
        (Method::GET, "/v1/switches/{sw}", get(switches::show)),
        (
            Method::DELETE,
            "/v1/switches/{sw}",
            delete(switches::remove),
        ),
        (
            Method::POST,
            "/v1/switches/{sw}/ports",
            post(switches::add_port),
        ),
        (
            Method::PUT,
            "/v1/switches/{sw}/ports/{port}",
            put(switches::set_port),
        ),
        (
            Method::DELETE,
            "/v1/switches/{sw}/ports/{port}",
            delete(switches::remove_port),
        ),
        (
            Method::PUT,
            "/v1/switches/{sw}/uplink/mirror",
            put(uplink_mirror::set),
        ),
        (
            Method::POST,
            "/v1/switches/{sw}/meters/reset",
            post(switches::reset_meters),
        ),
        (
            Method::GET,
            "/v1/switches/{sw}/policies",
            get(policies::list),
        ),
        (
            Method::POST,
            "/v1/switches/{sw}/policies",
            post(policies::add),
        ),
        (
            Method::PUT,
            "/v1/switches/{sw}/policies/{rd}/{ca}",
            put(policies::set),
        ),
        (
            Method::DELETE,
            "/v1/switches/{sw}/policies/{rd}/{ca}",
            delete(policies::remove),
        ),
        (
            Method::GET,
            "/v1/switches/{sw}/gateways",
            get(gateways::list),
        ),
        (
            Method::POST,
            "/v1/switches/{sw}/gateways",
            post(gateways::add),
        ),
        (
            Method::PUT,
            "/v1/switches/{sw}/gateways/{name}",
            put(gateways::set),
        ),
        (
            Method::DELETE,
            "/v1/switches/{sw}/gateways/{name}",
            delete(gateways::remove),
        ),
        (Method::GET, "/v1/jobs", get(jobs::list)),
        (Method::GET, "/v1/jobs/{id}", get(jobs::show)),
        (Method::POST, "/v1/jobs/{id}/cancel", post(jobs::cancel)),
        (Method::GET, "/metrics", get(prom::scrape)),
    ]
    .into_iter()
    .chain(pool_routes())
    .collect()
}

fn pool_routes() -> Vec<(Method, &'static str, Handler)> {
    vec![
        (Method::GET, "/v1/pools", get(pools::list)),
        (Method::POST, "/v1/pools", post(pools::create)),
        (Method::GET, "/v1/pools/{pool}", get(pools::show)),
        (Method::DELETE, "/v1/pools/{pool}", delete(pools::remove)),
        (Method::POST, "/v1/pools/{pool}/vms", post(pools::add_vm)),
        (
            Method::DELETE,
            "/v1/pools/{pool}/vms/{vm}",
            delete(pools::remove_vm),
        ),
        (Method::GET, "/v1/pools/{pool}/metrics", get(pools::metrics)),
    ]
}

/// Every (method, path template) served, in the table's order.
pub fn route_table() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|(m, p, _)| (m, p)).collect()
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    let mut by_path: BTreeMap<&'static str, Handler> = BTreeMap::new();
    for (_, path, handler) in routes() {
        let merged = match by_path.remove(path) {
            Some(h) => h.merge(handler),
            None => handler,
        };
        by_path.insert(path, merged);
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            daemon.clone(),
            prom::count_requests,
        ))
        .layer(middleware::from_fn(whole_body))
        .with_state(daemon)
}

async fn not_found(req: Request) -> HttpError {
    HttpError::new(
        vireo_api::ApiErrorCode::NotFound,
        format!(
            "no route {} {} (see docs/api.md)",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> HttpError {
    HttpError::with_status(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Reads the whole body first, bounded in size and time, so a handler never waits on a client
/// and a huge or endless body costs at most 1 MiB and 10 s.
async fn whole_body(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        let mut e = HttpError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
        );
        e.close = true;
        e.into_response()
    };
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let collected = tokio::time::timeout(
        REQUEST_TIMEOUT,
        Limited::new(body, MAX_BODY_BYTES).collect(),
    )
    .await;
    let bytes = match collected {
        Err(_) => {
            let mut e = HttpError::with_status(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body was not complete within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            );
            e.close = true;
            return e.into_response();
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(e)) => {
            let mut e = HttpError::bad_request(format!("the request body could not be read: {e}"));
            e.close = true;
            return e.into_response();
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}
