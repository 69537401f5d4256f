//! Checkpoints through a real vireod (docs/checkpoints.md), on VMs without a worker: the disk
//! data a checkpoint froze comes back on apply, a tree with branches survives deleting its
//! middle, deleting the checkpoint the VM runs from merges the VM's data down, bad input is a
//! clear 4xx, and vireod killed at each step of create/apply/delete comes back consistent
//! (every disk file passes the VHDX check, the VM's data is the one it had before or after).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::daemon::{spec_json, Vireod};
use serde_json::{json, Value};
use vireo_vhdx::{CreateOptions, OpenOptions, Vhdx};

const LIMIT: Duration = Duration::from_secs(30);
const SIZE: u64 = 8 << 20;

fn base_disk(dir: &Path) -> PathBuf {
    let p = dir.join("base.vhdx");
    let opts = CreateOptions {
        size: SIZE,
        block_size: 1 << 20,
        ..CreateOptions::default()
    };
    drop(Vhdx::create(&p, &opts).unwrap());
    p
}

/// What the guest would write: 64 KiB of `byte` at 1 MiB (and 4 KiB of it at 0).
fn write(path: &Path, byte: u8) {
    let v = Vhdx::open(path, &OpenOptions::default()).unwrap();
    v.write(&vec![byte; 64 << 10], 1 << 20).unwrap();
    v.write(&[byte; 4096], 0).unwrap();
    v.flush().unwrap();
}

fn read(path: &Path) -> (u8, u8) {
    let v = Vhdx::open(path, &OpenOptions::read_only()).unwrap();
    let mut a = vec![0u8; 64 << 10];
    v.read(&mut a, 1 << 20).unwrap();
    assert!(a.iter().all(|&b| b == a[0]), "torn data at 1 MiB");
    let mut b = [0u8; 4096];
    v.read(&mut b, 0).unwrap();
    (a[0], b[0])
}

fn disk_path(d: &Vireod, vm: &str) -> PathBuf {
    PathBuf::from(
        d.show(&format!("/v1/vms/{vm}"))["spec"]["disks"][0]["path"]
            .as_str()
            .unwrap(),
    )
}

fn job(d: &Vireod, r: common::daemon::Response) -> Value {
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let j = d.wait_job(r.json()["id"].as_str().unwrap(), LIMIT);
    assert_eq!(j["state"], "completed", "{j}\n{}", d.log());
    j
}

fn checkpoint(d: &Vireod, vm: &str, name: &str) {
    job(
        d,
        d.post_json(
            &format!("/v1/vms/{vm}/checkpoints"),
            &json!({ "name": name }),
        ),
    );
}

fn apply(d: &Vireod, vm: &str, cp: &str) {
    job(d, d.post(&format!("/v1/vms/{vm}/checkpoints/{cp}/apply")));
}

fn delete(d: &Vireod, vm: &str, cp: &str) {
    job(
        d,
        d.request("DELETE", &format!("/v1/vms/{vm}/checkpoints/{cp}"), None),
    );
}

fn names(d: &Vireod, vm: &str) -> Vec<(String, Option<String>, bool)> {
    let list = d.show(&format!("/v1/vms/{vm}/checkpoints"));
    let by_id = |id: &Value| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|c| &c["id"] == id)
            .map(|c| c["name"].as_str().unwrap().to_owned())
    };
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                by_id(&c["parent"]),
                c["current"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Every VHDX file under `dirs` passes the check (a valid chain: a broken parent link fails it).
fn all_clean(dirs: &[&Path]) -> usize {
    let mut n = 0;
    for dir in dirs {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path
                    .extension()
                    .is_some_and(|x| x == "vhdx" || x == "avhdx")
                {
                    let r = Vhdx::check(&path, false).unwrap();
                    assert!(r.is_clean(), "{}: {r:?}", path.display());
                    n += 1;
                }
            }
        }
    }
    n
}

fn vm_with_disk(d: &Vireod, name: &str, disk: &Path) {
    let mut spec = spec_json(name, "");
    spec["disks"] = json!([{ "path": disk }]);
    d.create(&spec);
}

