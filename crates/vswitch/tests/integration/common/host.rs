//! Host commands (`ip`, `tc`, ...) for the namespace tests: run, require, capture, and the
//! precondition check (vireo-testkit) for making namespaces here.

use std::process::{Command, Stdio};

// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use vireo_testkit::cmd::{must, output, run};

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

/// A one-shot iperf3 server in namespace `ns` on `port`, once it listens (polled with `ss`, at
/// most 10 s: a fixed wait was sometimes too short on a busy CI machine, and the client's
/// connection was then refused). If it never shows, the caller's transfer fails and says so.
pub fn iperf_server(ns: &str, port: u16) -> std::process::Child {
    let port = port.to_string();
    let c = Command::new("ip")
        .args(["netns", "exec", ns, "iperf3", "-s", "-1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let filter = format!("sport = :{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let listening = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn", &filter])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty());
        if listening {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    c
}
