//! Save and restore through vireod's API with the fake worker: `save` → a job, `saving` then
//! `saved`, the worker gone and the files in `<vm-dir>/saved/`; a SIGKILLed and restarted
//! vireod keeps the VM saved; `start` restores (the worker is told `restore_from`) and the
//! files go once it runs; a damaged save fails the start with the file's name and keeps the
//! VM saved with its files; turn-off discards; a refused save leaves the VM running; saving an
//! off VM and changing a saved VM's spec are 409; a large VM's restore gets time for its
//! memory.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::daemon::{alive, spec_json, Vireod};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

fn saved_dir(d: &Vireod, vm: &Value) -> PathBuf {
    d.state_dir
        .join("vms")
        .join(vm["identity"]["id"].as_str().unwrap())
        .join("saved")
}

fn save(d: &Vireod, name: &str) -> Value {
    let r = d.post(&format!("/v1/vms/{name}/save"));
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let job = r.json();
    assert_eq!(job["kind"], "save");
    d.wait_job(job["id"].as_str().unwrap(), T)
}

#[test]
fn save_survives_a_vireod_kill_and_start_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let vm = d.create(&spec_json("s1", ""));
    let id = vm["identity"]["id"].as_str().unwrap().to_owned();
    let dir = saved_dir(&d, &vm);

    // An off VM cannot be saved.
    let e = d.post("/v1/vms/s1/save").assert_error(409, "conflict");
    assert!(e.contains("off"), "{e}");

    d.start_vm("s1");
    let pid = d.worker_record(&id).unwrap().pid;
    let job = save(&d, "s1");
    assert_eq!(job["state"], "completed", "{job}\n{}", d.log());
    assert_eq!(d.state("s1"), "saved");
    assert!(!alive(pid), "the worker is still there");
    assert!(dir.join("vm.state").is_file() && dir.join("memory.bin").is_file());

    // The spec cannot change while saved; starting it twice is not possible either.
    let spec = d.show("/v1/vms/s1")["spec"].clone();
    let r = d.request(
        "PUT",
        "/v1/vms/s1/spec",
        Some(("application/json", spec.to_string().as_bytes())),
    );
    let e = r.assert_error(409, "conflict");
    assert!(e.contains("saved"), "{e}");

    d.kill9();
    d.restart();
    assert_eq!(d.state("s1"), "saved");
    assert!(dir.join("vm.state").is_file());

    d.start_vm("s1");
    assert_eq!(d.state("s1"), "running");
    let launch: Value = serde_json::from_slice(
        &std::fs::read(d.state_dir.join("vms").join(&id).join("spec.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(launch["restore_from"], dir.display().to_string());
    common::daemon::wait_until(T, "the saved state deleted", || !dir.exists());
    let log = d.get("/v1/vms/s1/console/log");
    let text = String::from_utf8_lossy(&log.body);
    assert!(text.contains("fake guest s1 restored"), "{text}");

    // A start from Off boots (no restore_from).
    d.post("/v1/vms/s1/turn-off");
    d.start_vm("s1");
    let launch: Value = serde_json::from_slice(
        &std::fs::read(d.state_dir.join("vms").join(&id).join("spec.json")).unwrap(),
    )
    .unwrap();
    assert!(launch.get("restore_from").is_none(), "{launch}");
}

#[test]
fn a_damaged_save_fails_the_start_and_is_kept_and_turn_off_discards_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let vm = d.create(&spec_json("s2", ""));
    let dir = saved_dir(&d, &vm);
    d.start_vm("s2");
    assert_eq!(save(&d, "s2")["state"], "completed");
    std::fs::write(dir.join("vm.state"), b"garbage").unwrap();

    let r = d.post("/v1/vms/s2/start");
    assert_eq!(r.status, 202);
    let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "failed", "{job}");
    let err = job["error"].to_string();
    assert!(
        err.contains(&dir.join("vm.state").display().to_string()),
        "{err}"
    );
    assert_eq!(d.state("s2"), "saved");
    assert_eq!(std::fs::read(dir.join("vm.state")).unwrap(), b"garbage");

    // Turn-off discards the saved state: off, files gone.
    let r = d.post("/v1/vms/s2/turn-off");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(d.state("s2"), "off");
    assert!(!dir.exists());
}

#[test]
fn a_refused_save_leaves_the_vm_running_and_remove_deletes_a_save() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    d.create(&spec_json("s3", "fake.refuse=save"));
    d.start_vm("s3");
    let job = save(&d, "s3");
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].to_string().contains("refuses save"), "{job}");
    assert_eq!(d.state("s3"), "running");

    let vm = d.create(&spec_json("s4", ""));
    let dir = saved_dir(&d, &vm);
    d.start_vm("s4");
    d.post("/v1/vms/s4/pause");
    assert_eq!(save(&d, "s4")["state"], "completed");
    assert!(dir.is_dir());
    let r = d.request("DELETE", "/v1/vms/s4", None);
    assert_eq!(r.status, 204, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(!dir.exists());
}

/// A restore that reads all of a large VM's memory before its worker answers (an eager
/// restore) gets time for that memory: 64 MiB/s on top of the start's limit, here 2 s
/// (`VIREOD_TEST_START_TIMEOUT_MS`) instead of 30. A 1 GiB VM's worker answering after 5 s
/// starts (2 + 16 s); a 32 MiB one's (2 + 0 s) is turned off, as any start that large was
/// with the base limit alone.
#[test]
fn a_large_vms_restore_gets_time_for_its_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_env(
        &tmp.path().join("state"),
        &[("VIREOD_TEST_START_TIMEOUT_MS", "2000")],
    );
    let restore = |name: &str, memory: u64| {
        let mut spec = spec_json(name, "fake.restore_bind_ms=5000");
        spec["memory_bytes"] = memory.into();
        d.create(&spec);
        d.start_vm(name);
        assert_eq!(save(&d, name)["state"], "completed");
        let r = d.post(&format!("/v1/vms/{name}/start"));
        assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
        d.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(60))
    };
    let job = restore("large", 1 << 30);
    assert_eq!(job["state"], "completed", "{job}\n{}", d.log());
    assert_eq!(d.state("large"), "running");
    let job = restore("small", 32 << 20);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["error"].to_string().contains("within 2s"), "{job}");
}
