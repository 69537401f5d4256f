//! Worker supervision through the API with the fake worker (no KVM): start and stop jobs,
//! turn-off (with SIGKILL escalation), start failures, cancel, conflicts, crashes → Critical
//! touching no other VM, and the console.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::daemon::{alive, read_response, signal, spec_json, wait_until, Vireod};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn lab() -> (tempfile::TempDir, Vireod) {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    (tmp, d)
}

fn id_of(vm: &serde_json::Value) -> String {
    vm["identity"]["id"].as_str().unwrap().to_owned()
}

#[test]
fn start_stop_start_turn_off() {
    let (_tmp, d) = lab();
    let vm = d.create(&spec_json("web", ""));
    let id = id_of(&vm);
    let job = d.start_vm("web");
    assert_eq!(job["kind"], "start");
    assert_eq!(job["progress"], 100);
    assert_eq!(d.state("web"), "running");
    let rec = d.worker_record(&id).expect("worker.json");
    assert!(alive(rec.pid));
    let launch: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.state_dir.join("vms").join(&id).join("spec.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(launch["vm_id"], id.as_str());
    assert_eq!(launch["spec"]["name"], "web");
    assert_eq!(d.show("/v1/host")["running"], 1);
    let log = d.get("/v1/vms/web/console/log");
    assert_eq!(log.status, 200);
    assert_eq!(log.header("content-type"), Some("application/octet-stream"));
    assert_eq!(log.body, b"fake guest web running\n");
    assert_eq!(
        d.get("/v1/vms/web/console/log?max_bytes=8").body,
        b"running\n"
    );

    // Stop: the shutdown line powers the fake guest off.
    let r = d.post_json("/v1/vms/web/stop", &json!({"timeout_secs": 10}));
    assert_eq!(r.status, 202);
    let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(d.state("web"), "off");
    wait_until(T, "worker gone", || !alive(rec.pid));
    assert!(d.worker_record(&id).is_none());

    d.start_vm("web");
    let pid = d.worker_record(&id).unwrap().pid;
    let r = d.post("/v1/vms/web/turn-off");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "off");
    assert!(!alive(pid));
    let jobs = d.show(&format!("/v1/jobs?vm={id}"));
    let kinds: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["start", "stop", "start"], "newest first");
}

#[test]
fn stop_times_out_into_turn_off_and_turn_off_escalates_to_sigkill() {
    let (_tmp, d) = lab();
    let mut quiet = spec_json("quiet", "");
    quiet["shutdown_line"] = json!(null);
    d.create(&quiet);
    d.create(&spec_json(
        "stubborn",
        "fake.ignore_shutdown fake.ignore_turnoff",
    ));
    d.start_vm("quiet");
    d.start_vm("stubborn");

    let t = Instant::now();
    let r = d.post_json("/v1/vms/quiet/stop", &json!({"timeout_secs": 1}));
    assert_eq!(r.status, 202);
    let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "completed", "{job}");
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(d.state("quiet"), "off");

    // Ignores TurnOff: SIGKILL after the grace period, and still `off` (not critical).
    let t = Instant::now();
    let r = d.post("/v1/vms/stubborn/turn-off");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["state"], "off");
    assert!(t.elapsed() >= Duration::from_secs(9), "{:?}", t.elapsed());
}

#[test]
fn start_failures_fail_the_job_with_the_reason() {
    let (_tmp, d) = lab();
    d.create(&spec_json("bad", "fake.fail_start=disk_/x_is_locked"));
    d.create(&spec_json("crash", "fake.crash_start"));
    d.create(&spec_json("imposter", "fake.wrong_id"));
    for (vm, expect) in [
        ("bad", "disk /x is locked"),
        (
            "crash",
            "exited with status 3 without a record; worker.log: fake worker: crashing at start",
        ),
        ("imposter", "answers for VM"),
    ] {
        let r = d.post(&format!("/v1/vms/{vm}/start"));
        assert_eq!(r.status, 202);
        let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
        assert_eq!(job["state"], "failed", "{job}");
        let err = job["error"].as_str().unwrap();
        assert!(err.contains(expect), "{vm}: {err}");
        assert_eq!(d.wait_state(vm, "off", T)["state"], "off");
    }
    // A missing worker binary: the job fails at once, nothing left behind.
    let tmp = tempfile::tempdir().unwrap();
    let d2 = Vireod::start_with(
        &tmp.path().join("s"),
        std::path::Path::new("/nonexistent/vireo-vm"),
    );
    d2.create(&spec_json("x", ""));
    let r = d2.post("/v1/vms/x/start");
    assert_eq!(r.status, 202);
    let job = r.json();
    assert_eq!(job["state"], "failed");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/vireo-vm"),
        "{job}"
    );
    assert_eq!(d2.state("x"), "off");
}