#[test]
fn apply_brings_the_checkpoint_back_and_the_tree_survives_deletes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let base = base_disk(tmp.path());
    vm_with_disk(&d, "cp", &base);
    write(&base, 0xA1);
    checkpoint(&d, "cp", "c1");
    let top1 = disk_path(&d, "cp");
    assert_ne!(top1, base, "the VM runs on a new child");
    assert_eq!(read(&top1), (0xA1, 0xA1));
    write(&top1, 0xB2);
    assert_eq!(read(&base), (0xA1, 0xA1), "the frozen file is untouched");
    let c1 = d.show("/v1/vms/cp/checkpoints/c1");
    assert_eq!(c1["disks"][0]["frozen"], json!(base));
    assert_eq!(c1["has_state"], false);
    assert_eq!(c1["current"], true);

    // Apply: the checkpoint's data; the discarded child is gone.
    apply(&d, "cp", "c1");
    let top2 = disk_path(&d, "cp");
    assert_ne!(top2, top1);
    assert!(!top1.exists(), "the discarded state's file is deleted");
    assert_eq!(read(&top2), (0xA1, 0xA1));
    assert_eq!(d.state("cp"), "off");

    // Branch one: c2; then back to c1 and branch two: c3.
    write(&top2, 0xC3);
    checkpoint(&d, "cp", "c2");
    apply(&d, "cp", "c1");
    write(&disk_path(&d, "cp"), 0xD4);
    checkpoint(&d, "cp", "c3");
    write(&disk_path(&d, "cp"), 0xE5);
    assert_eq!(
        names(&d, "cp"),
        vec![
            ("c1".into(), None, false),
            ("c2".into(), Some("c1".into()), false),
            ("c3".into(), Some("c1".into()), true),
        ]
    );
    // Deleting the middle: its file stays (two branches build on it), the record goes.
    delete(&d, "cp", "c1");
    assert_eq!(
        names(&d, "cp"),
        vec![("c2".into(), None, false), ("c3".into(), None, true)]
    );
    assert!(base.exists());
    assert_eq!(read(&disk_path(&d, "cp")), (0xE5, 0xE5));
    apply(&d, "cp", "c2");
    assert_eq!(read(&disk_path(&d, "cp")), (0xC3, 0xC3));
    write(&disk_path(&d, "cp"), 0xF6);
    // Deleting the one the VM runs from: the VM's data merges down into c2's file.
    let frozen_c2 = PathBuf::from(
        d.show("/v1/vms/cp/checkpoints/c2")["disks"][0]["frozen"]
            .as_str()
            .unwrap(),
    );
    let top = disk_path(&d, "cp");
    delete(&d, "cp", "c2");
    assert_eq!(
        disk_path(&d, "cp"),
        frozen_c2,
        "the VM runs on the merged file"
    );
    assert!(!top.exists(), "the merged child is deleted");
    assert_eq!(read(&frozen_c2), (0xF6, 0xF6));
    // c3 still applies, its branch intact.
    apply(&d, "cp", "c3");
    assert_eq!(read(&disk_path(&d, "cp")), (0xD4, 0xD4));
    let vm_dir = d.state_dir.join("vms");
    assert!(all_clean(&[tmp.path(), &vm_dir]) >= 3);
}

#[test]
fn bad_input_is_a_clear_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let raw = tmp.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    vm_with_disk(&d, "rawvm", &raw);
    let r = d.post("/v1/vms/rawvm/checkpoints");
    let m = r.assert_error(422, "invalid");
    assert!(m.contains("raw.img") && m.contains("not a VHDX"), "{m}");
    let base = base_disk(tmp.path());
    vm_with_disk(&d, "ok", &base);
    checkpoint(&d, "ok", "one");
    let r = d.post_json("/v1/vms/ok/checkpoints", &json!({"name": "one"}));
    assert!(r.assert_error(409, "conflict").contains("\"one\""));
    let r = d.post("/v1/vms/ok/checkpoints/two/apply");
    assert!(r.assert_error(404, "not_found").contains("\"two\""));
    let r = d.request("DELETE", "/v1/vms/ok/checkpoints/two", None);
    r.assert_error(404, "not_found");
    let r = d.post_json("/v1/vms/ok/checkpoints", &json!({"name": ""}));
    r.assert_error(422, "invalid");
    let r = d.post_json("/v1/vms/ok/checkpoints", &json!({"nom": "x"}));
    r.assert_error(400, "bad_request");
    // Default name: the VM's and the time.
    let r = d.post("/v1/vms/ok/checkpoints");
    job(&d, r);
    assert!(
        names(&d, "ok")[1].0.starts_with("ok-20"),
        "{:?}",
        names(&d, "ok")
    );
}

