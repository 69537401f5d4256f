//! A stand-in for vireod on a Unix socket, to test the `vireo` client without the daemon: it
//! records every request (method, URI, headers, body) and answers like docs/api.md says, with a
//! few VM names that trigger the error paths:
//!
//! | VM | behaviour |
//! |---|---|
//! | `web` | exists, off; its start job goes 0 → 50 → 100 % over two polls |
//! | `bad` | its start job fails on the first poll |
//! | `slow` | its start job never ends |
//! | `nospawn` | its start job is failed already in the 202 (no worker could be spawned) |
//! | `missing` | 404 |
//! | `boom` | 500 with the API's error shape |
//! | `proxy` | 502 with a plain-text body (not vireod) |
//! | `off` | the console is refused, 409 |
//! | `taken` | create → 409 (name taken) |

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use vireo_api::{ApiError, ApiErrorCode, Job, JobKind, JobState, Vm, VmIdentity, VmSpec, VmState};

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    seen: Vec<Seen>,
    /// Job id → (VM name, polls so far).
    jobs: HashMap<Uuid, (String, JobKind, u32)>,
}

type Shared = Arc<Mutex<Inner>>;

pub struct FakeDaemon {
    /// Holds the socket; removed on drop.
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    inner: Shared,
}

impl FakeDaemon {
    pub fn start() -> FakeDaemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vireod.sock");
        let inner: Shared = Arc::default();
        let router = router(inner.clone());
        let std_listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
                axum::serve(listener, router).await.unwrap();
            });
        });
        FakeDaemon {
            _dir: dir,
            socket,
            inner,
        }
    }

    pub fn host(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.lock().unwrap().seen.clone()
    }
}

pub fn vm(name: &str, state: VmState) -> Vm {
    let mut spec: VmSpec = serde_json::from_value(serde_json::json!({
        "version": 1, "name": name, "vcpus": 1, "memory_bytes": 33554432,
        "kernel": "/k/probe.elf", "shutdown_line": "POWEROFF",
        "disks": [{"path": "/d/a.vhdx"}, {"path": "/d/b.img", "read_only": true}]
    }))
    .unwrap();
    vm_of(&mut spec, state)
}

/// The VM the daemon would answer for `spec`: id from the name, serials assigned.
fn vm_of(spec: &mut VmSpec, state: VmState) -> Vm {
    let id = vm_of_name(&spec.name);
    let identity = VmIdentity::assign(id, spec, || "02:00:00:00:00:01".parse().unwrap());
    Vm {
        spec: spec.clone(),
        identity,
        state,
        created_at: 1_796_398_971_000,
        updated_at: 1_796_398_971_000,
    }
}

fn api_error(code: ApiErrorCode, message: &str) -> Response {
    let status = StatusCode::from_u16(code.http_status()).unwrap();
    (status, Json(ApiError::new(code, message))).into_response()
}

/// `Err` for the names that fail whatever the route (a test server: size does not matter).
#[allow(clippy::result_large_err)]
fn lookup(name: &str) -> Result<Vm, Response> {
    match name {
        "missing" => Err(api_error(
            ApiErrorCode::NotFound,
            &format!("no VM named {name:?}"),
        )),
        "boom" => Err(api_error(
            ApiErrorCode::Internal,
            "the store is unavailable",
        )),
        "proxy" => Err((StatusCode::BAD_GATEWAY, "Bad Gateway").into_response()),
        _ => Ok(vm(name, VmState::Off)),
    }
}

fn router(inner: Shared) -> Router {
    Router::new()
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{vm}", get(show_vm).delete(remove_vm))
        .route("/v1/vms/{vm}/spec", put(set_spec))
        .route("/v1/vms/{vm}/rename", post(rename))
        .route("/v1/vms/{vm}/start", post(start))
        .route("/v1/vms/{vm}/stop", post(stop))
        .route("/v1/vms/{vm}/turn-off", post(turn_off))
        .route("/v1/vms/{vm}/console/log", get(console_log))
        .route("/v1/vms/{vm}/console", get(console))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(show_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .layer(middleware::from_fn_with_state(inner.clone(), record))
        .with_state(inner)
}

/// Keeps a copy of every request, body included, then passes it on unchanged (extensions
/// too, so an upgrade still works).
async fn record(State(inner): State<Shared>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    inner.lock().unwrap().seen.push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: bytes.to_vec(),
    });
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

async fn list_vms() -> Json<Vec<Vm>> {
    Json(vec![vm("db", VmState::Running), vm("web", VmState::Off)])
}

async fn create_vm(body: Bytes) -> Response {
    let mut spec: VmSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return api_error(ApiErrorCode::BadRequest, &e.to_string()),
    };
    if spec.name == "taken" {
        return api_error(
            ApiErrorCode::Conflict,
            "a VM named \"taken\" exists already",
        );
    }
    (StatusCode::CREATED, Json(vm_of(&mut spec, VmState::Off))).into_response()
}

async fn show_vm(Path(name): Path<String>) -> Response {
    match lookup(&name) {
        Ok(vm) => Json(vm).into_response(),
        Err(r) => r,
    }
}

async fn remove_vm(Path(name): Path<String>) -> Response {
    match lookup(&name) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

async fn set_spec(Path(name): Path<String>, body: Bytes) -> Response {
    if let Err(r) = lookup(&name) {
        return r;
    }
    let mut spec: VmSpec = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return api_error(ApiErrorCode::BadRequest, &e.to_string()),
    };
    Json(vm_of(&mut spec, VmState::Off)).into_response()
}

