//! Resource pools through the API with the fake worker (metering numbers under the test's
//! control in `<vm-dir>/fake-metrics.json`): the pool's report is the sum of its members',
//! `/metrics` carries per-pool sums, bad input gets one-line 4xx and changes nothing, and
//! pools and memberships survive a vireod restart.

use crate::common;

use common::daemon::{spec_json, Vireod};
use serde_json::{json, Value};

fn id_of(vm: &Value) -> String {
    vm["identity"]["id"].as_str().unwrap().to_owned()
}

/// A worker reading: `uptime_s` s, `cpu_s` s of CPU, `mem` resident, `written` bytes on one
/// disk and `read` on another.
fn write_metrics(d: &Vireod, id: &str, uptime_s: u64, cpu_s: u64, mem: u64, written: u64) {
    let disk = |path: &str, read: u64, written: u64| {
        json!({
            "path": path, "serial": null,
            "read_bytes": read, "write_bytes": written,
            "read_ops": read / 512, "write_ops": written / 512, "flush_ops": 1,
            "normalized_ios": (read + written) / 8192, "throttled_ns": 3,
            "min_iops_alerts": 0, "min_iops_alert_active": false
        })
    };
    let m = json!({
        "uptime_ns": uptime_s * 1_000_000_000,
        "vcpu_cpu_ns": cpu_s * 500_000_000,
        "worker_cpu_ns": cpu_s * 1_000_000_000,
        "memory_bytes": 32 << 20,
        "memory_resident_bytes": mem,
        "worker_private_bytes": 4096,
        "disks": [disk("/d/a.vhdx", 0, written), disk("/d/b.vhdx", written * 2, 0)]
    });
    let dir = d.state_dir.join("vms").join(id);
    let tmp = dir.join("fake-metrics.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&m).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join("fake-metrics.json")).unwrap();
}

fn ok(r: common::daemon::Response, status: u16) -> Value {
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    if r.body.is_empty() {
        Value::Null
    } else {
        r.json()
    }
}

fn names(pool: &Value) -> Vec<String> {
    pool["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Sum of `field` (a JSON pointer) over the VMs' reports.
fn sum(reports: &[&Value], pointer: &str) -> u64 {
    reports
        .iter()
        .map(|r| r.pointer(pointer).unwrap().as_u64().unwrap())
        .sum()
}

fn sum_disks(reports: &[&Value], field: &str) -> u64 {
    reports
        .iter()
        .flat_map(|r| r["disks"].as_array().unwrap())
        .map(|d| d[field].as_u64().unwrap())
        .sum()
}

/// The aggregate in `p` against the members' reports it lists, field by field (docs/api.md).
fn assert_is_sum(p: &Value) {
    let members: Vec<&Value> = p["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["metrics"])
        .collect();
    assert_eq!(p["vms"], members.len());
    let enabled = members.iter().filter(|m| m["enabled"] == true).count();
    assert_eq!(p["enabled_vms"], enabled);
    assert_eq!(p["metered_ms"], sum(&members, "/metered_ms"));
    for f in ["worker_cpu_ns", "vcpu_cpu_ns"] {
        assert_eq!(p["cpu"][f], sum(&members, &format!("/cpu/{f}")), "cpu.{f}");
    }
    for f in ["average_percent", "vcpu_average_percent"] {
        let want: f64 = members.iter().map(|m| m["cpu"][f].as_f64().unwrap()).sum();
        assert!((p["cpu"][f].as_f64().unwrap() - want).abs() < 1e-9, "{f}");
    }
    for f in ["average_bytes", "min_bytes", "max_bytes", "samples"] {
        let want = sum(&members, &format!("/memory/{f}"));
        assert_eq!(p["memory"][f], want, "memory.{f}");
    }
    for f in [
        "read_bytes",
        "write_bytes",
        "read_ops",
        "write_ops",
        "flush_ops",
        "normalized_ios",
        "throttled_ns",
        "min_iops_alerts",
    ] {
        assert_eq!(p["disk"][f], sum_disks(&members, f), "disk.{f}");
    }
    let disks: usize = members
        .iter()
        .map(|m| m["disks"].as_array().unwrap().len())
        .sum();
    assert_eq!(p["disk"]["disks"], disks);
}

#[test]
fn a_pools_metrics_are_the_sum_of_its_members_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let pool = ok(d.post_json("/v1/pools", &json!({"name": "tenant-a"})), 201);
    assert_eq!(pool["vms"], json!([]));
    // One member joins at create, one through the route; "out" stays outside.
    let a = ok(
        d.post_json("/v1/vms?pool=tenant-a", &spec_json("a", "")),
        201,
    );
    let b = d.create(&spec_json("b", ""));
    let out = d.create(&spec_json("out", ""));
    let pool = ok(
        d.post_json("/v1/pools/tenant-a/vms", &json!({"vm": "b"})),
        200,
    );
    assert_eq!(names(&pool), ["a", "b"]);
    let (a, b, out) = (id_of(&a), id_of(&b), id_of(&out));

    // Metered from a baseline reading each; then each VM does its own amount of work.
    for (name, id) in [("a", &a), ("b", &b), ("out", &out)] {
        d.start_vm(name);
        write_metrics(&d, id, 10, 1, 1000, 512);
        ok(d.post(&format!("/v1/vms/{name}/metrics/enable")), 200);
    }
    write_metrics(&d, &a, 20, 3, 3000, 512 + 4096);
    write_metrics(&d, &b, 30, 9, 5000, 512 + 8192);
    write_metrics(&d, &out, 50, 40, 90000, 512 + 65536);

    let p = d.show("/v1/pools/tenant-a/metrics");
    assert_is_sum(&p);
    assert_eq!(p["pool"], "tenant-a");
    assert_eq!(
        (p["vms"].clone(), p["enabled_vms"].clone()),
        (json!(2), json!(2))
    );
    // What the VMs did, counted by the test: a 10 s and b 20 s metered, 2 + 8 s of CPU,
    // 4096 + 8192 bytes written on disk a and twice that read on disk b.
    assert_eq!(p["metered_ms"], 30_000);
    assert_eq!(p["cpu"]["worker_cpu_ns"], 10_000_000_000u64);
    assert_eq!(p["disk"]["write_bytes"], 4096 + 8192);
    assert_eq!(p["disk"]["read_bytes"], 2 * (4096 + 8192));
    assert_eq!(p["disk"]["disks"], 4);
    assert_eq!(p["memory"]["max_bytes"], 3000 + 5000);
    assert_eq!(
        p["network"],
        json!({"bytes_in": 0, "bytes_out": 0, "packets_in": 0, "packets_out": 0, "dropped": 0})
    );
    // 2 s of 10 (20%) plus 8 s of 20 (40%).
    assert!(
        (p["cpu"]["average_percent"].as_f64().unwrap() - 60.0).abs() < 1e-9,
        "{p}"
    );
    // The members are the VMs' own reports (counters; the sampler may add memory readings).
    for m in p["members"].as_array().unwrap() {
        let own = d.show(&format!("/v1/vms/{}/metrics", m["name"].as_str().unwrap()));
        for ptr in [
            "/metered_ms",
            "/cpu/worker_cpu_ns",
            "/disks",
            "/period_started_at",
        ] {
            assert_eq!(m["metrics"].pointer(ptr), own.pointer(ptr), "{ptr}");
        }
    }

    // /metrics: per-pool series are the sums of the members' VM series.
    let text = String::from_utf8(d.get("/metrics").body).unwrap();
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(value(r#"vireo_pool_vms{pool="tenant-a"}"#), 2.0);
    assert_eq!(
        value(r#"vireo_pool_disk_written_bytes_total{pool="tenant-a"}"#),
        value(r#"vireo_vm_disk_written_bytes_total{vm="a",disk="/d/a.vhdx"}"#)
            + value(r#"vireo_vm_disk_written_bytes_total{vm="b",disk="/d/a.vhdx"}"#)
    );
    assert_eq!(
        value(r#"vireo_pool_disk_written_bytes_total{pool="tenant-a"}"#),
        (2 * 512 + 4096 + 8192) as f64
    );
    assert_eq!(
        value(r#"vireo_pool_cpu_seconds_total{pool="tenant-a"}"#),
        12.0
    );
    assert_eq!(
        value(r#"vireo_pool_memory_resident_bytes{pool="tenant-a"}"#),
        8000.0
    );

    // A member that leaves takes its usage with it.
    let pool = ok(d.request("DELETE", "/v1/pools/tenant-a/vms/b", None), 200);
    assert_eq!(names(&pool), ["a"]);
    let p = d.show("/v1/pools/tenant-a/metrics");
    assert_is_sum(&p);
    assert_eq!(p["disk"]["write_bytes"], 4096);
    // Resetting a member's metering resets its share.
    ok(d.post("/v1/vms/a/metrics/reset"), 200);
    let p = d.show("/v1/pools/tenant-a/metrics");
    assert_eq!(
        (p["disk"]["write_bytes"].clone(), p["metered_ms"].clone()),
        (json!(0), json!(0))
    );
    // An empty pool reports zeros.
    ok(d.request("DELETE", "/v1/pools/tenant-a/vms/a", None), 200);
    let p = d.show("/v1/pools/tenant-a/metrics");
    assert_eq!(
        (p["vms"].clone(), p["period_started_at"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(p["members"], json!([]));
}

/// (method, path, body, status, code, a value the message must name).
type Refusal = (
    &'static str,
    &'static str,
    Option<Value>,
    u16,
    &'static str,
    &'static str,
);

#[test]
fn membership_rules_bad_input_and_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    ok(d.post_json("/v1/pools", &json!({"name": "p1"})), 201);
    let p2 = ok(d.post_json("/v1/pools", &json!({"name": "p2"})), 201);
    d.create(&spec_json("v", ""));
    d.create(&spec_json("w", ""));
    // The store's rows and the VM folders (a refused create must leave no folder).
    let snapshot = |d: &Vireod| {
        let mut folders: Vec<_> = std::fs::read_dir(d.state_dir.join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        folders.sort();
        (d.get("/v1/pools").body, d.get("/v1/vms").body, folders)
    };
    let before = snapshot(&d);
    // Each refusal: one line, the right status, nothing changed.
    let cases: Vec<Refusal> = vec![
        (
            "POST",
            "/v1/pools",
            Some(json!({"name": "p1"})),
            409,
            "conflict",
            "p1",
        ),
        (
            "POST",
            "/v1/pools",
            Some(json!({"name": "a/b"})),
            422,
            "invalid",
            "a/b",
        ),
        (
            "POST",
            "/v1/pools",
            Some(json!({"name": ".."})),
            422,
            "invalid",
            "..",
        ),
        (
            "POST",
            "/v1/pools",
            Some(json!({"name": "x".repeat(65)})),
            422,
            "invalid",
            "xxx",
        ),
        (
            "POST",
            "/v1/pools",
            Some(json!({"name": "x", "extra": 1})),
            400,
            "bad_request",
            "extra",
        ),
        ("GET", "/v1/pools/none", None, 404, "not_found", "none"),
        ("DELETE", "/v1/pools/none", None, 404, "not_found", "none"),
        (
            "GET",
            "/v1/pools/none/metrics",
            None,
            404,
            "not_found",
            "none",
        ),
        (
            "POST",
            "/v1/pools/none/vms",
            Some(json!({"vm": "v"})),
            404,
            "not_found",
            "none",
        ),
        (
            "POST",
            "/v1/pools/p1/vms",
            Some(json!({"vm": "ghost"})),
            404,
            "not_found",
            "ghost",
        ),
        (
            "POST",
            "/v1/pools/p1/vms",
            Some(json!({"vm": 3})),
            400,
            "bad_request",
            "",
        ),
        (
            "DELETE",
            "/v1/pools/p1/vms/v",
            None,
            404,
            "not_found",
            "not in pool",
        ),
        (
            "DELETE",
            "/v1/pools/p1/vms/ghost",
            None,
            404,
            "not_found",
            "ghost",
        ),
        ("GET", "/v1/pools?vm=ghost", None, 404, "not_found", "ghost"),
        (
            "DELETE",
            "/v1/pools/p1?force=maybe",
            None,
            400,
            "bad_request",
            "",
        ),
        (
            "POST",
            "/v1/vms?pool=none",
            Some(spec_json("new", "")),
            404,
            "not_found",
            "none",
        ),
    ];
    for (method, path, body, status, code, names_value) in cases {
        let body = body.map(|b| serde_json::to_vec(&b).unwrap());
        let r = d.request(
            method,
            path,
            body.as_deref().map(|b| ("application/json", b)),
        );
        let msg = r.assert_error(status, code);
        assert!(!msg.contains('\n'), "{method} {path}: {msg}");
        assert!(msg.contains(names_value), "{method} {path}: {msg}");
        assert_eq!(snapshot(&d), before, "{method} {path} changed the store");
    }

    // A VM is in one pool at most: adding it elsewhere is refused, again is no change.
    ok(d.post_json("/v1/pools/p1/vms", &json!({"vm": "v"})), 200);
    let again = ok(d.post_json("/v1/pools/p1/vms", &json!({"vm": "v"})), 200);
    assert_eq!(names(&again), ["v"]);
    let msg = d
        .post_json("/v1/pools/p2/vms", &json!({"vm": "v"}))
        .assert_error(409, "conflict");
    assert!(msg.contains("p1"), "{msg}");
    let msg = d
        .post_json("/v1/vms?pool=p2", &spec_json("v", ""))
        .assert_error(409, "conflict");
    assert!(msg.contains("\"v\""), "{msg}");
    // By id as well as by name; ?vm= finds a VM's pool.
    let by_id = format!("/v1/pools/{}/vms", p2["id"].as_str().unwrap());
    ok(d.post_json(&by_id, &json!({"vm": "w"})), 200);
    let of_v = d.show("/v1/pools?vm=v");
    assert_eq!(of_v.as_array().unwrap().len(), 1);
    assert_eq!(of_v[0]["name"], "p1");
    d.create(&spec_json("loner", ""));
    assert_eq!(d.show("/v1/pools?vm=loner"), json!([]));

    // A pool with members is kept unless forced; forced, its VMs stay, in no pool.
    let msg = d
        .request("DELETE", "/v1/pools/p1", None)
        .assert_error(409, "conflict");
    assert!(msg.contains("force=true"), "{msg}");
    assert_eq!(names(&d.show("/v1/pools/p1")), ["v"]);

    // Everything survives a kill -9 and restart.
    let before = snapshot(&d);
    d.kill9();
    d.restart();
    assert_eq!(snapshot(&d), before);

    ok(d.request("DELETE", "/v1/pools/p1?force=true", None), 204);
    assert_eq!(d.state("v"), "off");
    assert_eq!(d.show("/v1/pools?vm=v"), json!([]));
    // The name is free again, and v may join elsewhere.
    ok(d.post_json("/v1/pools", &json!({"name": "p1"})), 201);
    ok(d.post_json("/v1/pools/p2/vms", &json!({"vm": "v"})), 200);
    // Renaming a member keeps it in; removing it takes it out.
    ok(d.post_json("/v1/vms/w/rename", &json!({"name": "w2"})), 200);
    assert_eq!(names(&d.show("/v1/pools/p2")), ["v", "w2"]);
    ok(d.request("DELETE", "/v1/vms/w2", None), 204);
    assert_eq!(names(&d.show("/v1/pools/p2")), ["v"]);
    // An empty pool is deleted without force.
    ok(d.request("DELETE", "/v1/pools/p1", None), 204);
    let pools = d.show("/v1/pools");
    assert_eq!(pools.as_array().unwrap().len(), 1, "{pools}");
}
