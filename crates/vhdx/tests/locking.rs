//! File locks: a read-write open is exclusive, read-only opens share, parents of differencing
//! disks are shared, locks go away with the handle (or the process), and tools can opt out.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use vireo_vhdx::{CreateOptions, DiskType, LockKind, OpenOptions, Vhdx, VhdxError};

const CHILD_ENV: &str = "VIREO_LOCK_TEST_CHILD";

fn dynamic(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    Vhdx::create(
        &p,
        &CreateOptions {
            size: 64 << 20,
            disk_type: DiskType::Dynamic,
            ..Default::default()
        },
    )
    .unwrap();
    p
}

fn rw() -> OpenOptions {
    OpenOptions::default()
}

fn ro() -> OpenOptions {
    OpenOptions::read_only()
}

#[track_caller]
fn assert_locked(r: Result<Vhdx, VhdxError>, path: &Path, wanted: LockKind) {
    match r {
        Err(VhdxError::Locked { path: p, wanted: w }) => {
            assert_eq!(p, path);
            assert_eq!(w, wanted);
        }
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("expected Locked, the open succeeded"),
    }
}

#[test]
fn rw_excludes_everything_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "a.vhdx");
    let first = Vhdx::open(&p, &rw()).unwrap();
    assert_locked(Vhdx::open(&p, &rw()), &p, LockKind::Exclusive);
    assert_locked(Vhdx::open(&p, &ro()), &p, LockKind::Shared);
    assert!(matches!(
        Vhdx::check(&p, false),
        Err(VhdxError::Locked { .. })
    ));
    let msg = Vhdx::open(&p, &rw()).unwrap_err().to_string();
    assert!(msg.contains("in use by another process (locked)"), "{msg}");
    // The opt-out for inspection tools.
    let peek = Vhdx::open(
        &p,
        &OpenOptions {
            no_lock: true,
            ..ro()
        },
    )
    .unwrap();
    assert_eq!(peek.virtual_size(), 64 << 20);
    drop(peek);
    // Released with the handle.
    drop(first);
    drop(Vhdx::open(&p, &rw()).unwrap());
}

#[test]
fn readers_share_and_keep_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "a.vhdx");
    let r1 = Vhdx::open(&p, &ro()).unwrap();
    let r2 = Vhdx::open(&p, &ro()).unwrap();
    assert!(Vhdx::check(&p, false).is_ok());
    assert_locked(Vhdx::open(&p, &rw()), &p, LockKind::Exclusive);
    assert!(matches!(
        Vhdx::check(&p, true),
        Err(VhdxError::Locked { .. })
    ));
    drop(r1);
    assert_locked(Vhdx::open(&p, &rw()), &p, LockKind::Exclusive);
    drop(r2);
    drop(Vhdx::open(&p, &rw()).unwrap());
}

#[test]
fn parents_are_shared_and_merge_takes_them_exclusively() {
    let dir = tempfile::tempdir().unwrap();
    let base = dynamic(dir.path(), "base.vhdx");
    let mk_child = |name: &str| {
        let c = dir.path().join(name);
        drop(
            Vhdx::create(
                &c,
                &CreateOptions {
                    disk_type: DiskType::Differencing,
                    parent: Some(base.clone()),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        c
    };
    let (c1, c2) = (mk_child("c1.avhdx"), mk_child("c2.avhdx"));
    // Two children of one parent may run at once; the parent cannot be written meanwhile.
    let d1 = Vhdx::open(&c1, &rw()).unwrap();
    d1.write(&[7u8; 4096], 0).unwrap();
    let d2 = Vhdx::open(&c2, &rw()).unwrap();
    assert_locked(Vhdx::open(&base, &rw()), &base, LockKind::Exclusive);
    drop(d2);
    // Merging c1 needs the parent exclusively: refused while c2... is closed but d1 is open.
    let never = std::sync::atomic::AtomicBool::new(false);
    assert!(matches!(
        Vhdx::merge_into_parent(&c1, &|_, _| {}, &never),
        Err(VhdxError::Locked { .. })
    ));
    drop(d1);
    // Another reader of the parent blocks the merge too.
    let reader = Vhdx::open(&base, &ro()).unwrap();
    assert!(matches!(
        Vhdx::merge_into_parent(&c1, &|_, _| {}, &never),
        Err(VhdxError::Locked { .. })
    ));
    drop(reader);
    Vhdx::merge_into_parent(&c1, &|_, _| {}, &never).unwrap();
    let merged = Vhdx::open(&base, &ro()).unwrap();
    let mut buf = [0u8; 4096];
    merged.read(&mut buf, 0).unwrap();
    assert_eq!(buf, [7u8; 4096]);
    drop(merged);
    // Compact and resize are read-write opens: exclusive.
    let holder = Vhdx::open(&base, &ro()).unwrap();
    assert!(matches!(
        Vhdx::compact(&base, &|_, _| {}, &never),
        Err(VhdxError::Locked { .. })
    ));
    drop(holder);
    Vhdx::compact(&base, &|_, _| {}, &never).unwrap();
}

/// Holds `path` open (mode "rw" or "ro") in a child process until its stdin closes.
fn spawn_holder(path: &Path, mode: &str) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "lock_holder_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{mode}:{}", path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.ends_with("HOLDING") => break,
            Some(Ok(_)) => {}
            other => panic!("holder exited before holding the lock: {other:?}"),
        }
    }
    // Keep draining its stdout so libtest's closing lines do not hit a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

#[test]
fn lock_holder_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // Only meaningful when spawned by the tests below.
    };
    let (mode, path) = spec.split_once(':').unwrap();
    let opts = if mode == "rw" { rw() } else { ro() };
    let disk = Vhdx::open(Path::new(path), &opts).unwrap();
    println!("HOLDING");
    // Until the parent closes our stdin (or dies); bounded by the parent's own timeout.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(disk);
}

