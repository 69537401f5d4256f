//! `--storage-root`: a spec's kernel, initrd and disks must resolve (symlinks and `..`
//! followed) to files under a root, else 422 naming the path and nothing stored. The common
//! helper's roots are the temporary directory and the probe image's directory, so a file in
//! /etc is outside.

use crate::common;

use common::daemon::{spec_json, Vireod};
use serde_json::{json, Value};

/// A file outside every root the helper gives vireod.
const OUTSIDE: &str = "/etc/passwd";

fn inventory(d: &Vireod) -> Vec<u8> {
    d.get("/v1/vms").body
}

#[test]
fn paths_outside_the_roots_are_422_and_nothing_is_stored() {
    assert!(!OUTSIDE.starts_with(std::env::temp_dir().to_str().unwrap()));
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let inside = tmp.path().join("disk.raw");
    std::fs::write(&inside, b"disk").unwrap();
    let link = tmp.path().join("escape.raw");
    std::os::unix::fs::symlink(OUTSIDE, &link).unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    // Enough `..` to climb from the temp dir to / and back down into /etc.
    let depth = tmp.path().components().count();
    let dotdot = format!(
        "{}/sub/{}etc/passwd",
        tmp.path().display(),
        "../".repeat(depth)
    );
    let missing = tmp.path().join("missing.raw");

    let empty = inventory(&d);
    let cases: Vec<(&str, Value, String)> = vec![
        ("kernel", json!(OUTSIDE), OUTSIDE.into()),
        ("disk", json!(OUTSIDE), OUTSIDE.into()),
        ("disk", json!(link), link.display().to_string()),
        ("disk", json!(dotdot), dotdot.clone()),
        ("initrd", json!(link), link.display().to_string()),
        ("disk", json!(missing), missing.display().to_string()),
    ];
    for (field, path, shown) in &cases {
        let mut spec = spec_json("x", "");
        match *field {
            "disk" => spec["disks"] = json!([{ "path": path }]),
            f => spec[f] = path.clone(),
        }
        let msg = d.post_json("/v1/vms", &spec).assert_error(422, "invalid");
        assert!(msg.contains(shown.as_str()), "{field} {shown}: {msg}");
        if shown.contains("missing") {
            assert!(msg.contains("no such file"), "{msg}");
        } else {
            assert!(msg.contains("outside vireod's storage roots"), "{msg}");
            assert!(
                msg.contains(std::env::temp_dir().to_str().unwrap()),
                "{msg}"
            );
        }
        assert_eq!(
            inventory(&d),
            empty,
            "{field} {shown}: something was stored"
        );
    }

    // Inside: 201, and the stored path is the resolved one.
    let mut spec = spec_json("ok", "");
    let via_dots = tmp.path().join("sub/../disk.raw");
    spec["disks"] = json!([{ "path": via_dots }]);
    let vm = d.create(&spec);
    let real = std::fs::canonicalize(&inside).unwrap();
    assert_eq!(vm["spec"]["disks"][0]["path"], json!(real));

    // A spec update that escapes: 422, the stored spec unchanged.
    let before = d.get("/v1/vms/ok").body;
    let mut bad = spec_json("ok", "");
    bad["disks"] = json!([{ "path": link }]);
    let r = d.request(
        "PUT",
        "/v1/vms/ok/spec",
        Some(("application/json", &serde_json::to_vec(&bad).unwrap())),
    );
    r.assert_error(422, "invalid");
    assert_eq!(d.get("/v1/vms/ok").body, before);
}
