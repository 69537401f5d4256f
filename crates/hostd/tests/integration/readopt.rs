//! vireod killed (SIGKILL) or stopped (SIGTERM) while VMs run, then restarted: workers are
//! re-adopted (same processes, still controllable), workers that died meanwhile are accounted
//! for, the inventory is identical, and automatic start happens.

use crate::common;

use std::time::{Duration, Instant};

use common::daemon::{alive, signal, spec_json, wait_until, Vireod};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

fn id_of(vm: &Value) -> String {
    vm["identity"]["id"].as_str().unwrap().to_owned()
}

/// The inventory without the fields a restart may legitimately change.
fn inventory(d: &Vireod) -> Vec<(String, Value, Value)> {
    d.show("/v1/vms")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (id_of(v), v["spec"].clone(), v["identity"].clone()))
        .collect()
}

#[test]
fn killed_vireod_readopts_running_workers_and_accounts_for_dead_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let keep = id_of(&d.create(&spec_json("keep", "")));
    let dies = id_of(&d.create(&spec_json("dies", "")));
    let powers_off = id_of(&d.create(&spec_json("powers-off", "")));
    d.create(&spec_json("idle", ""));
    for vm in ["keep", "dies", "powers-off"] {
        d.start_vm(vm);
    }
    let before = inventory(&d);
    let keep_pid = d.worker_record(&keep).unwrap().pid;
    let dies_pid = d.worker_record(&dies).unwrap().pid;
    let off_pid = d.worker_record(&powers_off).unwrap().pid;

    // SIGTERM first: vireod exits 0, the workers stay.
    assert_eq!(d.terminate().code(), Some(0));
    assert!(alive(keep_pid) && alive(dies_pid) && alive(off_pid));
    d.restart();
    assert_eq!(d.state("keep"), "running");
    assert_eq!(d.worker_record(&keep).unwrap().pid, keep_pid);

    // Now SIGKILL, and two workers end while nobody watches: one killed, one powered off
    // through its own console (it writes exit.json).
    d.kill9();
    signal(dies_pid, libc::SIGKILL);
    {
        use std::io::Write;
        let console = d
            .state_dir
            .join("vms")
            .join(&powers_off)
            .join("console.sock");
        let mut c = std::os::unix::net::UnixStream::connect(console).unwrap();
        c.write_all(b"POWEROFF\n").unwrap();
    }
    wait_until(T, "both workers gone", || {
        !alive(dies_pid) && !alive(off_pid)
    });
    d.restart();
    assert_eq!(
        inventory(&d),
        before,
        "inventory changed across the restart"
    );
    assert_eq!(d.state("keep"), "running");
    assert_eq!(d.state("powers-off"), "off");
    let vm = d.show("/v1/vms/dies");
    assert_eq!(vm["state"], "critical");
    assert_eq!(
        vm["reason"],
        format!("worker pid {dies_pid} gone while vireod was down")
    );
    assert_eq!(d.state("idle"), "off");
    assert_eq!(d.show("/v1/host")["vms"], 4);

    // The adopted worker is fully controllable: console, then a stop noticed by polling.
    let log = d.get("/v1/vms/keep/console/log");
    assert_eq!(log.body, b"fake guest keep running\n");
    let r = d.post_json("/v1/vms/keep/stop", &json!({"timeout_secs": 10}));
    let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(d.state("keep"), "off");
    assert!(!alive(keep_pid));

    // An adopted worker that crashes: critical, without a wait status to name a signal.
    d.start_vm("keep");
    d.kill9();
    d.restart();
    let pid = d.worker_record(&keep).unwrap().pid;
    signal(pid, libc::SIGKILL);
    let vm = d.wait_state("keep", "critical", T);
    assert!(
        vm["reason"]
            .as_str()
            .unwrap()
            .starts_with(&format!("worker pid {pid} exited without a record")),
        "{vm}"
    );
}

#[test]
fn a_vm_starting_when_vireod_died_reaches_running_after_the_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let id = id_of(&d.create(&spec_json("late", "fake.boot_ms=2500")));
    let r = d.post("/v1/vms/late/start");
    let job = r.json()["id"].as_str().unwrap().to_owned();
    wait_until(T, "worker record", || d.worker_record(&id).is_some());
    d.kill9();
    d.restart();
    assert_eq!(d.state("late"), "starting");
    d.wait_state("late", "running", T);
    let job = d.show(&format!("/v1/jobs/{job}"));
    assert_eq!(job["state"], "failed");
    assert_eq!(job["error"], "vireod restarted while the job ran");
    assert_eq!(d.post("/v1/vms/late/turn-off").status, 200);
}

