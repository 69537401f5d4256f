//! Live save and lazy restore for real (docs/vm-state.md, "Live save", "Lazy restore"): the
//! probe runs its DIRTY workload while its memory is written; the VM restored from that save
//! holds exactly the memory the original had at the pause, byte for byte, and carries on; a
//! snapshot leaves the original running; a large VM restores lazily and its memory verifies;
//! a damaged memory file and a full disk are clear errors that change nothing; the working set a
//! live save records is what the guest was writing, and a restore fetching it first (or given a
//! damaged or wrong one) still holds exactly the saved memory.

use crate::common;

use common::{read, wait_above};

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::state::working_set::WorkingSet;
use vireo_vmm::state::Identity;
use vireo_vmm::{
    AfterSave, ConsoleConfig, LiveSaveOptions, RestoreFrom, StateError, Vm, VmConfig, VmExit,
    VmHandle,
};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);
const STATUS_PAGE: u64 = 0x80000;
const PASSES: u64 = STATUS_PAGE + 8;

fn config(mem: u64) -> (VmConfig, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), mem, 1);
    config.console = ConsoleConfig::Stream(theirs);
    (config, ours)
}

struct Running {
    h: VmHandle,
    console: ProbeConsole,
    run: std::thread::JoinHandle<vireo_vmm::error::Result<VmExit>>,
}

impl Running {
    fn start(vm: Vm, ours: UnixStream) -> Running {
        let h = vm.handle();
        let console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
        let run = std::thread::spawn(move || vm.run());
        Running { h, console, run }
    }

    fn boot(mem: u64) -> Running {
        let (config, ours) = config(mem);
        let mut r = Running::start(Vm::new(config).unwrap(), ours);
        r.console.wait_ready(T).unwrap();
        r
    }

    fn restore(mem: u64, dir: &Path) -> Running {
        let (config, ours) = config(mem);
        let vm = Vm::restore(config, &RestoreFrom::dir(dir).unwrap()).unwrap();
        Running::start(vm, ours)
    }

    fn stop(self) {
        self.h.request_stop();
        assert_eq!(self.run.join().unwrap().unwrap(), VmExit::Stopped);
    }
}

/// FNV-1a over guest RAM `[start, start+len)` as the host reads it.
fn host_sum(h: &VmHandle, start: u64, len: u64) -> u64 {
    let mut buf = vec![0u8; MIB as usize];
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    let mut at = start;
    while at < start + len {
        h.memory().read_slice(&mut buf, GuestAddress(at)).unwrap();
        for &b in &buf {
            sum = (sum ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        at += MIB;
    }
    sum
}

fn live(then: AfterSave) -> LiveSaveOptions {
    LiveSaveOptions {
        then,
        ..Default::default()
    }
}

#[test]
fn kvm_live_save_under_dirty_workload_restores_memory_as_at_the_pause() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");
    let mem = 128 * MIB;
    let mut a = Running::boot(mem);
    a.console.command("MEM FILL 16 32 5", T).unwrap();
    a.console.command("MEM FILL 60 8 6", T).unwrap();
    a.console.command("DIRTY START 16 32 0", T).unwrap();
    let p = wait_above(&a.h, PASSES, 0);
    wait_above(&a.h, PASSES, p);

    let before = read(&a.h, PASSES);
    let report =
        a.h.save_live(
            &save,
            Identity::default(),
            None,
            &live(AfterSave::StayPaused),
        )
        .unwrap();
    eprintln!("passes {before} -> {}: {report:?}", read(&a.h, PASSES));
    // Paused after a save; the original's memory is the reference.
    assert!(a.h.is_paused());
    assert!(report.bytes_written >= 32 * MIB, "{report:?}");
    assert!(report.pause <= report.total, "{report:?}");
    let passes_saved = read(&a.h, PASSES);
    let want = host_sum(&a.h, 0, mem);
    let mut files: Vec<_> = std::fs::read_dir(&save)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["memory.bin", "memory.crc", "vm.state", "working-set.bin"]
    );
    // The working set is what the guest wrote during the save: the DIRTY range, plus the
    // probe's own stack and status page below 8 MiB.
    let ws = WorkingSet::read(&save.join(vireo_vmm::WORKING_SET_FILE), mem).unwrap();
    let in_hot: u64 = ws
        .runs
        .iter()
        .map(|&(off, len)| overlap(off, len, 16 * MIB, 32 * MIB))
        .sum();
    let low: u64 = ws
        .runs
        .iter()
        .map(|&(off, len)| overlap(off, len, 0, 8 * MIB))
        .sum();
    assert!(in_hot >= MIB, "{} bytes of the DIRTY range", in_hot);
    assert_eq!(in_hot + low, ws.bytes(), "outside what was written: {ws:?}");

    let mut b = Running::restore(mem, &save);
    assert!(b.h.is_paused());
    // Read through the fault path while paused (nothing of the guest runs yet).
    assert_eq!(host_sum(&b.h, 0, mem), want, "restored RAM differs");
    a.stop();
    b.h.resume().unwrap();
    wait_above(&b.h, PASSES, passes_saved);
    let stop = b.console.command("DIRTY STOP", T).unwrap();
    assert!(stop.starts_with("OK passes="), "{stop}");
    b.console.command("MEM VERIFY 60 8 6", T).unwrap();
    b.stop();
}

