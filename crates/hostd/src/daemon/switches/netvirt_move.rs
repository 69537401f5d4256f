//! Network virtualization across a migration (`docs/netvirt.md`, "A VM that moves"): what the
//! destination tells the source (its provider addresses), what each side does to its own
//! policy table once the VM runs on the destination, and what a peer host does with the
//! entries the destination pushes to it (`PeerMsg::PolicyMoved`).
//!
//! Locking: as every other change of a switch's table (`netvirt.rs`), a switch's ops lock
//! is held while its process is told and its stored spec written, one switch at a time.

use std::net::IpAddr;

use vireo_api::migrate::{SwitchProviderAddresses, MAX_MOVED_ENTRIES};
use vireo_api::switch::SwitchOp;
use vireo_api::VmSpec;
use vireo_netconfig::PolicyEntry;

use super::netvirt::{local_cas, nic_cas, stored, with_entry, without_entry};
use crate::daemon::Daemon;
use crate::switch_store::SwitchRow;

/// This host's provider addresses on each overlay switch the VM's NICs name (what the
/// destination puts in its `Accepted`).
pub fn provider_addresses(d: &Daemon, vm: &VmSpec) -> Vec<SwitchProviderAddresses> {
    let mut out: Vec<SwitchProviderAddresses> = Vec::new();
    for nic in vm.nics.iter().filter(|n| n.virtual_subnet.is_some()) {
        if out.iter().any(|s| s.switch == nic.switch) {
            continue;
        }
        let Ok(row) = d.store.find_switch(&nic.switch) else {
            continue;
        };
        if let Some(o) = &row.spec.overlay {
            out.push(SwitchProviderAddresses {
                switch: nic.switch.clone(),
                provider_addresses: o.provider_addresses.clone(),
            });
        }
    }
    out
}

/// The VM's CAs as entries at this host's PAs (of each CA's family): what a destination
/// pushes to its peers once the VM runs here.
pub fn arrival_entries(d: &Daemon, vm: &VmSpec) -> Vec<PolicyEntry> {
    entries_at(d, vm, &provider_addresses(d, vm))
}

fn entries_at(d: &Daemon, vm: &VmSpec, pas: &[SwitchProviderAddresses]) -> Vec<PolicyEntry> {
    let mut out = Vec::new();
    for nic in vm.nics.iter().filter(|n| n.virtual_subnet.is_some()) {
        let (Ok(row), Some(pas)) = (
            d.store.find_switch(&nic.switch),
            pas.iter().find(|p| p.switch == nic.switch),
        ) else {
            continue;
        };
        for l in nic_cas(&row.spec, &vm.name, nic) {
            let (Some(mac), Some(&pa)) = (
                l.mac,
                pas.provider_addresses
                    .iter()
                    .find(|pa| pa.is_ipv4() == l.ca.is_ipv4()),
            ) else {
                continue;
            };
            out.push(PolicyEntry {
                routing_domain: l.routing_domain,
                ca: l.ca,
                mac,
                vsid: l.vsid,
                pa,
            });
        }
    }
    out
}

/// Tells the switch process, then stores: the process's refusal leaves the store as it was.
async fn set_entry(d: &Daemon, row: &mut SwitchRow, entry: &PolicyEntry) -> Result<(), String> {
    let what = format!(
        "switch {:?}: moving CA {} of {:?} to PA {}",
        row.spec.name, entry.ca, entry.routing_domain, entry.pa
    );
    d.switches
        .call(
            row.id,
            SwitchOp::SetPolicy {
                entry: entry.clone(),
            },
        )
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    row.spec = with_entry(&row.spec, entry);
    d.store
        .set_switch_spec(row.id, &row.spec)
        .map_err(|e| format!("{what}: {e}"))
}

