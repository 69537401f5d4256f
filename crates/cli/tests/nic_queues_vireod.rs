//! End to end under KVM: a VM NIC with two queue pairs (`vm nic add --queues 2`) through vireod,
//! its real worker and its switch process. The worker's NIC has the pairs (its log says what the
//! port gave), the probe guest, whose driver knows no multiqueue and so stays on pair 0, still
//! exchanges frames through it with a one-pair VM; the count is shown by `vm show` and `vm nic
//! list`, refused out of range (422 naming the field and value) and refused while the VM runs
//! (hardware); turned off, it changes and the VM starts with the new count; saved, the VM's NICs
//! cannot change and it restores with its count and still exchanges frames.
//!
//! Not covered here: frames on the second pair from vireod (the probe has no control queue);
//! `crates/vmm/tests/vhost_user_net.rs` drives that with a fake driver against a switch port.

use std::time::{Duration, Instant};

use vireo_api::{NicSpec, Vm};
use vireo_probe_image::console::{decode_hex, encode_hex};
use vireo_probe_image::tagged_frame as frame;

mod vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::Daemon;

/// VMs and the switch outlive vireod by design: removed on the way out, also on a failure.
struct RemoveAll<'a>(&'a Daemon);

impl Drop for RemoveAll<'_> {
    fn drop(&mut self) {
        for vm in ["mq", "one"] {
            let _ = self.0.vireo(&["vm", "turn-off", vm]).output();
            let _ = self.0.vireo(&["vm", "rm", vm]).output();
        }
        let _ = self.0.vireo(&["switch", "rm", "lan"]).output();
    }
}

fn nics(d: &Daemon, vm: &str) -> Vec<NicSpec> {
    serde_json::from_str(&d.ok(&["vm", "nic", "list", vm, "--output", "json"])).unwrap()
}

fn worker_log(d: &Daemon, vm: &str) -> String {
    let dir = d
        .dir
        .path()
        .join("state/vms")
        .join(d.vm(vm).identity.id.to_string());
    std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default()
}

/// True when `want` reaches the probe's NIC 0 within 20 s (other frames are skipped).
fn receives(c: &mut Console, want: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let answer = c.ask("NET 0 RECV 2000");
        if let Some(hex) = answer.strip_prefix("OK ") {
            if decode_hex(hex).as_deref() == Some(want) {
                return true;
            }
        }
    }
    false
}

#[test]
fn kvm_a_two_pair_nic_through_vireod() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let switchd = std::path::Path::new(vireod_harness::VIREO)
        .parent()
        .unwrap()
        .join("vireo-switch");
    if !switchd.is_file() {
        vireo_testkit::skip(
            "vireo-switch built beside vireo (cargo build --release -p vireo-switchd)",
        );
        return;
    }
    let Some(d) = Daemon::start() else { return };
    let _cleanup = RemoveAll(&d);
    let kernel = vireo_probe_image::probe_elf();
    let kernel = kernel.to_str().unwrap();
    d.ok(&["switch", "create", "lan", "--type", "private"]);
    for vm in ["mq", "one"] {
        d.ok(&["vm", "create", vm, "--kernel", kernel, "--memory", "32M"]);
    }

    for bad in ["0", "9"] {
        let (code, e) = d.fails(&["vm", "nic", "add", "mq", "--switch", "lan", "--queues", bad]);
        assert_eq!(code, 2, "{e}");
        assert!(
            e.contains("nics[0].queues") && e.contains(bad) && e.contains("1 to 4"),
            "{e}"
        );
    }
    assert!(nics(&d, "mq").is_empty(), "a refused NIC was stored");

    let out = d.ok(&["vm", "nic", "add", "mq", "--switch", "lan", "--queues", "2"]);
    assert!(out.contains("2 queue pairs"), "{out}");
    d.ok(&["vm", "nic", "add", "one", "--switch", "lan"]);
    let show = d.ok(&["vm", "show", "mq"]);
    assert!(show.contains("access 1, 2 queue pairs)"), "{show}");
    let vm: Vm = serde_json::from_str(&d.ok(&["vm", "show", "mq", "--output", "json"])).unwrap();
    assert_eq!(vm.spec.nics[0].queues, Some(2));
    assert_eq!(nics(&d, "one")[0].queues, None, "one pair unless asked");

    for vm in ["mq", "one"] {
        d.ok(&["vm", "start", vm]);
    }
    let (mut mq, mut one) = (Console::attach(&d, "mq"), Console::attach(&d, "one"));
    mq.ok("PING");
    one.ok("PING");
    let log = worker_log(&d, "mq");
    assert!(
        log.contains("NIC nic0 (lan) on ") && log.contains("2 queue pair(s)"),
        "{log}"
    );
    let mac = |vm: &str| nics(&d, vm)[0].mac.unwrap().0;
    let (m_mq, m_one) = (mac("mq"), mac("one"));
    for tag in 1..=3 {
        let f = frame(m_one, m_mq, tag);
        mq.ok(&format!("NET 0 SEND {}", encode_hex(&f)));
        assert!(receives(&mut one, &f), "mq -> one #{tag}");
        let f = frame(m_mq, m_one, tag + 10);
        one.ok(&format!("NET 0 SEND {}", encode_hex(&f)));
        assert!(receives(&mut mq, &f), "one -> mq #{tag}");
    }

    let (code, e) = d.fails(&["vm", "nic", "set", "mq", "nic0", "--queues", "4"]);
    assert_eq!(code, 1, "a conflict, not bad input: {e}");
    assert!(e.contains("turn it off first"), "{e}");
    assert_eq!(
        nics(&d, "mq")[0].queues,
        Some(2),
        "a refused change was stored"
    );

    d.ok(&["vm", "turn-off", "mq"]);
    let (_, e) = d.fails(&["vm", "nic", "set", "mq", "nic0", "--queues", "9"]);
    assert!(e.contains("nics[0].queues") && e.contains('9'), "{e}");
    let out = d.ok(&[
        "vm", "nic", "set", "mq", "nic0", "--queues", "4", "--vlan", "1",
    ]);
    assert!(out.contains("access 1, 4 queue pairs"), "{out}");
    d.ok(&["vm", "start", "mq"]);
    let mut mq = Console::attach(&d, "mq");
    mq.ok("PING");
    let log = worker_log(&d, "mq");
    assert!(log.contains("4 queue pair(s)"), "{log}");

    // Saved, the guest's NICs are part of its state: no count change, no NIC added.
    drop(mq);
    d.ok(&["vm", "save", "mq"]);
    let (code, e) = d.fails(&["vm", "nic", "set", "mq", "nic0", "--queues", "2"]);
    assert_eq!(code, 1, "{e}");
    assert!(
        e.contains("saved") && e.contains("turn it off first"),
        "{e}"
    );
    let (_, e) = d.fails(&["vm", "nic", "add", "mq", "--switch", "lan"]);
    assert!(
        e.contains("saved") && e.contains("turn it off first"),
        "{e}"
    );
    d.ok(&["vm", "start", "mq"]);
    let mut mq = Console::attach(&d, "mq");
    mq.ok("PING");
    assert_eq!(nics(&d, "mq").len(), 1);
    assert_eq!(
        nics(&d, "mq")[0].queues,
        Some(4),
        "restored with its pair count"
    );
    let f = frame(m_one, m_mq, 7);
    mq.ok(&format!("NET 0 SEND {}", encode_hex(&f)));
    assert!(receives(&mut one, &f), "mq -> one after the restore");
}
