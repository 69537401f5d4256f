//! The REST API over vireod's real Unix socket: the VM resource, every kind of bad input
//! (4xx with the one error shape, the inventory unchanged), the socket's rules and signals.

use crate::common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::daemon::{read_response, spec_json, Vireod, FAKE_WORKER};
use serde_json::{json, Value};

#[test]
fn vm_resource_create_list_show_rename_update_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let host = d.show("/v1/host");
    assert_eq!(host["vms"], 0);
    assert!(host["max_vcpus"].as_u64().unwrap() >= 1);

    let b = d.create(&spec_json("bravo", ""));
    let a = d.create(&spec_json("alpha", ""));
    assert_eq!(a["state"], "off");
    let id = a["identity"]["id"].as_str().unwrap().to_owned();
    let list = d.show("/v1/vms");
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "bravo"]);
    assert_eq!(d.show("/v1/vms/alpha"), a);
    assert_eq!(d.show(&format!("/v1/vms/{id}")), a);
    assert_eq!(d.show("/v1/host")["vms"], 2);

    let r = d.post_json("/v1/vms/alpha/rename", &json!({"name": "charlie"}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["spec"]["name"], "charlie");
    assert_eq!(d.get("/v1/vms/alpha").status, 404);
    assert_eq!(d.show(&format!("/v1/vms/{id}"))["spec"]["name"], "charlie");

    let mut spec = spec_json("charlie", "console=ttyS0");
    spec["vcpus"] = json!(2);
    let body = serde_json::to_vec(&spec).unwrap();
    let r = d.request(
        "PUT",
        "/v1/vms/charlie/spec",
        Some(("application/json", &body)),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["spec"]["vcpus"], 2);
    assert_eq!(r.json()["identity"]["id"], id.as_str());

    let r = d.request("DELETE", "/v1/vms/charlie?delete_disks=false", None);
    assert_eq!(r.status, 204);
    assert_eq!(d.get(&format!("/v1/vms/{id}")).status, 404);
    assert!(!d.state_dir.join("vms").join(&id).exists());
    assert_eq!(d.show("/v1/vms").as_array().unwrap().len(), 1);
    drop(b);
}

#[test]
fn remove_with_delete_disks_deletes_the_files_but_never_a_shared_one() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let disk = |n: &str| {
        let p = tmp.path().join(n);
        std::fs::write(&p, b"disk").unwrap();
        p
    };
    let (own, shared) = (disk("own.raw"), disk("shared.raw"));
    let mut a = spec_json("a", "");
    a["disks"] = json!([{"path": own}, {"path": shared}]);
    let mut b = spec_json("b", "");
    b["disks"] = json!([{"path": shared}]);
    d.create(&a);
    d.create(&b);
    let r = d.request("DELETE", "/v1/vms/a?delete_disks=true", None);
    let msg = r.assert_error(409, "conflict");
    assert!(msg.contains("shared.raw"), "{msg}");
    assert!(own.exists() && d.get("/v1/vms/a").status == 200);
    assert_eq!(
        d.request("DELETE", "/v1/vms/b?delete_disks=false", None)
            .status,
        204
    );
    assert_eq!(
        d.request("DELETE", "/v1/vms/a?delete_disks=true", None)
            .status,
        204
    );
    assert!(!own.exists() && !shared.exists());
}

