//! Export, import and clone through vireod's API with the fake worker (docs/export.md): an off
//! VM with a differencing VHDX exported (chain copied, locators relinked, `check` clean),
//! imported as a copy with a new identity and in place with its own, both VMs running side by
//! side and their disks independent; a saved VM exported and imported saved, its start
//! restoring; the compatibility report listing every problem and storing nothing; clone.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{spec_json, Vireod};
use serde_json::{json, Value};
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const T: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// `dir/base.vhdx` (BASE at 0) ← `dir/child.vhdx` (CHILD at 1 MiB); returns the child.
fn chain(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (base, child) = (dir.join("base.vhdx"), dir.join("child.vhdx"));
    let opts = CreateOptions {
        size: 16 * MIB,
        block_size: MIB as u32,
        ..Default::default()
    };
    let b = Vhdx::create(&base, &opts).unwrap();
    b.write(&sector(b"BASE"), 0).unwrap();
    b.flush().unwrap();
    drop(b);
    let c = Vhdx::create(
        &child,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(base),
            ..Default::default()
        },
    )
    .unwrap();
    c.write(&sector(b"CHILD"), MIB).unwrap();
    c.flush().unwrap();
    child
}

fn sector(tag: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[..tag.len()].copy_from_slice(tag);
    s
}

fn read_tag(path: &Path, at: u64) -> Vec<u8> {
    let d = Vhdx::open(path, &OpenOptions::read_only()).unwrap();
    let mut s = vec![0u8; 512];
    d.read(&mut s, at).unwrap();
    s.into_iter().take_while(|&b| b != 0).collect()
}

fn job_of(d: &Vireod, r: &common::daemon::Response) -> Value {
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let job = if v.get("job").is_some() {
        v["job"].clone()
    } else {
        v
    };
    let done = d.wait_job(job["id"].as_str().unwrap(), T);
    assert_eq!(done["state"], "completed", "{done}\n{}", d.log());
    done
}

fn export(d: &Vireod, vm: &str, dir: &Path) -> Value {
    let r = d.post_json(&format!("/v1/vms/{vm}/export"), &json!({ "dir": dir }));
    job_of(d, &r)
}