#[test]
fn locks_hold_across_processes_and_die_with_them() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "a.vhdx");

    let mut writer = spawn_holder(&p, "rw");
    assert_locked(Vhdx::open(&p, &rw()), &p, LockKind::Exclusive);
    assert_locked(Vhdx::open(&p, &ro()), &p, LockKind::Shared);
    // SIGKILL: the kernel drops the lock with the process.
    writer.kill().unwrap();
    writer.wait().unwrap();
    drop(Vhdx::open(&p, &rw()).unwrap());

    let mut reader = spawn_holder(&p, "ro");
    drop(Vhdx::open(&p, &ro()).unwrap());
    assert_locked(Vhdx::open(&p, &rw()), &p, LockKind::Exclusive);
    drop(reader.stdin.take()); // Closing stdin ends it normally.
    assert!(reader.wait().unwrap().success());
    drop(Vhdx::open(&p, &rw()).unwrap());
}

/// QEMU speaks the same OFD-lock protocol: its writers and ours exclude each other, readers mix.
#[test]
fn qemu_and_vireo_respect_each_others_locks() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let qemu_io = |args: &[&str]| Command::new("qemu-io").args(args).output();
    if !vireo_testkit::require(vireo_testkit::Need::QemuIo) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path(), "a.vhdx");
    let ps = p.to_str().unwrap();
    let qemu_write = || qemu_io(&["-f", "vhdx", "-c", "write 0 4k", ps]).unwrap();
    let qemu_read = || qemu_io(&["-r", "-f", "vhdx", "-c", "read 0 4k", ps]).unwrap();

    let ours = Vhdx::open(&p, &rw()).unwrap();
    let out = qemu_read();
    assert!(!out.status.success(), "qemu read a disk we hold read-write");
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock"));
    drop(ours);

    let ours = Vhdx::open(&p, &ro()).unwrap();
    assert!(
        qemu_read().status.success(),
        "qemu could not read beside our reader"
    );
    assert!(
        !qemu_write().status.success(),
        "qemu wrote under our reader"
    );
    drop(ours);
    assert!(qemu_write().status.success());

    // A QEMU writer that stays open (sleeps inside qemu-io) keeps us out until it ends.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "vhdx", "-c", "sleep 30000", ps])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it has the image open (its locks follow at once), without opening it
    // ourselves: an open of ours at the wrong moment would make qemu-io give up instead.
    let fds = format!("/proc/{}/fd", holder.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline
        && !std::fs::read_dir(&fds).is_ok_and(|d| {
            d.flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == p))
        })
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let refused = matches!(Vhdx::open(&p, &ro()), Err(VhdxError::Locked { .. }));
    let rw_refused = matches!(Vhdx::open(&p, &rw()), Err(VhdxError::Locked { .. }));
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        refused && rw_refused,
        "a running qemu-io writer did not keep us out"
    );
    drop(Vhdx::open(&p, &rw()).unwrap());
}

#[test]
fn vhd_files_take_the_same_locks() {
    use vireo_vhdx::vhd::{self, Vhd, VhdCreateOptions, VhdError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.vhd");
    let writer = Vhd::create(
        &path,
        &VhdCreateOptions {
            size: 64 << 20,
            disk_type: vhd::DiskType::Dynamic,
            block_size: None,
        },
    )
    .unwrap();
    for ro in [false, true] {
        match Vhd::open(&path, ro) {
            Err(VhdError::Locked { path: p, .. }) => assert_eq!(p, path),
            other => panic!("open (read-only {ro}) beside a writer was not refused: {other:?}"),
        }
    }
    drop(writer);
    let readers = (
        Vhd::open(&path, true).unwrap(),
        Vhd::open(&path, true).unwrap(),
    );
    assert!(matches!(
        Vhd::open(&path, false),
        Err(VhdError::Locked { .. })
    ));
    drop(readers);
    Vhd::open(&path, false).unwrap();
}