/// Every rejected request leaves `GET /v1/vms` byte-identical.
#[test]
fn bad_input_gets_4xx_with_the_error_shape_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    d.create(&spec_json("keep", ""));
    d.create(&spec_json("other", ""));
    let before = d.get("/v1/vms").body;
    let json_body = |v: &Value| serde_json::to_vec(v).unwrap();
    let check = |what: &str, r: common::daemon::Response, status: u16, code: &str| {
        let msg = r.assert_error(status, code);
        assert!(!msg.is_empty() && !msg.contains('\n'), "{what}: {msg:?}");
        assert_eq!(
            d.get("/v1/vms").body,
            before,
            "{what} changed the inventory"
        );
    };
    let post = |path: &str, ct: &str, body: &[u8]| d.request("POST", path, Some((ct, body)));
    let ct = "application/json";

    check(
        "malformed",
        post("/v1/vms", ct, b"{\"version\":1,"),
        400,
        "bad_request",
    );
    check(
        "not an object",
        post("/v1/vms", ct, b"[1,2]"),
        400,
        "bad_request",
    );
    let mut unknown = spec_json("new", "");
    unknown["vcpu"] = json!(2);
    check(
        "unknown field",
        post("/v1/vms", ct, &json_body(&unknown)),
        400,
        "bad_request",
    );
    let mut wrong_type = spec_json("new", "");
    wrong_type["vcpus"] = json!("two");
    check(
        "wrong type",
        post("/v1/vms", ct, &json_body(&wrong_type)),
        400,
        "bad_request",
    );
    let good = json_body(&spec_json("new", ""));
    check(
        "text/plain",
        post("/v1/vms", "text/plain", &good),
        400,
        "bad_request",
    );
    check(
        "no content type",
        post("/v1/vms", "", &good),
        400,
        "bad_request",
    );
    for name in [
        "a/b",
        "..",
        "a..b",
        ".hidden",
        "nul\0byte",
        "",
        &"x".repeat(65),
        // The import endpoint's path: a VM so named could not be shown or removed.
        "import",
    ] {
        let s = spec_json(name, "");
        check(
            &format!("name {name:?}"),
            post("/v1/vms", ct, &json_body(&s)),
            422,
            "invalid",
        );
        let r = post(
            "/v1/vms/keep/rename",
            ct,
            &json_body(&json!({ "name": name })),
        );
        check(&format!("rename to {name:?}"), r, 422, "invalid");
    }
    let mut mem = spec_json("new", "");
    mem["memory_bytes"] = json!(12345);
    check(
        "memory",
        post("/v1/vms", ct, &json_body(&mem)),
        422,
        "invalid",
    );
    let mut rel = spec_json("new", "");
    rel["kernel"] = json!("relative/kernel");
    check(
        "relative kernel",
        post("/v1/vms", ct, &json_body(&rel)),
        422,
        "invalid",
    );
    check(
        "duplicate",
        post("/v1/vms", ct, &json_body(&spec_json("keep", ""))),
        409,
        "conflict",
    );
    let r = post(
        "/v1/vms/keep/rename",
        ct,
        &json_body(&json!({"name": "other"})),
    );
    check("rename onto a taken name", r, 409, "conflict");
    let r = post(
        "/v1/vms/keep/rename",
        ct,
        &json_body(&json!({"name": "x", "force": true})),
    );
    check("rename unknown field", r, 400, "bad_request");
    let r = d.request("PUT", "/v1/vms/keep/spec", Some((ct, &json_body(&mem))));
    check("put invalid spec", r, 422, "invalid");
    check("missing VM", d.get("/v1/vms/nope"), 404, "not_found");
    check("NUL in the key", d.get("/v1/vms/a%00b"), 404, "not_found");
    check("dot-dot key", d.get("/v1/vms/.."), 404, "not_found");
    check(
        "not UTF-8 in the key",
        d.get("/v1/vms/%ff"),
        400,
        "bad_request",
    );
    check(
        "id-shaped missing key",
        d.get(&format!("/v1/vms/{}", uuid::Uuid::new_v4())),
        404,
        "not_found",
    );
    check(
        "missing VM start",
        d.post("/v1/vms/nope/start"),
        404,
        "not_found",
    );
    check(
        "missing VM rm",
        d.request("DELETE", "/v1/vms/nope", None),
        404,
        "not_found",
    );
    let r = d.request("DELETE", "/v1/vms/keep?delete_disks=maybe", None);
    check("bad query", r, 400, "bad_request");
    let r = d.request("DELETE", "/v1/vms/keep?shred=true", None);
    check("unknown query", r, 400, "bad_request");
    check(
        "jobs of a missing VM",
        d.get("/v1/jobs?vm=nope"),
        404,
        "not_found",
    );
    check("job id not a uuid", d.get("/v1/jobs/xyz"), 404, "not_found");
    let r = d.post(&format!("/v1/jobs/{}/cancel", uuid::Uuid::new_v4()));
    check("cancel missing job", r, 404, "not_found");
    check("unknown route", d.get("/v2/everything"), 404, "not_found");
    check(
        "wrong method",
        d.request("PATCH", "/v1/vms/keep", None),
        405,
        "bad_request",
    );
    check(
        "wrong method 2",
        d.request("DELETE", "/v1/vms", None),
        405,
        "bad_request",
    );
    let r = post("/v1/vms/keep/stop", ct, b"{\"timeout\":3}");
    check("stop unknown field", r, 400, "bad_request");
    check(
        "stop an off VM",
        d.post("/v1/vms/keep/stop"),
        409,
        "conflict",
    );
    check(
        "turn off an off VM",
        d.post("/v1/vms/keep/turn-off"),
        409,
        "conflict",
    );
    check(
        "console log of an off VM",
        d.get("/v1/vms/keep/console/log"),
        409,
        "conflict",
    );
    check(
        "console without upgrade",
        d.get("/v1/vms/keep/console"),
        400,
        "bad_request",
    );
    let big = vec![b' '; 2 << 20];
    check("2 MiB body", post("/v1/vms", ct, &big), 413, "bad_request");

    // A declared 1 GiB body is refused from its header, without being sent.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n";
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut s);
    check("1 GiB body", r, 413, "bad_request");
}

