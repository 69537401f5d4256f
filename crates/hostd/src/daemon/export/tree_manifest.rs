//! The checkpoint tree in an export manifest (format version 2, docs/export.md): each
//! checkpoint's record with its paths made relative to the folder, its state files, every disk
//! file of the tree once with the file it is a differencing child of, and the VM's running tops.
//! [`check`] is pure: an import trusts none of it before every path stays inside the folder,
//! every parent named is in the manifest and no parent chain loops.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vireo_api::Checkpoint;

use super::manifest::{FileEntry, Manifest};

/// One disk file of the tree (a base, a frozen file or a running top), copied once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeFileEntry {
    pub path: PathBuf,
    pub size: u64,
    /// The tree file this one is a differencing child of (relinked to it on a copy).
    #[serde(default)]
    pub parent: Option<PathBuf>,
}

/// A disk's running top: the file the VM writes (its `disks[i].chain[0]`) over a checkpoint's
/// frozen file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopEntry {
    pub serial: String,
    pub file: PathBuf,
    pub parent: PathBuf,
}

/// A checkpoint: the record as vireod stores it (`current` marks "now"), its paths relative to
/// the folder, and its state files (`checkpoints/<id>/...`) when it has state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointEntry {
    pub record: Checkpoint,
    #[serde(default)]
    pub state: Vec<FileEntry>,
}

