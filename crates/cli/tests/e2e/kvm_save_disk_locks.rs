//! End to end: a saved VM's disk stays locked from `vireo vm save` until its restored worker
//! runs, with no moment free (docs/vm-state.md, "Disk locks across a save"). Another process
//! trying `F_OFD_SETLK` on the disk is refused throughout the save, while the VM is saved,
//! through `vm start` and after; vireod killed with SIGKILL and restarted takes the lock again
//! before it serves; a disk someone else locked while vireod was down makes `vm start` fail
//! naming the disk and the holder, the VM still saved, and the restore still verifies the
//! guest's memory and disk.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::Daemon;

/// Tries a whole-file OFD write lock on `path` from a fresh open: `Ok(true)` refused
/// (EAGAIN), `Ok(false)` it was free (the lock went again with the file). The open is
/// O_RDONLY|F_WRLCK-free of side effects on the disk's content.
fn lock_refused(path: &Path) -> std::io::Result<bool> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let Some(errno) = try_write_lock(&file) else {
        return Ok(false);
    };
    match errno {
        libc::EAGAIN | libc::EACCES => Ok(true),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// `F_OFD_SETLK` of a write lock on all of `file`: `None` taken, `Some(errno)` refused.
fn try_write_lock(file: &std::fs::File) -> Option<i32> {
    // SAFETY: an all-zero flock is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on an open descriptor with a live, initialised flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    (rc != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// Probes the disk's lock over and over on a thread until stopped; counts the probes and
/// the times it was free.
struct Prober {
    stop: Arc<AtomicBool>,
    free: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Prober {
    fn start(path: &Path) -> Prober {
        let (stop, free, probes) = (Arc::default(), Arc::default(), Arc::default());
        let (s, f, p, path): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>, PathBuf) = (
            Arc::clone(&stop),
            Arc::clone(&free),
            Arc::clone(&probes),
            path.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if !lock_refused(&path).unwrap() {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                p.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        Prober {
            stop,
            free,
            probes,
            thread: Some(thread),
        }
    }

    /// Stops it and says how often the lock was free, of how many probes.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        (
            self.free.load(Ordering::SeqCst),
            self.probes.load(Ordering::SeqCst),
        )
    }
}

#[test]
fn a_saved_vms_disk_stays_locked_through_save_vireod_restart_and_restore() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(mut d) = Daemon::start() else { return };
    let disk = d.dir.path().join("s.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&[
        "vm", "create", "s", "--kernel", &kernel, "--memory", "32M", "--disk", "s.img",
    ]);
    d.ok(&["vm", "start", "s"]);
    let mut c = Console::attach(&d, "s");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("MEM FILL 16 8 9");
    drop(c);
    assert!(
        lock_refused(&disk).unwrap(),
        "the running worker holds no lock"
    );

    // The save: the worker hands its locked file to vireod before it exits.
    let p = Prober::start(&disk);
    let out = d.ok(&["vm", "save", "s"]);
    assert!(out.contains("VM s is saved"), "{out}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (free, probes) = p.finish();
    assert_eq!(d.vm("s").state.name(), "saved");
    assert!(probes > 0);
    assert_eq!(
        free, 0,
        "the disk was free {free} times of {probes} during the save"
    );
    let log = std::fs::read_to_string(d.dir.path().join("vireod.log")).unwrap();
    assert!(!log.contains("locking them again by path"), "{log}");

    // vireod killed: its files close (the one window left); restarted, it locks again
    // before it answers.
    d.kill9_and_restart();
    assert_eq!(d.vm("s").state.name(), "saved");
    assert!(
        lock_refused(&disk).unwrap(),
        "vireod did not lock the disk again"
    );

    // The restore: vireod hands the file to the new worker, keeping its own until it runs.
    let p = Prober::start(&disk);
    d.ok(&["vm", "start", "s"]);
    assert_eq!(d.vm("s").state.name(), "running");
    let mut c = Console::attach(&d, "s");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 0 64 5");
    drop(c);
    let (free, probes) = p.finish();
    assert!(probes > 0);
    assert_eq!(
        free, 0,
        "the disk was free {free} times of {probes} during the restore"
    );
    let worker_log = std::fs::read_to_string(
        d.dir
            .path()
            .join("state/vms")
            .join(d.vm("s").identity.id.to_string())
            .join("worker.log"),
    )
    .unwrap();
    assert!(
        worker_log.contains("opened from its inherited locked file"),
        "{worker_log}"
    );

    // Someone takes the disk while vireod is down: the start names the disk and the holder,
    // and the VM stays saved until the holder lets go.
    d.ok(&["vm", "save", "s"]);
    d.kill9();
    let squatter = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    assert_eq!(try_write_lock(&squatter), None, "vireod's lock outlived it");
    d.restart();
    let (code, line) = d.fails(&["vm", "start", "s"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains(&disk.display().to_string()), "{line}");
    assert!(
        line.contains(&format!("pid {}", std::process::id())),
        "{line}"
    );
    assert_eq!(d.vm("s").state.name(), "saved");
    drop(squatter);
    d.ok(&["vm", "start", "s"]);
    assert_eq!(d.vm("s").state.name(), "running");
    let mut c = Console::attach(&d, "s");
    c.ok("MEM VERIFY 16 8 9");
    c.ok("DISK 0 VERIFY 0 64 5");
    drop(c);
    assert!(lock_refused(&disk).unwrap());
    d.ok(&["vm", "turn-off", "s"]);
    assert!(
        !lock_refused(&disk).unwrap(),
        "the disk stayed locked after turn-off"
    );
}