/// The source, once VM `vm` runs on the destination whose provider addresses are
/// `new_pas`: each CA of its NICs in a virtual subnet gets an entry at the new PA on this
/// host's switch (process and stored spec), so traffic still arriving here from hosts with a
/// stale table is forwarded there (`docs/netvirt.md`, "Packet flow") instead of dropped, and
/// `vireo netvirt policy list` shows where the VM went.
///
/// Called once the VM's NIC ports are gone (after `nics::remove_vm`: before that the CAs
/// belong to local ports and the switch refuses the entry). Returns how many entries were
/// set; the first failure ends it with a message naming the switch and CA.
pub async fn vm_moved_away(
    d: &Daemon,
    vm: &VmSpec,
    new_pas: &[SwitchProviderAddresses],
) -> Result<usize, String> {
    let mut n = 0;
    for entry in entries_at(d, vm, new_pas) {
        let Some(nic_switch) = vm
            .nics
            .iter()
            .find(|nic| {
                nic.virtual_subnet
                    .as_ref()
                    .is_some_and(|v| v.vsid == entry.vsid && v.ca.contains(&entry.ca))
            })
            .map(|nic| nic.switch.clone())
        else {
            continue;
        };
        let Ok(row) = d.store.find_switch(&nic_switch) else {
            continue;
        };
        let _ops = d.switches.lock_ops(row.id).await;
        let mut row = d
            .store
            .find_switch(&row.id.to_string())
            .map_err(|e| e.to_string())?;
        set_entry(d, &mut row, &entry).await?;
        n += 1;
    }
    Ok(n)
}

/// The destination, once VM `vm` runs here: stored entries for its CAs (this host had
/// talked to it while it was elsewhere) are dropped — its NIC's port owns those CAs now, and a
/// switch process rebuilt from the store must not find the old PA.
pub async fn vm_arrived(d: &Daemon, vm: &VmSpec) {
    for nic in vm.nics.iter().filter(|n| n.virtual_subnet.is_some()) {
        let Ok(row) = d.store.find_switch(&nic.switch) else {
            continue;
        };
        let _ops = d.switches.lock_ops(row.id).await;
        let Ok(mut row) = d.store.find_switch(&row.id.to_string()) else {
            continue;
        };
        let before = row.spec.clone();
        for l in nic_cas(&row.spec, &vm.name, nic) {
            row.spec = without_entry(&row.spec, &l.routing_domain, l.ca);
        }
        if row.spec != before {
            if let Err(e) = d.store.set_switch_spec(row.id, &row.spec) {
                tracing::warn!(switch = %row.spec.name, "dropping the arrived VM's old entries: {e}");
            }
        }
    }
}

/// A peer's `PolicyMoved`: each entry moves the stored entry of the same routing domain, CA,
/// VSID and MAC (the same VM) to the new PA, on every overlay switch here that has one.
/// Entries for CAs this host never stored, for local VMs' CAs, or naming one of this host's
/// own PAs change nothing: a peer reports moves, it does not create tenants' entries here.
/// Returns how many stored entries changed.
pub async fn apply_moved(d: &Daemon, entries: &[PolicyEntry]) -> Result<u32, String> {
    if entries.len() > MAX_MOVED_ENTRIES {
        return Err(format!(
            "{} entries in one move; at most {MAX_MOVED_ENTRIES}",
            entries.len()
        ));
    }
    let rows = d.store.list_switches().map_err(|e| e.to_string())?;
    let vms = d.store.list().map_err(|e| e.to_string())?;
    let mut n = 0;
    for row in rows.iter().filter(|r| r.spec.overlay.is_some()) {
        let _ops = d.switches.lock_ops(row.id).await;
        let mut row = d
            .store
            .find_switch(&row.id.to_string())
            .map_err(|e| e.to_string())?;
        let local = local_cas(&row.spec, vms.iter().map(|vm| &vm.spec));
        for e in entries {
            if !moves_stored(&row, e) || local.iter().any(|l| is_same(l, e)) {
                continue;
            }
            set_entry(d, &mut row, e).await?;
            n += 1;
        }
    }
    Ok(n)
}

fn is_same(l: &super::netvirt::LocalCa, e: &PolicyEntry) -> bool {
    l.routing_domain == e.routing_domain && l.ca == e.ca
}

/// Whether `e` moves an entry stored on `row`'s switch (same VM, another PA that is not ours).
fn moves_stored(row: &SwitchRow, e: &PolicyEntry) -> bool {
    let Some(overlay) = &row.spec.overlay else {
        return false;
    };
    let ours = |pa: &IpAddr| overlay.provider_addresses.contains(pa);
    let unicast = |a: &IpAddr| !(a.is_unspecified() || a.is_multicast() || a.is_loopback());
    match stored(&row.spec, &e.routing_domain, e.ca) {
        Some(old) => {
            old.mac == e.mac
                && old.vsid == e.vsid
                && old.pa != e.pa
                && !ours(&e.pa)
                && unicast(&e.pa)
                && overlay.check_entry(e).is_ok()
        }
        None => false,
    }
}
