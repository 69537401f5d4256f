//! Two probe VMs, each on a TAP, joined by a Linux bridge inside a network namespace the test
//! creates (and deletes, even on failure), exchange frames both ways.

mod common;

use common::Netns;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vireo_probe_image::console::{decode_hex, encode_hex};
use vireo_probe_image::{probe_elf, ProbeConsole};

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

fn mac_bytes(s: &str) -> Vec<u8> {
    s.split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

fn frame(dst: &[u8], src: &[u8], tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f.extend((0..50u8).map(|i| i ^ tag));
    f
}

/// Receives frames until one equals `want` (the bridge may deliver unrelated frames first).
fn recv_expect(vm: &mut Vm, want: &[u8]) {
    for _ in 0..10 {
        let answer = vm.console.command("NET 0 RECV 5000", T).expect("NET RECV");
        let hex = answer.trim_start_matches("OK").trim();
        if decode_hex(hex).as_deref() == Some(want) {
            return;
        }
    }
    panic!("frame {} never arrived", encode_hex(want));
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
    let f1 = frame(&mb, &ma, 1);
    a.console
        .command(&format!("NET 0 SEND {}", encode_hex(&f1)), T)
        .unwrap();
    recv_expect(&mut b, &f1);

    // B echoes what A sends, with the MACs swapped, so it comes back to A. The host stack's own
    // IGMP reports on the TAPs (sent when they come up) may reach B first and are echoed too,
    // so B echoes everything for a few seconds rather than just one frame.
    b.console.send_line("NET 0 ECHO 32 3000").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let f2 = frame(&mb, &ma, 2);
    a.console
        .command(&format!("NET 0 SEND {}", encode_hex(&f2)), T)
        .unwrap();
    recv_expect(&mut a, &frame(&ma, &mb, 2));
    let echoed = b.console.answer(T).unwrap();
    let n: u32 = echoed
        .strip_prefix("OK echoed=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected ECHO answer {echoed:?}"));
    assert!(n >= 1, "B echoed nothing: {echoed}");
    drop(a);
    drop(b);
}
