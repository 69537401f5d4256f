//! The switch resource: create, list, show (spec + process + ports as the process reports
//! them), remove; host interfaces as ports (add, change live, remove); reset the meters.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use vireo_api::switch::{SwitchOp, SwitchReply, SwitchSpec};
use vireo_api::switch_rest::{SwitchInfo, SwitchNic};
use vireo_api::ApiErrorCode;
use vireo_netconfig::{PortConfig, SwitchKind};

use super::St;
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};
use crate::daemon::switches::{self, launch};
use crate::daemon::Daemon;
use crate::switch_store::SwitchRow;

fn invalid(message: String) -> HttpError {
    HttpError::new(ApiErrorCode::Invalid, message)
}

/// The stored parts of a switch; `ports` asks the process (bounded in time).
async fn info(d: &Daemon, row: SwitchRow, ports: bool) -> Result<SwitchInfo, HttpError> {
    let vms = d.store.list()?;
    let nics = vms
        .iter()
        .flat_map(|vm| {
            vm.spec
                .nics
                .iter()
                .filter(|n| n.switch == row.spec.name)
                .map(move |n| SwitchNic {
                    vm: vm.spec.name.clone(),
                    vm_id: vm.id(),
                    nic: launch::nic_name(n).to_owned(),
                    port: launch::port_name(vm.id(), launch::nic_name(n)),
                })
        })
        .collect();
    let reported = if ports {
        match d.switches.call(row.id, SwitchOp::Status).await {
            Ok(Some(SwitchReply::Status { ports })) => ports,
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::warn!(switch = %row.spec.name, error = %e, "no status from the switch process");
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };
    Ok(SwitchInfo {
        id: row.id,
        interface_ports: d.store.interface_ports(row.id)?,
        process: d.switches.process_info(row.id),
        spec: row.spec,
        created_at: row.created_at,
        nics,
        ports: reported,
    })
}

pub async fn list(State(d): St) -> Result<Json<Vec<SwitchInfo>>, HttpError> {
    let mut out = Vec::new();
    for row in d.store.list_switches()? {
        out.push(info(&d, row, false).await?);
    }
    Ok(Json(out))
}

pub async fn show(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<Json<SwitchInfo>, HttpError> {
    let row = d.store.find_switch(&key)?;
    Ok(Json(info(&d, row, true).await?))
}

/// The host interfaces a switch kind names must be interface names.
fn check_kind(kind: &SwitchKind) -> Result<(), HttpError> {
    let names: Vec<(&str, &String)> = match kind {
        SwitchKind::Private => vec![],
        SwitchKind::Internal { host_interface } => vec![("kind.host_interface", host_interface)],
        SwitchKind::External {
            interface,
            host_interface,
            ..
        } => {
            let mut v = vec![("kind.interface", interface)];
            v.extend(host_interface.iter().map(|h| ("kind.host_interface", h)));
            v
        }
    };
    for (field, name) in names {
        launch::check_ifname(name).map_err(|e| invalid(format!("{field}: {e}")))?;
    }
    Ok(())
}

pub async fn create(
    State(d): St,
    ApiJson(spec): ApiJson<SwitchSpec>,
) -> Result<(StatusCode, Json<SwitchInfo>), HttpError> {
    vireo_api::validate_name("name", &spec.name).map_err(|e| invalid(e.to_string()))?;
    check_kind(&spec.kind)?;
    switches::netvirt::check_team(&spec).map_err(|e| invalid(format!("team: {e}")))?;
    check_team_members_free(&d, &spec)?;
    launch::check_switch(&spec).map_err(|e| invalid(format!("switch {:?}: {e}", spec.name)))?;
    let row = d.store.create_switch(&spec)?;
    switches::start(&d, &row).await;
    Ok((StatusCode::CREATED, Json(info(&d, row, true).await?)))
}

/// A team member must not be another switch's uplink, team member or interface port (two
/// switches reading one interface would each see the other's frames).
fn check_team_members_free(d: &Daemon, spec: &SwitchSpec) -> Result<(), HttpError> {
    let Some(team) = &spec.team else {
        return Ok(());
    };
    for row in d.store.list_switches()? {
        let mut used: Vec<String> = d
            .store
            .interface_ports(row.id)?
            .into_iter()
            .map(|p| p.name)
            .collect();
        if let SwitchKind::External { interface, .. } = &row.spec.kind {
            used.push(interface.clone());
        }
        if let Some(t) = &row.spec.team {
            used.extend(t.members.iter().cloned());
        }
        if let Some(m) = team.members.iter().find(|m| used.contains(m)) {
            return Err(invalid(format!(
                "team: member {m:?} is already used by switch {:?}; choose another interface",
                row.spec.name
            )));
        }
    }
    Ok(())
}

pub async fn remove(State(d): St, ApiPath(key): ApiPath<String>) -> Result<StatusCode, HttpError> {
    let row = d.store.find_switch(&key)?;
    let _ops = d.switches.lock_ops(row.id).await;
    d.store.remove_switch(row.id)?;
    switches::stop(&d, row.id).await;
    Ok(StatusCode::NO_CONTENT)
}

fn check_interface_port(row: &SwitchRow, config: &PortConfig) -> Result<(), HttpError> {
    launch::check_ifname(&config.name).map_err(|e| invalid(format!("name: {e}")))?;
    launch::check_port(&row.spec, config).map_err(|reason| {
        invalid(format!(
            "switch {:?} refuses the port policy of {:?}: {reason}",
            row.spec.name, config.name
        ))
    })
}

fn refused(row: &SwitchRow, e: impl std::fmt::Display) -> HttpError {
    invalid(format!("switch {:?} refused: {e}", row.spec.name))
}

pub async fn add_port(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(config): ApiJson<PortConfig>,
) -> Result<(StatusCode, Json<PortConfig>), HttpError> {
    let row = d.store.find_switch(&key)?;
    check_interface_port(&row, &config)?;
    let _ops = d.switches.lock_ops(row.id).await;
    d.store.add_interface_port(&row, &config)?;
    let op = SwitchOp::AddPort {
        port: launch::interface_port(&config),
    };
    if let Err(e) = d.switches.call(row.id, op).await {
        d.store.remove_interface_port(&row, &config.name)?;
        return Err(refused(&row, e));
    }
    Ok((StatusCode::CREATED, Json(config)))
}

pub async fn set_port(
    State(d): St,
    ApiPath((key, port)): ApiPath<(String, String)>,
    ApiJson(config): ApiJson<PortConfig>,
) -> Result<Json<PortConfig>, HttpError> {
    let row = d.store.find_switch(&key)?;
    if config.name != port {
        return Err(invalid(format!(
            "name: {:?} differs from the port {port:?} in the path (a port cannot be renamed)",
            config.name
        )));
    }
    let _ops = d.switches.lock_ops(row.id).await;
    let old = d.store.interface_ports(row.id)?;
    let Some(old) = old.into_iter().find(|p| p.name == port) else {
        return Err(crate::switch_store::SwitchStoreError::PortNotFound {
            switch: row.spec.name.clone(),
            port,
        }
        .into());
    };
    check_interface_port(&row, &config)?;
    let op = SwitchOp::SetPort {
        config: config.clone(),
    };
    d.switches
        .call(row.id, op)
        .await
        .map_err(|e| refused(&row, e))?;
    if let Err(e) = d.store.set_interface_port(&row, &config) {
        let _ = d
            .switches
            .call(row.id, SwitchOp::SetPort { config: old })
            .await;
        return Err(e.into());
    }
    Ok(Json(config))
}

pub async fn remove_port(
    State(d): St,
    ApiPath((key, port)): ApiPath<(String, String)>,
) -> Result<StatusCode, HttpError> {
    let row = d.store.find_switch(&key)?;
    let _ops = d.switches.lock_ops(row.id).await;
    d.store.remove_interface_port(&row, &port)?;
    if let Err(e) = d
        .switches
        .call(row.id, SwitchOp::RemovePort { name: port.clone() })
        .await
    {
        tracing::warn!(switch = %row.spec.name, port, error = %e, "port removed from the store, not from the process");
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn reset_meters(
    State(d): St,
    ApiPath(key): ApiPath<String>,
) -> Result<StatusCode, HttpError> {
    let row = d.store.find_switch(&key)?;
    match d.switches.call(row.id, SwitchOp::ResetMeters).await {
        Ok(Some(_)) => Ok(StatusCode::NO_CONTENT),
        Ok(None) => Err(HttpError::conflict(format!(
            "switch {:?} has no running process; see its error in `vireo switch show`",
            row.spec.name
        ))),
        Err(e) => Err(HttpError::conflict(format!(
            "switch {:?}: {e}",
            row.spec.name
        ))),
    }
}
