//! End to end with the real worker (`vireo-vm`) and the probe guest under /dev/kvm: the
//! lifecycle through the API, the console both ways, a killed worker, and vireod killed and
//! restarted while probe VMs run.
//!
//! `vireo-vm` is found beside `vireod` in the target directory, where a workspace build (what
//! ./test.sh runs) puts it; `cargo build --release -p vireo-worker` makes it for a run of
//! this package alone.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::daemon::{alive, signal, wait_until, Vireod, VIREOD};
use common::probe::{console, wait_ready};
use serde_json::{json, Value};
use vireo_probe_image::probe_elf;

const T: Duration = Duration::from_secs(60);

fn worker_bin() -> Option<PathBuf> {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return None;
    }
    let bin = std::path::Path::new(VIREOD).with_file_name("vireo-vm");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p vireo-worker` (a workspace build does)",
        bin.display()
    );
    Some(bin)
}

fn probe(name: &str) -> Value {
    json!({
        "version": 1,
        "name": name,
        "vcpus": 1,
        "memory_bytes": 64 << 20,
        "kernel": probe_elf(),
        "cmdline": "console=ttyS0",
        "shutdown_line": "POWEROFF",
    })
}

fn id_of(vm: &Value) -> String {
    vm["identity"]["id"].as_str().unwrap().to_owned()
}

#[test]
fn probe_vm_lifecycle_and_console_through_vireod() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let id = id_of(&d.create(&probe("p1")));
    d.start_vm("p1");
    assert_eq!(d.state("p1"), "running");
    wait_ready(&d, "p1");
    let mut c = console(&d, "p1");
    assert_eq!(c.command("PING", T).unwrap(), "OK PONG");
    let info = c.command("INFO", T).unwrap();
    assert!(info.contains("mem_mib=64"), "{info}");
    drop(c);

    // Stop: the worker writes POWEROFF to COM1; the probe powers off.
    let r = d.post_json("/v1/vms/p1/stop", &json!({"timeout_secs": 30}));
    assert_eq!(r.status, 202);
    let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "completed", "{job}\n{}", d.log());
    assert_eq!(d.state("p1"), "off");
    let exit: Value = serde_json::from_slice(
        &std::fs::read(d.state_dir.join("vms").join(&id).join("exit.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(exit["reason"]["kind"], "powered_off", "{exit}");

    // Start again and turn off.
    d.start_vm("p1");
    wait_ready(&d, "p1");
    let pid = d.worker_record(&id).unwrap().pid;
    let r = d.post("/v1/vms/p1/turn-off");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "off");
    assert!(!alive(pid));
}

#[test]
fn probe_vms_survive_vireod_kill_and_a_killed_worker_touches_only_its_vm() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let a = id_of(&d.create(&probe("a")));
    let b = id_of(&d.create(&probe("b")));
    let c = id_of(&d.create(&probe("c")));
    for vm in ["a", "b", "c"] {
        d.start_vm(vm);
        wait_ready(&d, vm);
    }
    let before = d.show("/v1/vms");
    let (pa, pb, pc) = (
        d.worker_record(&a).unwrap().pid,
        d.worker_record(&b).unwrap().pid,
        d.worker_record(&c).unwrap().pid,
    );

    // A worker killed under a live vireod: its VM critical, the others untouched.
    signal(pc, libc::SIGKILL);
    let vm = d.wait_state("c", "critical", T);
    assert!(
        vm["reason"]
            .as_str()
            .unwrap()
            .starts_with(&format!("worker pid {pc} killed by signal 9 (SIGKILL)")),
        "{vm}"
    );
    let mut con = console(&d, "a");
    assert_eq!(con.command("PING", T).unwrap(), "OK PONG");
    drop(con);

    // vireod killed; meanwhile b's worker dies too.
    d.kill9();
    signal(pb, libc::SIGKILL);
    wait_until(T, "b's worker gone", || !alive(pb));
    d.restart();
    assert!(alive(pa));
    assert_eq!(d.state("a"), "running");
    assert_eq!(d.worker_record(&a).unwrap().pid, pa);
    let vm = d.show("/v1/vms/b");
    assert_eq!(vm["state"], "critical");
    assert_eq!(
        vm["reason"],
        format!("worker pid {pb} gone while vireod was down")
    );
    let after = d.show("/v1/vms");
    let ids = |v: &Value| -> Vec<(Value, Value)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| (x["spec"].clone(), x["identity"].clone()))
            .collect()
    };
    assert_eq!(ids(&after), ids(&before));

    // The adopted worker answers: console, then a graceful stop noticed by polling.
    let mut con = console(&d, "a");
    assert_eq!(con.command("PING", T).unwrap(), "OK PONG");
    drop(con);
    let r = d.post_json("/v1/vms/a/stop", &json!({"timeout_secs": 30}));
    let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "completed", "{job}");
    assert_eq!(d.state("a"), "off");
    assert!(!alive(pa));
    // Critical VMs start again.
    d.start_vm("b");
    wait_ready(&d, "b");
    assert_eq!(d.post("/v1/vms/b/turn-off").status, 200);
}

#[test]
fn a_real_start_failure_fails_the_job_with_the_workers_message() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let mut spec = probe("nokernel");
    // The kernel must exist at create (storage roots); gone by the start.
    let kernel = tmp.path().join("vireo-kernel.elf");
    std::fs::write(&kernel, b"gone soon").unwrap();
    spec["kernel"] = json!(kernel);
    d.create(&spec);
    std::fs::remove_file(&kernel).unwrap();
    let r = d.post("/v1/vms/nokernel/start");
    assert_eq!(r.status, 202);
    let job = d.wait_job(r.json()["id"].as_str().unwrap(), T);
    assert_eq!(job["state"], "failed", "{job}");
    let err = job["error"].as_str().unwrap();
    assert!(err.contains("vireo-kernel.elf"), "{err}");
    assert_eq!(d.state("nokernel"), "off");
}

/// GET `/v1/vms/{vm}/metrics`: the first disk's written bytes.
fn written(d: &Vireod, vm: &str) -> u64 {
    let m = d.show(&format!("/v1/vms/{vm}/metrics"));
    m["disks"][0]["write_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("{m}"))
}

#[test]
fn probe_metering_counts_what_the_guest_wrote_across_pause_vireod_restart_and_worker_runs() {
    let Some(bin) = worker_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start_with(&tmp.path().join("state"), &bin);
    let disk = tmp.path().join("m.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut spec = probe("m");
    spec["disks"] = json!([{ "path": disk }]);
    d.create(&spec);
    d.start_vm("m");
    wait_ready(&d, "m");
    assert_eq!(d.post("/v1/vms/m/metrics/enable").status, 200);
    let sectors = 64 * 512;
    let mut c = console(&d, "m");
    for _ in 0..2 {
        assert_eq!(c.command("DISK 0 WRITE 0 64 7", T).unwrap(), "OK");
    }
    assert_eq!(written(&d, "m"), 2 * sectors);
    drop(c);

    // vireod killed and restarted: the adopted worker's next reading adds only what is new.
    d.kill9();
    d.restart();
    let mut c = console(&d, "m");
    assert_eq!(c.command("DISK 0 WRITE 0 64 7", T).unwrap(), "OK");
    assert_eq!(written(&d, "m"), 3 * sectors);
    drop(c);

    // Paused: the worker still answers Metrics; nothing is written meanwhile.
    assert_eq!(d.post("/v1/vms/m/pause").json()["state"], "paused");
    assert_eq!(written(&d, "m"), 3 * sectors);
    assert_eq!(d.post("/v1/vms/m/resume").json()["state"], "running");

    // A new worker run adds to the period; /metrics shows that worker's own count.
    assert_eq!(d.post("/v1/vms/m/turn-off").status, 200);
    d.start_vm("m");
    wait_ready(&d, "m");
    let mut c = console(&d, "m");
    assert_eq!(c.command("DISK 0 WRITE 0 64 7", T).unwrap(), "OK");
    assert_eq!(written(&d, "m"), 4 * sectors);
    let text = String::from_utf8(d.get("/metrics").body).unwrap();
    let series = format!(
        "vireo_vm_disk_written_bytes_total{{vm=\"m\",disk=\"{}\"}} {sectors}",
        disk.display()
    );
    assert!(
        text.lines().any(|l| l == series),
        "no {series:?} in\n{text}"
    );
    let ended = d.post("/v1/vms/m/metrics/reset").json();
    assert_eq!(ended["disks"][0]["write_bytes"], 4 * sectors);
    assert_eq!(written(&d, "m"), 0);
    drop(c);
    assert_eq!(d.post("/v1/vms/m/turn-off").status, 200);
}
