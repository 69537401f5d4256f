//! NIC teaming and network virtualization through vireod, with real `vireo-switch` processes
//! (a recorded skip when the binary is not built): a switch whose uplink is a team of two veths
//! (their far ends in a namespace this test makes) shows its members' state through the API;
//! policy entries added, moved and removed through the API are what the switch process's own
//! `list_policies` answers; bad inputs are 422 naming the value; a vireod SIGKILL (re-adopted
//! process) and a switch process SIGKILL (rebuilt from the store) keep team and policies.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::daemon::{signal, spec_json, wait_until, Vireod, FAKE_WORKER};
use serde_json::{json, Value};
use vireo_testkit::Need;

fn switch_bin_built() -> bool {
    let bin = Path::new(FAKE_WORKER).with_file_name("vireo-switch");
    bin.is_file()
        || vireo_testkit::skip(&format!(
            "{} (cargo build --release -p vireo-switchd)",
            bin.display()
        ))
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(ip(args), "ip {args:?} failed");
}

/// A namespace holding the far ends of `n` veth pairs whose near ends stay here (the team's
/// members); everything goes on drop, also when the test fails.
struct Wires {
    ns: String,
    near: Vec<String>,
}

impl Wires {
    fn new(tag: &str, n: usize) -> Wires {
        let id = std::process::id() % 100_000;
        let w = Wires {
            ns: format!("vnw-{tag}-{id}"),
            near: (0..n).map(|i| format!("nw{tag}{id}{i}")).collect(),
        };
        must(&["netns", "add", &w.ns]);
        for (i, near) in w.near.iter().enumerate() {
            let far = format!("nwf{tag}{id}{i}");
            must(&[
                "link", "add", near, "type", "veth", "peer", "name", &far, "netns", &w.ns,
            ]);
            must(&["link", "set", near, "up"]);
            must(&["-n", &w.ns, "link", "set", &far, "up"]);
        }
        w
    }
}

impl Drop for Wires {
    fn drop(&mut self) {
        for near in &self.near {
            ip(&["link", "del", near]);
        }
        ip(&["netns", "del", &self.ns]);
    }
}

fn put(d: &Vireod, path: &str, v: &Value) -> common::daemon::Response {
    let body = serde_json::to_vec(v).unwrap();
    d.request("PUT", path, Some(("application/json", &body)))
}

/// The switch process's own answer to `list_policies`, on its control socket.
fn switchd_policies(state: &Path, id: &str) -> Vec<Value> {
    let sock: PathBuf = state.join("switches").join(id).join("switch.sock");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"{\"version\":1,\"op\":\"list_policies\"}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["reply"], "policies", "{v}");
    v["entries"].as_array().unwrap().clone()
}

fn has(entries: &[Value], ca: &str, pa: &str) -> bool {
    entries.iter().any(|e| e["ca"] == ca && e["pa"] == pa)
}

fn team_members(sw: &Value) -> Vec<Value> {
    let ports = sw["ports"].as_array().unwrap();
    let p = ports
        .iter()
        .find(|p| p["config"]["name"] == "uplink")
        .unwrap_or_else(|| panic!("no uplink port in {sw}"));
    p["team"]["members"].as_array().unwrap().clone()
}

