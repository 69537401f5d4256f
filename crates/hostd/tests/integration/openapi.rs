//! docs/openapi.yaml against the server: the same routes with the same methods both ways
//! (the router's table is `daemon::router::route_table`), every `$ref` resolves, and a live
//! vireod answers each route only with statuses the document lists, with bodies that carry the
//! documented schema's required fields.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::daemon::{spec_json, Response, Vireod};
use serde_json::{json, Value};
use vireo_hostd::daemon::router::route_table;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// (METHOD, path) → the operation object.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut ops = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (key, op) in item.as_object().unwrap() {
            if METHODS.contains(&key.as_str()) {
                ops.insert((key.to_uppercase(), path.clone()), op.clone());
            }
        }
    }
    ops
}

#[test]
fn document_and_router_have_the_same_routes() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    let documented: BTreeSet<(String, String)> = operations(&doc).into_keys().collect();
    let table = route_table();
    let served: BTreeSet<(String, String)> = table
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        served.len(),
        table.len(),
        "the route table lists a route twice"
    );
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in docs/openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );
}

fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference.strip_prefix('#').expect("local $ref");
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("$ref {reference} does not resolve"))
}

fn walk_refs(doc: &Value, v: &Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                resolve(doc, r);
            }
            m.values().for_each(|v| walk_refs(doc, v));
        }
        Value::Array(a) => a.iter().for_each(|v| walk_refs(doc, v)),
        _ => {}
    }
}

#[test]
fn every_ref_resolves_and_every_operation_has_a_success_status() {
    let doc = document();
    walk_refs(&doc, &doc);
    for ((m, p), op) in operations(&doc) {
        let statuses: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        assert!(
            statuses
                .iter()
                .any(|s| s.starts_with('1') || s.starts_with('2')),
            "{m} {p}: no success status"
        );
    }
}

/// The response's documented schema (following `$ref`s), if JSON.
fn response_schema<'a>(doc: &'a Value, op: &'a Value, status: u16) -> Option<&'a Value> {
    let mut r = op["responses"].get(status.to_string())?;
    if let Some(Value::String(reference)) = r.get("$ref") {
        r = resolve(doc, reference);
    }
    let mut schema = r.get("content")?.get("application/json")?.get("schema")?;
    if let Some(Value::String(reference)) = schema.get("$ref") {
        schema = resolve(doc, reference);
    }
    Some(schema)
}

/// The body has the schema's required fields (items of an array each).
fn check_body(doc: &Value, schema: &Value, body: &Value, what: &str) {
    if schema["type"] == "array" {
        let mut items = &schema["items"];
        if let Some(Value::String(reference)) = items.get("$ref") {
            items = resolve(doc, reference);
        }
        for b in body
            .as_array()
            .unwrap_or_else(|| panic!("{what}: not an array"))
        {
            check_body(doc, items, b, what);
        }
        return;
    }
    for field in schema["required"].as_array().into_iter().flatten() {
        let field = field.as_str().unwrap();
        assert!(
            body.get(field).is_some(),
            "{what}: no field {field:?} in {body}"
        );
    }
}

