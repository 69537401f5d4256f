//! memory.bin's page checksums for real (docs/vm-state.md, "Files"): a probe saved live and
//! restored from an intact save verifies; one flipped byte in its memory file stops the lazily
//! restored VM with a reason naming the page once the guest touches it, is refused before
//! anything runs by an eager restore, and a save whose checksum table went missing is refused.

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::state::Identity;
use vireo_vmm::{
    AfterSave, ConsoleConfig, LiveSaveOptions, RestoreFrom, StateError, Vm, VmConfig, VmExit,
};

const MIB: u64 = 1 << 20;
const MEM: u64 = 32 * MIB;
const T: Duration = Duration::from_secs(30);

fn config() -> (VmConfig, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), MEM, 1);
    config.console = ConsoleConfig::Stream(theirs);
    (config, ours)
}

fn console(ours: UnixStream) -> ProbeConsole {
    ProbeConsole::new(ours.try_clone().unwrap(), ours)
}

#[test]
fn kvm_a_flipped_byte_in_memory_bin_stops_or_refuses_the_restore() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");

    // A probe with 8 MiB of seeded pattern at 16 MiB, saved live while it runs.
    let (cfg, ours) = config();
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    let mut c = console(ours);
    c.wait_ready(T).unwrap();
    c.command("MEM FILL 16 8 7", T).unwrap();
    let sum = c.command("MEM SUM 16 8", T).unwrap();
    h.save_live(
        &save,
        Identity::default(),
        None,
        &LiveSaveOptions {
            then: AfterSave::Resume,
            ..Default::default()
        },
    )
    .unwrap();
    h.request_stop();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
    assert!(save.join(vireo_vmm::SUMS_FILE).is_file());

    // Intact: restores and holds the same memory.
    {
        let (cfg, ours) = config();
        let vm = Vm::restore(cfg, &RestoreFrom::dir(&save).unwrap()).unwrap();
        let h = vm.handle();
        let run = std::thread::spawn(move || vm.run());
        h.resume().unwrap();
        assert_eq!(console(ours).command("MEM SUM 16 8", T).unwrap(), sum);
        h.request_stop();
        assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
    }

    // One byte flipped inside the pattern (20 MiB + 0x123).
    let at = 20 * MIB + 0x123;
    let mem_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(save.join(vireo_vmm::MEMORY_FILE))
        .unwrap();
    let mut b = [0u8; 1];
    mem_file.read_exact_at(&mut b, at).unwrap();
    mem_file.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    let page = format!("{:#x}", at & !0xfff);

    // Lazy (the default): the VM stops with the reason once the page is needed (the guest's
    // MEM SUM or the background copy, whichever gets there first); if the background copy
    // gets there while the VM is still being built, the restore itself is refused with it.
    {
        let (cfg, ours) = config();
        match Vm::restore(cfg, &RestoreFrom::dir(&save).unwrap()) {
            Ok(vm) => lazy_restore_stops_naming(vm, ours, &sum, &page),
            Err(e) => {
                assert!(matches!(e, StateError::Corrupt { .. }), "{e:?}");
                let msg = e.to_string();
                assert!(
                    msg.contains("corrupt") && msg.contains(&page),
                    "reason does not name the page: {msg}"
                );
            }
        }
    }

    // Eager: refused before anything runs, naming the file and the page.
    {
        let (cfg, _ours) = config();
        let mut from = RestoreFrom::dir(&save).unwrap();
        from.eager = true;
        let err = match Vm::restore(cfg, &from) {
            Err(e) => e,
            Ok(_) => panic!("an eager restore accepted a corrupt memory file"),
        };
        assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("memory.bin") && msg.contains(&page), "{msg}");
    }

    // The table gone (a copy that left it behind): refused, naming it.
    std::fs::remove_file(save.join(vireo_vmm::SUMS_FILE)).unwrap();
    let err = match RestoreFrom::dir(&save) {
        Err(e) => e,
        Ok(_) => panic!("a save without its checksum table was accepted"),
    };
    assert!(err.to_string().contains("memory.crc"), "{err}");
}

/// A lazily restored VM from a corrupt memory file: run, it stops naming `page`, and the guest
/// never sums the corrupt memory as the original (`sum`).
fn lazy_restore_stops_naming(vm: Vm, ours: UnixStream, sum: &str, page: &str) {
    let h = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    h.resume().unwrap();
    // The guest may never answer: its VM is stopped under it.
    let answer = console(ours).command("MEM SUM 16 8", Duration::from_secs(10));
    assert!(
        answer.as_ref().map_or(true, |a| *a != sum),
        "the guest summed the corrupt memory as the original: {answer:?}"
    );
    h.request_stop();
    match run.join().unwrap().unwrap() {
        VmExit::Error(why) => assert!(
            why.contains("corrupt") && why.contains(page),
            "reason does not name the page: {why}"
        ),
        other => panic!("a corrupt memory file ran on: {other:?}"),
    }
}
