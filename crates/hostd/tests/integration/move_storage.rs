//! `POST /v1/vms/{vm}/move-storage` on a VM that is off (vireod copies with the worker's
//! engine; no KVM needed): the job completes, the spec names the new files, the old ones are
//! gone and the content is the same; refusals leave everything as it was.

use crate::common;

use std::time::Duration;

use common::daemon::{spec_json, Vireod};
use serde_json::json;

fn disk_bytes() -> Vec<u8> {
    let mut v = vec![0u8; 4 << 20];
    for (i, b) in v.iter_mut().enumerate().step_by(4096) {
        *b = (i / 4096) as u8 | 1;
    }
    v
}

#[test]
fn an_off_vm_moves_its_raw_disk_and_the_spec_follows() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let old = tmp.path().join("disk.raw");
    std::fs::write(&old, disk_bytes()).unwrap();
    let mut spec = spec_json("mv", "");
    spec["disks"] = json!([{ "path": old }]);
    d.create(&spec);

    // Refused: outside the roots (422), and an existing destination file (409).
    let msg = d
        .post_json(
            "/v1/vms/mv/move-storage",
            &json!({ "to": "/etc/vireo-move-test" }),
        )
        .assert_error(422, "invalid");
    assert!(msg.contains("outside vireod's storage roots"), "{msg}");
    let taken = tmp.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("disk.raw"), b"theirs").unwrap();
    let msg = d
        .post_json("/v1/vms/mv/move-storage", &json!({ "to": taken }))
        .assert_error(409, "conflict");
    assert!(msg.contains("exists already"), "{msg}");
    assert_eq!(std::fs::read(taken.join("disk.raw")).unwrap(), b"theirs");

    let to = tmp.path().join("new");
    let r = d.post_json("/v1/vms/mv/move-storage", &json!({ "to": to }));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let job = r.json();
    assert_eq!(job["kind"], "move_storage");
    let job = d.wait_job(job["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(job["state"], "completed", "{job}");
    let new = std::fs::canonicalize(&to).unwrap().join("disk.raw");
    let vm = d.show("/v1/vms/mv");
    assert_eq!(vm["spec"]["disks"][0]["path"], json!(new), "{vm}");
    assert!(!old.exists(), "the old file is deleted");
    assert_eq!(std::fs::read(&new).unwrap(), disk_bytes());
}