#[test]
fn a_live_vireod_answers_only_documented_statuses() {
    let doc = document();
    let ops = operations(&doc);
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let ct = "application/json";
    let spec = serde_json::to_vec(&spec_json("doc", "")).unwrap();
    let spec2 = serde_json::to_vec(&spec_json("doc", "quiet")).unwrap();
    let bad = b"{nope".to_vec();
    let rename = serde_json::to_vec(&json!({"name": "doc2"})).unwrap();
    let rename_back = serde_json::to_vec(&json!({"name": "doc"})).unwrap();
    let stop = serde_json::to_vec(&json!({"timeout_secs": 5})).unwrap();
    let mut exercised = BTreeSet::new();
    let mut call = |m: &str, template: &str, path: &str, body: Option<&[u8]>| -> Response {
        let r = d.request(m, path, body.map(|b| (ct, b)));
        let key = (m.to_owned(), template.to_owned());
        let op = ops
            .get(&key)
            .unwrap_or_else(|| panic!("{m} {template} not documented"));
        let documented = op["responses"].get(r.status.to_string()).is_some();
        assert!(
            documented,
            "{m} {path} answered {} (not documented): {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if let Some(schema) = response_schema(&doc, op, r.status) {
            check_body(&doc, schema, &r.json(), &format!("{m} {path} {}", r.status));
        }
        exercised.insert(key);
        r
    };
    call("GET", "/v1/host", "/v1/host", None);
    call("POST", "/v1/vms", "/v1/vms", Some(&bad));
    call("POST", "/v1/vms", "/v1/vms", Some(&spec));
    call("POST", "/v1/vms", "/v1/vms", Some(&spec));
    call("GET", "/v1/vms", "/v1/vms", None);
    call("GET", "/v1/vms/{vm}", "/v1/vms/doc", None);
    call("GET", "/v1/vms/{vm}", "/v1/vms/none", None);
    call("PUT", "/v1/vms/{vm}/spec", "/v1/vms/doc/spec", Some(&spec2));
    call(
        "POST",
        "/v1/vms/{vm}/rename",
        "/v1/vms/doc/rename",
        Some(&rename),
    );
    call(
        "POST",
        "/v1/vms/{vm}/rename",
        "/v1/vms/doc2/rename",
        Some(&rename_back),
    );
    call(
        "GET",
        "/v1/vms/{vm}/console/log",
        "/v1/vms/doc/console/log",
        None,
    );
    call("GET", "/v1/vms/{vm}/console", "/v1/vms/doc/console", None);
    call("POST", "/v1/vms/{vm}/stop", "/v1/vms/doc/stop", None);
    call(
        "POST",
        "/v1/vms/{vm}/turn-off",
        "/v1/vms/doc/turn-off",
        None,
    );
    for op in ["pause", "resume", "reset"] {
        let template = format!("/v1/vms/{{vm}}/{op}");
        call("POST", &template, &format!("/v1/vms/doc/{op}"), None);
        call("POST", &template, &format!("/v1/vms/none/{op}"), None);
    }
    call("GET", "/v1/vms/{vm}/metrics", "/v1/vms/doc/metrics", None);
    call("GET", "/v1/vms/{vm}/metrics", "/v1/vms/none/metrics", None);
    for op in ["enable", "disable", "reset"] {
        let template = format!("/v1/vms/{{vm}}/metrics/{op}");
        call(
            "POST",
            &template,
            &format!("/v1/vms/doc/metrics/{op}"),
            None,
        );
        call(
            "POST",
            &template,
            &format!("/v1/vms/none/metrics/{op}"),
            None,
        );
    }
    call("GET", "/metrics", "/metrics", None);
    // Disks while off: the spec only.
    let img = tmp.path().join("doc-disk.img");
    std::fs::write(&img, vec![0u8; 4096]).unwrap();
    let disk = serde_json::to_vec(&json!({"path": img})).unwrap();
    let missing = serde_json::to_vec(&json!({"path": tmp.path().join("none.img")})).unwrap();
    let disks = "/v1/vms/{vm}/disks";
    call("GET", disks, "/v1/vms/doc/disks", None);
    call("GET", disks, "/v1/vms/none/disks", None);
    call("POST", disks, "/v1/vms/doc/disks", Some(&bad));
    call("POST", disks, "/v1/vms/doc/disks", Some(&missing));
    call("POST", disks, "/v1/vms/none/disks", Some(&disk));
    assert_eq!(
        call("POST", disks, "/v1/vms/doc/disks", Some(&disk)).status,
        201
    );
    assert_eq!(
        call("POST", disks, "/v1/vms/doc/disks", Some(&disk)).status,
        409
    );
    let resize = "/v1/vms/{vm}/disks/{disk}/resize";
    let grow = serde_json::to_vec(&json!({"size_bytes": 8192})).unwrap();
    let odd = serde_json::to_vec(&json!({"size_bytes": 1000})).unwrap();
    let shrink = serde_json::to_vec(&json!({"size_bytes": 512})).unwrap();
    call("POST", resize, "/v1/vms/none/disks/0/resize", Some(&grow));
    call("POST", resize, "/v1/vms/doc/disks/7/resize", Some(&grow));
    call("POST", resize, "/v1/vms/doc/disks/0/resize", Some(&bad));
    call("POST", resize, "/v1/vms/doc/disks/0/resize", Some(&odd));
    // A raw file has no map of its data: a shrink needs force.
    assert_eq!(
        call("POST", resize, "/v1/vms/doc/disks/0/resize", Some(&shrink)).status,
        422
    );
    let r = call("POST", resize, "/v1/vms/doc/disks/0/resize", Some(&grow));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["size_bytes"], 8192);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8192);
    let one = "/v1/vms/{vm}/disks/{disk}";
    call("DELETE", one, "/v1/vms/doc/disks/nope", None);
    assert_eq!(call("DELETE", one, "/v1/vms/doc/disks/0", None).status, 200);
    // Checkpoints of the off VM (no disks left: spec only).
    let cps = "/v1/vms/{vm}/checkpoints";
    let cp = "/v1/vms/{vm}/checkpoints/{cp}";
    let apply = "/v1/vms/{vm}/checkpoints/{cp}/apply";
    let named = serde_json::to_vec(&json!({"name": "c1"})).unwrap();
    let renamed = serde_json::to_vec(&json!({"name": "c2"})).unwrap();
    call("POST", cps, "/v1/vms/none/checkpoints", None);
    call("POST", cps, "/v1/vms/doc/checkpoints", Some(&bad));
    let r = call("POST", cps, "/v1/vms/doc/checkpoints", Some(&named));
    assert_eq!(r.status, 202);
    d.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(20));
    assert_eq!(
        call("POST", cps, "/v1/vms/doc/checkpoints", Some(&named)).status,
        409
    );
    call("GET", cps, "/v1/vms/doc/checkpoints", None);
    call("GET", cps, "/v1/vms/none/checkpoints", None);
    call("GET", cp, "/v1/vms/doc/checkpoints/c1", None);
    call("GET", cp, "/v1/vms/doc/checkpoints/nope", None);
    call("PATCH", cp, "/v1/vms/doc/checkpoints/c1", Some(&bad));
    assert_eq!(
        call("PATCH", cp, "/v1/vms/doc/checkpoints/c1", Some(&renamed)).status,
        200
    );
    call("POST", apply, "/v1/vms/doc/checkpoints/nope/apply", None);
    let r = call("POST", apply, "/v1/vms/doc/checkpoints/c2/apply", None);
    d.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(20));
    call("DELETE", cp, "/v1/vms/doc/checkpoints/nope", None);
    let r = call(
        "DELETE",
        cp,
        "/v1/vms/doc/checkpoints/c2?subtree=true",
        None,
    );
    d.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(20));
    let r = call("POST", "/v1/vms/{vm}/start", "/v1/vms/doc/start", None);
    let job = r.json()["id"].as_str().unwrap().to_owned();
    d.wait_job(&job, Duration::from_secs(20));
    for op in ["pause", "resume", "reset"] {
        call(
            "POST",
            &format!("/v1/vms/{{vm}}/{op}"),
            &format!("/v1/vms/doc/{op}"),
            None,
        );
    }
    call(
        "POST",
        "/v1/vms/{vm}/metrics/enable",
        "/v1/vms/doc/metrics/enable",
        None,
    );
    call("GET", "/v1/vms/{vm}/metrics", "/v1/vms/doc/metrics", None);
    // Running under the fake worker, which refuses hot-plug: 422, nothing changes.
    call("POST", disks, "/v1/vms/doc/disks", Some(&disk));
    exercise_pools(&mut call);
    exercise_host_trust(&mut call);
    call(
        "GET",
        "/v1/vms/{vm}/console/log",
        "/v1/vms/doc/console/log?max_bytes=4",
        None,
    );
    call("PUT", "/v1/vms/{vm}/spec", "/v1/vms/doc/spec", Some(&spec2));
    call("DELETE", "/v1/vms/{vm}", "/v1/vms/doc", None);
    let r = call("POST", "/v1/vms/{vm}/stop", "/v1/vms/doc/stop", Some(&stop));
    let stop_job = r.json()["id"].as_str().unwrap().to_owned();
    call(
        "POST",
        "/v1/jobs/{id}/cancel",
        &format!("/v1/jobs/{stop_job}/cancel"),
        None,
    );
    d.wait_job(&stop_job, Duration::from_secs(20));
    call("GET", "/v1/jobs", "/v1/jobs", None);
    call("GET", "/v1/jobs", "/v1/jobs?vm=doc", None);
    call("GET", "/v1/jobs", "/v1/jobs?vm=none", None);
    call("GET", "/v1/jobs/{id}", &format!("/v1/jobs/{job}"), None);
    call("GET", "/v1/jobs/{id}", "/v1/jobs/zzz", None);
    call(
        "POST",
        "/v1/jobs/{id}/cancel",
        &format!("/v1/jobs/{job}/cancel"),
        None,
    );
    let mv = "/v1/vms/{vm}/move-storage";
    let to = serde_json::to_vec(&json!({ "to": "/nowhere" })).unwrap();
    call("POST", mv, "/v1/vms/none/move-storage", Some(&to));
    call("POST", mv, "/v1/vms/doc/move-storage", None);
    call("POST", mv, "/v1/vms/doc/move-storage", Some(&to));
    let mig = "/v1/vms/{vm}/migrate";
    let nowhere = serde_json::to_vec(&json!({ "to": "127.0.0.1:1" })).unwrap();
    let bad_to = serde_json::to_vec(&json!({ "to": "nowhere" })).unwrap();
    assert_eq!(
        call("POST", mig, "/v1/vms/none/migrate", Some(&nowhere)).status,
        404
    );
    assert_eq!(call("POST", mig, "/v1/vms/doc/migrate", None).status, 400);
    assert_eq!(
        call("POST", mig, "/v1/vms/doc/migrate", Some(&bad_to)).status,
        422
    );
    // Off: nothing to migrate.
    assert_eq!(
        call("POST", mig, "/v1/vms/doc/migrate", Some(&nowhere)).status,
        409
    );
    let save = "/v1/vms/{vm}/save";
    call("POST", save, "/v1/vms/none/save", None);
    assert_eq!(call("POST", save, "/v1/vms/doc/save", None).status, 409);
    let r = call("POST", "/v1/vms/{vm}/start", "/v1/vms/doc/start", None);
    let start = r.json()["id"].as_str().unwrap().to_owned();
    d.wait_job(&start, Duration::from_secs(20));
    // Running: a job, which fails at once (nothing listens there); the VM runs on.
    let r = call("POST", mig, "/v1/vms/doc/migrate", Some(&nowhere));
    assert_eq!(r.status, 202);
    let m = d.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(20));
    assert_eq!(m["state"], "failed", "{m}");
    let r = call("POST", save, "/v1/vms/doc/save", None);
    assert_eq!(r.status, 202);
    let saved = d.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(20));
    assert_eq!(saved["state"], "completed", "{saved}");
    // Export, clone and import of the saved VM (docs/export.md).
    let out = tmp.path().join("exp");
    std::fs::create_dir(&out).unwrap();
    let exp = serde_json::to_vec(&json!({"dir": out})).unwrap();
    let export = "/v1/vms/{vm}/export";
    call("POST", export, "/v1/vms/none/export", Some(&exp));
    call("POST", export, "/v1/vms/doc/export", Some(&bad));
    let r = call("POST", export, "/v1/vms/doc/export", Some(&exp));
    assert_eq!(r.status, 202);
    d.wait_job(r.json()["id"].as_str().unwrap(), Duration::from_secs(20));
    assert_eq!(
        call("POST", export, "/v1/vms/doc/export", Some(&exp)).status,
        409
    );
    let clone = "/v1/vms/{vm}/clone";
    let cl = serde_json::to_vec(&json!({"name": "doc-c", "to": out})).unwrap();
    call("POST", clone, "/v1/vms/doc/clone", Some(&bad));
    call("POST", clone, "/v1/vms/none/clone", Some(&cl));
    let r = call("POST", clone, "/v1/vms/doc/clone", Some(&cl));
    assert_eq!(r.status, 202);
    d.wait_job(
        r.json()["job"]["id"].as_str().unwrap(),
        Duration::from_secs(20),
    );
    assert_eq!(
        call("POST", clone, "/v1/vms/doc/clone", Some(&cl)).status,
        422
    );
    let import = "/v1/vms/import";
    let same = serde_json::to_vec(&json!({"dir": out.join("doc")})).unwrap();
    let new = serde_json::to_vec(&json!({"dir": out.join("doc"), "new_id": true, "name": "doc-i"}))
        .unwrap();
    call("POST", import, import, Some(&bad));
    assert_eq!(call("POST", import, import, Some(&same)).status, 422);
    let r = call("POST", import, import, Some(&new));
    assert_eq!(r.status, 202);
    d.wait_job(
        r.json()["job"]["id"].as_str().unwrap(),
        Duration::from_secs(20),
    );
    let r = call(
        "POST",
        "/v1/vms/{vm}/turn-off",
        "/v1/vms/doc/turn-off",
        None,
    );
    assert_eq!(r.status, 200);
    call(
        "DELETE",
        "/v1/vms/{vm}",
        "/v1/vms/doc?delete_disks=false",
        None,
    );
    // Switches and NICs (with or without a vireo-switch binary beside vireod: without one
    // the switch exists, its process error says why, and port changes wait in the store).
    let sw = serde_json::to_vec(&json!({"name": "dsw", "kind": {"type": "private"}})).unwrap();
    let bad_sw = serde_json::to_vec(&json!({"name": "a/b", "kind": {"type": "private"}})).unwrap();
    call("POST", "/v1/switches", "/v1/switches", Some(&sw));
    call("POST", "/v1/switches", "/v1/switches", Some(&sw));
    call("POST", "/v1/switches", "/v1/switches", Some(&bad_sw));
    call("POST", "/v1/switches", "/v1/switches", Some(&bad));
    call("GET", "/v1/switches", "/v1/switches", None);
    call("GET", "/v1/switches/{sw}", "/v1/switches/dsw", None);
    call("GET", "/v1/switches/{sw}", "/v1/switches/none", None);
    let port = serde_json::to_vec(&json!({"name": "vdocx0", "vlan": {"type": "access", "vid": 3}}))
        .unwrap();
    let bad_port = serde_json::to_vec(&json!({"name": "a/b"})).unwrap();
    call(
        "POST",
        "/v1/switches/{sw}/ports",
        "/v1/switches/dsw/ports",
        Some(&port),
    );
    call(
        "POST",
        "/v1/switches/{sw}/ports",
        "/v1/switches/dsw/ports",
        Some(&bad_port),
    );
    call(
        "POST",
        "/v1/switches/{sw}/ports",
        "/v1/switches/none/ports",
        Some(&port),
    );
    let t = "/v1/switches/{sw}/ports/{port}";
    call("PUT", t, "/v1/switches/dsw/ports/vdocx0", Some(&port));
    call("PUT", t, "/v1/switches/dsw/ports/other", Some(&port));
    call("DELETE", t, "/v1/switches/dsw/ports/vdocx0", None);
    call("DELETE", t, "/v1/switches/dsw/ports/vdocx0", None);
    let t = "/v1/switches/{sw}/uplink/mirror";
    let mirror =
        serde_json::to_vec(&json!({"role": {"source": "both"}, "overlay": "inner"})).unwrap();
    call("PUT", t, "/v1/switches/dsw/uplink/mirror", Some(&mirror));
    call("PUT", t, "/v1/switches/none/uplink/mirror", Some(&mirror));
    call(
        "PUT",
        t,
        "/v1/switches/dsw/uplink/mirror",
        Some(b"{\"role\": 7}"),
    );
    let t = "/v1/switches/{sw}/meters/reset";
    call("POST", t, "/v1/switches/dsw/meters/reset", None);
    call("POST", t, "/v1/switches/none/meters/reset", None);
    call("POST", "/v1/vms", "/v1/vms", Some(&spec));
    let nic = serde_json::to_vec(&json!({"switch": "dsw", "name": "n0"})).unwrap();
    let nic_nowhere = serde_json::to_vec(&json!({"switch": "none"})).unwrap();
    call("POST", "/v1/vms/{vm}/nics", "/v1/vms/doc/nics", Some(&nic));
    call(
        "POST",
        "/v1/vms/{vm}/nics",
        "/v1/vms/doc/nics",
        Some(&nic_nowhere),
    );
    call("POST", "/v1/vms/{vm}/nics", "/v1/vms/none/nics", Some(&nic));
    let policy = serde_json::to_vec(&json!({"vlan": {"type": "access", "vid": 7}})).unwrap();
    let bad_policy = serde_json::to_vec(&json!({"vlan": {"type": "access", "vid": 4095}})).unwrap();
    let t = "/v1/vms/{vm}/nics/{nic}";
    call("PUT", t, "/v1/vms/doc/nics/n0", Some(&policy));
    call("PUT", t, "/v1/vms/doc/nics/n0", Some(&bad_policy));
    call("PUT", t, "/v1/vms/doc/nics/n9", Some(&policy));
    call("DELETE", "/v1/switches/{sw}", "/v1/switches/dsw", None);
    call("DELETE", t, "/v1/vms/doc/nics/n0", None);
    call("DELETE", t, "/v1/vms/doc/nics/n0", None);
    call("DELETE", "/v1/switches/{sw}", "/v1/switches/dsw", None);
    call("DELETE", "/v1/switches/{sw}", "/v1/switches/dsw", None);
    exercise_policies(&mut call);
    let all: BTreeSet<_> = ops.into_keys().collect();
    let missed: Vec<_> = all.difference(&exercised).collect();
    assert!(missed.is_empty(), "not exercised: {missed:?}");
}

