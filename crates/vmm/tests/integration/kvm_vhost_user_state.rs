//! Save and restore of a VM whose NIC is a vhost-user port of a Vireo switch (docs/vm-state.md):
//! two probe VMs on one switch, A blasting sequence-numbered frames at B. A is paused, saved
//! and resumed mid-blast, then paused and saved mid-blast again with frames queued in its
//! transmit ring that the switch has not taken (it stopped serving A's port meanwhile), stopped, and restored into a NEW VM that
//! reconnects to its port. B's sink then accounts for every frame A sent exactly once: received,
//! or dropped by the switch because B's receive ring was full (counted), never lost silently
//! or duplicated. Afterwards the restored NIC still receives.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_probe_image::{console, probe_elf, ProbeConsole};
use vireo_vmm::state::Identity;
use vireo_vmm::vhost_user_net::VhostUserNet;
use vireo_vmm::{ConsoleConfig, RestoreFrom, VirtioSlot, Vm, VmConfig, VmExit};
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{DropReason, PortConfig, Switch, SwitchConfig};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);
const MAC_A: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0x00, 0x5a, 0x00, 0x0b];
/// A sends for this long (guest time, which keeps running through the save): long enough
/// that the blast is still going when the switch stops serving A, however fast the host is (a
/// fixed frame count finished within the first 300 ms on a quiet machine).
const BLAST_SECS: u64 = 20;

