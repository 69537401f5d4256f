//! Pause, resume and reset: requests answered at once (no job) that move a running VM through
//! its worker. The worker acts first and the state changes only once it said `Ok`, so a
//! refused or failed op leaves the VM as it was and the client gets the worker's reason.

use std::sync::Arc;

use vireo_api::worker::{WorkerOp, WorkerReply};
use vireo_api::{transition, Action, ApiErrorCode, Vm};

use super::http_error::HttpError;
use super::worker_client::{call_once, WorkerCallError};
use super::Daemon;

/// `POST /vms/{vm}/pause|resume|reset`.
pub async fn worker_action(daemon: &Arc<Daemon>, vm: &Vm, action: Action) -> Result<Vm, HttpError> {
    let op = match action {
        Action::Pause => WorkerOp::Pause,
        Action::Resume => WorkerOp::Resume,
        Action::Reset => WorkerOp::Reset,
        other => {
            return Err(HttpError::internal(format!(
                "{} has no worker op",
                other.name()
            )))
        }
    };
    let _guard = daemon.try_lock_vm(vm)?;
    // Checked before the worker is asked: an illegal request must not reach it (409 with the
    // current state).
    let vm = daemon.store.get_by_id(vm.id())?;
    transition(&vm.state, &action)?;
    let name = &vm.spec.name;
    let verb = action.name();
    let worker = daemon.sup.get(vm.id()).ok_or_else(|| {
        HttpError::conflict(format!(
            "VM {name:?} has no worker now (it is ending); retry"
        ))
    })?;
    match call_once(&worker.socket(), op).await {
        Ok(WorkerReply::Ok) => {}
        Err(WorkerCallError::Refused(message)) => {
            return Err(HttpError::new(
                ApiErrorCode::Conflict,
                format!(
                    "the worker of VM {name:?} could not {verb}: {message}; the VM is still {}",
                    vm.state
                ),
            ))
        }
        Ok(other) => {
            return Err(HttpError::internal(format!(
                "the worker of VM {name:?} answered {verb} with {other:?}"
            )))
        }
        Err(e) => {
            return Err(HttpError::internal(format!(
                "the worker of VM {name:?} did not answer {verb}: {e}; the VM is still {}",
                vm.state
            )))
        }
    }
    Ok(daemon.store.set_state(vm.id(), &action)?)
}