/// The host identity and trust routes, each answer checked by `call`.
fn exercise_host_trust(call: &mut impl FnMut(&str, &str, &str, Option<&[u8]>) -> Response) {
    let (trusted, one) = ("/v1/host/trusted", "/v1/host/trusted/{fingerprint}");
    call("GET", "/v1/host/identity", "/v1/host/identity", None);
    let fp = format!("sha256:{}", "ab".repeat(32));
    let add = serde_json::to_vec(&json!({"fingerprint": fp, "name": "peer"})).unwrap();
    assert_eq!(call("POST", trusted, trusted, Some(&add)).status, 201);
    assert_eq!(call("POST", trusted, trusted, Some(&add)).status, 200);
    call("POST", trusted, trusted, Some(b"{nope"));
    let bad = serde_json::to_vec(&json!({"fingerprint": "sha256:12", "name": "x"})).unwrap();
    assert_eq!(call("POST", trusted, trusted, Some(&bad)).status, 422);
    call("GET", trusted, trusted, None);
    let path = format!("/v1/host/trusted/{fp}");
    assert_eq!(call("DELETE", one, &path, None).status, 204);
    assert_eq!(call("DELETE", one, &path, None).status, 404);
    call("DELETE", one, "/v1/host/trusted/sha256:zz", None);
}

