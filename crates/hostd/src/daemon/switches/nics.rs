//! VM NICs as switch ports: checks before a spec with NICs is stored (its switches exist, each
//! switch takes its port's policy), and the store change and the switch processes kept in step
//! (ports added, changed, removed under the switches' ops locks, the store change undone when a
//! switch refuses).

use std::collections::BTreeMap;

use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use vireo_api::switch::{SwitchOp, SwitchPort};
use vireo_api::{ApiErrorCode, Vm, VmSpec};

use super::{launch, switch_dir};
use crate::daemon::http_error::HttpError;
use crate::daemon::Daemon;
use crate::switch_store::{SwitchRow, SwitchStoreError};

fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

/// Every NIC's switch exists and takes the NIC's port policy: 422 naming the NIC otherwise.
pub fn check(daemon: &Daemon, spec: &VmSpec) -> Result<(), HttpError> {
    for (i, nic) in spec.nics.iter().enumerate() {
        let row = match daemon.store.find_switch(&nic.switch) {
            Ok(r) => r,
            Err(SwitchStoreError::NotFound(_)) => {
                return Err(invalid(format!(
                    "nics[{i}].switch: no switch {:?}; create it first (vireo switch create)",
                    nic.switch
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let name = launch::port_name(Uuid::nil(), nic.name.as_deref().unwrap_or("nic"));
        let config = launch::nic_port_config(&row.spec, &name, nic)
            .map_err(|e| invalid(format!("nics[{i}].virtual_subnet: {e}")))?;
        super::netvirt::check_nic_cas(daemon, &row, spec, nic)
            .map_err(|e| invalid(format!("nics[{i}].virtual_subnet: {e}")))?;
        launch::check_port(&row.spec, &config).map_err(|reason| {
            invalid(format!(
                "nics[{i}]: switch {:?} refuses the port policy: {reason}",
                nic.switch
            ))
        })?;
    }
    Ok(())
}

/// The ports a spec's NICs stand for, by (switch id, port name).
fn ports(
    daemon: &Daemon,
    vm_id: Uuid,
    spec: Option<&VmSpec>,
) -> BTreeMap<(Uuid, String), SwitchPort> {
    let mut out = BTreeMap::new();
    for nic in spec.map(|s| s.nics.as_slice()).unwrap_or_default() {
        let Ok(row) = daemon.store.find_switch(&nic.switch) else {
            continue;
        };
        let port = launch::nic_port(&row.spec, &switch_dir(daemon, row.id), vm_id, nic);
        out.insert((row.id, port.config.name.clone()), port);
    }
    out
}

/// The ops locks of the switches `specs` name, in id order (no two requests can deadlock).
pub async fn lock_switches(daemon: &Daemon, specs: &[Option<&VmSpec>]) -> Vec<OwnedMutexGuard<()>> {
    let mut ids: Vec<Uuid> = specs
        .iter()
        .flatten()
        .flat_map(|s| s.nics.iter())
        .filter_map(|n| {
            daemon
                .store
                .find_switch(&n.switch)
                .ok()
                .map(|r: SwitchRow| r.id)
        })
        .collect();
    ids.sort();
    ids.dedup();
    let mut guards = Vec::new();
    for id in ids {
        guards.push(daemon.switches.lock_ops(id).await);
    }
    guards
}

/// Tells the switch processes what changed between `old` and `new` (a removed NIC's port goes,
/// a new one is added, a changed policy is set live). Stops at the first refusal and returns
/// it; the caller undoes (by applying `new` → `old`). A switch without a running process is
/// skipped: it builds its ports from the store when it starts.
pub async fn apply(
    daemon: &Daemon,
    vm_id: Uuid,
    old: Option<&VmSpec>,
    new: Option<&VmSpec>,
) -> Result<(), String> {
    let before = ports(daemon, vm_id, old);
    let after = ports(daemon, vm_id, new);
    for (key, _) in before.iter().filter(|(k, _)| !after.contains_key(*k)) {
        call(
            daemon,
            key.0,
            SwitchOp::RemovePort {
                name: key.1.clone(),
            },
        )
        .await?;
    }
    for (key, port) in &after {
        match before.get(key) {
            None => call(daemon, key.0, SwitchOp::AddPort { port: port.clone() }).await?,
            Some(b) if b.config != port.config => {
                call(
                    daemon,
                    key.0,
                    SwitchOp::SetPort {
                        config: port.config.clone(),
                    },
                )
                .await?
            }
            Some(_) => {}
        }
    }
    Ok(())
}

async fn call(daemon: &Daemon, switch: Uuid, op: SwitchOp) -> Result<(), String> {
    let what = format!("{op:?}");
    match daemon.switches.call(switch, op).await {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(switch = %switch, op = %what, error = %e, "switch refused a port change");
            Err(e.to_string())
        }
    }
}

/// `POST /vms`: checks, stores, adds the NICs' ports; a switch refusing a port removes the VM
/// again (422 with the switch's reason).
pub async fn create_vm(
    daemon: &Daemon,
    spec: &VmSpec,
    pool: Option<&str>,
) -> Result<Vm, HttpError> {
    if spec.nics.is_empty() {
        return Ok(daemon.store.create_vm_in_pool(spec, pool)?);
    }
    check(daemon, spec)?;
    let _guards = lock_switches(daemon, &[Some(spec)]).await;
    let vm = daemon.store.create_vm_in_pool(spec, pool)?;
    if let Err(reason) = apply(daemon, vm.id(), None, Some(&vm.spec)).await {
        let _ = apply(daemon, vm.id(), Some(&vm.spec), None).await;
        daemon.store.remove(vm.id())?;
        return Err(invalid(format!("a switch refused the VM's NIC: {reason}")));
    }
    Ok(vm)
}

/// `PUT /vms/{vm}/spec` (the VM is off): checks, stores, brings the ports in line; a refusal
/// restores the old spec and ports.
pub async fn update_spec(daemon: &Daemon, old: &Vm, spec: &VmSpec) -> Result<Vm, HttpError> {
    if spec.nics.is_empty() && old.spec.nics.is_empty() {
        return Ok(daemon.store.update_spec(old.id(), spec)?);
    }
    check(daemon, spec)?;
    let _guards = lock_switches(daemon, &[Some(&old.spec), Some(spec)]).await;
    let vm = daemon.store.update_spec(old.id(), spec)?;
    if let Err(reason) = apply(daemon, vm.id(), Some(&old.spec), Some(&vm.spec)).await {
        let _ = apply(daemon, vm.id(), Some(&vm.spec), Some(&old.spec)).await;
        daemon.store.update_spec(old.id(), &old.spec)?;
        return Err(invalid(format!("a switch refused the VM's NIC: {reason}")));
    }
    Ok(vm)
}

/// `DELETE /vms/{vm}`: removes it from the store, then its ports (a switch that cannot be
/// told is logged; its next start builds from the store without them).
pub async fn remove_vm(daemon: &Daemon, vm: &Vm) -> Result<(), HttpError> {
    let _guards = lock_switches(daemon, &[Some(&vm.spec)]).await;
    daemon.store.remove(vm.id())?;
    if let Err(e) = apply(daemon, vm.id(), Some(&vm.spec), None).await {
        tracing::warn!(vm = %vm.id(), error = %e, "ports of a removed VM not all removed");
    }
    Ok(())
}