/// Bytes of `[off, off+len)` inside `[start, start+size)`.
fn overlap(off: u64, len: u64, start: u64, size: u64) -> u64 {
    (off + len).min(start + size).saturating_sub(off.max(start))
}

#[test]
fn kvm_working_set_is_only_a_hint() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");
    let mem = 64 * MIB;
    let mut a = Running::boot(mem);
    a.console.command("MEM FILL 12 8 21", T).unwrap();
    a.console.command("DIRTY START 24 16 0", T).unwrap();
    wait_above(&a.h, PASSES, 0);
    a.h.save_live(
        &save,
        Identity::default(),
        None,
        &live(AfterSave::StayPaused),
    )
    .unwrap();
    let want = host_sum(&a.h, 0, mem);
    a.stop();
    let ws_file = save.join(vireo_vmm::WORKING_SET_FILE);
    assert!(WorkingSet::read(&ws_file, mem).is_some_and(|w| w.bytes() > 0));
    let all = WorkingSet {
        runs: vec![(0, mem)],
    };
    let garbage = b"VIREOWS1 but nothing after".to_vec();
    // Damaged, for another memory size, everything, and none at all: the same memory.
    for (what, bytes) in [
        ("damaged", Some(garbage)),
        ("foreign", Some(all.encode(2 * mem))),
        ("all of memory", Some(all.encode(mem))),
        ("missing", None),
    ] {
        match bytes {
            Some(b) => std::fs::write(&ws_file, b).unwrap(),
            None => std::fs::remove_file(&ws_file).unwrap(),
        }
        let mut b = Running::restore(mem, &save);
        assert_eq!(host_sum(&b.h, 0, mem), want, "working set {what}");
        b.h.resume().unwrap();
        b.console.command("MEM VERIFY 12 8 21", T).unwrap();
        b.stop();
    }
}

/// A restore builds its VM while memory is already being filled (docs/vm-state.md, "Restore
/// timing"), so the new VM's loader must write elsewhere: bytes the saved guest had where
/// the loader puts the PVH start info and the kernel come back as saved, not as loaded.
#[test]
fn kvm_restore_keeps_saved_bytes_where_the_loader_writes() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    const START_INFO: u64 = 0x6000;
    const KERNEL: u64 = 0x10_0000;
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");
    let mem = 64 * MIB;
    let a = Running::boot(mem);
    a.h.pause().unwrap();
    let marker: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    for at in [START_INFO, KERNEL] {
        a.h.memory().write_slice(&marker, GuestAddress(at)).unwrap();
    }
    a.h.save_live(
        &save,
        Identity::default(),
        None,
        &live(AfterSave::StayPaused),
    )
    .unwrap();
    let want = host_sum(&a.h, 0, mem);
    a.stop();

    let b = Running::restore(mem, &save);
    for at in [START_INFO, KERNEL] {
        let mut got = vec![0u8; marker.len()];
        b.h.memory().read_slice(&mut got, GuestAddress(at)).unwrap();
        assert!(got == marker, "the page at {at:#x} is not the saved one");
    }
    assert_eq!(host_sum(&b.h, 0, mem), want);
    b.stop();
}

#[test]
fn kvm_snapshot_leaves_the_original_running() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let mem = 64 * MIB;
    let mut a = Running::boot(mem);
    a.console.command("MEM FILL 40 8 9", T).unwrap();
    a.console.command("DIRTY START 16 16 0", T).unwrap();
    wait_above(&a.h, PASSES, 0);
    let report =
        a.h.save_live(&snap, Identity::default(), None, &live(AfterSave::Resume))
            .unwrap();
    assert!(!a.h.is_paused());
    assert!(report.pause < report.total, "{report:?}");
    // The original runs on.
    let after = read(&a.h, PASSES);
    wait_above(&a.h, PASSES, after);
    assert_eq!(a.console.command("PING", T).unwrap(), "OK PONG");

    // The snapshot restores into a second VM that runs beside it.
    let mut b = Running::restore(mem, &snap);
    let passes_b = read(&b.h, PASSES);
    b.h.resume().unwrap();
    wait_above(&b.h, PASSES, passes_b);
    b.console.command("MEM VERIFY 40 8 9", T).unwrap();
    a.console.command("MEM VERIFY 40 8 9", T).unwrap();
    b.stop();
    a.stop();
}