async fn rename(Path(name): Path<String>, Json(body): Json<serde_json::Value>) -> Response {
    let new = body["name"].as_str().unwrap_or_default().to_string();
    if new == "db" {
        return api_error(ApiErrorCode::Conflict, "a VM named \"db\" exists already");
    }
    match lookup(&name) {
        Ok(mut vm) => {
            vm.spec.name = new;
            Json(vm).into_response()
        }
        Err(r) => r,
    }
}

fn new_job(inner: &Shared, vm: &str, kind: JobKind) -> Job {
    let id = Uuid::new_v4();
    inner
        .lock()
        .unwrap()
        .jobs
        .insert(id, (vm.to_string(), kind, 0));
    job_at(id, vm, kind, 0)
}

/// The job after `polls` polls (see the module doc).
fn job_at(id: Uuid, vm: &str, kind: JobKind, polls: u32) -> Job {
    let (state, progress, error) = match (vm, kind, polls) {
        (_, JobKind::Stop, _) => (JobState::Completed, 100, None),
        ("nospawn", _, _) => (
            JobState::Failed,
            0,
            Some("cannot spawn /nonexistent/vireo-vm: No such file or directory".to_string()),
        ),
        ("slow", _, _) | (_, _, 0) => (JobState::Running, 0, None),
        ("bad", _, _) => (
            JobState::Failed,
            100,
            Some("kernel /k/probe.elf: not an ELF or bzImage".to_string()),
        ),
        (_, _, 1) => (JobState::Running, 50, None),
        _ => (JobState::Completed, 100, None),
    };
    Job {
        id,
        vm_id: Some(vm_of_name(vm)),
        kind,
        state,
        progress,
        error,
        created_at: 1_796_398_971_000,
        migration: None,
    }
}

/// A VM's id, fixed by its name.
pub fn vm_of_name(name: &str) -> Uuid {
    let hash = name.bytes().fold(0x1000_u128, |h, b| {
        h.wrapping_mul(131).wrapping_add(b.into())
    });
    Uuid::from_u128(hash)
}

async fn start(State(inner): State<Shared>, Path(name): Path<String>) -> Response {
    if let Err(r) = lookup(&name) {
        return r;
    }
    (
        StatusCode::ACCEPTED,
        Json(new_job(&inner, &name, JobKind::Start)),
    )
        .into_response()
}

async fn stop(State(inner): State<Shared>, Path(name): Path<String>) -> Response {
    if let Err(r) = lookup(&name) {
        return r;
    }
    (
        StatusCode::ACCEPTED,
        Json(new_job(&inner, &name, JobKind::Stop)),
    )
        .into_response()
}

async fn turn_off(Path(name): Path<String>) -> Response {
    match lookup(&name) {
        Ok(vm) => Json(vm).into_response(),
        Err(r) => r,
    }
}

async fn console_log(Path(name): Path<String>) -> Response {
    if let Err(r) = lookup(&name) {
        return r;
    }
    (
        [("content-type", "application/octet-stream")],
        &b"\nPROBE READY\nOK PONG\n\xff\x00binary"[..],
    )
        .into_response()
}

/// 101, then a guest that answers each chunk in upper case and hangs up after `POWEROFF`.
async fn console(Path(name): Path<String>, request: Request) -> Response {
    if name == "off" {
        return api_error(ApiErrorCode::Conflict, "cannot attach to a VM that is off");
    }
    if let Err(r) = lookup(&name) {
        return r;
    }
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        let mut buf = [0u8; 1024];
        loop {
            let n = match io.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if buf[..n].starts_with(b"POWEROFF") {
                let _ = io.write_all(b"OK\n").await;
                let _ = io.shutdown().await;
                return;
            }
            if io.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "vireo-console")
        .body(Body::empty())
        .unwrap()
}

async fn list_jobs(
    State(inner): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Vec<Job>> {
    let inner = inner.lock().unwrap();
    let mut jobs: Vec<Job> = inner
        .jobs
        .iter()
        .filter(|(_, (vm, _, _))| query.get("vm").is_none_or(|want| want == vm))
        .map(|(id, (vm, kind, polls))| job_at(*id, vm, *kind, *polls))
        .collect();
    jobs.sort_by_key(|j| j.id);
    Json(jobs)
}

async fn show_job(State(inner): State<Shared>, Path(id): Path<Uuid>) -> Response {
    let mut inner = inner.lock().unwrap();
    match inner.jobs.get_mut(&id) {
        Some((vm, kind, polls)) => {
            *polls += 1;
            Json(job_at(id, vm, *kind, *polls)).into_response()
        }
        None => api_error(ApiErrorCode::NotFound, &format!("no job {id}")),
    }
}

async fn cancel_job(State(inner): State<Shared>, Path(id): Path<Uuid>) -> Response {
    let inner = inner.lock().unwrap();
    match inner.jobs.get(&id) {
        Some((vm, _, _)) if vm == "slow" => {
            let mut job = job_at(id, vm, JobKind::Start, 0);
            job.state = JobState::Cancelled;
            Json(job).into_response()
        }
        Some(_) => api_error(ApiErrorCode::Conflict, &format!("job {id} has ended")),
        None => api_error(ApiErrorCode::NotFound, &format!("no job {id}")),
    }
}