#[test]
fn a_start_job_can_be_cancelled_a_stop_job_cannot() {
    let (_tmp, d) = lab();
    let vm = d.create(&spec_json("slow", "fake.never_runs fake.ignore_shutdown"));
    let id = id_of(&vm);
    let r = d.post("/v1/vms/slow/start");
    let job_id = r.json()["id"].as_str().unwrap().to_owned();
    wait_until(T, "worker record", || d.worker_record(&id).is_some());
    let pid = d.worker_record(&id).unwrap().pid;
    let r = d.post(&format!("/v1/jobs/{job_id}/cancel"));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["state"], "cancelled");
    assert_eq!(d.state("slow"), "off");
    assert!(!alive(pid));
    let r = d.post(&format!("/v1/jobs/{job_id}/cancel"));
    r.assert_error(409, "conflict");
    assert_eq!(d.show(&format!("/v1/jobs/{job_id}"))["state"], "cancelled");

    // A stop is not cancellable.
    let mut spec = spec_json("slow2", "fake.ignore_shutdown");
    spec["name"] = json!("slow2");
    d.create(&spec);
    d.start_vm("slow2");
    let r = d.post_json("/v1/vms/slow2/stop", &json!({"timeout_secs": 30}));
    let stop_id = r.json()["id"].as_str().unwrap().to_owned();
    let msg = d
        .post(&format!("/v1/jobs/{stop_id}/cancel"))
        .assert_error(409, "conflict");
    assert!(msg.contains("turn-off forces a stop"), "{msg}");
    assert_eq!(d.state("slow2"), "stopping");
    // ... but turn-off ends it, and the stop job completes with the VM off.
    assert_eq!(d.post("/v1/vms/slow2/turn-off").status, 200);
    let job = d.wait_job(&stop_id, T);
    assert_eq!(job["state"], "completed", "{job}");
}

#[test]
fn conflicting_requests_get_409_and_one_wins() {
    let (_tmp, d) = lab();
    d.create(&spec_json("vm", "fake.boot_ms=300"));
    // Two starts at once: exactly one is accepted.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| d.post("/v1/vms/vm/start").status))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|&&s| s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 202 || s == 409),
        "{statuses:?}"
    );
    d.wait_state("vm", "running", T);
    let before = d.get("/v1/vms").body;
    d.post("/v1/vms/vm/start").assert_error(409, "conflict");
    let msg = d
        .request("DELETE", "/v1/vms/vm", None)
        .assert_error(409, "conflict");
    assert!(msg.contains("running"), "{msg}");
    let body = serde_json::to_vec(&spec_json("vm", "")).unwrap();
    let r = d.request("PUT", "/v1/vms/vm/spec", Some(("application/json", &body)));
    r.assert_error(409, "conflict");
    assert_eq!(d.get("/v1/vms").body, before);
    // Stop and turn-off at once: both may act, the VM ends off and the worker gone.
    std::thread::scope(|s| {
        s.spawn(|| d.post("/v1/vms/vm/turn-off"));
        s.spawn(|| d.post_json("/v1/vms/vm/stop", &json!({"timeout_secs": 5})));
    });
    d.wait_state("vm", "off", T);
}

#[test]
fn a_killed_worker_makes_its_vm_critical_and_no_other() {
    let (_tmp, d) = lab();
    let a = id_of(&d.create(&spec_json("a", "")));
    let b = id_of(&d.create(&spec_json("b", "")));
    d.create(&spec_json("c", "fake.vcpu_fail_ms=200"));
    d.start_vm("a");
    d.start_vm("b");
    let pid_a = d.worker_record(&a).unwrap().pid;
    signal(pid_a, libc::SIGKILL);
    let vm = d.wait_state("a", "critical", T);
    assert_eq!(
        vm["reason"],
        format!("worker pid {pid_a} killed by signal 9 (SIGKILL); worker.log: fake worker {pid_a} for {a}")
    );
    assert_eq!(d.state("b"), "running");
    assert_eq!(d.get("/v1/vms/b/console/log").status, 200);
    assert!(alive(d.worker_record(&b).unwrap().pid));
    d.get("/v1/vms/a/console/log").assert_error(409, "conflict");

    // A failing vCPU: critical with the worker's reason.
    d.start_vm("c");
    let vm = d.wait_state("c", "critical", T);
    assert_eq!(vm["reason"], "a vCPU failed: triple fault (fake)");

    // Critical can be started again, or turned off (acknowledged).
    d.start_vm("a");
    assert_eq!(d.state("a"), "running");
    let r = d.post("/v1/vms/c/turn-off");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "off");
    assert_eq!(d.state("b"), "running");
}

