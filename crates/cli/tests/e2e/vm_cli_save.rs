//! End to end: `vireo vm save` / `vireo vm start` of a probe-guest VM through a real vireod
//! and its `vireo-vm` workers. The guest writes a disk pattern, fills memory and runs its dirty
//! workload; after the save the worker is gone and the files exist; vireod is SIGKILLed and
//! restarted (the VM stays saved); `vm start` continues the guest (its workload still runs,
//! memory and disk verify, no second `PROBE READY`). A damaged state file fails the start
//! with one line naming it and keeps the VM saved; saving an off VM fails (409 → exit 1).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::Daemon;

#[test]
fn probe_guest_save_survives_a_vireod_kill_and_start_continues_it() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(mut d) = Daemon::start() else { return };
    std::fs::write(d.dir.path().join("s.img"), vec![0u8; 1 << 20]).unwrap();
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&[
        "vm", "create", "s", "--kernel", &kernel, "--memory", "32M", "--disk", "s.img",
    ]);
    let (code, line) = d.fails(&["vm", "save", "s"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("off"), "{line}");

    d.ok(&["vm", "start", "s"]);
    let id = d.vm("s").identity.id.to_string();
    let vm_dir = d.dir.path().join("state").join("vms").join(&id);
    let mut c = Console::attach(&d, "s");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("MEM FILL 16 8 9");
    c.ok("DIRTY START 8 4 0");
    drop(c);
    let pid: u32 = {
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(vm_dir.join("worker.json")).unwrap()).unwrap();
        rec["pid"].as_u64().unwrap() as u32
    };

    let out = d.ok(&["vm", "save", "s"]);
    assert!(out.contains("VM s is saved"), "{out}");
    assert_eq!(d.vm("s").state.name(), "saved");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the worker is still there"
    );
    let saved = vm_dir.join("saved");
    assert!(saved.join("vm.state").is_file() && saved.join("memory.bin").is_file());
    let list = d.ok(&["vm", "list"]);
    assert!(list.contains("saved"), "{list}");

    d.kill9_and_restart();
    assert_eq!(d.vm("s").state.name(), "saved");

    d.ok(&["vm", "start", "s"]);
    assert_eq!(d.vm("s").state.name(), "running");
    let mut c = Console::attach(&d, "s");
    let stop = c.ok("DIRTY STOP");
    assert!(stop.contains("passes="), "{stop}");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 0 64 5");
    let log = d.ok(&["vm", "console", "s", "--log"]);
    assert!(
        !log.contains("PROBE READY"),
        "the guest booted again: {log}"
    );
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while saved.exists() {
        assert!(Instant::now() < deadline, "the saved state was not deleted");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A damaged save: the start fails naming the file, the VM stays saved, the files stay.
    d.ok(&["vm", "save", "s"]);
    let state = saved.join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let (code, line) = d.fails(&["vm", "start", "s"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains(&state.display().to_string()), "{line}");
    assert_eq!(d.vm("s").state.name(), "saved");
    assert_eq!(std::fs::read(&state).unwrap(), bytes);
    // Turn-off discards it.
    d.ok(&["vm", "turn-off", "s"]);
    assert_eq!(d.vm("s").state.name(), "off");
    assert!(!saved.exists());
}
