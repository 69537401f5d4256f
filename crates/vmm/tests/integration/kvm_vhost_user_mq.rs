//! Multiqueue end to end under KVM: a probe VM whose NIC has two queue pairs on a switch's
//! vhost-user port (`VhostUserNet::connect_with_pairs`). The probe's driver negotiates MQ and
//! CTRL_VQ and turns the second pair on with VQ_PAIRS_SET (`NET 0 PAIRS 2`); UDP frames of 16
//! flows from the host then arrive on both receive rings, each flow on one ring; the guest sends
//! on both transmit rings and the host gets every frame. Lowered to one pair, everything comes
//! in on pair 0 and pair 1 refuses to send. Saved with two pairs and restored into a new VM on
//! a new connection, the NIC still uses both pairs and every flow keeps its ring.

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vireo_netport::{channel_pair, ChannelPort, FramePort};
use vireo_probe_image::console::{decode_hex, encode_hex};
use vireo_probe_image::{
    parse_udp_flow_frame, probe_elf, udp_flow_frame, ProbeConsole, ProbeError,
};
use vireo_vmm::state::Identity;
use vireo_vmm::vhost_user_net::VhostUserNet;
use vireo_vmm::{ConsoleConfig, RestoreFrom, VirtioSlot, Vm, VmConfig, VmExit, VmHandle};
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{PortConfig, Switch, SwitchConfig};

const T: Duration = Duration::from_secs(60);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x6d, 0x71, 0x01];
const MAC_HOST: [u8; 6] = [0x52, 0x54, 0x00, 0x6d, 0x71, 0x02];
const FLOWS: u16 = 16;
const PAIRS: u16 = 2;

struct Running {
    h: VmHandle,
    run: JoinHandle<Result<VmExit, vireo_vmm::VmmError>>,
    con: ProbeConsole,
}