#[test]
fn kvm_large_vm_restores_lazily_and_verifies() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let mem = 1024 * MIB;
    if vireo_vmm::memory::check_size(mem).is_err() {
        vireo_testkit::skip_env("a host that can back 1 GiB of guest RAM");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");
    let mut a = Running::boot(mem);
    a.console.command("MEM FILL 900 16 3", T).unwrap();
    a.console.command("MEM FILL 20 4 4", T).unwrap();
    let sum = a.console.command("MEM SUM 896 32", T).unwrap();
    a.h.save_live(
        &save,
        Identity::default(),
        None,
        &live(AfterSave::StayPaused),
    )
    .unwrap();
    a.stop();
    // Sparse: only what the guest wrote (plus the probe itself) takes disk space.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(save.join(vireo_vmm::MEMORY_FILE)).unwrap();
    assert_eq!(m.len(), mem);
    assert!(
        m.blocks() * 512 < 64 * MIB,
        "{} bytes allocated",
        m.blocks() * 512
    );

    let mut b = Running::restore(mem, &save);
    b.h.resume().unwrap();
    b.console.command("MEM VERIFY 900 16 3", T).unwrap();
    b.console.command("MEM VERIFY 20 4 4", T).unwrap();
    assert_eq!(b.console.command("MEM SUM 896 32", T).unwrap(), sum);
    // The background copy ends on its own.
    let deadline = Instant::now() + T;
    while b.h.restoring_memory() {
        assert!(Instant::now() < deadline, "lazy restore never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A save of the restored VM sees every page (it waits for the restore).
    let again = dir.path().join("again");
    b.h.save_live(&again, Identity::default(), None, &live(AfterSave::Resume))
        .unwrap();
    let c_sum = {
        let mut c = Running::restore(mem, &again);
        c.h.resume().unwrap();
        let s = c.console.command("MEM SUM 896 32", T).unwrap();
        c.stop();
        s
    };
    assert_eq!(c_sum, sum);
    b.stop();
}

#[test]
fn kvm_truncated_memory_file_is_a_clear_error() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("save");
    let mem = 32 * MIB;
    let mut a = Running::boot(mem);
    a.h.save_live(&save, Identity::default(), None, &live(AfterSave::Resume))
        .unwrap();
    assert_eq!(a.console.command("PING", T).unwrap(), "OK PONG");
    a.stop();
    let mem_file = save.join(vireo_vmm::MEMORY_FILE);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem_file)
        .unwrap()
        .set_len(mem - 4096)
        .unwrap();
    let (config, _ours) = config(mem);
    let err = match Vm::restore(config, &RestoreFrom::dir(&save).unwrap()) {
        Err(e) => e,
        Ok(_) => panic!("a truncated memory file restored"),
    };
    assert!(matches!(err, StateError::Mismatch(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&mem_file.display().to_string()) && msg.contains(&(mem - 4096).to_string()),
        "{msg}"
    );
}

/// Unmounts the small file system when the test ends, passed or not.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn kvm_failed_live_save_leaves_the_vm_running_and_no_state_file() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Root)
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    // A 4 MiB file system: the memory file cannot fit, the copy fails with ENOSPC.
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "vireo-live-save-test"])
        .arg(&small)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting a tmpfs");
    let _mount = Mount(small.clone());
    let mem = 64 * MIB;
    let mut a = Running::boot(mem);
    a.console.command("MEM FILL 16 16 2", T).unwrap();
    a.console.command("DIRTY START 40 8 0", T).unwrap();
    let save = small.join("save");
    let err =
        a.h.save_live(
            &save,
            Identity::default(),
            None,
            &live(AfterSave::StayPaused),
        )
        .unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(!a.h.is_paused(), "the VM must run on");
    let p = read(&a.h, PASSES);
    wait_above(&a.h, PASSES, p);
    assert_eq!(a.console.command("PING", T).unwrap(), "OK PONG");
    let left: Vec<_> = std::fs::read_dir(&save)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    a.stop();
}

#[test]
fn kvm_dirty_log_reports_a_page_written_again_after_a_fetch() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let mut a = Running::boot(64 * MIB);
    a.h.start_dirty_log().unwrap();
    a.h.fetch_and_clear_dirty().unwrap();
    let in_range = |pages: Vec<u64>| {
        pages
            .into_iter()
            .filter(|&p| (16 * MIB..18 * MIB).contains(&p))
            .count()
    };
    for seed in 1..=3 {
        a.console
            .command(&format!("MEM FILL 16 2 {seed}"), T)
            .unwrap();
        let n = in_range(a.h.fetch_and_clear_dirty().unwrap().pages());
        assert_eq!(n, 512, "fill {seed}: {n} of 512 pages reported");
    }
    a.h.stop_dirty_log().unwrap();
    a.stop();
}