/// The pool routes, each answer checked by `call` (VM "doc" exists and runs, metered).
fn exercise_pools(call: &mut impl FnMut(&str, &str, &str, Option<&[u8]>) -> Response) {
    let body = |v: Value| serde_json::to_vec(&v).unwrap();
    let (pools, pool) = ("/v1/pools", "/v1/pools/{pool}");
    let (members, member) = ("/v1/pools/{pool}/vms", "/v1/pools/{pool}/vms/{vm}");
    let metrics = "/v1/pools/{pool}/metrics";
    call("POST", pools, pools, Some(b"{nope"));
    call("POST", pools, pools, Some(&body(json!({"name": "a/b"}))));
    assert_eq!(
        call("POST", pools, pools, Some(&body(json!({"name": "dp"})))).status,
        201
    );
    call("POST", pools, pools, Some(&body(json!({"name": "dp"}))));
    call("POST", pools, pools, Some(&body(json!({"name": "other"}))));
    call("GET", pools, pools, None);
    call("GET", pools, "/v1/pools?vm=none", None);
    call("GET", pool, "/v1/pools/dp", None);
    call("GET", pool, "/v1/pools/none", None);
    let add = body(json!({"vm": "doc"}));
    call("POST", members, "/v1/pools/none/vms", Some(&add));
    call("POST", members, "/v1/pools/dp/vms", Some(b"[]"));
    assert_eq!(
        call("POST", members, "/v1/pools/dp/vms", Some(&add)).status,
        200
    );
    call("POST", members, "/v1/pools/other/vms", Some(&add));
    call("GET", pools, "/v1/pools?vm=doc", None);
    assert_eq!(
        call("GET", metrics, "/v1/pools/dp/metrics", None).status,
        200
    );
    call("GET", metrics, "/v1/pools/none/metrics", None);
    call("POST", "/v1/vms", "/v1/vms?pool=none", Some(b"{}"));
    call("DELETE", pool, "/v1/pools/dp", None);
    call("DELETE", pool, "/v1/pools/dp?force=maybe", None);
    call("DELETE", member, "/v1/pools/other/vms/doc", None);
    assert_eq!(
        call("DELETE", member, "/v1/pools/dp/vms/doc", None).status,
        200
    );
    call("DELETE", member, "/v1/pools/dp/vms/none", None);
    call("DELETE", pool, "/v1/pools/none", None);
    call("DELETE", pool, "/v1/pools/dp?force=true", None);
    assert_eq!(call("DELETE", pool, "/v1/pools/other", None).status, 204);
}