impl Running {
    fn start(socket: &Path, from: Option<&RestoreFrom>) -> Running {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut config = VmConfig::new(probe_elf(), 64 << 20, 1);
        config.console = ConsoleConfig::Stream(theirs);
        config.devices.push(VirtioSlot {
            device: Box::new(VhostUserNet::connect_with_pairs(socket, MAC, PAIRS).unwrap()),
            flush_on_exit: None,
        });
        let vm = match from {
            Some(from) => Vm::restore(config, from).unwrap(),
            None => Vm::new(config).unwrap(),
        };
        let h = vm.handle();
        let run = std::thread::spawn(move || vm.run());
        let mut con = ProbeConsole::new(ours.try_clone().unwrap(), ours);
        match from {
            Some(_) => h.resume().unwrap(),
            None => con.wait_ready(T).unwrap(),
        }
        Running { h, run, con }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.con
            .command(line, T)
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// The probe's `ERR` text for `line`, which must fail.
    fn refused(&mut self, line: &str) -> String {
        match self.con.command(line, T) {
            Err(ProbeError::Err(text)) => text,
            other => panic!("{line}: expected ERR, got {other:?}"),
        }
    }
}

/// Frame `flow` of round `round` from the host to the VM (its source port is the flow).
fn udp_frame(flow: u16, round: u8) -> Vec<u8> {
    udp_flow_frame(MAC, MAC_HOST, flow, round)
}

/// (round, flow) of a frame made by `udp_frame`.
fn parse_udp(f: &[u8]) -> Option<(u8, u16)> {
    parse_udp_flow_frame(f).filter(|_| f[..6] == MAC)
}

/// The host sends one frame of each flow (tagged `round`); the guest takes them off each
/// receive ring in turn. Returns the flows each pair got; every flow arrives exactly once.
fn flows_per_pair(vm: &mut Running, host: &ChannelPort, round: u8) -> Vec<Vec<u16>> {
    for flow in 0..FLOWS {
        host.send(&udp_frame(flow, round)).unwrap();
    }
    let mut per_pair = vec![Vec::new(); usize::from(PAIRS)];
    let mut seen = HashSet::new();
    let deadline = Instant::now() + T;
    while seen.len() < usize::from(FLOWS) {
        assert!(
            Instant::now() < deadline,
            "round {round}: only {per_pair:?} arrived"
        );
        for (p, flows) in per_pair.iter_mut().enumerate() {
            let line = format!("NET 0 RECV 100 pair={p}");
            let hex = match vm.con.command(&line, T) {
                Ok(answer) => answer.strip_prefix("OK ").unwrap().to_string(),
                Err(ProbeError::Err(text)) if text.contains("timeout") => continue,
                Err(e) => panic!("{line}: {e}"),
            };
            let frame = decode_hex(&hex).unwrap();
            let Some((r, flow)) = parse_udp(&frame) else {
                continue; // not ours (nothing else is on this switch, but do not depend on it)
            };
            assert_eq!(r, round, "a frame of round {r} came in round {round}");
            assert!(
                seen.insert(flow),
                "flow {flow} of round {round} arrived twice"
            );
            flows.push(flow);
        }
    }
    per_pair
}

/// The guest sends 8 tagged frames on each pair in use and blasts 64 frames on the last one;
/// the host receives every one of them.
fn transmit_on_every_pair(vm: &mut Running, host: &ChannelPort, pairs: u16, tag: u8) {
    let mut want = HashSet::new();
    for p in 0..pairs {
        for k in 0..8u8 {
            let mut f = [MAC_HOST, MAC].concat();
            f.extend_from_slice(&[0x88, 0xb6, tag, p as u8, k]);
            f.resize(60, 0);
            vm.cmd(&format!("NET 0 SEND {} pair={p}", encode_hex(&f)));
            want.insert(f);
        }
    }
    let mac_host = MAC_HOST.map(|b| format!("{b:02x}")).join(":");
    let blast = vm.cmd(&format!("NET 0 BLAST 64 64 {mac_host} pair={}", pairs - 1));
    assert!(blast.starts_with("OK sent=64 "), "{blast}");
    eprintln!("tag {tag}: blast on pair {}: {blast}", pairs - 1);
    let mut blast_seqs = HashSet::new();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + T;
    while !want.is_empty() || blast_seqs.len() < 64 {
        assert!(
            Instant::now() < deadline,
            "tag {tag}: {} sent frames and {} of 64 blast frames never reached the host",
            want.len(),
            blast_seqs.len()
        );
        let Some(len) = host.recv(&mut buf).unwrap() else {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        };
        let f = &buf[..len];
        if f.len() >= 30 && f[12..18] == [0x88, 0xb5, b'V', b'B', b'L', b'S'] {
            blast_seqs.insert(u64::from_le_bytes(f[22..30].try_into().unwrap()));
        } else {
            want.remove(f);
        }
    }
}

#[test]
fn kvm_probe_uses_two_queue_pairs_and_keeps_them_across_a_restore() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let save_dir = dir.path().join("save");
    let mut sw = Switch::new(SwitchConfig::private("kvm-vhu-mq")).unwrap();
    let p_vm = sw.add_port(PortConfig::access("vm", 1)).unwrap();
    let p_host = sw.add_port(PortConfig::access("host", 1)).unwrap();
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
    let (port, server) = VhostUserServer::listen(&sock, "vm").unwrap();
    rt.attach(p_vm, port.clone());
    let (host_sw, host) = channel_pair("host-sw", "host").unwrap();
    rt.attach(p_host, Arc::new(host_sw));

