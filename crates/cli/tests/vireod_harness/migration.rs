//! Two vireods that migrate VMs between them: host identities, mutual trust, migration jobs.

use super::Daemon;

/// `vireo host identity --output json`.
pub fn identity(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["host", "identity", "--output", "json"])).unwrap()
}

/// The address other hosts migrate VMs to (`--migration-listen`, port resolved).
pub fn migration_address(d: &Daemon) -> String {
    identity(d)["migration_listen"]
        .as_str()
        .expect("vireod started with --migration-listen")
        .to_owned()
}

/// Each host trusts the other's certificate, named `host-a` and `host-b`.
pub fn trust_each_other(a: &Daemon, b: &Daemon) {
    let fingerprint = |d: &Daemon| identity(d)["fingerprint"].as_str().unwrap().to_owned();
    let (fp_a, fp_b) = (fingerprint(a), fingerprint(b));
    a.ok(&["host", "trust", "add", &fp_b, "host-b"]);
    b.ok(&["host", "trust", "add", &fp_a, "host-a"]);
}

/// `vireo job show ID --output json`.
pub fn job(d: &Daemon, id: &str) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["job", "show", id, "--output", "json"])).unwrap()
}