fn vm_with_disk(d: &Vireod, name: &str, disk: &Path) -> Value {
    let mut spec = spec_json(name, "");
    spec["disks"] = json!([{ "path": disk }]);
    d.create(&spec)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn export_then_import_as_copy_with_new_id_and_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let child = chain(&tmp.path().join("src"));
    let e1 = vm_with_disk(&d, "e1", &child);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();

    let job = export(&d, "e1", &out);
    assert_eq!(job["kind"], "export");
    assert_eq!(entries(&out), ["e1"], "only the finished folder");
    let folder = out.join("e1");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(folder.join("vm.json")).unwrap()).unwrap();
    assert_eq!(manifest["version"], 1);
    assert_eq!(manifest["state"], "off");
    assert_eq!(manifest["checkpoints"], json!([]));
    let files: Vec<PathBuf> = manifest["disks"][0]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| folder.join(f["path"].as_str().unwrap()))
        .collect();
    assert_eq!(files.len(), 2, "{manifest}");
    for f in &files {
        let report = Vhdx::check(f, false).unwrap();
        assert!(report.clean, "{}: {:?}", f.display(), report.problems);
    }
    // The copied child reads through the copied parent, not the original.
    let top = Vhdx::open(&files[0], &OpenOptions::read_only()).unwrap();
    let parent = top.info().parent.unwrap().path;
    assert_eq!(
        std::fs::canonicalize(parent).unwrap(),
        std::fs::canonicalize(&files[1]).unwrap()
    );
    drop(top);
    assert_eq!(read_tag(&files[0], 0), b"BASE");
    assert_eq!(read_tag(&files[0], MIB), b"CHILD");

    // A copy with a new identity, beside the original.
    let to = tmp.path().join("imported");
    std::fs::create_dir(&to).unwrap();
    let r = d.post_json(
        "/v1/vms/import",
        &json!({ "dir": folder, "copy": true, "to": to, "new_id": true, "name": "e2" }),
    );
    let reply = r.json();
    assert_eq!(reply["name"], "e2");
    assert_eq!(reply["warnings"], json!([]));
    job_of(&d, &r);
    let e2 = d.show("/v1/vms/e2");
    assert_ne!(e2["identity"]["id"], e1["identity"]["id"]);
    assert_ne!(
        e2["identity"]["disk_serials"],
        e1["identity"]["disk_serials"]
    );
    let e2_disk = PathBuf::from(e2["spec"]["disks"][0]["path"].as_str().unwrap());
    assert!(
        e2_disk.starts_with(std::fs::canonicalize(&to).unwrap().join("e2")),
        "{}",
        e2_disk.display()
    );
    assert_eq!(entries(&to), ["e2"]);
    for f in entries(&to.join("e2/disks")) {
        assert!(
            Vhdx::check(&to.join("e2/disks").join(f), false)
                .unwrap()
                .clean
        );
    }
    assert_eq!(read_tag(&e2_disk, MIB), b"CHILD");
    // Independent: a write to the copy leaves the original as it was.
    let w = Vhdx::open(&e2_disk, &Default::default()).unwrap();
    w.write(&sector(b"NEW"), 0).unwrap();
    w.flush().unwrap();
    drop(w);
    assert_eq!(read_tag(&e2_disk, 0), b"NEW");
    assert_eq!(read_tag(&child, 0), b"BASE");

    // Both run side by side.
    d.start_vm("e1");
    d.start_vm("e2");
    assert_eq!(
        (d.state("e1"), d.state("e2")),
        ("running".into(), "running".into())
    );
    for vm in ["e1", "e2"] {
        assert_eq!(d.post(&format!("/v1/vms/{vm}/turn-off")).status, 200);
    }

    // In place with its own identity: only once the original is gone (its id is taken).
    let r = d.post_json("/v1/vms/import", &json!({ "dir": folder, "name": "e3" }));
    let e = r.assert_error(422, "invalid");
    assert!(e.contains("--new-id"), "{e}");
    assert_eq!(d.request("DELETE", "/v1/vms/e1", None).status, 204);
    let r = d.post_json("/v1/vms/import", &json!({ "dir": folder }));
    job_of(&d, &r);
    let back = d.show("/v1/vms/e1");
    assert_eq!(back["identity"], e1["identity"]);
    let disk = PathBuf::from(back["spec"]["disks"][0]["path"].as_str().unwrap());
    assert_eq!(disk, std::fs::canonicalize(&files[0]).unwrap());
    d.start_vm("e1");
}

#[test]
fn the_report_lists_every_problem_and_stores_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    d.create(&spec_json("r1", ""));
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    export(&d, "r1", &out);
    // As if exported on a bigger host with a switch this one lacks.
    let path = out.join("r1/vm.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["spec"]["nics"] = json!([{ "switch": "lab", "name": "nic0" }]);
    m["spec"]["memory_bytes"] = json!(1u64 << 50);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let before = d.show("/v1/vms");

    let r = d.post_json("/v1/vms/import", &json!({ "dir": out.join("r1") }));
    let e = r.assert_error(422, "invalid");
    for fix in ["--name", "--new-id", "--switch lab=", "--memory"] {
        assert!(e.contains(fix), "{fix} missing from: {e}");
    }
    assert!(e.contains("4 problem(s)"), "{e}");
    assert_eq!(d.show("/v1/vms"), before, "nothing stored");
    assert_eq!(
        d.show("/v1/jobs").as_array().unwrap().len(),
        1,
        "no import job"
    );

    // An unknown format version is refused before anything else.
    m["version"] = json!(7);
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let e = d
        .post_json("/v1/vms/import", &json!({ "dir": out.join("r1") }))
        .assert_error(422, "invalid");
    assert!(e.contains("version 7"), "{e}");
    // Not an export at all.
    let e = d
        .post_json("/v1/vms/import", &json!({ "dir": tmp.path() }))
        .assert_error(422, "invalid");
    assert!(e.contains("vm.json"), "{e}");
}