/// A running VM whose fake worker refuses `Checkpoint`; its name.
fn refusing_vm(d: &Vireod, dir: &Path) -> String {
    let disk = dir.join("refusing.vhdx");
    drop(
        Vhdx::create(
            &disk,
            &CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let mut spec = common::daemon::spec_json("refusing", "fake.refuse=checkpoint");
    spec["disks"] = json!([{ "path": disk }]);
    d.create(&spec);
    d.start_vm("refusing");
    "refusing".into()
}

/// Starts vireod with the fault hook at `point`, sends `req`, waits for it to die.
fn crash_at(state: &Path, point: &str, req: impl FnOnce(&Vireod)) {
    let mut d = with_fault(state, point);
    req(&d);
    let mut c = d.child.take().unwrap();
    let start = Instant::now();
    while c.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < LIMIT, "vireod did not die at {point}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its workers run on through its death (dropping the handle would kill them).
    std::mem::forget(d);
}

/// vireod with the fault hook at `point` (the workers it starts inherit it).
fn with_fault(state: &Path, point: &str) -> Vireod {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_vireo-fake-worker"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(state.with_extension("vireod.log"))
        .unwrap();
    let child = Vireod::command(state, &worker)
        .env("VIREO_CHECKPOINT_FAULT", point)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let d = Vireod {
        state_dir: state.to_owned(),
        sock: state.join("vireod.sock"),
        worker_bin: worker,
        child: Some(child),
        extra_args: Vec::new(),
        extra_env: Vec::new(),
    };
    common::daemon::wait_until(LIMIT, "vireod's socket", || {
        std::os::unix::net::UnixStream::connect(&d.sock).is_ok()
    });
    assert_eq!(d.get("/v1/host").status, 200, "{}", d.log());
    d
}

#[test]
fn vireod_killed_at_each_step_comes_back_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let base = base_disk(tmp.path());
    {
        let d = Vireod::start(&state);
        vm_with_disk(&d, "k", &base);
        write(&base, 0x11);
        let mut d = d;
        d.terminate();
    }
    let vm_dir = state.join("vms");
    // Create, cut short before its commit: rolled back (no checkpoint, disk as before).
    for point in ["create-intent", "create-child"] {
        crash_at(&state, point, |d| {
            let _ = d.post_json("/v1/vms/k/checkpoints", &json!({"name": "x"}));
        });
        let mut d = Vireod::start(&state);
        assert!(names(&d, "k").is_empty(), "{point}: {:?}", names(&d, "k"));
        assert_eq!(disk_path(&d, "k"), base, "{point}");
        assert_eq!(read(&base), (0x11, 0x11));
        all_clean(&[tmp.path()]);
        let leftovers: Vec<_> = std::fs::read_dir(
            vm_dir
                .join(d.show("/v1/vms/k")["identity"]["id"].as_str().unwrap())
                .join("checkpoints/disks"),
        )
        .into_iter()
        .flatten()
        .flatten()
        .collect();
        assert!(leftovers.is_empty(), "{point}: {leftovers:?}");
        d.terminate();
    }
    // Create cut short after its commit: the checkpoint is there.
    crash_at(&state, "create-commit", |d| {
        let _ = d.post_json("/v1/vms/k/checkpoints", &json!({"name": "a"}));
    });
    let mut d = Vireod::start(&state);
    assert_eq!(names(&d, "k"), vec![("a".into(), None, true)]);
    let top_a = disk_path(&d, "k");
    write(&top_a, 0x22);
    d.terminate();
    // Apply, before and after its commit.
    crash_at(&state, "apply-child", |d| {
        let _ = d.post("/v1/vms/k/checkpoints/a/apply");
    });
    let mut d = Vireod::start(&state);
    assert_eq!(disk_path(&d, "k"), top_a, "rolled back");
    assert_eq!(read(&top_a), (0x22, 0x22));
    d.terminate();
    crash_at(&state, "apply-commit", |d| {
        let _ = d.post("/v1/vms/k/checkpoints/a/apply");
    });
    let mut d = Vireod::start(&state);
    let top = disk_path(&d, "k");
    assert_ne!(top, top_a, "finished");
    assert!(!top_a.exists(), "the discarded file went during recovery");
    assert_eq!(read(&top), (0x11, 0x11));
    write(&top, 0x33);
    d.terminate();
    // Delete with its merge, killed right after the commit and after the merge.
    for point in ["delete-commit", "delete-merged"] {
        {
            let mut d = Vireod::start(&state);
            if names(&d, "k").is_empty() {
                checkpoint(&d, "k", "a");
                write(&disk_path(&d, "k"), 0x33);
            }
            d.terminate();
        }
        crash_at(&state, point, |d| {
            let _ = d.request("DELETE", "/v1/vms/k/checkpoints/a", None);
        });
        let mut d = Vireod::start(&state);
        common::daemon::wait_until(LIMIT, "the delete to finish", || disk_path(&d, "k") == base);
        assert!(names(&d, "k").is_empty());
        assert_eq!(read(&base), (0x33, 0x33), "{point}");
        all_clean(&[tmp.path()]);
        d.terminate();
    }
}

/// A running VM (the fake worker: its save writes `vm.state`/`memory.bin`): the checkpoint
/// captures its state, the VM runs on from its new disk; apply of a running VM is refused
/// without save_current/stop; with save_current the current state becomes a checkpoint too;
/// the applied checkpoint's state is restored by the next start.
#[test]
fn a_running_vm_is_checkpointed_with_its_state_and_runs_on() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let base = base_disk(tmp.path());
    vm_with_disk(&d, "run", &base);
    d.start_vm("run");
    let id = d.show("/v1/vms/run")["identity"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pid = d.worker_record(&id).unwrap().pid;
    checkpoint(&d, "run", "live");
    assert_eq!(d.state("run"), "running", "the VM runs on");
    assert_eq!(
        d.worker_record(&id).unwrap().pid,
        pid,
        "taken live: the same worker"
    );
    let c = d.show("/v1/vms/run/checkpoints/live");
    assert_eq!(c["has_state"], true);
    assert_eq!(c["capture"]["live"], true, "{c}");
    assert_eq!(c["capture"]["pause_us"], 1000, "the worker's report: {c}");
    let cp_dir = d
        .state_dir
        .join("vms")
        .join(&id)
        .join("checkpoints")
        .join(c["id"].as_str().unwrap());
    for f in ["vm.state", "memory.bin", "memory.crc", "working-set.bin"] {
        assert!(cp_dir.join(f).is_file(), "{f} missing from the checkpoint");
    }
    let child = disk_path(&d, "run");
    assert_ne!(child, base);
    assert!(child.is_file(), "the worker made the child");
    // A worker that refuses: nothing of the checkpoint is left, the VM runs on its file.
    let refused = refusing_vm(&d, tmp.path());
    let r = d.post_json(
        &format!("/v1/vms/{refused}/checkpoints"),
        &json!({"name": "no"}),
    );
    let j = d.wait_job(r.json()["id"].as_str().unwrap(), LIMIT);
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("refuses checkpoint"),
        "{j}"
    );
    assert!(names(&d, &refused).is_empty());
    assert_eq!(d.state(&refused), "running");
    // Paused stays paused.
    assert_eq!(d.post("/v1/vms/run/pause").status, 200);
    checkpoint(&d, "run", "paused");
    assert_eq!(d.state("run"), "paused");
    // Apply on a running VM: refused, then with save_current.
    let r = d.post("/v1/vms/run/checkpoints/live/apply");
    assert!(r.assert_error(409, "conflict").contains("save_current"));
    job(
        &d,
        d.post_json(
            "/v1/vms/run/checkpoints/live/apply",
            &json!({"save_current": true}),
        ),
    );
    assert_eq!(d.state("run"), "saved");
    let n = names(&d, "run");
    assert_eq!(n.len(), 3, "{n:?}");
    assert!(n[2].0.starts_with("run-before-live"), "{n:?}");
    assert!(n[0].2, "the VM runs from 'live': {n:?}");
    d.start_vm("run");
    let log = d.get("/v1/vms/run/console/log");
    let text = String::from_utf8_lossy(&log.body);
    assert!(text.contains("restored"), "{text}");
    // Deleting a checkpoint another one builds on ('run-before-live' froze its child) while
    // the VM runs: the record goes, its file stays in the chain, the VM never stops.
    let r = d.request("DELETE", "/v1/vms/run/checkpoints/paused", None);
    let j = d.wait_job(r.json()["id"].as_str().unwrap(), LIMIT);
    assert_eq!(j["state"], "completed", "{j}");
    assert_eq!(d.state("run"), "running");
    all_clean(&[tmp.path()]);
}

