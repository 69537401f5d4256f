//! Fuzzes the API from docs/openapi.yaml: for every documented operation, requests with random
//! path keys, query strings and bodies (mutations of a valid body, wrong types, unknown fields,
//! odd names, random bytes, wrong content types). No answer may be a 5xx or lack the error
//! shape, and a rejected request must leave the inventory byte-identical. Deterministic: the
//! seed is printed and can be set with VIREO_FUZZ_SEED.

use crate::common;

use common::daemon::{spec_json, Vireod};
use serde_json::{json, Map, Value};

/// xorshift64*: enough randomness for inputs, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const ODD_STRINGS: &[&str] = &[
    "",
    ".",
    "..",
    "a/b",
    "../etc",
    "nul\0x",
    "ünï",
    " space",
    "-",
    "a..b",
    "%2e%2e",
    "\u{202e}x",
    "x\ny",
    "/abs/path",
    "relative/path",
];

fn odd_string(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => "x".repeat(rng.below(200)),
        1 => (0..rng.below(20))
            .map(|_| char::from(rng.below(128) as u8))
            .collect(),
        _ => rng.pick(ODD_STRINGS).to_string(),
    }
}

fn random_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next() as i64),
        3 => json!(*rng.pick(&[0u64, 1, 4095, 4096, 1 << 20, u64::MAX, 33554432])),
        4 => json!(-1.5e300),
        5 => json!(odd_string(rng)),
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                m.insert(odd_string(rng), random_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A few random edits of `base` (recursively into objects and arrays).
fn mutate(rng: &mut Rng, mut v: Value) -> Value {
    for _ in 0..1 + rng.below(3) {
        mutate_once(rng, &mut v, 0);
    }
    v
}

fn mutate_once(rng: &mut Rng, v: &mut Value, depth: u32) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.below(3) > 0 => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let key = rng.pick(&keys).clone();
            match rng.below(4) {
                0 => {
                    m.remove(&key);
                }
                1 => {
                    m.insert(format!("{key}_extra"), random_value(rng, depth));
                }
                2 if depth < 3 => mutate_once(rng, m.get_mut(&key).unwrap(), depth + 1),
                _ => {
                    m.insert(key, random_value(rng, depth));
                }
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(2) == 0 => {
            let i = rng.below(a.len());
            mutate_once(rng, &mut a[i], depth + 1);
        }
        other => *other = random_value(rng, depth),
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn random_requests_for_every_documented_route_never_5xx_and_rejections_change_nothing() {
    let seed: u64 = std::env::var("VIREO_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_abcd_0001);
    eprintln!("VIREO_FUZZ_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let doc: Value = serde_norway::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/openapi.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut ops: Vec<(String, String, Option<String>)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "post", "put", "delete"].contains(&method.as_str()) {
                let body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                    .as_str()
                    .map(|r| r.rsplit('/').next().unwrap().to_owned());
                ops.push((method.to_uppercase(), path.clone(), body));
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start(&tmp.path().join("state"));
    let (mut rejected, mut accepted) = (0, 0);
    // Which documented operations answered 2xx at least once (with a real key or body).
    let mut succeeded = std::collections::BTreeSet::new();
    for i in 0..2000 {
        if d.get("/v1/vms/base").status == 404 {
            d.create(&spec_json("base", ""));
        }
        if d.get("/v1/pools/base").status == 404 {
            let r = d.post_json("/v1/pools", &json!({"name": "base"}));
            assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
        }
        let (method, template, body_schema) = rng.pick(&ops).clone();
        // Starting or turning off real VMs would change state by design: random keys only.
        let real_ok = !template.ends_with("/start") && !template.ends_with("/turn-off");
        let key = if real_ok && rng.below(2) == 0 {
            "base".to_owned()
        } else {
            percent_encode(&odd_string(&mut rng))
        };
        if method == "DELETE" && template == "/v1/pools/{pool}/vms/{vm}" && key == "base" {
            // Membership is what this route removes: without it the route's success path is
            // reached only by luck (it depended on the number of routes in the document).
            d.post_json("/v1/pools/base/vms", &json!({"vm": "base"}));
        }
        let mut path = template
            .replace("{vm}", &key)
            .replace("{id}", &key)
            .replace("{sw}", if rng.below(2) == 0 { "fsw" } else { &key })
            .replace("{nic}", if rng.below(2) == 0 { "nic0" } else { &key })
            .replace("{port}", &key)
            .replace("{pool}", &key)
            .replace("{cp}", &key);
        if rng.below(3) == 0 {
            let q = [
                "delete_disks=true",
                "delete_disks=maybe",
                "max_bytes=-1",
                "max_bytes=99999999999",
                "vm=base",
                "vm=%00",
                "pool=base",
                "pool=..",
                "force=true",
                "force=2",
                "x=1",
                "&&==",
            ];
            path = format!("{path}?{}", rng.pick(&q));
        }
        if path.contains("delete_disks=true") {
            // Deleting files named by a random spec is not for a fuzzer.
            path = path.replace("delete_disks=true", "delete_disks=false");
        }
        let base_body = match body_schema.as_deref() {
            Some("VmSpec") => spec_json(if rng.below(2) == 0 { "base" } else { "fuzz" }, ""),
            Some("RenameRequest") => json!({"name": "renamed"}),
            Some("StopRequest") => json!({"timeout_secs": 1}),
            Some("CreatePoolRequest") => json!({"name": "fuzz-pool"}),
            Some("AddPoolMemberRequest") => json!({"vm": "base"}),
            Some("SwitchSpec") => json!({"name": "fsw", "kind": {"type": "private"}}),
            Some("NicSpec") => json!({"switch": "fsw"}),
            Some("NicPolicy") => json!({"vlan": {"type": "access", "vid": 5}}),
            Some("PortConfig") => json!({"name": "vfuzz0"}),
            _ => json!({}),
        };
        let mut body: Option<Vec<u8>> = match rng.below(5) {
            0 => None,
            1 => Some((0..rng.below(64)).map(|_| rng.next() as u8).collect()),
            2 => Some(serde_json::to_vec(&base_body).unwrap()),
            _ => Some(serde_json::to_vec(&mutate(&mut rng, base_body)).unwrap()),
        };
        let mut ct = *rng.pick(&["application/json", "application/json", "text/plain", ""]);
        if method == "POST"
            && template == "/v1/pools/{pool}/vms"
            && key == "base"
            && rng.below(2) == 0
        {
            // A whole, valid add came up about once in 3,000 iterations (route, key, body,
            // content type and no query all had to line up), so whether the success path was
            // reached depended on the number of routes in the document: half the time, send it.
            path = "/v1/pools/base/vms".to_owned();
            body = Some(serde_json::to_vec(&json!({"vm": "base"})).unwrap());
            ct = "application/json";
        }
        if method == "DELETE"
            && template == "/v1/pools/{pool}"
            && key == "base"
            && rng.below(2) == 0
        {
            // As for the add above: a whole delete (forced: the pool may have members), half
            // the time, so the success path does not depend on the number of routes.
            path = "/v1/pools/base?force=true".to_owned();
            body = None;
        }
        let inventory = |d: &Vireod| (d.get("/v1/vms").body, d.get("/v1/pools").body);
        let before = inventory(&d);
        let switches_before = d.get("/v1/switches").body;
        let r = d.request(&method, &path, body.as_deref().map(|b| (ct, b)));
        let what = format!(
            "#{i} {method} {path} ct={ct:?} body={:?}",
            body.as_deref().map(String::from_utf8_lossy)
        );
        assert!(
            r.status < 500,
            "{what}: {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if r.status >= 400 {
            let e = r.json();
            assert!(
                e["code"].is_string() && e["message"].is_string(),
                "{what}: {e}"
            );
            assert_eq!(
                inventory(&d),
                before,
                "{what} was rejected but changed the inventory"
            );
            assert_eq!(
                d.get("/v1/switches").body,
                switches_before,
                "{what} was rejected but changed the switches"
            );
            rejected += 1;
        } else {
            accepted += 1;
            succeeded.insert((method.clone(), template.clone()));
        }
    }
    // The pool routes are walked like the others, and reach their handlers' success paths.
    for (method, template, _) in ops.iter().filter(|(_, t, _)| t.starts_with("/v1/pools")) {
        assert!(
            succeeded.contains(&(method.clone(), template.clone())),
            "{method} {template} never succeeded"
        );
    }
    eprintln!("{accepted} accepted, {rejected} rejected");
    assert!(
        accepted > 50 && rejected > 1000,
        "{accepted} accepted, {rejected} rejected"
    );
}