fn config(socket: &std::path::Path, mac: [u8; 6]) -> (VmConfig, ProbeConsole) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), 64 * MIB, 1);
    config.console = ConsoleConfig::Stream(theirs);
    config.devices.push(VirtioSlot {
        device: Box::new(VhostUserNet::connect(socket, mac).unwrap()),
        flush_on_exit: None,
    });
    (config, ProbeConsole::new(ours.try_clone().unwrap(), ours))
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn num(answer: &str, key: &str) -> u64 {
    console::field(answer, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {answer}"))
}

/// Frames A's driver has published in its transmit ring that the backend has not taken, as
/// the paused VM's state and memory say.
fn pending_tx(state: &vireo_vmm::VmState, mem: &vireo_vmm::GuestMemory) -> u16 {
    let tx = &state.virtio[0].queues[1];
    let avail: u16 = mem.read_obj(GuestAddress(tx.avail_ring + 2)).unwrap();
    avail.wrapping_sub(tx.next_avail)
}

#[test]
fn kvm_vhost_user_nic_is_saved_and_restored_mid_blast_without_losing_a_frame() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sock_a, sock_b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let save_dir = dir.path().join("save");
    let mut sw = Switch::new(SwitchConfig::private("kvm-vhu-save")).unwrap();
    let p_a = sw.add_port(PortConfig::access("a", 1)).unwrap();
    let p_b = sw.add_port(PortConfig::access("b", 1)).unwrap();
    let switch = Arc::new(Mutex::new(sw));
    let rt = SwitchRuntime::start(switch.clone()).unwrap();
    let (port_a, server_a) = VhostUserServer::listen(&sock_a, "a").unwrap();
    let (port_b, server_b) = VhostUserServer::listen(&sock_b, "b").unwrap();
    rt.attach(p_a, port_a.clone());
    rt.attach(p_b, port_b.clone());

    let (config_b, mut con_b) = config(&sock_b, MAC_B);
    let vm_b = Vm::new(config_b).unwrap();
    let h_b = vm_b.handle();
    let run_b = std::thread::spawn(move || vm_b.run());
    let (config_a, mut con_a) = config(&sock_a, MAC_A);
    let vm_a = Vm::new(config_a).unwrap();
    let h_a = vm_a.handle();
    let run_a = std::thread::spawn(move || vm_a.run());
    con_b.wait_ready(T).unwrap();
    con_a.wait_ready(T).unwrap();

    // B counts for up to 120 s and waits 20 s after the last frame, longer than A's save and
    // restore take.
    con_b.send_line("NET 0 SINK 120 20000").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    con_a
        .send_line(&format!("NET 0 BLAST 64 {BLAST_SECS}s {}", mac_text(MAC_B)))
        .unwrap();

    // Pause, save the state, resume: the blast goes on (the backend's rings restart).
    std::thread::sleep(Duration::from_millis(300));
    h_a.pause().unwrap();
    let s1 = h_a.save_state(Identity::default(), None).unwrap();
    assert!(s1.virtio[0].active);
    h_a.resume().unwrap();

    // The switch stops serving A's port, so A's transmit ring fills with frames nobody takes
    // (a busy switch); A is paused and saved with them queued.
    rt.detach(p_a);
    let mut pending = 0;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        h_a.pause().unwrap();
        let s = h_a.save_state(Identity::default(), None).unwrap();
        pending = pending_tx(&s, h_a.memory());
        if pending > 0 {
            break;
        }
        h_a.resume().unwrap();
    }
    assert!(pending > 0, "A's transmit ring never held queued frames");
    h_a.save(&save_dir, Identity::default(), None).unwrap();
    h_a.request_stop();
    assert_eq!(run_a.join().unwrap().unwrap(), VmExit::Stopped);
    drop((con_a, h_a));
    // The old VMM's session ends; the port waits for the next one.
    let deadline = Instant::now() + T;
    while port_a.connected() {
        assert!(Instant::now() < deadline, "port A kept the old session");
        std::thread::sleep(Duration::from_millis(5));
    }

    // A new VM from the save, on a new connection to the same port.
    let from = RestoreFrom::dir(&save_dir).unwrap();
    let (config_a, mut con_a) = config(&sock_a, MAC_A);
    let vm_a = Vm::restore(config_a, &from).unwrap();
    let h_a = vm_a.handle();
    let run_a = std::thread::spawn(move || vm_a.run());
    rt.attach(p_a, port_a.clone());
    h_a.resume().unwrap();

    // A's blast ends on the restored VM and answers on its new console.
    let blast = con_a.answer(Duration::from_secs(150)).unwrap();
    assert!(blast.starts_with("OK sent="), "{blast}");
    let sent = num(&blast, "sent");
    assert!(
        sent >= pending as u64,
        "{blast}; {pending} were queued at the save"
    );
    let sink = con_b.answer(Duration::from_secs(150)).unwrap();
    assert!(sink.starts_with("OK frames="), "{sink}");
    let (frames, lost, reordered, other) = (
        num(&sink, "frames"),
        num(&sink, "lost"),
        num(&sink, "reordered"),
        num(&sink, "other"),
    );
    let dropped = vireo_vswitch::runtime::lock(&switch).drops(p_b, DropReason::TxFull);
    eprintln!(
        "A sent {sent}, {pending} queued at the save; B: {sink}; switch dropped {dropped} for B's full ring"
    );
    // Nothing duplicated or out of order, and every frame accounted for: received by B or
    // dropped by the switch (overload, counted); a frame lost in the save would be neither.
    assert_eq!(reordered, 0, "{sink}");
    assert_eq!(other, 0, "{sink}");
    assert_eq!(frames + dropped, sent, "{sink}; dropped {dropped}");
    assert!(lost <= dropped, "{sink}; dropped {dropped}");

    // Both NICs keep working: B sends to the restored A, which receives it.
    let f = {
        let mut f = [MAC_A, MAC_B].concat();
        f.extend_from_slice(&[0x88, 0xb5, 0xde, 0xad]);
        f.extend(std::iter::repeat_n(0x5au8, 50));
        f
    };
    let hex = console::encode_hex(&f);
    let deadline = Instant::now() + T;
    loop {
        con_b.command(&format!("NET 0 SEND {hex}"), T).unwrap();
        let got = con_a.command("NET 0 RECV 500", T);
        if let Ok(got) = got {
            assert!(got.ends_with(&hex), "{got}");
            break;
        }
        assert!(Instant::now() < deadline, "the restored NIC never received");
    }

    con_a.send_line("POWEROFF 0").unwrap();
    assert_eq!(run_a.join().unwrap().unwrap(), VmExit::PowerOff(0));
    con_b.send_line("POWEROFF 0").unwrap();
    assert_eq!(run_b.join().unwrap().unwrap(), VmExit::PowerOff(0));
    drop(h_b);
    server_a.stop().unwrap();
    server_b.stop().unwrap();
    rt.stop().unwrap();
}