#[test]
fn a_worker_without_a_record_is_found_through_its_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let id = id_of(&d.create(&spec_json("norec", "")));
    d.start_vm("norec");
    let pid = d.worker_record(&id).unwrap().pid;
    d.kill9();
    // As if vireod had died between the spawn and writing worker.json.
    std::fs::remove_file(d.state_dir.join("vms").join(&id).join("worker.json")).unwrap();
    d.restart();
    assert_eq!(d.state("norec"), "running");
    assert_eq!(d.worker_record(&id).unwrap().pid, pid);
    let r = d.post("/v1/vms/norec/turn-off");
    assert_eq!(r.status, 200);
    assert!(!alive(pid));

    // Same, with a worker that has not bound its socket yet when vireod comes back.
    let id = id_of(&d.create(&spec_json("binding", "fake.bind_ms=1500")));
    let r = d.post("/v1/vms/binding/start");
    assert_eq!(r.status, 202);
    wait_until(T, "worker record", || d.worker_record(&id).is_some());
    let pid = d.worker_record(&id).unwrap().pid;
    d.kill9();
    std::fs::remove_file(d.state_dir.join("vms").join(&id).join("worker.json")).unwrap();
    d.restart();
    d.wait_state("binding", "running", T);
    assert_eq!(d.worker_record(&id).unwrap().pid, pid);
    assert_eq!(d.post("/v1/vms/binding/turn-off").status, 200);
    assert!(!alive(pid));
}

#[test]
fn automatic_start_after_the_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let mut spec = spec_json("auto", "");
    spec["auto_start"] = json!({"enabled": true, "delay_secs": 1});
    d.create(&spec);
    d.create(&spec_json("manual", ""));
    assert_eq!(d.terminate().code(), Some(0));
    let t = Instant::now();
    d.restart();
    d.wait_state("auto", "running", T);
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(d.state("manual"), "off");
    let jobs = d.show("/v1/jobs");
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    assert_eq!(jobs[0]["state"], "completed");
}

#[test]
fn a_vm_stopping_when_vireod_died_is_adopted_and_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let id = id_of(&d.create(&spec_json("halting", "fake.ignore_shutdown")));
    d.start_vm("halting");
    let pid = d.worker_record(&id).unwrap().pid;
    let r = d.post_json("/v1/vms/halting/stop", &json!({"timeout_secs": 600}));
    assert_eq!(r.status, 202);
    d.kill9();
    d.restart();
    assert_eq!(d.state("halting"), "stopping");
    // The default timeout (30 s) is too long to wait for here; a turn-off ends it at once
    // through the adopted worker.
    let r = d.post("/v1/vms/halting/turn-off");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "off");
    assert!(!alive(pid));
}

/// A create racing a SIGKILL of vireod: after the restart the VM is there whole (row, folder,
/// identity) or not at all, never a folder alone.
#[test]
fn a_create_cut_by_sigkill_leaves_a_whole_vm_or_none() {
    use std::collections::BTreeSet;
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    for i in 0..16u64 {
        let sock = d.sock.clone();
        let body = serde_json::to_vec(&spec_json(&format!("c{i}"), "")).unwrap();
        let client = std::thread::spawn(move || {
            let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
                return;
            };
            let head = format!(
                "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
            let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
        });
        std::thread::sleep(Duration::from_micros(i * 500));
        d.kill9();
        client.join().unwrap();
        d.restart();
        let vms = d.show("/v1/vms");
        let ids: BTreeSet<String> = vms.as_array().unwrap().iter().map(id_of).collect();
        let folders: BTreeSet<String> = std::fs::read_dir(d.state_dir.join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(ids, folders, "round {i}");
        eprintln!("round {i}: {} VMs", ids.len());
        for vm in vms.as_array().unwrap() {
            assert_eq!(d.show(&format!("/v1/vms/{}", id_of(vm))), *vm);
            assert_eq!(vm["state"], "off");
        }
    }
}