#[test]
fn a_saved_vm_imports_saved_and_start_restores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let s1 = d.create(&spec_json("s1", ""));
    d.start_vm("s1");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // Running: exported from a temporary live checkpoint (state included), which goes after.
    let live_out = tmp.path().join("live-out");
    std::fs::create_dir(&live_out).unwrap();
    export(&d, "s1", &live_out);
    for f in ["vm.state", "memory.bin", "memory.crc", "working-set.bin"] {
        assert!(
            live_out.join("s1/saved").join(f).is_file(),
            "{f} not exported"
        );
    }
    assert_eq!(d.state("s1"), "running", "the VM ran on");
    assert_eq!(d.show("/v1/vms/s1/checkpoints"), json!([]), "temporary");
    let r = d.post("/v1/vms/s1/save");
    job_of(&d, &r);
    assert_eq!(d.state("s1"), "saved");
    export(&d, "s1", &out);
    for f in ["vm.state", "memory.bin", "memory.crc", "working-set.bin"] {
        assert!(out.join("s1/saved").join(f).is_file(), "{f} not exported");
    }
    assert_eq!(d.state("s1"), "saved", "export does not change the VM");

    // With a new id the saved state is dropped, with a warning.
    let r = d.post_json(
        "/v1/vms/import",
        &json!({ "dir": out.join("s1"), "copy": true, "to": tmp.path(), "new_id": true, "name": "s2" }),
    );
    assert!(
        r.json()["warnings"][0]
            .as_str()
            .unwrap()
            .contains("saved state is dropped"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    job_of(&d, &r);
    assert_eq!(d.state("s2"), "off");

    // Moved: removed here, imported in place, still saved; start continues it.
    assert_eq!(d.request("DELETE", "/v1/vms/s1", None).status, 204);
    let r = d.post_json("/v1/vms/import", &json!({ "dir": out.join("s1") }));
    job_of(&d, &r);
    let back = d.show("/v1/vms/s1");
    assert_eq!(back["state"], "saved");
    assert_eq!(back["identity"], s1["identity"]);
    d.start_vm("s1");
    let log = d.get("/v1/vms/s1/console/log");
    let text = String::from_utf8_lossy(&log.body);
    assert!(text.contains("fake guest s1 restored"), "{text}");
}

#[test]
fn clone_gives_an_independent_vm_with_a_new_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let child = chain(&tmp.path().join("src"));
    let c1 = vm_with_disk(&d, "c1", &child);
    let to = tmp.path().join("clones");
    std::fs::create_dir(&to).unwrap();
    let r = d.post_json("/v1/vms/c1/clone", &json!({ "name": "c2", "to": to }));
    let job = job_of(&d, &r);
    assert_eq!(job["kind"], "clone");
    let c2 = d.show("/v1/vms/c2");
    assert_ne!(c2["identity"]["id"], c1["identity"]["id"]);
    assert_ne!(
        c2["identity"]["disk_serials"],
        c1["identity"]["disk_serials"]
    );
    let disk = PathBuf::from(c2["spec"]["disks"][0]["path"].as_str().unwrap());
    assert_eq!(read_tag(&disk, 0), b"BASE");
    assert_eq!(read_tag(&disk, MIB), b"CHILD");
    d.start_vm("c1");
    d.start_vm("c2");
    // A running VM is cloned from a temporary live checkpoint: the clone starts off with the
    // same data, the VM runs on with no checkpoint left.
    let r = d.post_json("/v1/vms/c1/clone", &json!({ "name": "c3", "to": to }));
    assert!(
        r.json()["warnings"][0].as_str().unwrap().contains("runs"),
        "{:?}",
        r.json()
    );
    job_of(&d, &r);
    let c3 = d.show("/v1/vms/c3");
    assert_eq!(c3["state"], "off");
    assert_ne!(c3["identity"]["id"], c1["identity"]["id"]);
    let disk = PathBuf::from(c3["spec"]["disks"][0]["path"].as_str().unwrap());
    assert_eq!(read_tag(&disk, MIB), b"CHILD");
    assert_eq!(d.state("c1"), "running");
    assert_eq!(d.show("/v1/vms/c1/checkpoints"), json!([]), "temporary");
    let e = d
        .post_json("/v1/vms/c1/clone", &json!({ "name": "c2", "to": to }))
        .assert_error(422, "invalid");
    assert!(e.contains("already exists"), "{e}");
}
