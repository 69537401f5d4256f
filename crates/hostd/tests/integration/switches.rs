//! Switch processes under vireod without KVM (VMs are created, not started): the real
//! `vireo-switch` (found beside the fake worker in the target directory; a recorded skip when
//! it is not built) is spawned at create, gets a VM's NIC port and its live policy changes,
//! is re-adopted after vireod's SIGKILL, restarted after its own, and stopped at removal.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{alive, signal, spec_json, wait_until, Vireod, FAKE_WORKER};
use serde_json::{json, Value};

fn switch_bin_built() -> bool {
    let bin = Path::new(FAKE_WORKER).with_file_name("vireo-switch");
    if bin.is_file() {
        return true;
    }
    vireo_testkit::skip(&format!(
        "{} (cargo build --release -p vireo-switchd)",
        bin.display()
    ));
    false
}

fn put(d: &Vireod, path: &str, v: &Value) -> common::daemon::Response {
    let body = serde_json::to_vec(v).unwrap();
    d.request("PUT", path, Some(("application/json", &body)))
}

fn pid(sw: &Value) -> u64 {
    sw["process"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("{sw}"))
}

#[test]
fn switch_process_follows_the_store_across_vireod_and_switch_restarts() {
    if !switch_bin_built() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut d = Vireod::start(&tmp.path().join("state"));
    let r = d.post_json(
        "/v1/switches",
        &json!({"name": "lan", "kind": {"type": "private"}}),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let sw = r.json();
    assert_eq!(sw["process"]["running"], true, "{sw}");
    let p1 = pid(&sw);
    let id = sw["id"].as_str().unwrap().to_owned();

    let vm = d.create(&spec_json("web", ""));
    let vm_id = vm["identity"]["id"].as_str().unwrap().to_owned();
    let r = d.post_json("/v1/vms/web/nics", &json!({"switch": "lan"}));
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["name"], "nic0");
    let port_name = format!("{vm_id}/nic0");
    let port = |d: &Vireod| -> Value {
        let sw = d.show("/v1/switches/lan");
        sw["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["config"]["name"] == port_name.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("no port {port_name} in {sw}"))
    };
    let socket = port(&d)["attach"]["socket"].as_str().unwrap().to_owned();
    assert!(Path::new(&socket).exists(), "{socket}");
    assert!(socket.starts_with(
        &*tmp
            .path()
            .join("state/switches")
            .join(&id)
            .to_string_lossy()
    ));

    // A live policy change reaches the process; a refused one changes nothing anywhere.
    let r = put(
        &d,
        "/v1/vms/web/nics/nic0",
        &json!({"vlan": {"type": "access", "vid": 7}}),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        port(&d)["config"]["vlan"],
        json!({"type": "access", "vid": 7})
    );
    let spec_before = d.show("/v1/vms/web")["spec"].clone();
    let r = put(
        &d,
        "/v1/vms/web/nics/nic0",
        &json!({"vlan": {"type": "access", "vid": 4095}}),
    );
    r.assert_error(422, "invalid");
    assert_eq!(
        port(&d)["config"]["vlan"],
        json!({"type": "access", "vid": 7})
    );
    assert_eq!(d.show("/v1/vms/web")["spec"], spec_before);

    // vireod SIGKILLed: the same process is re-adopted.
    d.kill9();
    d.restart();
    let sw = d.show("/v1/switches/lan");
    assert_eq!(pid(&sw), p1, "{sw}");
    assert_eq!(sw["process"]["restarts"], 0);

    // The switch process SIGKILLed: restarted with the stored ports and policies.
    signal(p1 as u32, libc::SIGKILL);
    wait_until(Duration::from_secs(20), "a new switch process", || {
        let sw = d.show("/v1/switches/lan");
        sw["process"]["running"] == true && sw["process"]["pid"].as_u64() != Some(p1)
    });
    let sw = d.show("/v1/switches/lan");
    assert_eq!(sw["process"]["restarts"], 1);
    assert_eq!(
        port(&d)["config"]["vlan"],
        json!({"type": "access", "vid": 7})
    );
    let p2 = pid(&sw);

    // In use: refused; once the VM is gone, removed with its process and folder.
    let m = d
        .request("DELETE", "/v1/switches/lan", None)
        .assert_error(409, "conflict");
    assert!(m.contains("web"), "{m}");
    assert_eq!(d.request("DELETE", "/v1/vms/web", None).status, 204);
    assert!(
        !Path::new(&socket).exists(),
        "the port's socket went with it"
    );
    assert_eq!(d.request("DELETE", "/v1/switches/lan", None).status, 204);
    wait_until(Duration::from_secs(10), "the switch process gone", || {
        !alive(p2 as u32)
    });
    assert!(!tmp.path().join("state/switches").join(&id).exists());
    d.get("/v1/switches/lan").assert_error(404, "not_found");
}
