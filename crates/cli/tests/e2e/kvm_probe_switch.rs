//! Three probe VMs, each on a TAP inside a network namespace the test creates, are ports of a
//! Vireo switch running in this process (AF_PACKET sockets bound to the TAPs, opened from a
//! thread that entered the namespace). Real guest traffic proves the port policies: same
//! access VLAN passes, different VLANs are blocked, PVLAN isolated↔isolated is blocked while
//! isolated→promiscuous passes, a spoofed source MAC and a gratuitous ARP for a neighbour's
//! IP are dropped and counted. Policies are changed while the switch runs.

use crate::common;

use common::{ip, Netns};

use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, PacketBuilder};
use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::{
    DropReason, GuardConfig, MacAddr, PortConfig, PortId, PvlanDomain, PvlanMode, Switch,
    SwitchConfig, VlanConfig,
};

const T: Duration = Duration::from_secs(60);

struct Vm {
    child: Child,
    console: ProbeConsole,
    mac: [u8; 6],
    ip: Ipv4Addr,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mac_str(m: &[u8; 6]) -> String {
    MacAddr(*m).to_string()
}

fn start_vm(ns: &str, tap: &str, mac: [u8; 6], ip: Ipv4Addr) -> Vm {
    let net = format!("tap={tap},mac={}", mac_str(&mac));
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
    let mut vm = Vm {
        child,
        console,
        mac,
        ip,
    };
    vm.console.wait_ready(T).expect("probe ready");
    vm
}

/// Binds an AF_PACKET port to `ifname` in namespace `ns`: a socket belongs to the namespace
/// of the thread that creates it, so a helper thread enters the namespace and opens it there.
fn bind_in_ns(ns: &str, ifname: &str) -> PacketPort {
    let path = format!("/var/run/netns/{ns}");
    let ifname = ifname.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns(2) on a namespace fd we hold; it only changes this helper thread.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        PacketPort::bind(&ifname).unwrap()
    })
    .join()
    .unwrap()
}

/// A UDP datagram from `from` to `to`, marked with `tag` so each test frame is unique.
fn udp(from: &Vm, to_mac: [u8; 6], to_ip: Ipv4Addr, tag: u8) -> Vec<u8> {
    let payload: Vec<u8> = (0..32u8).map(|i| i ^ tag).collect();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(from.mac, to_mac)
        .ipv4(from.ip.octets(), to_ip.octets(), 64)
        .udp(40000 + tag as u16, 9)
        .write(&mut v, &payload)
        .unwrap();
    v
}

/// A gratuitous ARP from `src_mac` claiming `claimed`.
fn garp(src_mac: [u8; 6], claimed: Ipv4Addr) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &src_mac,
        &claimed.octets(),
        &[0; 6],
        &claimed.octets(),
    )
    .unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(src_mac, [0xff; 6])
        .arp(arp)
        .write(&mut v)
        .unwrap();
    v
}

fn send(vm: &mut Vm, f: &[u8]) {
    vm.console.net_send(0, f).unwrap();
}

/// Whether `got` is `sent` as the switch delivers it: frames shorter than the Ethernet minimum
/// (60 bytes without FCS, e.g. a 42-byte ARP) arrive zero-padded to it.
fn same_frame(got: &[u8], sent: &[u8]) -> bool {
    let padded = sent.len() < 60
        && got.len() == 60
        && got.starts_with(sent)
        && got[sent.len()..].iter().all(|b| *b == 0);
    got == sent || padded
}

/// Receives for up to `window`, skipping unrelated frames (the host stack's own frames on the
/// TAP); true when `want` arrived.
fn received(vm: &mut Vm, want: &[u8], window: Duration) -> bool {
    vm.console
        .net_receive(0, window, |got| same_frame(got, want))
        .unwrap()
}

const PASS: Duration = Duration::from_secs(10);
/// How long a blocked frame is given to show up anyway.
const BLOCK: Duration = Duration::from_secs(2);

struct Lab {
    rt: SwitchRuntime,
    ports: Vec<PortId>,
    vms: Vec<Vm>,
}

impl Lab {
    fn set(&self, k: usize, cfg: PortConfig) {
        lock(self.rt.switch())
            .set_port_config(self.ports[k], cfg)
            .unwrap();
    }

    fn drops(&self, k: usize, r: DropReason) -> u64 {
        lock(self.rt.switch()).drops(self.ports[k], r)
    }

    /// VM `from` sends `f`; whether VM `to` got it.
    fn deliver(&mut self, from: usize, to: usize, f: &[u8], window: Duration) -> bool {
        send(&mut self.vms[from], f);
        received(&mut self.vms[to], f, window)
    }

