//! An imported VM's checkpoint tree (manifest version 2, docs/export.md): the records, the head
//! and the state files to store with the VM, on this host's paths. Pure: the paths come from
//! the import's plan.
//!
//! With a new identity (`--new-id`) every checkpoint gets a new id (checkpoint ids are unique
//! on a host, and the source may still be here), each disk serial and MAC the one the VM's
//! disk or NIC in the same place got (fresh ones for a disk or NIC only a checkpoint has), and
//! a checkpoint's memory state is dropped, keeping its disks: a saved state restores only with
//! the MACs it was saved with, as for the VM's own saved state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vireo_api::identity::disk_serial;
use vireo_api::{MacAddr, VmSpec};

use super::manifest::Manifest;
use crate::checkpoint_store::Top;
use crate::store::ImportedTree;

/// How the VM's identity changes, old → new (empty maps: kept).
#[derive(Debug, Default)]
pub struct Renames {
    pub serials: BTreeMap<String, String>,
    pub macs: BTreeMap<MacAddr, MacAddr>,
    pub ids: BTreeMap<Uuid, Uuid>,
    /// Checkpoints lose their memory state.
    pub drop_state: bool,
}

impl Renames {
    /// The renames of a new identity: the VM's disks and NICs by position in `old` and `new`,
    /// anything only a checkpoint has gets a fresh value.
    pub fn new_identity(m: &Manifest, old: &VmSpec, new: &VmSpec, vm: Uuid) -> Renames {
        let mut r = Renames {
            drop_state: true,
            ..Renames::default()
        };
        for (o, n) in old.disks.iter().zip(&new.disks) {
            if let (Some(o), Some(n)) = (&o.serial, &n.serial) {
                r.serials.insert(o.clone(), n.clone());
            }
        }
        for (o, n) in old.nics.iter().zip(&new.nics) {
            if let (Some(o), Some(n)) = (o.mac, n.mac) {
                r.macs.insert(o, n);
            }
        }
        let mut next = new.disks.len() as u32;
        for c in &m.checkpoints {
            r.ids.insert(c.record.id, Uuid::new_v4());
            let serials = c.record.spec.disks.iter().filter_map(|d| d.serial.clone());
            for s in serials.chain(c.record.disks.iter().map(|d| d.serial.clone())) {
                if !r.serials.contains_key(&s) {
                    let taken: Vec<&String> = r.serials.values().collect();
                    let fresh = (next..)
                        .map(|n| disk_serial(vm, n))
                        .find(|f| !taken.contains(&f))
                        .expect("a u32 range holds more serials than a tree has disks");
                    next += 1;
                    r.serials.insert(s, fresh);
                }
            }
            for mac in c.record.spec.nics.iter().filter_map(|n| n.mac) {
                r.macs.entry(mac).or_insert_with(random_mac);
            }
        }
        r
    }

    fn serial(&self, s: &str) -> String {
        self.serials.get(s).cloned().unwrap_or_else(|| s.to_owned())
    }

    fn id(&self, id: Uuid) -> Uuid {
        self.ids.get(&id).copied().unwrap_or(id)
    }
}

/// A fresh locally administered MAC (40 random bits).
pub fn random_mac() -> MacAddr {
    let b = *Uuid::new_v4().as_bytes();
    MacAddr::generate([b[0], b[1], b[2], b[3], b[4]])
}

/// The tree of `m` for VM `vm`: `place` turns a manifest path into the file's path here,
/// `state_from` into where a state file is read from; NICs move to `switches` (old → new).
/// `None` for a manifest without checkpoints.
pub fn tree_for_import(
    m: &Manifest,
    vm: Uuid,
    renames: &Renames,
    switches: &BTreeMap<String, String>,
    place: &dyn Fn(&Path) -> PathBuf,
    state_from: &dyn Fn(&Path) -> PathBuf,
) -> Option<ImportedTree> {
    if m.checkpoints.is_empty() {
        return None;
    }
    let mut tree = ImportedTree::default();
    for c in &m.checkpoints {
        let mut r = c.record.clone();
        r.id = renames.id(r.id);
        r.vm_id = vm;
        r.parent = r.parent.map(|p| renames.id(p));
        r.spec.kernel = place(&r.spec.kernel);
        r.spec.initrd = r.spec.initrd.as_deref().map(place);
        for d in &mut r.spec.disks {
            d.path = place(&d.path);
            d.serial = d.serial.as_deref().map(|s| renames.serial(s));
        }
        for n in &mut r.spec.nics {
            n.mac = n.mac.map(|m| renames.macs.get(&m).copied().unwrap_or(m));
            if let Some(s) = switches.get(&n.switch) {
                n.switch = s.clone();
            }
        }
        for d in &mut r.disks {
            d.serial = renames.serial(&d.serial);
            d.frozen = place(&d.frozen);
            d.parent_file = d.parent_file.as_deref().map(place);
        }
        if renames.drop_state {
            r.has_state = false;
            r.capture = None;
        } else if !c.state.is_empty() {
            let files = c.state.iter().map(|f| state_from(&f.path)).collect();
            tree.states.push((r.id, files));
        }
        if r.current {
            tree.head.current = Some(r.id);
        }
        tree.records.push(r);
    }
    for t in &m.tops {
        let top = Top {
            file: place(&t.file),
            parent: place(&t.parent),
        };
        tree.head.tops.insert(renames.serial(&t.serial), top);
    }
    Some(tree)
}

/// Whether importing `m` with `renames` drops memory state from any checkpoint.
pub fn drops_state(m: &Manifest, renames: &Renames) -> Vec<String> {
    if !renames.drop_state {
        return Vec::new();
    }
    m.checkpoints
        .iter()
        .filter(|c| c.record.has_state)
        .map(|c| c.record.name.clone())
        .collect()
}