/// A switch with an overlay and its policy table (docs/netvirt.md).
fn exercise_policies(call: &mut impl FnMut(&str, &str, &str, Option<&[u8]>) -> Response) {
    let sw = serde_json::to_vec(&json!({"name": "osw", "kind": {"type": "private"},
        "overlay": {"provider_addresses": ["192.0.2.1"], "provider_mac": "02:00:00:00:01:01",
            "routing_domains": [{"name": "red", "subnets": [{"vsid": 5001}]}]}}))
    .unwrap();
    assert_eq!(
        call("POST", "/v1/switches", "/v1/switches", Some(&sw)).status,
        201
    );
    let e = serde_json::to_vec(&json!({"routing_domain": "red", "ca": "10.0.0.7",
        "mac": "02:00:00:00:00:07", "vsid": 5001, "pa": "192.0.2.2"}))
    .unwrap();
    let bad_e = serde_json::to_vec(&json!({"routing_domain": "red", "ca": "10.0.0.8",
        "mac": "02:00:00:00:00:08", "vsid": 16777216, "pa": "192.0.2.2"}))
    .unwrap();
    let t = "/v1/switches/{sw}/policies";
    assert_eq!(
        call("POST", t, "/v1/switches/osw/policies", Some(&e)).status,
        201
    );
    assert_eq!(
        call("POST", t, "/v1/switches/osw/policies", Some(&e)).status,
        422
    );
    call("POST", t, "/v1/switches/osw/policies", Some(&bad_e));
    call("POST", t, "/v1/switches/osw/policies", Some(b"{"));
    call("POST", t, "/v1/switches/none/policies", Some(&e));
    call("GET", t, "/v1/switches/osw/policies", None);
    call("GET", t, "/v1/switches/none/policies", None);
    let t = "/v1/switches/{sw}/policies/{rd}/{ca}";
    assert_eq!(
        call("PUT", t, "/v1/switches/osw/policies/red/10.0.0.7", Some(&e)).status,
        200
    );
    call("PUT", t, "/v1/switches/osw/policies/red/10.0.0.9", Some(&e));
    call("PUT", t, "/v1/switches/osw/policies/red/nonsense", Some(&e));
    assert_eq!(
        call("DELETE", t, "/v1/switches/osw/policies/red/10.0.0.7", None).status,
        204
    );
    call("DELETE", t, "/v1/switches/osw/policies/red/10.0.0.7", None);
    exercise_gateways(call);
    call("DELETE", "/v1/switches/{sw}", "/v1/switches/osw", None);
}

