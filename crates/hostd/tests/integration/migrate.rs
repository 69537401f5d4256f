//! Migration between two vireods (docs/migration.md, "Between the vireods"), with the fake
//! worker playing both workers' sides of the live-migration contract (`tests/bin/fake_worker.rs`):
//! each test runs two vireods with their own state directories and `--migration-listen
//! 127.0.0.1:0`, trusting each other (or not), on loopback only.
//!
//! - live: the VM's record moves (same id), it runs on the destination only, progress (rounds)
//!   shows in the job, the downtime is reported;
//! - quick: the saved state is sent and restored on the destination;
//! - untrusted either way: refused in the TLS handshake, no record on the destination;
//! - refused offers (name taken) with the reason in the job; bad requests 4xx (among them
//!   `keep_source` without `with_storage`);
//! - cancel before the switch-over, the destination worker dying, the destination vireod dying
//!   (and its restart removing the half-arrived VM): the VM runs on the source, both agree;
//! - `--max-migrations 1` queues the second migration.

use crate::common;

use std::time::{Duration, Instant};

use common::daemon::{alive, spec_json, wait_until, Vireod};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

struct Pair {
    _tmp: tempfile::TempDir,
    a: Vireod,
    b: Vireod,
    /// B's migration listener.
    b_addr: String,
}

fn identity(d: &Vireod) -> Value {
    d.show("/v1/host/identity")
}

fn trust(d: &Vireod, other: &Vireod, name: &str) {
    let fp = identity(other)["fingerprint"].as_str().unwrap().to_owned();
    let r = d.post_json(
        "/v1/host/trusted",
        &json!({"fingerprint": fp, "name": name}),
    );
    assert!(r.status == 201 || r.status == 200, "{:?}", r.json());
}

/// Two vireods; `a_trusts_b` / `b_trusts_a` choose the trust lists.
fn pair(a_trusts_b: bool, b_trusts_a: bool, a_args: &[&str]) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let fake = std::path::Path::new(env!("CARGO_BIN_EXE_vireo-fake-worker"));
    let mut args_a = vec!["--migration-listen", "127.0.0.1:0"];
    args_a.extend_from_slice(a_args);
    let a = Vireod::start_args(&tmp.path().join("a"), fake, &args_a);
    let b = Vireod::start_args(
        &tmp.path().join("b"),
        fake,
        &["--migration-listen", "127.0.0.1:0"],
    );
    if a_trusts_b {
        trust(&a, &b, "host-b");
    }
    if b_trusts_a {
        trust(&b, &a, "host-a");
    }
    let b_addr = identity(&b)["migration_listen"]
        .as_str()
        .expect("B shows its migration listener")
        .to_owned();
    assert!(
        b_addr.starts_with("127.0.0.1:") && !b_addr.ends_with(":0"),
        "{b_addr}"
    );
    Pair {
        _tmp: tmp,
        a,
        b,
        b_addr,
    }
}

fn running_vm(d: &Vireod, name: &str, cmdline: &str) -> Value {
    let vm = d.create(&spec_json(name, cmdline));
    d.start_vm(name);
    vm
}

fn migrate(d: &Vireod, name: &str, body: Value) -> Value {
    let r = d.post_json(&format!("/v1/vms/{name}/migrate"), &body);
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let job = r.json();
    assert_eq!(job["kind"], "migrate");
    job
}

fn vm_names(d: &Vireod) -> Vec<String> {
    d.show("/v1/vms")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["spec"]["name"].as_str().unwrap().to_owned())
        .collect()
}

fn worker_pid(d: &Vireod, vm: &Value) -> u32 {
    d.worker_record(vm["identity"]["id"].as_str().unwrap())
        .unwrap()
        .pid
}

