//! Multiqueue virtio-blk with the probe guest's driver (docs/probe-protocol.md, `DISK i BENCH
//! ... queues=N`): the probe negotiates VIRTIO_BLK_F_MQ and spreads its queue depth over two
//! queues of a VHDX disk, each served by its own worker. A pattern run is paused and saved in
//! the middle, the VM ends, a new VM is restored from the save (its disk built with one queue,
//! as an older spec or a changed vCPU count would, so it must take the saved two), and the
//! run finishes there; the whole disk then verifies. A one-queue disk refuses `queues=2`.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vireo_block::BlockBackend;
use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vhdx::{CreateOptions, OpenOptions, Vhdx};
use vireo_vmm::state::Identity;
use vireo_vmm::{ConsoleConfig, RestoreFrom, VirtioSlot, Vm, VmConfig, VmExit};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);
const DISK_SECTORS: u64 = 16 * MIB / 512;

/// A one-vCPU probe VM whose disk 0 is `disk` with `queues` request queues.
fn config(disk: &Path, queues: u16) -> (VmConfig, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), 64 * MIB, 1);
    config.console = ConsoleConfig::Stream(theirs);
    let backend: Arc<dyn BlockBackend> =
        Arc::new(Vhdx::open(disk, &OpenOptions::default()).unwrap());
    config.devices.push(VirtioSlot {
        device: Box::new(vireo_virtio::Block::new(backend.clone()).with_queues(queues)),
        flush_on_exit: Some(backend),
    });
    (config, ours)
}

fn console(stream: UnixStream) -> ProbeConsole {
    ProbeConsole::new(stream.try_clone().unwrap(), stream)
}

#[test]
fn kvm_probe_spreads_io_over_two_queues_across_a_save_and_restore() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.vhdx");
    drop(
        Vhdx::create(
            &disk,
            &CreateOptions {
                size: 16 * MIB,
                block_size: MIB as u32,
                ..CreateOptions::default()
            },
        )
        .unwrap(),
    );
    let save_dir = dir.path().join("save");

    let (cfg, stream) = config(&disk, 2);
    let vm = Vm::new(cfg).unwrap();
    let h = vm.handle();
    let mut con = console(stream);
    let run = std::thread::spawn(move || vm.run());
    con.wait_ready(T).unwrap();
    // Random pattern writes over both queues allocate the VHDX's blocks from two workers at
    // once; the sequential pattern then fills the rest, so the whole disk has pattern 7.
    let a = con
        .command("DISK 0 BENCH randwrite 4K 16 1 7 queues=2", T)
        .unwrap();
    assert!(a.starts_with("OK iops="), "{a}");
    con.command(&format!("DISK 0 WRITE 0 {DISK_SECTORS} 7"), T)
        .unwrap();
    // A verifying run is saved in the middle: requests are in flight on both queues.
    con.send_line("DISK 0 BENCH randread 4K 16 3 7 queues=2")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    h.pause().unwrap();
    h.save(&save_dir, Identity::default(), None).unwrap();
    h.request_stop();
    assert_eq!(run.join().unwrap().unwrap(), VmExit::Stopped);
    drop((con, h));

    let from = RestoreFrom::dir(&save_dir).unwrap();
    let (cfg, stream) = config(&disk, 1);
    let vm = Vm::restore(cfg, &from).unwrap();
    let h = vm.handle();
    let mut con = console(stream);
    let run = std::thread::spawn(move || vm.run());
    h.resume().unwrap();
    let a = con.answer(T).unwrap();
    assert!(
        a.starts_with("OK iops="),
        "the run saved mid-way finishes verified: {a}"
    );
    con.command(&format!("DISK 0 VERIFY 0 {DISK_SECTORS} 7"), T)
        .unwrap();
    let a = con
        .command("DISK 0 BENCH write 64K 8 1 7 queues=2", T)
        .unwrap();
    assert!(a.starts_with("OK iops="), "{a}");
    con.command(&format!("DISK 0 VERIFY 0 {DISK_SECTORS} 7"), T)
        .unwrap();
    con.send_line("POWEROFF").unwrap();
    assert!(matches!(run.join().unwrap().unwrap(), VmExit::PowerOff(_)));
    drop(h);
    let report = Vhdx::check(&disk, false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);

    // A one-queue disk: the probe finds no second queue to spread over.
    let (cfg, stream) = config(&disk, 1);
    let vm = Vm::new(cfg).unwrap();
    let mut con = console(stream);
    let run = std::thread::spawn(move || vm.run());
    con.wait_ready(T).unwrap();
    assert!(matches!(
        con.command("DISK 0 BENCH randread 4K 8 1 7 queues=2", T),
        Err(vireo_probe_image::ProbeError::Err(e)) if e == "range"
    ));
    let a = con.command("DISK 0 BENCH randread 4K 8 1 7", T).unwrap();
    assert!(a.starts_with("OK iops="), "{a}");
    con.send_line("POWEROFF").unwrap();
    run.join().unwrap().unwrap();
}
