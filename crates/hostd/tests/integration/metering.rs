//! Pause/resume/reset and resource metering through the API, with the fake worker (numbers under
//! the test's control in `<vm-dir>/fake-metrics.json`), and `/metrics` as Prometheus text.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{spec_json, Vireod};
use serde_json::{json, Value};

fn id_of(vm: &Value) -> String {
    vm["identity"]["id"].as_str().unwrap().to_owned()
}

/// A reading as the worker gives it: `uptime_s` seconds, `cpu_s` of CPU, `written` bytes.
fn write_metrics(d: &Vireod, id: &str, uptime_s: u64, cpu_s: u64, mem: u64, written: u64) {
    let m = json!({
        "uptime_ns": uptime_s * 1_000_000_000,
        "vcpu_cpu_ns": cpu_s * 500_000_000,
        "worker_cpu_ns": cpu_s * 1_000_000_000,
        "memory_bytes": 32 << 20,
        "memory_resident_bytes": mem,
        "worker_private_bytes": 4096,
        "disks": [{
            "path": "/d/a.vhdx", "serial": null,
            "read_bytes": written / 2, "write_bytes": written,
            "read_ops": 1, "write_ops": written / 512, "flush_ops": 0,
            "normalized_ios": written / 512, "throttled_ns": 7,
            "min_iops_alerts": 0, "min_iops_alert_active": false
        }]
    });
    let dir = d.state_dir.join("vms").join(id);
    let tmp = dir.join("fake-metrics.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&m).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join("fake-metrics.json")).unwrap();
}

fn metrics(d: &Vireod, vm: &str) -> Value {
    d.show(&format!("/v1/vms/{vm}/metrics"))
}

fn post_ok(d: &Vireod, path: &str) -> Value {
    let r = d.post(path);
    assert_eq!(
        r.status,
        200,
        "{path}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

#[test]
fn pause_resume_reset_follow_the_state_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    d.create(&spec_json("pr", ""));
    // Off: nothing to pause, resume or reset; 409 names the state.
    for op in ["pause", "resume", "reset"] {
        let msg = d
            .post(&format!("/v1/vms/pr/{op}"))
            .assert_error(409, "conflict");
        assert!(msg.contains("off"), "{op}: {msg}");
    }
    d.start_vm("pr");
    d.post("/v1/vms/pr/resume").assert_error(409, "conflict");
    assert_eq!(post_ok(&d, "/v1/vms/pr/pause")["state"], "paused");
    let msg = d.post("/v1/vms/pr/pause").assert_error(409, "conflict");
    assert!(msg.contains("paused"), "{msg}");
    // Reset works from paused and leaves the VM running.
    assert_eq!(post_ok(&d, "/v1/vms/pr/reset")["state"], "running");
    assert_eq!(post_ok(&d, "/v1/vms/pr/pause")["state"], "paused");
    assert_eq!(post_ok(&d, "/v1/vms/pr/resume")["state"], "running");
    assert_eq!(post_ok(&d, "/v1/vms/pr/reset")["state"], "running");
    d.post("/v1/vms/none/pause").assert_error(404, "not_found");
    // A paused VM can be turned off.
    post_ok(&d, "/v1/vms/pr/pause");
    assert_eq!(post_ok(&d, "/v1/vms/pr/turn-off")["state"], "off");
}

#[test]
fn a_refused_worker_op_leaves_the_state_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    d.create(&spec_json("nope", "fake.refuse=pause"));
    d.start_vm("nope");
    let msg = d.post("/v1/vms/nope/pause").assert_error(409, "conflict");
    assert!(msg.contains("fake worker refuses pause"), "{msg}");
    assert_eq!(d.state("nope"), "running");
}

#[test]
fn a_paused_vm_stays_paused_across_a_vireod_restart_and_the_worker_decides() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    d.create(&spec_json("p1", ""));
    d.create(&spec_json("p2", ""));
    d.start_vm("p1");
    d.start_vm("p2");
    post_ok(&d, "/v1/vms/p1/pause");
    post_ok(&d, "/v1/vms/p2/pause");
    d.kill9();
    // While vireod is down p2 is resumed behind its back: its worker says so afterwards.
    let sock = d
        .state_dir
        .join("vms")
        .join(id_of(&d_show_offline(&d, "p2")))
        .join("worker.sock");
    resume_directly(&sock);
    d.restart();
    assert_eq!(d.state("p1"), "paused");
    assert_eq!(d.state("p2"), "running");
    assert_eq!(post_ok(&d, "/v1/vms/p1/resume")["state"], "running");
}

/// The VM's row straight from the store's folder layout (vireod is down): its id by name.
fn d_show_offline(d: &Vireod, name: &str) -> Value {
    for e in std::fs::read_dir(d.state_dir.join("vms")).unwrap() {
        let dir = e.unwrap().path();
        let Ok(text) = std::fs::read(dir.join("spec.json")) else {
            continue;
        };
        let launch: Value = serde_json::from_slice(&text).unwrap();
        if launch["spec"]["name"] == name {
            return json!({"identity": {"id": dir.file_name().unwrap().to_str().unwrap()}});
        }
    }
    panic!("no VM {name}");
}

fn resume_directly(sock: &Path) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = serde_json::to_string(&vireo_api::worker::WorkerRequest::new(
        vireo_api::worker::WorkerOp::Resume,
    ))
    .unwrap();
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\""), "{line}");
}

