//! A VM's NICs one at a time: add and remove (while the VM is off: a running worker's NICs are
//! fixed), and change a NIC's port policy — live on a running VM: the switch process takes the
//! new policy first (`SetPort`), then it is stored; a refusal stores nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use vireo_api::switch::SwitchOp;
use vireo_api::{ApiErrorCode, NicPolicy, NicSpec, Vm, VmState};

use super::St;
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};
use crate::daemon::switches::{launch, nics};
use crate::daemon::Daemon;

fn must_be_off(vm: &Vm, what: &str) -> Result<(), HttpError> {
    // A saved VM's guest saw its NICs (and their queue pairs): its state would not restore
    // into another set.
    if vm.state == VmState::Saved {
        return Err(HttpError::conflict(format!(
            "cannot {what} a NIC of a VM that is saved: its saved state has the current NICs; \
             turn it off first (that discards the saved state)"
        )));
    }
    if vm.state.has_worker() {
        return Err(HttpError::conflict(format!(
            "cannot {what} a NIC of a VM that is {}: stop the VM first (NIC hot-plug is not supported)",
            vm.state
        )));
    }
    Ok(())
}

fn nic_index(vm: &Vm, nic: &str) -> Result<usize, HttpError> {
    vm.spec
        .nics
        .iter()
        .position(|n| n.name.as_deref() == Some(nic))
        .ok_or_else(|| {
            HttpError::new(
                ApiErrorCode::NotFound,
                format!("VM {:?} has no NIC {nic:?}", vm.spec.name),
            )
        })
}

/// The VM, locked, re-read under its lock.
async fn locked(
    d: &Daemon,
    key: &str,
) -> Result<(Vm, tokio::sync::OwnedMutexGuard<()>), HttpError> {
    let vm = d.find(key)?;
    let guard = d.try_lock_vm(&vm)?;
    Ok((d.store.get_by_id(vm.id())?, guard))
}

pub async fn add(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(nic): ApiJson<NicSpec>,
) -> Result<(StatusCode, Json<NicSpec>), HttpError> {
    let (vm, _guard) = locked(&d, &key).await?;
    must_be_off(&vm, "add")?;
    let mut spec = vm.spec.clone();
    spec.nics.push(nic);
    let updated = nics::update_spec(&d, &vm, &spec).await?;
    let added = updated.spec.nics.last().cloned().expect("just added");
    Ok((StatusCode::CREATED, Json(added)))
}

pub async fn remove(
    State(d): St,
    ApiPath((key, nic)): ApiPath<(String, String)>,
) -> Result<StatusCode, HttpError> {
    let (vm, _guard) = locked(&d, &key).await?;
    let i = nic_index(&vm, &nic)?;
    must_be_off(&vm, "remove")?;
    let mut spec = vm.spec.clone();
    spec.nics.remove(i);
    nics::update_spec(&d, &vm, &spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Replaces the NIC's policy. `policy.vlan` set clears the NIC's `vlan` shortcut (both set
/// would be refused).
pub async fn set(
    State(d): St,
    ApiPath((key, nic)): ApiPath<(String, String)>,
    ApiJson(policy): ApiJson<NicPolicy>,
) -> Result<Json<NicSpec>, HttpError> {
    let (vm, _guard) = locked(&d, &key).await?;
    let i = nic_index(&vm, &nic)?;
    let mut spec = vm.spec.clone();
    let n = &mut spec.nics[i];
    if policy.vlan.is_some() {
        n.vlan = None;
    }
    n.policy = policy;
    let new_nic = n.clone();
    vireo_api::validate_spec(&spec, &d.limits)
        .map_err(|e| HttpError::new(ApiErrorCode::Invalid, e.to_string()))?;
    nics::check(&d, &spec)?;
    let _ops = nics::lock_switches(&d, &[Some(&spec)]).await;
    let row = d.store.find_switch(&new_nic.switch)?;
    let port = launch::port_name(vm.id(), &nic);
    let config = new_nic.port_config(&port);
    d.switches
        .call(row.id, SwitchOp::SetPort { config })
        .await
        .map_err(|e| {
            HttpError::new(
                ApiErrorCode::Invalid,
                format!("switch {:?} refused the policy: {e}", row.spec.name),
            )
        })?;
    if let Err(e) = d.store.update_spec(vm.id(), &spec) {
        let old = vm.spec.nics[i].port_config(&port);
        let _ = d
            .switches
            .call(row.id, SwitchOp::SetPort { config: old })
            .await;
        return Err(e.into());
    }
    Ok(Json(new_nic))
}