#[test]
fn live_migration_moves_the_vm_with_its_identity_and_reports_progress() {
    let p = pair(true, true, &[]);
    let vm = running_vm(&p.a, "m1", "fake.migrate_ms=800");
    let src_pid = worker_pid(&p.a, &vm);
    let job = migrate(&p.a, "m1", json!({"to": p.b_addr, "max_downtime_ms": 50}));
    let id = job["id"].as_str().unwrap();
    // While it runs the job carries the worker's rounds.
    let mut saw_round = false;
    let start = Instant::now();
    let job = loop {
        let j = p.a.show(&format!("/v1/jobs/{id}"));
        // (Once the worker completed, the job still runs while the record here goes.)
        if j["migration"]["round"].as_u64().unwrap_or(0) > 0 && j["migration"]["state"] == "precopy"
        {
            saw_round = true;
            assert!(
                j["migration"]["transferred_bytes"].as_u64().unwrap() > 0,
                "{j}"
            );
            assert!(j["progress"].as_u64().unwrap() < 100, "{j}");
        }
        if j["state"] != "running" {
            break j;
        }
        assert!(start.elapsed() < T, "{j}");
        std::thread::sleep(Duration::from_millis(30));
    };
    assert_eq!(
        job["state"],
        "completed",
        "{job}\n{}\n{}",
        p.a.log(),
        p.b.log()
    );
    assert!(saw_round, "no pre-copy round was ever shown");
    assert_eq!(job["migration"]["downtime_ms"], 7, "{job}");
    // One place only: gone here (worker exited), running there with the same identity.
    assert!(vm_names(&p.a).is_empty(), "{:?}", vm_names(&p.a));
    assert_eq!(p.a.get("/v1/vms/m1").status, 404);
    wait_until(T, "the source worker gone", || !alive(src_pid));
    let there = p.b.show("/v1/vms/m1");
    assert_eq!(there["state"], "running", "{there}");
    assert_eq!(there["identity"], vm["identity"]);
    let log = p.b.get("/v1/vms/m1/console/log");
    assert!(String::from_utf8_lossy(&log.body).contains("fake guest m1 arrived"));
    assert!(alive(worker_pid(&p.b, &there)));
    // It can be stopped there like any VM.
    let r = p.b.post("/v1/vms/m1/turn-off");
    assert_eq!(r.status, 200, "{:?}", r.json());
}

#[test]
fn quick_migration_saves_sends_and_restores() {
    let p = pair(true, true, &[]);
    let vm = running_vm(&p.a, "q1", "");
    let job = migrate(&p.a, "q1", json!({"to": p.b_addr, "quick": true}));
    let job = p.a.wait_job(job["id"].as_str().unwrap(), T);
    assert_eq!(
        job["state"],
        "completed",
        "{job}\n{}\n{}",
        p.a.log(),
        p.b.log()
    );
    assert!(job["migration"]["downtime_ms"].as_u64().is_some(), "{job}");
    assert!(
        job["migration"]["transferred_bytes"].as_u64().unwrap() > 0,
        "{job}"
    );
    assert_eq!(p.a.get("/v1/vms/q1").status, 404);
    let there = p.b.wait_state("q1", "running", T);
    assert_eq!(there["identity"], vm["identity"]);
    let log = p.b.get("/v1/vms/q1/console/log");
    assert!(
        String::from_utf8_lossy(&log.body).contains("fake guest q1 restored"),
        "{}",
        String::from_utf8_lossy(&log.body)
    );
    // The saved files were spent by the restore.
    let saved =
        p.b.state_dir
            .join("vms")
            .join(vm["identity"]["id"].as_str().unwrap())
            .join("saved");
    wait_until(T, "the saved state deleted", || !saved.exists());
}

fn assert_still_here(p: &Pair, name: &str, pid: u32) {
    assert_eq!(p.a.state(name), "running");
    assert!(alive(pid), "the source worker was stopped");
    wait_until(T, "no VM on the destination", || vm_names(&p.b).is_empty());
}