#[test]
fn a_slow_client_times_out_and_a_vanished_one_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let before = d.get("/v1/vms").body;
    // A client that disconnects mid-body.
    let body = serde_json::to_vec(&spec_json("half", "")).unwrap();
    let mut s = UnixStream::connect(&d.sock).unwrap();
    let head = format!(
        "POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..body.len() / 2]).unwrap();
    drop(s);
    // A client that never finishes its body.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body[..10]).unwrap();
    let t = Instant::now();
    let r = read_response(&mut s);
    r.assert_error(408, "bad_request");
    assert!(t.elapsed() >= Duration::from_secs(9) && t.elapsed() < Duration::from_secs(15));
    // Headers that never end.
    let mut s = UnixStream::connect(&d.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\n").unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the connection stayed open"
    );
    assert_eq!(d.get("/v1/vms").body, before);
}

#[test]
fn socket_is_private_one_daemon_per_dir_and_sigterm_or_sigint_exit_0() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut d = Vireod::start(&state);
    let mode = std::fs::metadata(&d.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let out = Vireod::command(&state, std::path::Path::new(FAKE_WORKER))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("vireod: ") && last.contains("in use by another vireod"),
        "{err}"
    );

    // Another state dir, the same live socket: refused, the socket left alone.
    let other = tmp.path().join("other");
    let out = Vireod::command(&other, std::path::Path::new(FAKE_WORKER))
        .arg("--listen")
        .arg(format!("unix:{}", d.sock.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another vireod is listening"), "{err}");
    assert_eq!(d.get("/v1/vms").status, 200);

    let bad = Vireod::command(&other, std::path::Path::new(FAKE_WORKER))
        .args(["--listen", "tcp:127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));

    // A stale socket (vireod killed) is replaced.
    d.create(&spec_json("persist", ""));
    d.kill9();
    assert!(d.sock.exists());
    d.restart();
    assert_eq!(d.state("persist"), "off");
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(!d.sock.exists(), "the socket is removed at exit");
    d.restart();
    assert_eq!(d.stop_with(libc::SIGINT).code(), Some(0));
}
