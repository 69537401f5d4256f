//! Network virtualization as vireod keeps it (`docs/netvirt.md`): the checks a policy entry or
//! a VM NIC's virtual subnet must pass before anything is stored or sent, and the policy table
//! as the API lists it.
//!
//! Where the table lives: remote VMs' entries in the switch's stored spec
//! (`SwitchSpec.overlay.policies`), so a restarted switch process is built with them and a
//! restarted vireod finds them; local VMs' entries follow from their NICs (`NicSpec
//! .virtual_subnet`) and are derived by the switch itself from its ports. No lock here: the
//! callers hold the switch's ops lock while they check, tell the process and store.

use std::net::IpAddr;

use vireo_api::switch::SwitchSpec;
use vireo_api::{NicSpec, VmSpec};
use vireo_netconfig::{MacAddr, PolicyEntry, MAX_VSID};

use super::launch;
use crate::daemon::Daemon;
use crate::switch_store::SwitchRow;

/// One CA of a VM NIC on this host: which VM and NIC hold it.
pub(super) struct LocalCa {
    pub(super) vm: String,
    pub(super) nic: String,
    pub(super) routing_domain: String,
    pub(super) ca: IpAddr,
    pub(super) vsid: u32,
    pub(super) mac: Option<MacAddr>,
}

pub(super) fn local_cas<'a>(
    spec: &SwitchSpec,
    vms: impl Iterator<Item = &'a VmSpec>,
) -> Vec<LocalCa> {
    vms.flat_map(|vm| {
        vm.nics
            .iter()
            .filter(|n| n.switch == spec.name)
            .flat_map(|n| nic_cas(spec, &vm.name, n))
    })
    .collect()
}

pub(super) fn nic_cas(spec: &SwitchSpec, vm: &str, n: &NicSpec) -> Vec<LocalCa> {
    let Some(v) = &n.virtual_subnet else {
        return Vec::new();
    };
    let Some(rd) = launch::routing_domain_of(spec, v.vsid) else {
        return Vec::new();
    };
    v.ca.iter()
        .map(|&ca| LocalCa {
            vm: vm.to_owned(),
            nic: launch::nic_name(n).to_owned(),
            routing_domain: rd.to_owned(),
            ca,
            vsid: v.vsid,
            mac: n.mac.map(|m| MacAddr(m.0)),
        })
        .collect()
}

/// A NIC of VM `spec` joining a virtual subnet: none of its CAs may be held by another NIC on
/// the switch (another VM's, or another of this VM's) in the same routing domain.
pub fn check_nic_cas(
    daemon: &Daemon,
    row: &SwitchRow,
    spec: &VmSpec,
    nic: &NicSpec,
) -> Result<(), String> {
    let others = daemon.store.list().map_err(|e| e.to_string())?;
    let mine = nic_cas(&row.spec, &spec.name, nic);
    let other_vms = others
        .iter()
        .map(|vm| &vm.spec)
        .filter(|s| s.name != spec.name);
    let taken: Vec<LocalCa> = local_cas(&row.spec, other_vms)
        .into_iter()
        .chain(
            spec.nics
                .iter()
                .filter(|n| n.switch == row.spec.name && !std::ptr::eq(*n, nic))
                .flat_map(|n| nic_cas(&row.spec, &spec.name, n)),
        )
        .collect();
    for m in &mine {
        if let Some(t) = taken
            .iter()
            .find(|t| t.routing_domain == m.routing_domain && t.ca == m.ca)
        {
            return Err(format!(
                "CA {} in routing domain {:?} is already VM {:?}'s NIC {}; give each NIC its own",
                m.ca, m.routing_domain, t.vm, t.nic
            ));
        }
    }
    Ok(())
}

