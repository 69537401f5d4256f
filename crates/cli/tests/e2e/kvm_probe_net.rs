//! Two probe VMs, each on a TAP, joined by a Linux bridge inside a network namespace the test
//! creates (and deletes, even on failure), exchange frames both ways.

use crate::common;

use common::Netns;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vireo_probe_image::console::encode_hex;
use vireo_probe_image::{probe_elf, tagged_frame, ProbeConsole};

const T: Duration = Duration::from_secs(60);

struct Vm {
    child: Child,
    console: ProbeConsole,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_vm(ns: &str, tap: &str, mac: &str) -> Vm {
    let net = format!("tap={tap},mac={mac}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vireo"), "run"])
        .args(["--kernel", probe_elf().to_str().unwrap(), "--memory", "64M"])
        .args(["--net", &net])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let console = ProbeConsole::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let mut vm = Vm { child, console };
    vm.console.wait_ready(T).expect("probe ready");
    vm
}

fn mac_bytes(s: &str) -> [u8; 6] {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Receives frames until one equals `want` (the bridge may deliver unrelated frames first).
fn recv_expect(vm: &mut Vm, want: &[u8]) {
    let got = vm
        .console
        .net_receive(0, Duration::from_secs(50), |f| f == want);
    assert!(got.unwrap(), "frame {} never arrived", encode_hex(want));
}

#[test]
fn kvm_two_probes_exchange_frames_over_a_bridge() {
    if !common::kvm_usable() {
        return;
    }
    let pid = std::process::id();
    let Some(ns) = Netns::create(format!("vireo-net-{pid}")) else {
        return;
    };
    let in_ns = |args: &[&str]| {
        let mut full = vec!["netns", "exec", &ns.0];
        full.extend_from_slice(args);
        Command::new("ip")
            .args(&full)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    // No IPv6 autoconfiguration chatter on the TAPs.
    assert!(in_ns(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1"
    ]));
    assert!(in_ns(&["ip", "link", "add", "vbr0", "type", "bridge"]));
    assert!(in_ns(&["ip", "link", "set", "vbr0", "multicast", "off"]));
    assert!(in_ns(&["ip", "link", "set", "vbr0", "up"]));

    let (tap_a, tap_b) = (
        format!("vta{}", pid % 100_000),
        format!("vtb{}", pid % 100_000),
    );
    let (mac_a, mac_b) = ("52:54:00:00:0a:01", "52:54:00:00:0b:02");
    let mut a = start_vm(&ns.0, &tap_a, mac_a);
    let mut b = start_vm(&ns.0, &tap_b, mac_b);
    for tap in [&tap_a, &tap_b] {
        assert!(in_ns(&["ip", "link", "set", tap, "master", "vbr0"]));
        assert!(in_ns(&["ip", "link", "set", tap, "up"]));
    }
    assert_eq!(
        a.console.command("NET 0 MAC", T).unwrap(),
        format!("OK mac={mac_a}")
    );
    assert_eq!(
        b.console.command("NET 0 MAC", T).unwrap(),
        format!("OK mac={mac_b}")
    );

    // A -> B.
    let (ma, mb) = (mac_bytes(mac_a), mac_bytes(mac_b));
    let f1 = tagged_frame(mb, ma, 1);
    a.console.net_send(0, &f1).unwrap();
    recv_expect(&mut b, &f1);

    // B echoes what A sends, with the MACs swapped, so it comes back to A. The host stack's own
    // IGMP reports on the TAPs (sent when they come up) may reach B first and are echoed too,
    // so B echoes everything for a few seconds rather than just one frame.
    b.console.send_line("NET 0 ECHO 32 3000").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    a.console.net_send(0, &tagged_frame(mb, ma, 2)).unwrap();
    recv_expect(&mut a, &tagged_frame(ma, mb, 2));
    let echoed = b.console.answer(T).unwrap();
    let n: u32 = echoed
        .strip_prefix("OK echoed=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ECHO answer {echoed:?}"));
    assert!(n >= 1, "B echoed nothing: {echoed}");
    drop(a);
    drop(b);
}