#[test]
fn metering_counts_only_while_enabled_resets_per_period_and_survives_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let vm = d.create(&spec_json("m", ""));
    let id = id_of(&vm);
    // New VMs are not metered.
    let m0 = metrics(&d, "m");
    assert_eq!(m0["enabled"], false);
    assert_eq!(m0["nics"], json!([]));
    d.start_vm("m");
    write_metrics(&d, &id, 10, 1, 1000, 512);
    metrics(&d, "m"); // a reading while disabled counts nothing
    assert_eq!(post_ok(&d, "/v1/vms/m/metrics/enable")["enabled"], true);
    write_metrics(&d, &id, 20, 6, 3000, 512 + 4096);
    let m = metrics(&d, "m");
    assert_eq!(m["metered_ms"], 10_000, "{m}");
    assert_eq!(m["cpu"]["worker_cpu_ns"], 5_000_000_000u64);
    assert_eq!(m["cpu"]["average_percent"], 50.0);
    assert_eq!(m["cpu"]["vcpu_average_percent"], 25.0);
    assert_eq!(m["disks"][0]["write_bytes"], 4096);
    assert_eq!(m["disks"][0]["read_bytes"], 2048);
    assert_eq!(m["disks"][0]["normalized_ios"], 8);
    assert_eq!(m["disks"][0]["average_iops"], 0.8);
    assert_eq!(m["disks"][0]["path"], "/d/a.vhdx");
    assert_eq!(m["memory"]["min_bytes"], 3000);

    // vireod killed and restarted: the worker lives on and its next reading adds only growth.
    d.kill9();
    d.restart();
    write_metrics(&d, &id, 30, 7, 5000, 512 + 8192);
    let m = metrics(&d, "m");
    assert_eq!(m["enabled"], true);
    assert_eq!(m["disks"][0]["write_bytes"], 8192, "{m}");
    assert_eq!(m["metered_ms"], 20_000);
    assert_eq!(
        (
            m["memory"]["min_bytes"].clone(),
            m["memory"]["max_bytes"].clone()
        ),
        (json!(3000), json!(5000))
    );

    // A new worker run counts from zero and adds to the period.
    post_ok(&d, "/v1/vms/m/turn-off");
    d.start_vm("m");
    write_metrics(&d, &id, 5, 1, 1000, 1024);
    let m = metrics(&d, "m");
    assert_eq!(m["disks"][0]["write_bytes"], 8192 + 1024, "{m}");
    assert_eq!(m["metered_ms"], 25_000);

    // Reset answers the period it ends; the next period starts at zero.
    let period = m["period_started_at"].as_i64().unwrap();
    let last = post_ok(&d, "/v1/vms/m/metrics/reset");
    assert_eq!(last["disks"][0]["write_bytes"], 8192 + 1024);
    assert_eq!(last["period_started_at"], period);
    let m = metrics(&d, "m");
    // (The GET's own reading saw no growth.)
    assert_eq!(m["metered_ms"], 0);
    assert_eq!(m["disks"][0]["write_bytes"], 0, "{m}");
    assert!(m["period_started_at"].as_i64().unwrap() >= period);

    // Disabled: growth is not counted, and the setting survives a restart.
    post_ok(&d, "/v1/vms/m/metrics/disable");
    write_metrics(&d, &id, 9, 1, 1000, 4096);
    d.kill9();
    d.restart();
    let m = metrics(&d, "m");
    assert_eq!(m["enabled"], false);
    assert_eq!(m["disks"][0]["write_bytes"], 0, "{m}");
    d.post("/v1/vms/none/metrics/enable")
        .assert_error(404, "not_found");
    d.get("/v1/vms/none/metrics").assert_error(404, "not_found");
}

#[test]
fn prometheus_text_carries_host_and_vm_series() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let vm = d.create(&spec_json("pm", ""));
    d.create(&spec_json("idle", ""));
    d.start_vm("pm");
    write_metrics(&d, &id_of(&vm), 10, 3, 777, 4096);
    metrics(&d, "pm"); // a reading now rather than at the next sampler tick
    let r = d.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .contains("openmetrics-text"));
    let text = String::from_utf8(r.body.clone()).unwrap();
    let samples = parse_exposition(&text);
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
            })
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
            .2
    };
    assert_eq!(value("vireod_up", &[]), 1.0);
    assert_eq!(value("vireo_vms", &[("state", "running")]), 1.0);
    assert_eq!(value("vireo_vms", &[("state", "off")]), 1.0);
    assert_eq!(
        value("vireo_vm_state", &[("vm", "pm"), ("state", "running")]),
        1.0
    );
    assert_eq!(
        value("vireo_vm_state", &[("vm", "idle"), ("state", "off")]),
        1.0
    );
    assert_eq!(value("vireo_vm_cpu_seconds_total", &[("vm", "pm")]), 3.0);
    assert_eq!(
        value("vireo_vm_memory_resident_bytes", &[("vm", "pm")]),
        777.0
    );
    let disk = [("vm", "pm"), ("disk", "/d/a.vhdx")];
    assert_eq!(value("vireo_vm_disk_written_bytes_total", &disk), 4096.0);
    assert_eq!(value("vireo_vm_disk_write_ops_total", &disk), 8.0);
    assert!(
        value(
            "vireod_api_requests_total",
            &[("route", "/v1/vms/{vm}/metrics"), ("status", "200")]
        ) >= 1.0
    );
    assert!(text.trim_end().ends_with("# EOF"));
}

type Sample = (String, Vec<(String, String)>, f64);

/// A strict reader of the text exposition: `# HELP/TYPE/EOF` comments, else
/// `name{k="v",...} value`; anything else fails the test.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ")
            || line.starts_with("# TYPE ")
            || line.starts_with("# UNIT ")
            || line == "# EOF"
        {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels {line:?}"));
                let labels = body
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label {p:?}"));
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or_else(|| panic!("unquoted {p:?}"));
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                (name.to_owned(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name {name:?}"
        );
        out.push((name, labels, value));
    }
    out
}