/// The uplink port's configuration as the switch process reports it.
fn uplink_config(sw: &Value) -> Value {
    sw["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["config"]["name"] == "uplink")
        .unwrap_or_else(|| panic!("no uplink port in {sw}"))["config"]
        .clone()
}

fn entry(ca: &str, vsid: u64, pa: &str) -> Value {
    json!({"routing_domain": "red", "ca": ca, "mac": "02:00:00:00:00:07", "vsid": vsid, "pa": pa})
}

#[test]
fn teamed_overlay_switch_keeps_team_and_policies_across_restarts() {
    if !vireo_testkit::require(Need::Netns) || !switch_bin_built() {
        return;
    }
    let wires = Wires::new("t", 2);
    let (a, b) = (wires.near[0].clone(), wires.near[1].clone());
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut d = Vireod::start(&state);

    let sw = json!({
        "name": "nv",
        "kind": {"type": "private"},
        "team": {"members": [a, b], "mode": "switch_independent", "distribution": "hyper_v_port"},
        "overlay": {
            "provider_addresses": ["192.0.2.1"],
            "provider_mac": "02:00:00:00:01:01",
            "routing_domains": [{"name": "red", "encap": "vxlan",
                "subnets": [{"vsid": 5001, "prefixes": ["10.0.0.0/24"]}]}]
        }
    });
    // Bad team members and bad overlays: refused before anything is stored.
    let mut bad = sw.clone();
    bad["team"]["members"] = json!([a, "nwnosuch0"]);
    let m = d
        .post_json("/v1/switches", &bad)
        .assert_error(422, "invalid");
    assert!(m.contains("nwnosuch0"), "{m}");
    let mut bad = sw.clone();
    bad["overlay"]["routing_domains"][0]["subnets"][0]["vsid"] = json!(16_777_216);
    let m = d
        .post_json("/v1/switches", &bad)
        .assert_error(422, "invalid");
    assert!(m.contains("16777216"), "{m}");
    assert_eq!(d.show("/v1/switches"), json!([]));

    let r = d.post_json("/v1/switches", &sw);
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    // A second switch may not take a member of the first.
    let mut other = sw.clone();
    other["name"] = json!("nv2");
    other["team"]["members"] = json!([b]);
    let m = d
        .post_json("/v1/switches", &other)
        .assert_error(422, "invalid");
    assert!(m.contains(&b) && m.contains("nv"), "{m}");

    // The team's state and per-member counters come from the switch process.
    wait_until(Duration::from_secs(20), "both members up", || {
        let ms = team_members(&d.show("/v1/switches/nv"));
        ms.len() == 2 && ms.iter().all(|m| m["link_up"] == true)
    });
    let ms = team_members(&d.show("/v1/switches/nv"));
    assert_eq!(ms[0]["name"], a.as_str());
    assert_eq!(ms[1]["name"], b.as_str());
    for m in &ms {
        assert!(m["tx_frames"].is_u64() && m["rx_bytes"].is_u64(), "{m}");
    }

    // A local VM in virtual subnet 5001 with CA 10.0.0.2: its entry comes from the NIC.
    d.create(&spec_json("web", ""));
    let r = d.post_json(
        "/v1/vms/web/nics",
        &json!({"switch": "nv", "mac": "02:00:00:00:00:02",
                "virtual_subnet": {"vsid": 5001, "ca": ["10.0.0.2"]}}),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let m = d
        .post_json(
            "/v1/vms/web/nics",
            &json!({"switch": "nv", "virtual_subnet": {"vsid": 6000, "ca": ["10.0.0.3"]}}),
        )
        .assert_error(422, "invalid");
    assert!(m.contains("6000"), "{m}");

    // A remote VM's entry: added, listed by the process itself, refused twice.
    let r = d.post_json(
        "/v1/switches/nv/policies",
        &entry("10.0.0.7", 5001, "192.0.2.2"),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let table = switchd_policies(&state, &id);
    assert!(has(&table, "10.0.0.7", "192.0.2.2"), "{table:?}");
    assert!(has(&table, "10.0.0.2", "192.0.2.1"), "{table:?}");
    let listed = d.show("/v1/switches/nv/policies");
    assert_eq!(listed.as_array().unwrap().len(), table.len(), "{listed}");

    let p = "/v1/switches/nv/policies";
    let m = d
        .post_json(p, &entry("10.0.0.7", 5001, "192.0.2.2"))
        .assert_error(422, "invalid");
    assert!(m.contains("10.0.0.7") && m.contains("already"), "{m}");
    let m = d
        .post_json(p, &entry("10.0.0.8", 16_777_216, "192.0.2.2"))
        .assert_error(422, "invalid");
    assert!(m.contains("16777216"), "{m}");
    let m = d
        .post_json(p, &entry("10.0.0.2", 5001, "192.0.2.2"))
        .assert_error(422, "invalid");
    assert!(m.contains("10.0.0.2") && m.contains("web"), "{m}");
    let mut blue = entry("10.0.0.9", 5001, "192.0.2.2");
    blue["routing_domain"] = json!("blue");
    let m = d.post_json(p, &blue).assert_error(422, "invalid");
    assert!(m.contains("blue"), "{m}");
    d.post_json(
        "/v1/switches/none/policies",
        &entry("10.0.0.8", 5001, "192.0.2.2"),
    )
    .assert_error(404, "not_found");
    put(
        &d,
        "/v1/switches/nv/policies/red/10.0.0.9",
        &entry("10.0.0.7", 5001, "192.0.2.2"),
    )
    .assert_error(422, "invalid");
    let refused = switchd_policies(&state, &id);
    assert_eq!(refused.len(), table.len(), "{refused:?}");

    // The VM moved: its entry gets the new PA at once. Another entry comes and goes.
    let r = put(
        &d,
        "/v1/switches/nv/policies/red/10.0.0.7",
        &entry("10.0.0.7", 5001, "192.0.2.3"),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(has(&switchd_policies(&state, &id), "10.0.0.7", "192.0.2.3"));
    let mut e8 = entry("10.0.0.8", 5001, "192.0.2.4");
    e8["mac"] = json!("02:00:00:00:00:08");
    assert_eq!(d.post_json(p, &e8).status, 201);
    assert!(has(&switchd_policies(&state, &id), "10.0.0.8", "192.0.2.4"));
    let del = "/v1/switches/nv/policies/red/10.0.0.8";
    assert_eq!(d.request("DELETE", del, None).status, 204);
    assert!(!has(
        &switchd_policies(&state, &id),
        "10.0.0.8",
        "192.0.2.4"
    ));
    d.request("DELETE", del, None)
        .assert_error(404, "not_found");
    d.request("DELETE", "/v1/switches/nv/policies/red/10.0.0.2", None)
        .assert_error(404, "not_found");

    // The uplink mirrors the customer frames inside its tunnel packets.
    let mirror = json!({"role": {"source": "both"}, "overlay": "inner"});
    let r = put(&d, "/v1/switches/nv/uplink/mirror", &mirror);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let up = uplink_config(&d.show("/v1/switches/nv"));
    assert_eq!(up["mirror"], json!({"source": "both"}), "{up}");
    assert_eq!(up["mirror_overlay"], "inner", "{up}");
    assert_eq!(
        up["role"], "uplink",
        "the rest of the uplink's policy stays: {up}"
    );
    let m = put(
        &d,
        "/v1/switches/nv/uplink/mirror",
        &json!({"role": "none", "overlay": "sideways"}),
    )
    .assert_error(400, "bad_request");
    assert!(m.contains("sideways"), "{m}");

    // vireod SIGKILLed: the running process is re-adopted with its table.
    d.kill9();
    d.restart();
    assert!(has(&switchd_policies(&state, &id), "10.0.0.7", "192.0.2.3"));

    // The switch process SIGKILLed: rebuilt from the store — team and entries.
    let p1 = d.show("/v1/switches/nv")["process"]["pid"]
        .as_u64()
        .unwrap();
    signal(p1 as u32, libc::SIGKILL);
    wait_until(Duration::from_secs(30), "a new switch process", || {
        let sw = d.show("/v1/switches/nv");
        sw["process"]["running"] == true && sw["process"]["pid"].as_u64() != Some(p1)
    });
    let table = switchd_policies(&state, &id);
    assert!(has(&table, "10.0.0.7", "192.0.2.3"), "{table:?}");
    let up = uplink_config(&d.show("/v1/switches/nv"));
    assert_eq!(
        up["mirror_overlay"], "inner",
        "the uplink mirror from the store: {up}"
    );
    assert!(has(&table, "10.0.0.2", "192.0.2.1"), "{table:?}");
    assert!(!has(&table, "10.0.0.8", "192.0.2.4"), "{table:?}");
    wait_until(Duration::from_secs(20), "the team back", || {
        let ms = team_members(&d.show("/v1/switches/nv"));
        ms.len() == 2 && ms.iter().all(|m| m["link_up"] == true)
    });

    assert_eq!(d.request("DELETE", "/v1/vms/web", None).status, 204);
    assert_eq!(d.request("DELETE", "/v1/switches/nv", None).status, 204);
    drop(d);
    drop(wires);
}

#[test]
fn policies_need_an_overlay_and_a_team_needs_a_kind_without_uplink() {
    if !switch_bin_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let r = d.post_json(
        "/v1/switches",
        &json!({"name": "plain", "kind": {"type": "private"}}),
    );
    assert_eq!(r.status, 201);
    let m = d
        .post_json(
            "/v1/switches/plain/policies",
            &entry("10.0.0.7", 5001, "192.0.2.2"),
        )
        .assert_error(422, "invalid");
    assert!(m.contains("plain") && m.contains("no overlay"), "{m}");
    assert_eq!(d.show("/v1/switches/plain/policies"), json!([]));
    let m = put(
        &d,
        "/v1/switches/plain/uplink/mirror",
        &json!({"role": {"source": "both"}}),
    )
    .assert_error(422, "invalid");
    assert!(m.contains("plain") && m.contains("no uplink"), "{m}");
    let m = d
        .post_json(
            "/v1/switches",
            &json!({"name": "t", "kind": {"type": "external", "interface": "lo"},
                    "team": {"members": ["lo"]}}),
        )
        .assert_error(422, "invalid");
    assert!(m.contains("external"), "{m}");
    let m = d
        .post_json(
            "/v1/switches",
            &json!({"name": "t", "kind": {"type": "private"}, "team": {"members": []}}),
        )
        .assert_error(422, "invalid");
    assert!(m.contains("at least one member"), "{m}");
    assert_eq!(d.request("DELETE", "/v1/switches/plain", None).status, 204);
}