#[test]
fn untrusted_hosts_are_refused_in_the_handshake_either_way() {
    for (a_trusts_b, b_trusts_a) in [(true, false), (false, true)] {
        let p = pair(a_trusts_b, b_trusts_a, &[]);
        let vm = running_vm(&p.a, "u1", "");
        let pid = worker_pid(&p.a, &vm);
        let job = migrate(&p.a, "u1", json!({"to": p.b_addr}));
        let job = p.a.wait_job(job["id"].as_str().unwrap(), T);
        assert_eq!(job["state"], "failed", "{job}");
        let e = job["error"].as_str().unwrap();
        assert!(e.contains("TLS handshake") && e.contains("trust"), "{e}");
        assert_still_here(&p, "u1", pid);
        // Nothing of the VM reached B (not even its offer).
        assert!(!p.b.log().contains("VM incoming"), "{}", p.b.log());
        if !b_trusts_a {
            assert!(
                p.b.log().contains("migration connection refused"),
                "{}",
                p.b.log()
            );
        }
    }
}

#[test]
fn refused_offers_and_bad_requests_leave_the_vm_where_it_is() {
    let p = pair(true, true, &[]);
    let vm = running_vm(&p.a, "r1", "");
    let pid = worker_pid(&p.a, &vm);
    // A VM of that name on B.
    p.b.create(&spec_json("r1", ""));
    let job = migrate(&p.a, "r1", json!({"to": p.b_addr}));
    let job = p.a.wait_job(job["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "failed");
    let e = job["error"].as_str().unwrap();
    assert!(e.contains("refused") && e.contains("\"r1\" exists"), "{e}");
    assert_eq!(p.a.state("r1"), "running");
    assert!(alive(pid));
    assert_eq!(vm_names(&p.b), vec!["r1".to_string()]);
    assert_eq!(p.b.state("r1"), "off");

    // Bad requests: 4xx, one line, nothing started.
    let bad = |body: Value, status: u16, word: &str| {
        let r = p.a.post_json("/v1/vms/r1/migrate", &body);
        let e = r.assert_error(status, if status == 409 { "conflict" } else { "invalid" });
        assert!(e.contains(word), "{e}");
    };
    bad(json!({"to": "somewhere"}), 422, "ADDR:PORT");
    bad(
        json!({"to": p.b_addr, "with_storage": true}),
        422,
        "needs dest_dir",
    );
    bad(
        json!({"to": p.b_addr, "with_storage": true, "dest_dir": "rel"}),
        422,
        "absolute",
    );
    bad(
        json!({"to": p.b_addr, "with_storage": true, "dest_dir": "/x", "quick": true}),
        422,
        "live",
    );
    bad(
        json!({"to": p.b_addr, "dest_dir": "/x"}),
        422,
        "with_storage",
    );
    // The source deletes its files only after a shared-nothing migration.
    bad(
        json!({"to": p.b_addr, "keep_source": true}),
        422,
        "keep_source (--keep-source) is for a shared-nothing migration",
    );
    bad(json!({"to": p.b_addr, "streams": 17}), 422, "streams 17");
    let r =
        p.a.post_json("/v1/vms/r1/migrate", &json!({"to": p.b_addr, "bogus": 1}));
    assert_eq!(r.status, 400);
    p.a.create(&spec_json("off1", ""));
    let r =
        p.a.post_json("/v1/vms/off1/migrate", &json!({"to": p.b_addr}));
    let e = r.assert_error(409, "conflict");
    assert!(e.contains("off") && e.contains("running"), "{e}");
    // Unreachable destination: a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let job = migrate(&p.a, "r1", json!({"to": closed.to_string()}));
    let job = p.a.wait_job(job["id"].as_str().unwrap(), T);
    assert!(
        job["error"].as_str().unwrap().contains("cannot reach"),
        "{job}"
    );
    assert_eq!(p.a.state("r1"), "running");
    assert!(alive(pid));
}

#[test]
fn cancel_before_the_switch_over_keeps_the_vm_on_the_source() {
    let p = pair(true, true, &[]);
    let vm = running_vm(&p.a, "c1", "fake.migrate_ms=10000");
    let pid = worker_pid(&p.a, &vm);
    let job = migrate(&p.a, "c1", json!({"to": p.b_addr}));
    let id = job["id"].as_str().unwrap();
    wait_until(T, "a pre-copy round", || {
        p.a.show(&format!("/v1/jobs/{id}"))["migration"]["round"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    // The destination has the VM incoming meanwhile.
    assert_eq!(p.b.state("c1"), "incoming");
    // Other requests on the migrating VM wait their turn.
    p.a.post("/v1/vms/c1/turn-off")
        .assert_error(409, "conflict");
    let r = p.a.post(&format!("/v1/jobs/{id}/cancel"));
    assert_eq!(r.status, 200, "{:?}", r.json());
    let job = p.a.wait_job(id, T);
    assert_eq!(job["state"], "cancelled", "{job}\n{}", p.a.log());
    assert_still_here(&p, "c1", pid);
}

#[test]
fn the_destination_worker_dying_leaves_the_vm_on_the_source() {
    let p = pair(true, true, &[]);
    let vm = running_vm(&p.a, "d1", "fake.dest_dies fake.migrate_ms=2000");
    let pid = worker_pid(&p.a, &vm);
    let job = migrate(&p.a, "d1", json!({"to": p.b_addr}));
    let job = p.a.wait_job(job["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["error"].as_str().unwrap().contains("runs on here"),
        "{job}"
    );
    assert_still_here(&p, "d1", pid);
    // It can migrate again later (nothing left behind on either side).
    let r = p.a.post_json(
        "/v1/vms/d1/migrate",
        &json!({"to": p.b_addr, "quick": true}),
    );
    let job = p.a.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(p.b.state("d1"), "running");
}

#[test]
fn the_destination_vireod_dying_leaves_the_vm_on_the_source_and_its_restart_cleans_up() {
    let mut p = pair(true, true, &[]);
    let vm = running_vm(&p.a, "k1", "fake.migrate_ms=10000");
    let pid = worker_pid(&p.a, &vm);
    let job = migrate(&p.a, "k1", json!({"to": p.b_addr}));
    let id = job["id"].as_str().unwrap();
    wait_until(T, "a pre-copy round", || {
        p.a.show(&format!("/v1/jobs/{id}"))["migration"]["round"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    p.b.kill9();
    let job = p.a.wait_job(id, T);
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(p.a.state("k1"), "running");
    assert!(alive(pid));
    p.b.restart();
    wait_until(T, "no VM on the destination", || vm_names(&p.b).is_empty());
    let dir =
        p.b.state_dir
            .join("vms")
            .join(vm["identity"]["id"].as_str().unwrap());
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn migrations_beyond_the_limit_queue() {
    let p = pair(true, true, &["--max-migrations", "1"]);
    running_vm(&p.a, "l1", "fake.migrate_ms=1500");
    running_vm(&p.a, "l2", "fake.migrate_ms=300");
    let j1 = migrate(&p.a, "l1", json!({"to": p.b_addr}));
    let id1 = j1["id"].as_str().unwrap();
    wait_until(T, "the first migration running", || {
        p.a.show(&format!("/v1/jobs/{id1}"))["migration"]["round"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let j2 = migrate(&p.a, "l2", json!({"to": p.b_addr}));
    let id2 = j2["id"].as_str().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let q = p.a.show(&format!("/v1/jobs/{id2}"));
    assert_eq!(q["state"], "running");
    assert_eq!(q["progress"], 0, "the second one should wait: {q}");
    assert_eq!(p.b.get("/v1/vms/l2").status, 404);
    for id in [id1, id2] {
        let j = p.a.wait_job(id, T);
        assert_eq!(j["state"], "completed", "{j}");
    }
    assert_eq!(vm_names(&p.b), vec!["l1".to_string(), "l2".to_string()]);
}