/// A policy entry for the switch of `row`, checked before the switch process sees it: the
/// switch has an overlay, the VSID is 24-bit and a subnet of the entry's routing domain, the
/// MAC is unicast, and the CA is not a local VM's (those entries come from the NIC).
pub fn check_entry(daemon: &Daemon, row: &SwitchRow, e: &PolicyEntry) -> Result<(), String> {
    let Some(overlay) = &row.spec.overlay else {
        return Err(format!(
            "switch {:?} has no overlay; create a switch with one (vireo switch create --overlay-pa ...)",
            row.spec.name
        ));
    };
    if e.vsid == 0 || e.vsid > MAX_VSID {
        return Err(format!(
            "vsid {} is outside 1..={MAX_VSID} (24 bits)",
            e.vsid
        ));
    }
    if e.mac.0 == [0; 6] {
        return Err(format!("customer MAC {} is not a unicast address", e.mac));
    }
    if e.ca.is_unspecified() || e.ca.is_multicast() || e.ca.is_loopback() {
        return Err(format!("CA {} is not a unicast address", e.ca));
    }
    if e.pa.is_unspecified() || e.pa.is_multicast() || e.pa.is_loopback() {
        return Err(format!("PA {} is not a unicast address", e.pa));
    }
    overlay.check_entry(e)?;
    let vms = daemon.store.list().map_err(|e| e.to_string())?;
    if let Some(l) = local_cas(&row.spec, vms.iter().map(|vm| &vm.spec))
        .into_iter()
        .find(|l| l.routing_domain == e.routing_domain && l.ca == e.ca)
    {
        return Err(format!(
            "CA {} in routing domain {:?} is VM {:?}'s NIC {} on this host; its entry follows the NIC",
            e.ca, e.routing_domain, l.vm, l.nic
        ));
    }
    Ok(())
}

/// The stored entry for (routing domain, CA), if any.
pub fn stored<'a>(spec: &'a SwitchSpec, rd: &str, ca: IpAddr) -> Option<&'a PolicyEntry> {
    spec.overlay
        .as_ref()?
        .policies
        .iter()
        .find(|p| p.routing_domain == rd && p.ca == ca)
}

/// `spec` with `e` replacing the entry of its (routing domain, CA), or added.
pub fn with_entry(spec: &SwitchSpec, e: &PolicyEntry) -> SwitchSpec {
    let mut s = spec.clone();
    if let Some(o) = &mut s.overlay {
        o.policies
            .retain(|p| !(p.routing_domain == e.routing_domain && p.ca == e.ca));
        o.policies.push(e.clone());
    }
    s
}

/// `spec` without the entry of (routing domain, CA).
pub fn without_entry(spec: &SwitchSpec, rd: &str, ca: IpAddr) -> SwitchSpec {
    let mut s = spec.clone();
    if let Some(o) = &mut s.overlay {
        o.policies
            .retain(|p| !(p.routing_domain == rd && p.ca == ca));
    }
    s
}

/// The table as the store has it, for a switch whose process does not answer: the stored
/// entries, then the local NICs' (PA: the overlay's first provider address of the CA's family,
/// as the switch derives it).
pub fn table_from_store(daemon: &Daemon, row: &SwitchRow) -> Result<Vec<PolicyEntry>, String> {
    let Some(overlay) = &row.spec.overlay else {
        return Ok(Vec::new());
    };
    let mut out = overlay.policies.clone();
    let vms = daemon.store.list().map_err(|e| e.to_string())?;
    for l in local_cas(&row.spec, vms.iter().map(|vm| &vm.spec)) {
        let pa = overlay
            .provider_addresses
            .iter()
            .find(|pa| pa.is_ipv4() == l.ca.is_ipv4());
        if let (Some(&pa), Some(mac)) = (pa, l.mac) {
            out.push(PolicyEntry {
                routing_domain: l.routing_domain,
                ca: l.ca,
                mac,
                vsid: l.vsid,
                pa,
            });
        }
    }
    Ok(out)
}

/// What a switch's team needs beyond `TeamConfig::validate`: a kind without its own uplink,
/// and members that are host interfaces here (under `/sys/class/net`, the namespace the switch
/// process runs in) other than the switch's host interface.
pub fn check_team(spec: &SwitchSpec) -> Result<(), String> {
    let Some(team) = &spec.team else {
        return Ok(());
    };
    team.validate().map_err(|e| e.to_string())?;
    let host_if = match &spec.kind {
        vireo_netconfig::SwitchKind::External { interface, .. } => {
            return Err(format!(
                "an external switch already has its uplink {interface:?}; use kind private or internal with a team"
            ))
        }
        vireo_netconfig::SwitchKind::Internal { host_interface } => Some(host_interface),
        vireo_netconfig::SwitchKind::Private => None,
    };
    for m in &team.members {
        if Some(m) == host_if {
            return Err(format!(
                "member {m:?} is the switch's host interface; a team member is a separate interface"
            ));
        }
        if !std::path::Path::new("/sys/class/net").join(m).exists() {
            return Err(format!(
                "member {m:?} is not a host interface here (ip link show); create it first"
            ));
        }
    }
    Ok(())
}
