//! Two probe VMs whose NICs are vhost-user ports of a Vireo switch running in this process
//! (`vireo run --net vhost-user=SOCKET`): no TAP, no kernel hop. Frames cross between them on
//! one VLAN, and stop when a port is moved to another VLAN while the VMs run. Needs only
//! /dev/kvm (no root, no network namespace).

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_probe_image::{probe_elf, tagged_frame as frame, ProbeConsole};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{MacAddr, PortConfig, Switch, SwitchConfig, VlanConfig};

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

fn start_vm(socket: &Path, mac: [u8; 6]) -> Vm {
    let net = format!("vhost-user={},mac={}", socket.display(), MacAddr(mac));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo"))
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
fn kvm_probe_vms_talk_over_vhost_user_switch_ports() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let macs = [[0x52, 0x54, 0, 0x76, 0, 1], [0x52, 0x54, 0, 0x76, 0, 2]];
    let sw = Arc::new(Mutex::new(
        Switch::new(SwitchConfig::private("vhu")).unwrap(),
    ));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let mut servers = Vec::new();
    let mut ports = Vec::new();
    let mut vms = Vec::new();
    let mut handles = Vec::new();
    for (k, mac) in macs.iter().enumerate() {
        let cfg = PortConfig {
            macs: vec![MacAddr(*mac)],
            ..PortConfig::access(&format!("vm{k}"), 10)
        };
        let id = lock(&sw).add_port(cfg).unwrap();
        let socket = dir.path().join(format!("vm{k}.sock"));
        let (port, server) = VhostUserServer::listen(&socket, &format!("vm{k}")).unwrap();
        rt.attach(id, port.clone());
        handles.push(port);
        vms.push(start_vm(&socket, *mac));
        servers.push(server);
        ports.push(id);
    }
    for (vm, mac) in vms.iter_mut().zip(&macs) {
        let want = format!("OK mac={}", MacAddr(*mac));
        assert_eq!(vm.console.command("NET 0 MAC", T).unwrap(), want);
    }
    let (a, b) = vms.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);

    // Both ways on VLAN 10.
    let f = frame(macs[1], macs[0], 1);
    send(a, &f);
    assert!(received(b, &f, Duration::from_secs(10)), "vm0 -> vm1");
    let f = frame(macs[0], macs[1], 2);
    send(b, &f);
    assert!(received(a, &f, Duration::from_secs(10)), "vm1 -> vm0");

    // B echoes: a round trip through the switch twice.
    b.console.send_line("NET 0 ECHO 1 10000").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let f = frame(macs[1], macs[0], 3);
    send(a, &f);
    assert!(received(
        a,
        &frame(macs[0], macs[1], 3),
        Duration::from_secs(10)
    ));
    assert_eq!(b.console.answer(T).unwrap(), "OK echoed=1");

    // Move vm1 to VLAN 20 while both run: nothing crosses any more, either way.
    let mut cfg = lock(&sw).status(ports[1]).unwrap().config;
    cfg.vlan = VlanConfig::Access { vid: 20 };
    lock(&sw).set_port_config(ports[1], cfg).unwrap();
    let f = frame(macs[1], macs[0], 4);
    send(a, &f);
    assert!(
        !received(b, &f, Duration::from_secs(2)),
        "VLAN 10 -> 20 passed"
    );
    let f = frame([0xff; 6], macs[1], 5);
    send(b, &f);
    assert!(
        !received(a, &f, Duration::from_secs(2)),
        "VLAN 20 -> 10 passed"
    );

    let st = lock(&sw).status(ports[0]).unwrap();
    assert!(st.meters.ingress.packets >= 3, "{st:?}");
    assert!(st.meters.egress.packets >= 2, "{st:?}");
    assert!(handles.iter().all(|p| p.connected()));
    drop(vms);
    // The VMs are gone: each port learns it and stops using their rings.
    let deadline = Instant::now() + Duration::from_secs(20);
    while handles.iter().any(|p| p.connected()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        handles.iter().all(|p| !p.connected()),
        "a port still holds rings"
    );
    for s in servers {
        s.stop().unwrap();
    }
    rt.stop().unwrap();
}

#[test]
fn vhost_user_socket_without_backend_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let out = common::run_with_timeout(
        &[
            "run",
            "--kernel",
            probe_elf().to_str().unwrap(),
            "--net",
            &format!("vhost-user={}", socket.display()),
        ],
        b"",
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("vhost-user backend") && err.contains("nobody.sock"),
        "{err}"
    );
}
