//! Host commands (`ip`, `tc`, ...) for the namespace tests: run, require, capture, and the
//! precondition check (vireo-testkit) for making namespaces here.

use std::process::{Command, Stdio};

/// Runs a command quietly; whether it succeeded.
pub fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command that must succeed (the test fails with its stderr otherwise).
pub fn must(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command's stdout (empty if it could not run).
pub fn output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether this host lets us create namespaces (root, iproute2) and has the tools the namespace
/// tests use (ping; ethtool for veth ports): a recorded skip if not, a failure under CI.
pub fn netns_available(tag: &str) -> bool {
    use vireo_testkit::{require_all, Need};
    if !require_all(&[Need::Netns, Need::Ping, Need::Ethtool]) {
        return false;
    }
    let probe = format!("vsnp{}{tag}", std::process::id());
    let ok = run(&["ip", "netns", "add", &probe]);
    run(&["ip", "netns", "del", &probe]);
    ok || vireo_testkit::skip("a network namespace (`ip netns add` failed)")
}

/// A one-shot iperf3 server in namespace `ns` on `port`, given half a second to listen.
pub fn iperf_server(ns: &str, port: u16) -> std::process::Child {
    let port = port.to_string();
    let c = Command::new("ip")
        .args(["netns", "exec", ns, "iperf3", "-s", "-1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(std::time::Duration::from_millis(500));
    c
}