fn apply_in_place(d: &Vireod, vm: &str, cp: &str) -> common::daemon::Response {
    d.post_json(
        &format!("/v1/vms/{vm}/checkpoints/{cp}/apply"),
        &json!({"keep_running": true}),
    )
}

fn vm_id(d: &Vireod, vm: &str) -> String {
    d.show(&format!("/v1/vms/{vm}"))["identity"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The AVHDX files in the VM's checkpoint disks folder.
fn children_on_disk(d: &Vireod, vm: &str) -> Vec<PathBuf> {
    let dir = d
        .state_dir
        .join("vms")
        .join(vm_id(d, vm))
        .join("checkpoints/disks");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// `keep_running` (the fake worker makes the children it is asked for and reports its disks
/// on them): the same worker goes on, on a new child of the checkpoint's frozen file, "now"
/// under the checkpoint, the VM's discarded child deleted; again and again; a paused VM stays
/// paused. Refused with 409 and nothing changed: a checkpoint without state, one of other
/// hardware; a bad combination is 422; a worker that refuses leaves no file behind.
#[test]
fn keep_running_applies_in_the_running_worker_or_is_refused_with_nothing_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let base = base_disk(tmp.path());
    vm_with_disk(&d, "ip", &base);
    checkpoint(&d, "ip", "cold");
    let cold_top = disk_path(&d, "ip");
    d.start_vm("ip");
    let id = vm_id(&d, "ip");
    let pid = d.worker_record(&id).unwrap().pid;
    checkpoint(&d, "ip", "live");
    let top = disk_path(&d, "ip");
    assert_ne!(top, cold_top);

    let why = apply_in_place(&d, "ip", "cold").assert_error(409, "conflict");
    assert!(
        why.contains("no memory state") && why.contains("--stop"),
        "{why}"
    );
    let r = d.post_json(
        "/v1/vms/ip/checkpoints/live/apply",
        &json!({"keep_running": true, "stop": true}),
    );
    assert!(r.assert_error(422, "invalid").contains("keep_running"));
    assert_eq!(d.state("ip"), "running");
    assert_eq!(disk_path(&d, "ip"), top, "nothing changed");

    // Applied twice: each time a new child of the frozen file, the one before deleted.
    let frozen = cold_top.clone();
    let mut prev = top.clone();
    for round in 0..2 {
        job(&d, apply_in_place(&d, "ip", "live"));
        assert_eq!(d.state("ip"), "running", "{round}");
        assert_eq!(d.worker_record(&id).unwrap().pid, pid, "the same worker");
        let now = disk_path(&d, "ip");
        assert_ne!(now, prev, "{round}");
        assert!(!prev.exists(), "{round}: the discarded file went");
        let v = Vhdx::open(&now, &OpenOptions::read_only()).unwrap();
        assert_eq!(v.info().parent.unwrap().path, frozen, "{round}");
        let n = names(&d, "ip");
        assert!(
            n.contains(&("live".into(), Some("cold".into()), true)),
            "{n:?}"
        );
        prev = now;
    }
    assert_eq!(
        children_on_disk(&d, "ip").len(),
        2,
        "cold's frozen file and now"
    );

    // Paused stays paused.
    assert_eq!(d.post("/v1/vms/ip/pause").status, 200);
    job(&d, apply_in_place(&d, "ip", "live"));
    assert_eq!(d.state("ip"), "paused");
    assert_eq!(d.post("/v1/vms/ip/resume").status, 200);

    // Other hardware since: refused, nothing changed.
    assert_eq!(d.post("/v1/vms/ip/turn-off").status, 200);
    let mut spec = d.show("/v1/vms/ip")["spec"].clone();
    spec["memory_bytes"] = json!(64 << 20);
    let body = serde_json::to_vec(&spec).unwrap();
    let r = d.request("PUT", "/v1/vms/ip/spec", Some(("application/json", &body)));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    d.start_vm("ip");
    let before = disk_path(&d, "ip");
    let why = apply_in_place(&d, "ip", "live").assert_error(409, "conflict");
    assert!(
        why.contains("memory") && why.contains("--save-current"),
        "{why}"
    );
    assert_eq!(disk_path(&d, "ip"), before);
    assert_eq!(d.state("ip"), "running");

    // A worker that refuses: the VM as before, no child left.
    let mut spec = spec_json("nope", "fake.refuse=apply");
    let disk = tmp.path().join("nope.vhdx");
    drop(
        Vhdx::create(
            &disk,
            &CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    spec["disks"] = json!([{ "path": disk }]);
    d.create(&spec);
    d.start_vm("nope");
    checkpoint(&d, "nope", "c");
    let top = disk_path(&d, "nope");
    let r = apply_in_place(&d, "nope", "c");
    let j = d.wait_job(r.json()["id"].as_str().unwrap(), LIMIT);
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"].as_str().unwrap().contains("refuses apply"),
        "{j}"
    );
    assert_eq!(disk_path(&d, "nope"), top);
    assert_eq!(children_on_disk(&d, "nope"), vec![top]);
    assert_eq!(d.state("nope"), "running");
    all_clean(&[tmp.path()]);
}

/// vireod killed at each step of an in-place apply (the worker runs on), and the worker
/// killed at each of its steps: after a restart the VM runs from the checkpoint (committed)
/// or as before (rolled back), every AVHDX in its folder is its disk or a frozen file, and
/// every chain checks clean.
#[test]
fn an_in_place_apply_cut_short_anywhere_comes_back_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let base = base_disk(tmp.path());
    // One handle throughout: dropping one kills the workers, which must outlive vireod.
    let mut d = Vireod::start(&state);
    vm_with_disk(&d, "k", &base);
    d.start_vm("k");
    checkpoint(&d, "k", "a");
    let id = vm_id(&d, "k");
    let pid = d.worker_record(&id).unwrap().pid;
    for (point, kept) in [
        ("apply-live-intent", false),
        ("apply-live-answered", true),
        ("apply-live-commit", true),
    ] {
        let before = disk_path(&d, "k");
        d.terminate();
        crash_at(&state, point, |d| {
            let r = apply_in_place(d, "k", "a");
            assert_eq!(
                r.status,
                202,
                "{point}: {:?}",
                String::from_utf8_lossy(&r.body)
            );
        });
        d.restart();
        assert_eq!(d.state("k"), "running", "{point}: the worker ran on");
        assert_eq!(d.worker_record(&id).unwrap().pid, pid, "{point}");
        let now = disk_path(&d, "k");
        assert_eq!(
            now != before,
            kept,
            "{point}: {} → {}",
            before.display(),
            now.display()
        );
        assert!(now.is_file(), "{point}");
        assert_eq!(before.exists(), !kept, "{point}: the discarded file");
        assert_eq!(
            children_on_disk(&d, "k"),
            vec![now.clone()],
            "{point}: nothing stray"
        );
        assert_eq!(names(&d, "k"), vec![("a".into(), None, true)], "{point}");
        all_clean(&[tmp.path()]);
    }
    d.terminate();
    // The worker killed: with its disks past the swap the apply is kept (the VM is down
    // either way), before it rolled back.
    for point in ["worker-child", "worker-apply-switched"] {
        let mut d = with_fault(&state, point);
        if d.state("k") == "running" {
            assert_eq!(d.post("/v1/vms/k/turn-off").status, 200);
        }
        d.start_vm("k");
        let before = disk_path(&d, "k");
        let r = apply_in_place(&d, "k", "a");
        let j = d.wait_job(r.json()["id"].as_str().unwrap(), LIMIT);
        assert_eq!(j["state"], "failed", "{point}: {j}");
        let now = disk_path(&d, "k");
        assert_ne!(now, before, "{point}: the children were complete: kept");
        assert!(!before.exists(), "{point}");
        assert_ne!(d.state("k"), "running", "{point}");
        d.terminate();
        let mut d = Vireod::start(&state);
        assert_eq!(
            disk_path(&d, "k"),
            now,
            "{point}: settled before the restart"
        );
        assert_eq!(children_on_disk(&d, "k"), vec![now], "{point}");
        all_clean(&[tmp.path()]);
        d.terminate();
    }
}

/// `vm move-storage` of an off VM with a checkpoint, vireod killed at each step of the move:
/// before its commit the VM and its checkpoint are on the old files and the copies are gone;
/// after it, on the copies in the destination with the old files gone. Either way every VHDX
/// left is one the tree uses and checks clean, and the data of the VM and of the checkpoint is
/// intact. The last round moves without a fault, back to where the files started.
#[test]
fn a_checkpointed_move_cut_short_anywhere_leaves_one_whole_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let base = base_disk(tmp.path());
    {
        let mut d = Vireod::start(&state);
        vm_with_disk(&d, "m", &base);
        write(&base, 0x21);
        checkpoint(&d, "m", "one");
        write(&disk_path(&d, "m"), 0x22);
        d.terminate();
    }
    let frozen = |d: &Vireod| -> PathBuf {
        let list = d.show("/v1/vms/m/checkpoints");
        PathBuf::from(list[0]["disks"][0]["frozen"].as_str().unwrap())
    };
    let mut home = tmp.path().to_path_buf();
    for (round, (point, moved)) in [
        ("move-intent", false),
        ("move-copied", false),
        ("move-commit", true),
    ]
    .into_iter()
    .enumerate()
    {
        let to = tmp.path().join(format!("to{round}"));
        crash_at(&state, point, |d| {
            let _ = d.post_json("/v1/vms/m/move-storage", &json!({ "to": to }));
        });
        let d = Vireod::start(&state);
        assert_eq!(names(&d, "m").len(), 1, "{point}");
        if moved {
            home = std::fs::canonicalize(&to).unwrap();
        }
        let (disk, base_now) = (disk_path(&d, "m"), frozen(&d));
        assert!(
            base_now.starts_with(&home),
            "{point}: {}",
            base_now.display()
        );
        assert_eq!(base_now.file_name(), base.file_name(), "{point}");
        assert_eq!(read(&disk), (0x22, 0x22), "{point}");
        assert_eq!(read(&base_now), (0x21, 0x21), "{point}");
        // Two VHDX files anywhere (the base and the VM's child): no copy and no old file left.
        assert_eq!(all_clean(&[tmp.path()]), 2, "{point}: files left behind");
        if !moved {
            assert!(
                base.exists(),
                "{point}: the old base went before the commit"
            );
        }
        // The checkpoint applies from wherever its files are now.
        apply(&d, "m", "one");
        assert_eq!(read(&disk_path(&d, "m")), (0x21, 0x21), "{point}");
        write(&disk_path(&d, "m"), 0x22);
        assert_eq!(all_clean(&[tmp.path()]), 2, "{point}: after the apply");
    }
    // And a move that is not cut short carries it all on, to a third folder.
    let mut d = Vireod::start(&state);
    let to = tmp.path().join("last");
    job(
        &d,
        d.post_json("/v1/vms/m/move-storage", &json!({ "to": to })),
    );
    let to = std::fs::canonicalize(&to).unwrap();
    assert!(disk_path(&d, "m").starts_with(&to));
    assert!(frozen(&d).starts_with(&to));
    assert_eq!(all_clean(&[tmp.path()]), 2);
    apply(&d, "m", "one");
    assert_eq!(read(&disk_path(&d, "m")), (0x21, 0x21));
    d.terminate();
}
