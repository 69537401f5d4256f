//! The uplink's part in port mirroring (`PUT /v1/switches/{sw}/uplink/mirror`): a source of
//! copies (ingress, egress or both), a destination, or nothing — and on a switch with an
//! overlay, whether its copies show the tunnel packets (`outer`) or the customer frames in
//! them (`inner`, `docs/vswitch.md` "Mirroring").
//!
//! Like the other switch changes: under the switch's ops lock, told to the process first (its
//! refusal is the 422), then stored in the spec (`uplink_mirror`), from which a restarted
//! process is built; a failed store puts the process back.

use axum::extract::State;
use axum::Json;
use vireo_api::switch::{SwitchOp, UplinkMirror};
use vireo_netconfig::{MirrorLayer, SwitchKind};

use super::policies::{call_error, invalid};
use super::St;
use crate::daemon::http_error::{ApiJson, ApiPath, HttpError};
use crate::switch_store::SwitchRow;

fn check(row: &SwitchRow, m: &UplinkMirror) -> Result<(), HttpError> {
    let has_uplink =
        matches!(row.spec.kind, SwitchKind::External { .. }) || row.spec.team.is_some();
    if !has_uplink {
        return Err(invalid(format!(
            "switch {:?} has no uplink (an external switch or one with --team has); mirror a VM NIC (vireo vm nic set --mirror) or an interface port instead",
            row.spec.name
        )));
    }
    if m.overlay == MirrorLayer::Inner && row.spec.overlay.is_none() {
        return Err(invalid(format!(
            "overlay: inner needs a switch with an overlay, and {:?} has none; leave --overlay out",
            row.spec.name
        )));
    }
    Ok(())
}

pub async fn set(
    State(d): St,
    ApiPath(key): ApiPath<String>,
    ApiJson(mirror): ApiJson<UplinkMirror>,
) -> Result<Json<UplinkMirror>, HttpError> {
    let id = d.store.find_switch(&key)?.id;
    let _ops = d.switches.lock_ops(id).await;
    let row = d.store.find_switch(&id.to_string())?;
    check(&row, &mirror)?;
    d.switches
        .call(row.id, SwitchOp::SetUplinkMirror { mirror })
        .await
        .map_err(|e| call_error(&row, e))?;
    let mut spec = row.spec.clone();
    spec.uplink_mirror = (mirror != UplinkMirror::default()).then_some(mirror);
    if let Err(e) = d.store.set_switch_spec(row.id, &spec) {
        let old = row.spec.uplink_mirror.unwrap_or_default();
        let _ = d
            .switches
            .call(row.id, SwitchOp::SetUplinkMirror { mirror: old })
            .await;
        return Err(e.into());
    }
    Ok(Json(mirror))
}