    let mut vm = Running::start(&sock, None);
    // The driver sets both pairs up but, like any driver, starts on one.
    assert_eq!(vm.cmd("NET 0 PAIRS"), "OK pairs=1 max=2");
    let e = vm.refused(&format!("NET 0 SEND {} pair=1", encode_hex(&[0u8; 60])));
    assert!(e.contains("pair not enabled"), "{e}");
    for bad in ["NET 0 PAIRS 0", "NET 0 PAIRS 3", "NET 0 RECV 10 pair=2"] {
        let e = vm.refused(bad);
        assert!(e.contains("no such pair"), "{bad}: {e}");
    }
    let e = vm.refused("NET 0 RECV 10 pair=x");
    assert!(e.contains("bad pair"), "{e}");

    // What switching costs, console round trip included (printed, not asserted: the host is
    // shared and noisy).
    let (mut switch, mut ping) = (Vec::new(), Vec::new());
    for n in [2, 1].repeat(10) {
        let start = Instant::now();
        assert_eq!(
            vm.cmd(&format!("NET 0 PAIRS {n}")),
            format!("OK pairs={n} max=2")
        );
        switch.push(start.elapsed());
        let start = Instant::now();
        vm.cmd("PING");
        ping.push(start.elapsed());
    }
    for (what, took) in [
        ("NET 0 PAIRS n", &mut switch),
        ("PING (console alone)", &mut ping),
    ] {
        took.sort();
        eprintln!(
            "{what}, 20 runs: median {:?}, min {:?}, max {:?}",
            took[10], took[0], took[19]
        );
    }
    assert_eq!(vm.cmd("NET 0 PAIRS 2"), "OK pairs=2 max=2");
    let two = flows_per_pair(&mut vm, &host, 1);
    eprintln!("2 pairs: flows per pair {two:?}");
    assert!(
        two.iter().all(|f| !f.is_empty()),
        "a pair got no flow: {two:?}"
    );
    // Each flow keeps its ring: a second round lands exactly as the first.
    let again = flows_per_pair(&mut vm, &host, 2);
    assert_eq!(sorted(&again), sorted(&two), "flows moved between rings");
    transmit_on_every_pair(&mut vm, &host, 2, 1);

    assert_eq!(vm.cmd("NET 0 PAIRS 1"), "OK pairs=1 max=2");
    let one = flows_per_pair(&mut vm, &host, 3);
    assert_eq!(one[0].len(), usize::from(FLOWS), "one pair: {one:?}");
    let e = vm.refused(&format!("NET 0 BLAST 64 1 {} pair=1", "00:00:00:00:00:01"));
    assert!(e.contains("pair not enabled"), "{e}");
    transmit_on_every_pair(&mut vm, &host, 1, 2);

    // Saved with two pairs in use, restored into a new VM that reconnects to the port.
    assert_eq!(vm.cmd("NET 0 PAIRS 2"), "OK pairs=2 max=2");
    vm.h.pause().unwrap();
    vm.h.save(&save_dir, Identity::default(), None).unwrap();
    vm.h.request_stop();
    let Running { h, run, con } = vm;
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
    // The handle holds the device, and with it the old session.
    drop((h, con));
    let deadline = Instant::now() + T;
    while port.connected() {
        assert!(Instant::now() < deadline, "the port kept the old session");
        std::thread::sleep(Duration::from_millis(5));
    }
    let from = RestoreFrom::dir(&save_dir).unwrap();
    let mut vm = Running::start(&sock, Some(&from));
    assert_eq!(vm.cmd("NET 0 PAIRS"), "OK pairs=2 max=2");
    let restored = flows_per_pair(&mut vm, &host, 4);
    assert_eq!(
        sorted(&restored),
        sorted(&two),
        "after the restore the flows landed elsewhere"
    );
    transmit_on_every_pair(&mut vm, &host, 2, 3);

    vm.con.send_line("POWEROFF 0").unwrap();
    assert_eq!(vm.run.join().unwrap().unwrap(), VmExit::PowerOff(0));
    server.stop().unwrap();
    rt.stop().unwrap();
}

fn sorted(per_pair: &[Vec<u16>]) -> Vec<Vec<u16>> {
    per_pair
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f.sort_unstable();
            f
        })
        .collect()
}