pub fn inside(p: &Path) -> bool {
    !p.as_os_str().is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Every problem of the tree part of `m`, the first one found as one line.
pub fn check(m: &Manifest) -> Result<(), String> {
    if m.checkpoints.is_empty() && m.tree.is_empty() && m.tops.is_empty() {
        return Ok(());
    }
    let outside = |p: &Path| format!("{} is not a path inside the folder", p.display());
    let mut files: BTreeMap<&Path, Option<&Path>> = BTreeMap::new();
    for f in &m.tree {
        for p in std::iter::once(&f.path).chain(&f.parent) {
            if !inside(p) {
                return Err(outside(p));
            }
        }
        if files.insert(&f.path, f.parent.as_deref()).is_some() {
            return Err(format!("tree file {} is listed twice", f.path.display()));
        }
    }
    for f in &m.tree {
        walk_parents(&files, &f.path)?;
    }
    let boot: BTreeSet<&Path> = std::iter::once(&m.kernel)
        .chain(&m.initrd)
        .chain(&m.boot)
        .map(|f| f.path.as_path())
        .collect();
    let known_disk = |p: &Path, what: &str| -> Result<(), String> {
        if !inside(p) {
            return Err(outside(p));
        }
        if !files.contains_key(p) {
            return Err(format!(
                "{what} {} is not one of the tree's files",
                p.display()
            ));
        }
        Ok(())
    };
    let mut serials = BTreeSet::new();
    for t in &m.tops {
        known_disk(&t.file, "running top")?;
        known_disk(&t.parent, "running top's parent")?;
        if !serials.insert(&t.serial) {
            return Err(format!("disk {} has two running tops", t.serial));
        }
    }
    for d in &m.disks {
        for f in &d.chain {
            known_disk(&f.path, "the VM's disk file")?;
        }
    }
    let ids: BTreeMap<Uuid, Option<Uuid>> = m
        .checkpoints
        .iter()
        .map(|c| (c.record.id, c.record.parent))
        .collect();
    if ids.len() != m.checkpoints.len() {
        return Err("two checkpoints have one id".into());
    }
    let names: BTreeSet<&str> = m
        .checkpoints
        .iter()
        .map(|c| c.record.name.as_str())
        .collect();
    if names.len() != m.checkpoints.len() {
        return Err("two checkpoints have one name".into());
    }
    if m.checkpoints.iter().filter(|c| c.record.current).count() > 1 {
        return Err("more than one checkpoint is marked current".into());
    }
    for c in &m.checkpoints {
        let r = &c.record;
        let what = format!("checkpoint {:?}", r.name);
        // Up the tree: every parent present, no loop (at most one step per checkpoint).
        let mut at = r.parent;
        let mut steps = 0;
        while let Some(p) = at {
            at = *ids.get(&p).ok_or_else(|| {
                format!("{what}'s parent {p} is not in the manifest: the export is damaged")
            })?;
            steps += 1;
            if steps > ids.len() {
                return Err(format!(
                    "{what}'s parents form a loop: the export is damaged"
                ));
            }
        }
        for d in &r.disks {
            known_disk(&d.frozen, &format!("{what}'s frozen file"))?;
            if let Some(p) = &d.parent_file {
                known_disk(p, &format!("{what}'s parent file"))?;
            }
        }
        for d in &r.spec.disks {
            known_disk(&d.path, &format!("{what}'s disk"))?;
        }
        for p in std::iter::once(&r.spec.kernel).chain(&r.spec.initrd) {
            if !inside(p) {
                return Err(outside(p));
            }
            if !boot.contains(p.as_path()) {
                return Err(format!(
                    "{what}'s boot file {} is not exported",
                    p.display()
                ));
            }
        }
        let own = Path::new("checkpoints").join(r.id.to_string());
        for f in &c.state {
            if !inside(&f.path) || f.path.parent() != Some(own.as_path()) {
                return Err(format!(
                    "{what}'s state file {} is not in {}",
                    f.path.display(),
                    own.display()
                ));
            }
        }
        if r.has_state && c.state.is_empty() {
            return Err(format!("{what} has state, but no state file is listed"));
        }
    }
    Ok(())
}

/// Follows `start`'s parents: each must be a tree file, and the chain must end.
fn walk_parents(files: &BTreeMap<&Path, Option<&Path>>, start: &Path) -> Result<(), String> {
    let mut at = start;
    for _ in 0..=files.len() {
        match files.get(at) {
            Some(Some(parent)) => {
                if !files.contains_key(parent) {
                    return Err(format!(
                        "{}'s parent {} is not in the manifest: the export is damaged",
                        at.display(),
                        parent.display()
                    ));
                }
                at = parent;
            }
            _ => return Ok(()),
        }
    }
    Err(format!(
        "the parents of {} form a loop: the export is damaged",
        start.display()
    ))
}

/// The tree files parents first, so each is relinked after the file it names is.
pub fn parents_first(tree: &[TreeFileEntry]) -> Vec<&TreeFileEntry> {
    let by_path: BTreeMap<&Path, &TreeFileEntry> =
        tree.iter().map(|f| (f.path.as_path(), f)).collect();
    let depth = |f: &TreeFileEntry| {
        let mut n = 0;
        let mut at = f.parent.as_deref();
        while let Some(p) = at.filter(|_| n <= tree.len()) {
            n += 1;
            at = by_path.get(p).and_then(|e| e.parent.as_deref());
        }
        n
    };
    let mut out: Vec<&TreeFileEntry> = tree.iter().collect();
    out.sort_by_key(|f| depth(f));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn disk(path: &str, serial: &str) -> serde_json::Value {
        json!({ "path": path, "serial": serial })
    }

    fn spec(disk_path: &str) -> serde_json::Value {
        json!({ "version": 1, "name": "m", "vcpus": 1, "memory_bytes": 33554432,
                "kernel": "boot/probe.elf", "disks": [disk(disk_path, "s0")] })
    }

    fn record(
        id: Uuid,
        name: &str,
        parent: Option<Uuid>,
        frozen: &str,
        under: Option<&str>,
    ) -> serde_json::Value {
        json!({
            "record": {
                "id": id, "vm_id": Uuid::nil(), "name": name, "parent": parent,
                "created_at": 1, "spec": spec(frozen),
                "disks": [{ "serial": "s0", "frozen": frozen, "parent_file": under }],
                "has_state": true, "current": false, "automatic": false
            },
            "state": [{ "path": format!("checkpoints/{id}/vm.state"), "size": 3 }]
        })
    }

    /// A VM on `top` over `second`'s frozen file over `first`'s (the base): a well-formed tree.
    fn manifest() -> (serde_json::Value, Uuid, Uuid) {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut second = record(
            b,
            "second",
            Some(a),
            "disks/1-mid.avhdx",
            Some("disks/0-base.vhdx"),
        );
        second["record"]["current"] = json!(true);
        let m = json!({
            "format": "vireo-vm-export", "version": 2, "exported_at": 1,
            "spec": spec("disks/2-top.avhdx"),
            "identity": { "id": Uuid::new_v4(), "macs": [], "disk_serials": ["s0"] },
            "state": "off",
            "kernel": { "path": "boot/probe.elf", "size": 1 },
            "disks": [{ "chain": [
                { "path": "disks/2-top.avhdx", "size": 1 },
                { "path": "disks/1-mid.avhdx", "size": 1 },
                { "path": "disks/0-base.vhdx", "size": 1 } ] }],
            "checkpoints": [
                record(a, "first", None, "disks/0-base.vhdx", None),
                second
            ],
            "tree": [
                { "path": "disks/0-base.vhdx", "size": 1 },
                { "path": "disks/1-mid.avhdx", "size": 1, "parent": "disks/0-base.vhdx" },
                { "path": "disks/2-top.avhdx", "size": 1, "parent": "disks/1-mid.avhdx" }
            ],
            "tops": [{ "serial": "s0", "file": "disks/2-top.avhdx", "parent": "disks/1-mid.avhdx" }]
        });
        (m, a, b)
    }

    fn checked(v: serde_json::Value) -> Result<(), String> {
        let m: Manifest = serde_json::from_value(v).expect("parses");
        m.check()
    }

    #[test]
    fn a_whole_tree_passes_and_its_files_are_listed_once() {
        let (v, _, _) = manifest();
        checked(v.clone()).unwrap();
        let m: Manifest = serde_json::from_value(v).unwrap();
        // kernel + 3 disk files + 2 state files, though the chain repeats the tree's files.
        assert_eq!(m.files().len(), 6);
        let order: Vec<_> = parents_first(&m.tree)
            .iter()
            .map(|f| f.path.clone())
            .collect();
        assert_eq!(order[0], Path::new("disks/0-base.vhdx"));
        assert_eq!(order[2], Path::new("disks/2-top.avhdx"));
    }

    #[test]
    fn paths_that_leave_the_folder_are_refused() {
        for (at, bad) in [
            ("/tree/1/parent", "../0-base.vhdx"),
            ("/tree/0/path", "/etc/passwd"),
            ("/checkpoints/0/record/disks/0/frozen", "disks/../../x"),
            ("/checkpoints/1/state/0/path", "checkpoints/../vm.json"),
            ("/tops/0/file", ""),
            ("/checkpoints/0/record/spec/kernel", "/boot/vmlinuz"),
        ] {
            let (mut v, _, _) = manifest();
            *v.pointer_mut(at).unwrap() = json!(bad);
            let e = checked(v).expect_err(at);
            assert!(
                e.contains("not a path inside")
                    || e.contains("is not in")
                    || e.contains("not one of"),
                "{at}: {e}"
            );
        }
    }

    #[test]
    fn a_parent_missing_from_the_manifest_is_refused() {
        let (mut v, _, _) = manifest();
        v["checkpoints"][1]["record"]["parent"] = json!(Uuid::new_v4());
        let e = checked(v).unwrap_err();
        assert!(
            e.contains("\"second\"'s parent") && e.contains("not in the manifest"),
            "{e}"
        );

        let (mut v, _, _) = manifest();
        v["tree"][2]["parent"] = json!("disks/9-gone.avhdx");
        let e = checked(v).unwrap_err();
        assert!(
            e.contains("9-gone") && e.contains("not in the manifest"),
            "{e}"
        );

        let (mut v, _, _) = manifest();
        v["checkpoints"][0]["record"]["disks"][0]["frozen"] = json!("disks/7-other.vhdx");
        let e = checked(v).unwrap_err();
        assert!(e.contains("not one of the tree's files"), "{e}");
    }

    #[test]
    fn loops_are_refused() {
        let (mut v, _, b) = manifest();
        v["checkpoints"][0]["record"]["parent"] = json!(b);
        let e = checked(v).unwrap_err();
        assert!(e.contains("loop"), "{e}");
        let (mut v, a, _) = manifest();
        v["checkpoints"][0]["record"]["parent"] = json!(a);
        let e = checked(v).unwrap_err();
        assert!(e.contains("loop"), "{e}");
        let (mut v, _, _) = manifest();
        v["tree"][0]["parent"] = json!("disks/2-top.avhdx");
        let e = checked(v).unwrap_err();
        assert!(e.contains("loop"), "{e}");
    }

    #[test]
    fn damaged_records_are_refused() {
        let (mut v, a, _) = manifest();
        v["checkpoints"][1]["record"]["id"] = json!(a);
        assert!(checked(v).unwrap_err().contains("one id"));
        let (mut v, _, _) = manifest();
        v["checkpoints"][1]["record"]["name"] = json!("first");
        assert!(checked(v).unwrap_err().contains("one name"));
        let (mut v, _, _) = manifest();
        v["checkpoints"][0]["record"]["current"] = json!(true);
        assert!(checked(v).unwrap_err().contains("current"));
        let (mut v, _, _) = manifest();
        v["checkpoints"][0]["state"] = json!([]);
        assert!(checked(v).unwrap_err().contains("no state file"));
        let (mut v, _, b) = manifest();
        v["checkpoints"][0]["state"][0]["path"] = json!(format!("checkpoints/{b}/vm.state"));
        assert!(checked(v).unwrap_err().contains("is not in checkpoints/"));
        let (mut v, _, _) = manifest();
        v["version"] = json!(1);
        assert!(checked(v)
            .unwrap_err()
            .contains("version 1 has no checkpoint tree"));
    }
}
