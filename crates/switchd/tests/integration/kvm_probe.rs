//! Two probe VMs (`vireo run --net vhost-user=SOCKET`) on two vhost-user ports of one
//! `vireo-switch` process: frames cross between them, a `SetPort` VLAN change cuts them apart
//! while they run, `Status` meters match the frames the probes sent, and a VM that goes away
//! and comes back on the same socket gets a fresh session. Needs /dev/kvm.
//!
//! `vireo` is found beside `vireo-switch` in the target directory, where a workspace build
//! (what ./test.sh runs) puts it; `cargo build --release -p vireo-cli` makes it for a run of
//! this package alone.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use vireo_api::switch::SwitchOp;
use vireo_probe_image::{probe_elf, tagged_frame as frame, ProbeConsole};
use vireo_vswitch::{MacAddr, PortConfig, SwitchConfig};

const T: Duration = Duration::from_secs(60);

fn vireo_bin() -> Option<PathBuf> {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return None;
    }
    let bin = Path::new(BIN).with_file_name("vireo");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --release -p vireo-cli` (a workspace build does)",
        bin.display()
    );
    Some(bin)
}

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

fn start_vm(vireo: &Path, socket: &Path, mac: [u8; 6]) -> Vm {
    let net = format!("vhost-user={},mac={}", socket.display(), MacAddr(mac));
    let mut child = Command::new(vireo)
        .args(["run", "--kernel", probe_elf().to_str().unwrap()])
        .args(["--memory", "64M", "--net", &net])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let console = ProbeConsole::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let mut vm = Vm { child, console };
    vm.console.wait_ready(T).expect("probe ready");
    let want = format!("OK mac={}", MacAddr(mac));
    assert_eq!(vm.console.command("NET 0 MAC", T).unwrap(), want);
    vm
}

fn send(vm: &mut Vm, f: &[u8]) {
    vm.console.net_send(0, f).unwrap();
}

/// Receives for up to `window`; true when `f` arrived (other frames are skipped).
fn received(vm: &mut Vm, f: &[u8], window: Duration) -> bool {
    vm.console.net_receive(0, window, |got| got == f).unwrap()
}

#[test]
fn kvm_probe_vms_talk_through_the_switch_process_and_a_vlan_change_cuts_them() {
    let Some(vireo) = vireo_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let macs = [[0x52, 0x54, 0, 0x77, 0, 1], [0x52, 0x54, 0, 0x77, 0, 2]];
    let sockets = [dir.join("ports/vm0.sock"), dir.join("ports/vm1.sock")];
    let port = |k: usize| {
        let mut p = vhost(&format!("vm{k}"), &sockets[k], 10);
        p.config.macs = vec![MacAddr(macs[k])];
        p
    };
    write_launch(dir, SwitchConfig::private("sw"), vec![port(0)]);
    let mut s = Switchd::start(dir);
    let mut c = s.client();
    c.ok(SwitchOp::AddPort { port: port(1) });
    let mut a = start_vm(&vireo, &sockets[0], macs[0]);
    let mut b = start_vm(&vireo, &sockets[1], macs[1]);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .status()
            .iter()
            .all(|p| p.connected)),
        "{:?}",
        s.status()
    );

    // Counted from here: a sends 3 frames to b, b sends 2 to a, each arrives.
    c.ok(SwitchOp::ResetMeters);
    for tag in 1..=3 {
        let f = frame(macs[1], macs[0], tag);
        send(&mut a, &f);
        assert!(
            received(&mut b, &f, Duration::from_secs(10)),
            "vm0 -> vm1 #{tag}"
        );
    }
    for tag in 11..=12 {
        let f = frame(macs[0], macs[1], tag);
        send(&mut b, &f);
        assert!(
            received(&mut a, &f, Duration::from_secs(10)),
            "vm1 -> vm0 #{tag}"
        );
    }
    let (m0, m1) = (s.port("vm0"), s.port("vm1"));
    let counts = |p: &vireo_api::switch::PortReport| {
        (
            p.meters.packets_in,
            p.meters.bytes_in,
            p.meters.packets_out,
            p.meters.bytes_out,
        )
    };
    assert_eq!(counts(&m0), (3, 3 * 64, 2, 2 * 64), "vm0: {m0:?}");
    assert_eq!(counts(&m1), (2, 2 * 64, 3, 3 * 64), "vm1: {m1:?}");
    assert_eq!(m0.learned_macs, vec![MacAddr(macs[0])]);
    assert_eq!(m1.learned_macs, vec![MacAddr(macs[1])]);

    // vm1 to VLAN 20 while both run: nothing crosses any more, either way.
    let mut cfg = PortConfig::access("vm1", 20);
    cfg.macs = vec![MacAddr(macs[1])];
    c.ok(SwitchOp::SetPort { config: cfg });
    let f = frame(macs[1], macs[0], 4);
    send(&mut a, &f);
    assert!(
        !received(&mut b, &f, Duration::from_secs(2)),
        "VLAN 10 -> 20 passed"
    );
    let f = frame([0xff; 6], macs[1], 5);
    send(&mut b, &f);
    assert!(
        !received(&mut a, &f, Duration::from_secs(2)),
        "VLAN 20 -> 10 passed"
    );
    let (m0, m1) = (s.port("vm0"), s.port("vm1"));
    assert_eq!(counts(&m0), (4, 4 * 64, 2, 2 * 64), "vm0: {m0:?}");
    assert_eq!(counts(&m1), (3, 3 * 64, 3, 3 * 64), "vm1: {m1:?}");

    // Back on VLAN 10; then vm1's VM goes away and a new one comes to the same socket: a
    // fresh session, and frames cross again.
    let mut cfg = PortConfig::access("vm1", 10);
    cfg.macs = vec![MacAddr(macs[1])];
    c.ok(SwitchOp::SetPort { config: cfg });
    drop(b);
    assert!(
        wait_until(Duration::from_secs(20), || !s.port("vm1").connected),
        "vm1 still connected after its VM ended"
    );
    let mut b = start_vm(&vireo, &sockets[1], macs[1]);
    assert!(wait_until(Duration::from_secs(10), || s
        .port("vm1")
        .connected));
    let f = frame(macs[1], macs[0], 6);
    send(&mut a, &f);
    assert!(
        received(&mut b, &f, Duration::from_secs(10)),
        "vm0 -> restarted vm1"
    );
    let f = frame(macs[0], macs[1], 7);
    send(&mut b, &f);
    assert!(
        received(&mut a, &f, Duration::from_secs(10)),
        "restarted vm1 -> vm0"
    );

    // Shutdown with VMs attached: sockets go, the process ends.
    c.ok(SwitchOp::Shutdown);
    assert_eq!(
        s.wait_exit(Duration::from_secs(20)).unwrap().code(),
        Some(0),
        "{}",
        s.log()
    );
    for p in &sockets {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    drop((a, b));
}
