//! Export and import interrupted (docs/export.md): a cancelled export leaves nothing; vireod
//! SIGKILLed in the middle of an export or an import leaves no folder that looks complete, no
//! VM half-registered, the source VM as it was, and a job marked failed after the restart.
//! Every vireod of this file copies slowly (`VIREOD_TEST_COPY_DELAY_MS`), so there is a middle.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{spec_json, wait_until, Vireod};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// An 8 MiB raw disk (8 copy chunks) and a vireod that copies one chunk per 150 ms.
fn setup(tmp: &Path, name: &str) -> Vireod {
    let d = Vireod::start_env(&tmp.join("state"), &[("VIREOD_TEST_COPY_DELAY_MS", "150")]);
    let disk = tmp.join(format!("{name}.raw"));
    std::fs::write(&disk, vec![0xa5u8; 8 << 20]).unwrap();
    let mut spec = spec_json(name, "");
    spec["disks"] = json!([{ "path": disk }]);
    d.create(&spec);
    d
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn partial_appears(dir: &Path) {
    wait_until(T, "a partial folder", || {
        entries(dir).iter().any(|e| e.ends_with(".partial"))
    });
}

fn start_export(d: &Vireod, vm: &str, dir: &Path) -> String {
    let r = d.post_json(&format!("/v1/vms/{vm}/export"), &json!({ "dir": dir }));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_cancelled_export_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = setup(tmp.path(), "x1");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let job = start_export(&d, "x1", &out);
    partial_appears(&out);
    // Busy meanwhile: the VM cannot start under the export.
    assert_eq!(d.post("/v1/vms/x1/start").status, 409);
    let r = d.post(&format!("/v1/jobs/{job}/cancel"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["state"], "cancelled");
    wait_until(T, "the partial folder removed", || entries(&out).is_empty());
    assert_eq!(d.show(&format!("/v1/jobs/{job}"))["state"], "cancelled");
    assert_eq!(d.state("x1"), "off");
    // The lock is released once the job has cleaned up.
    wait_until(T, "the VM free again", || {
        let r = d.post("/v1/vms/x1/start");
        r.status == 202
    });
}

#[test]
fn sigkill_in_the_middle_of_export_and_import() {
    let tmp = tempfile::tempdir().unwrap();
    let mut d = setup(tmp.path(), "k1");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let job = start_export(&d, "k1", &out);
    partial_appears(&out);
    d.kill9();
    d.restart();
    let names = entries(&out);
    assert!(
        names.iter().all(|n| n.ends_with(".partial")),
        "only unfinished debris: {names:?}"
    );
    assert!(!out.join("k1").exists());
    let j = d.show(&format!("/v1/jobs/{job}"));
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(d.state("k1"), "off");

    // Again, to the end: a complete export beside the debris.
    let job = start_export(&d, "k1", &out);
    let j = d.wait_job(&job, T);
    assert_eq!(j["state"], "completed", "{j}\n{}", d.log());
    assert!(out.join("k1/vm.json").is_file());

    // An import killed while copying registers nothing and leaves no destination.
    let to = tmp.path().join("to");
    std::fs::create_dir(&to).unwrap();
    let r = d.post_json(
        "/v1/vms/import",
        &json!({ "dir": out.join("k1"), "copy": true, "to": to, "new_id": true, "name": "k2" }),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let job = r.json()["job"]["id"].as_str().unwrap().to_owned();
    partial_appears(&to);
    d.kill9();
    d.restart();
    assert!(!to.join("k2").exists());
    assert_eq!(d.get("/v1/vms/k2").status, 404);
    let vms: Value = d.show("/v1/vms");
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(d.show(&format!("/v1/jobs/{job}"))["state"], "failed");
}