fn attach(d: &Vireod, vm: &str) -> UnixStream {
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET /v1/vms/{vm}/console HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: vireo-console\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    // The head ends with an empty line; read it byte by byte so no console byte is consumed.
    let mut head = Vec::new();
    let mut b = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed in the head: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: vireo-console"),
        "{head}"
    );
    s
}

#[test]
fn console_attach_is_raw_bytes_both_ways() {
    let (_tmp, d) = lab();
    d.create(&spec_json("tty", ""));
    let mut s = UnixStream::connect(&d.sock).unwrap();
    let req = "GET /v1/vms/tty/console HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: vireo-console\r\n\r\n";
    s.write_all(req.as_bytes()).unwrap();
    read_response(&mut s).assert_error(409, "conflict");

    d.start_vm("tty");
    let s = attach(&d, "tty");
    let mut w = s.try_clone().unwrap();
    let mut lines = BufReader::new(s);
    w.write_all(b"hello there\n").unwrap();
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "echo: hello there\n");
    // A second attach replaces the first (the worker serves one console client): the first
    // stream ends, the second carries on.
    let s2 = attach(&d, "tty");
    let mut rest = String::new();
    lines.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "");
    let mut w = s2.try_clone().unwrap();
    let mut lines = BufReader::new(s2);
    w.write_all(b"again\n").unwrap();
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "echo: again\n");
    // The guest powers off from the console: the stream ends, the VM is off.
    w.write_all(b"POWEROFF\n").unwrap();
    let mut rest = String::new();
    let _ = lines.read_to_string(&mut rest);
    assert!(rest.contains("powering off"), "{rest:?}");
    d.wait_state("tty", "off", T);
    let log = d.get("/v1/vms/tty/console/log");
    log.assert_error(409, "conflict");
}

#[test]
fn turn_off_of_a_worker_not_answering_yet_signals_it_at_once() {
    let (_tmp, d) = lab();
    let id = id_of(&d.create(&spec_json("early", "fake.bind_ms=8000")));
    let r = d.post("/v1/vms/early/start");
    assert_eq!(r.status, 202);
    let job = r.json()["id"].as_str().unwrap().to_owned();
    wait_until(T, "worker record", || d.worker_record(&id).is_some());
    let pid = d.worker_record(&id).unwrap().pid;
    let t = Instant::now();
    let r = d.post("/v1/vms/early/turn-off");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "off");
    // TurnOff undeliverable for 2 s, then SIGTERM: well before the 10 s grace.
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert!(!alive(pid));
    let job = d.wait_job(&job, T);
    assert_eq!(job["state"], "failed", "{job}");
}

/// Fields of `/proc/<pid>/stat` after the command name: (pgrp, session, nice).
fn group_session_nice(pid: u32) -> (i64, i64, i64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // rest[0] is field 3 (state): pgrp is field 5, session 6, nice 19.
    let field = |n: usize| rest[n - 3].parse().unwrap();
    (field(5), field(6), field(19))
}

#[test]
fn workers_run_in_their_own_group_in_vireods_session_at_a_lower_priority() {
    let (_tmp, d) = lab();
    d.create(&spec_json("nice", ""));
    let vm = d.create(&spec_json("nicer", ""));
    d.start_vm("nice");
    d.start_vm("nicer");
    let vireod = d.child.as_ref().unwrap().id();
    let (_, vireod_session, vireod_nice) = group_session_nice(vireod);
    let pid = d.worker_record(&id_of(&vm)).unwrap().pid;
    let (pgrp, session, nice) = group_session_nice(pid);
    // Its own process group: a Ctrl-C or SIGHUP for vireod's group does not reach it.
    assert_eq!(pgrp, i64::from(pid));
    // vireod's session, so autogroup scheduling puts daemon and guests in one group where
    // the nice value counts (a session per worker gave each busy guest vireod's share).
    assert_eq!(session, vireod_session);
    // 19 is the lowest priority there is: a vireod already at nice 10 or more (the tests run
    // under `nice`) puts its workers there.
    assert_eq!(nice, (vireod_nice + 10).min(19));
    // And it still outlives vireod.
    let mut d = d;
    d.kill9();
    assert!(alive(pid));
    common::daemon::kill_workers(&d.state_dir);
}