    fn port_cfg(&self, k: usize, vlan: VlanConfig) -> PortConfig {
        PortConfig {
            name: format!("vm{k}"),
            vlan,
            macs: vec![MacAddr(self.vms[k].mac)],
            guard: GuardConfig {
                arp_nd_guard: true,
                allowed_ipv4: vec![self.vms[k].ip],
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

#[test]
fn kvm_probe_vms_on_the_switch_obey_port_policies() {
    if !common::kvm_usable() {
        return;
    }
    let pid = std::process::id();
    let Some(ns) = Netns::create(format!("vireo-sw-{pid}")) else {
        return;
    };
    // No IPv6 autoconfiguration chatter on the TAPs.
    assert!(ip(&[
        "netns",
        "exec",
        &ns.0,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1"
    ]));

    let mut vms = Vec::new();
    let mut taps = Vec::new();
    for k in 0..3u8 {
        let tap = format!("vs{k}{}", pid % 100_000);
        let mac = [0x52, 0x54, 0x00, 0x5a, 0x00, k + 1];
        let addr = Ipv4Addr::new(10, 66, 0, k + 1);
        vms.push(start_vm(&ns.0, &tap, mac, addr));
        assert!(ip(&["-n", &ns.0, "link", "set", &tap, "up"]));
        taps.push(tap);
    }

    let domain = PvlanDomain {
        primary: 100,
        isolated: Some(101),
        communities: vec![],
    };
    let mut cfg = SwitchConfig::private("vm-e2e");
    cfg.pvlan_domains.push(domain);
    let sw = Arc::new(Mutex::new(Switch::new(cfg).unwrap()));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let mut lab = Lab {
        rt,
        ports: Vec::new(),
        vms,
    };
    let access = |vid| VlanConfig::Access { vid };
    for (k, tap) in taps.iter().enumerate() {
        let vid = if k == 2 { 20 } else { 10 };
        let id = lock(&sw).add_port(lab.port_cfg(k, access(vid))).unwrap();
        lab.rt.attach_packet(id, Arc::new(bind_in_ns(&ns.0, tap)));
        lab.ports.push(id);
    }
    for k in 0..3 {
        let want = format!("OK mac={}", mac_str(&lab.vms[k].mac));
        assert_eq!(lab.vms[k].console.command("NET 0 MAC", T).unwrap(), want);
    }
    let (m0, m1, m2) = (lab.vms[0].mac, lab.vms[1].mac, lab.vms[2].mac);
    let (i0, i1, i2) = (lab.vms[0].ip, lab.vms[1].ip, lab.vms[2].ip);

    // Same access VLAN: both ways.
    let f = udp(&lab.vms[0], m1, i1, 1);
    assert!(lab.deliver(0, 1, &f, PASS), "vm0 -> vm1 on VLAN 10");
    let f = udp(&lab.vms[1], m0, i0, 2);
    assert!(lab.deliver(1, 0, &f, PASS), "vm1 -> vm0 on VLAN 10");

    // Different VLANs: vm2 (VLAN 20) hears nothing from vm0, not even a broadcast.
    let f = udp(&lab.vms[0], m2, i2, 3);
    assert!(
        !lab.deliver(0, 2, &f, BLOCK),
        "VLAN 10 frame reached VLAN 20"
    );
    let f = udp(&lab.vms[0], [0xff; 6], Ipv4Addr::BROADCAST, 4);
    assert!(
        !lab.deliver(0, 2, &f, BLOCK),
        "VLAN 10 broadcast reached VLAN 20"
    );
    let f = udp(&lab.vms[2], m0, i0, 5);
    assert!(
        !lab.deliver(2, 0, &f, BLOCK),
        "VLAN 20 frame reached VLAN 10"
    );

    // Private VLAN, changed while the switch runs: vm0 and vm1 isolated, vm2 promiscuous.
    let pvlan = |mode| VlanConfig::Private {
        primary: 100,
        secondary: 101,
        mode,
    };
    lab.set(0, lab.port_cfg(0, pvlan(PvlanMode::Isolated)));
    lab.set(1, lab.port_cfg(1, pvlan(PvlanMode::Isolated)));
    lab.set(2, lab.port_cfg(2, pvlan(PvlanMode::Promiscuous)));
    let f = udp(&lab.vms[0], m2, i2, 6);
    assert!(lab.deliver(0, 2, &f, PASS), "isolated -> promiscuous");
    let f = udp(&lab.vms[2], m1, i1, 7);
    assert!(lab.deliver(2, 1, &f, PASS), "promiscuous -> isolated");
    let f = udp(&lab.vms[1], m2, i2, 12);
    assert!(lab.deliver(1, 2, &f, PASS), "isolated -> promiscuous (vm1)");
    // vm1's MAC is now learned in the domain, so this is a unicast the isolation rule blocks.
    let before = lab.drops(0, DropReason::Isolation);
    let f = udp(&lab.vms[0], m1, i1, 8);
    assert!(!lab.deliver(0, 1, &f, BLOCK), "isolated -> isolated passed");
    assert!(lab.drops(0, DropReason::Isolation) > before);
    let f = udp(&lab.vms[0], [0xff; 6], Ipv4Addr::BROADCAST, 9);
    assert!(
        !lab.deliver(0, 1, &f, BLOCK),
        "isolated broadcast reached isolated"
    );

    // Back on one access VLAN: spoofing and ARP guards.
    for k in 0..3 {
        lab.set(k, lab.port_cfg(k, access(10)));
    }
    let before = lab.drops(0, DropReason::MacSpoof);
    let mut f = udp(&lab.vms[0], m1, i1, 10);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0x00, 0x66, 0x66, 0x66]);
    assert!(!lab.deliver(0, 1, &f, BLOCK), "spoofed source MAC passed");
    assert_eq!(lab.drops(0, DropReason::MacSpoof), before + 1);

    let before = lab.drops(0, DropReason::ArpSpoof);
    let f = garp(m0, i1);
    assert!(
        !lab.deliver(0, 1, &f, BLOCK),
        "gratuitous ARP for vm1's IP passed"
    );
    assert_eq!(lab.drops(0, DropReason::ArpSpoof), before + 1);
    // The honest announcement of its own address still goes through.
    let f = garp(m0, i0);
    assert!(lab.deliver(0, 1, &f, PASS), "vm0's own gratuitous ARP");
    let f = udp(&lab.vms[0], m1, i1, 11);
    assert!(
        lab.deliver(0, 1, &f, PASS),
        "legitimate traffic after the guards"
    );

    let st = lock(&sw).status(lab.ports[0]).unwrap();
    assert!(st.meters.ingress.packets >= 8, "{st:?}");
    drop(lab);
}
