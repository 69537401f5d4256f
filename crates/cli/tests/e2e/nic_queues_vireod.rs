//! End to end under KVM: a VM NIC with two queue pairs (`vm nic add --queues 2`) through vireod,
//! its real worker and its switch process. The worker's NIC has the pairs (its log says what the
//! port gave); the probe guest's driver starts on pair 0 like any driver and exchanges frames
//! through it with a one-pair VM, then turns the second pair on (`NET 0 PAIRS 2`, a
//! VQ_PAIRS_SET the worker serves): frames of several flows from the other VM come in on both
//! receive rings, and a frame sent on pair 1 gets through. The count is shown by `vm show` and
//! `vm nic list`, refused out of range (422 naming the field and value) and refused while the VM
//! runs (hardware); turned off, it changes and the VM starts with the new count; saved with all
//! four pairs in use, the VM's NICs cannot change and it restores with its count, still using
//! the four pairs, and still exchanges frames.

use std::time::{Duration, Instant};

use vireo_api::{NicSpec, Vm};
use vireo_probe_image::console::{decode_hex, encode_hex};
use vireo_probe_image::tagged_frame as frame;
use vireo_probe_image::{parse_udp_flow_frame, udp_flow_frame};

use crate::vireod_harness;
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

/// `from` sends one UDP frame of each of 16 flows to `to` (MAC `to_mac`), which takes them off
/// each of its `pairs` receive rings in turn: the flows each ring got (every one exactly once).
fn flows_per_pair(
    from: &mut Console,
    to: &mut Console,
    (to_mac, from_mac): ([u8; 6], [u8; 6]),
    pairs: usize,
    tag: u8,
) -> Vec<Vec<u16>> {
    for flow in 0..16 {
        let f = udp_flow_frame(to_mac, from_mac, flow, tag);
        from.ok(&format!("NET 0 SEND {}", encode_hex(&f)));
    }
    let mut per_pair = vec![Vec::new(); pairs];
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 16 {
        assert!(Instant::now() < deadline, "only {per_pair:?} arrived");
        for (p, flows) in per_pair.iter_mut().enumerate() {
            let answer = to.ask(&format!("NET 0 RECV 100 pair={p}"));
            let Some(hex) = answer.strip_prefix("OK ") else {
                assert_eq!(answer, "ERR timeout");
                continue;
            };
            let got = decode_hex(hex).unwrap();
            // Frames of an earlier round or test still queued are skipped.
            if let Some((_, flow)) = parse_udp_flow_frame(&got).filter(|(t, _)| *t == tag) {
                assert!(seen.insert(flow), "flow {flow} arrived twice");
                flows.push(flow);
            }
        }
    }
    per_pair
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
    assert_eq!(mq.ok("NET 0 PAIRS 2"), "OK pairs=2 max=2");
    let spread = flows_per_pair(&mut one, &mut mq, (m_mq, m_one), 2, 1);
    assert!(
        spread.iter().all(|f| !f.is_empty()),
        "a pair got no flow: {spread:?}"
    );
    let f = frame(m_one, m_mq, 21);
    mq.ok(&format!("NET 0 SEND {} pair=1", encode_hex(&f)));
    assert!(receives(&mut one, &f), "mq -> one on pair 1");

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
    assert_eq!(mq.ok("NET 0 PAIRS 4"), "OK pairs=4 max=4");

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
    assert_eq!(mq.ok("NET 0 PAIRS"), "OK pairs=4 max=4");
    let spread = flows_per_pair(&mut one, &mut mq, (m_mq, m_one), 4, 2);
    assert!(
        spread.iter().filter(|f| !f.is_empty()).count() > 1,
        "after the restore every flow came in on one pair: {spread:?}"
    );
    let f = frame(m_one, m_mq, 7);
    mq.ok(&format!("NET 0 SEND {}", encode_hex(&f)));
    assert!(receives(&mut one, &f), "mq -> one after the restore");
}