/// The overlay gateways of switch "osw" (routing domain "red"; docs/netvirt.md).
fn exercise_gateways(call: &mut impl FnMut(&str, &str, &str, Option<&[u8]>) -> Response) {
    let body = |v: Value| serde_json::to_vec(&v).unwrap();
    let g = body(
        json!({"name": "out", "mode": "nat", "routing_domains": ["red"],
        "vlan": 30, "address": "198.51.100.1/24"}),
    );
    let (all, one) = (
        "/v1/switches/{sw}/gateways",
        "/v1/switches/{sw}/gateways/{name}",
    );
    let p = "/v1/switches/osw/gateways";
    assert_eq!(call("POST", all, p, Some(&g)).status, 201);
    assert_eq!(call("POST", all, p, Some(&g)).status, 422);
    let bad =
        body(json!({"name": "x", "routing_domains": ["green"], "address": "198.51.100.2/24"}));
    assert_eq!(call("POST", all, p, Some(&bad)).status, 422);
    call("POST", all, p, Some(b"{"));
    call("POST", all, "/v1/switches/none/gateways", Some(&g));
    let listed = call("GET", all, p, None);
    assert_eq!(listed.status, 200);
    call("GET", all, "/v1/switches/none/gateways", None);
    let fwd = body(
        json!({"name": "out", "mode": "forward", "routing_domains": ["red"],
        "address": "198.51.100.1/24", "next_hop": "198.51.100.254"}),
    );
    assert_eq!(
        call("PUT", one, "/v1/switches/osw/gateways/out", Some(&fwd)).status,
        200
    );
    assert_eq!(
        call("PUT", one, "/v1/switches/osw/gateways/other", Some(&fwd)).status,
        422
    );
    assert_eq!(
        call("DELETE", one, "/v1/switches/osw/gateways/out", None).status,
        204
    );
    assert_eq!(
        call("DELETE", one, "/v1/switches/osw/gateways/out", None).status,
        404
    );
}
