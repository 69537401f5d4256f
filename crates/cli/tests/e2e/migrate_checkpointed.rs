//! End to end, under KVM: a VM's checkpoint tree travels with a quick or a live migration
//! (docs/migration.md, "Checkpoints travel with the VM"). A running probe VM with two
//! checkpoints, each with its own memory and disk contents, moves between two vireods on shared
//! storage: the destination lists the same tree, a delete there merges live, and applying the
//! first checkpoint there gives back its memory sum and disk pattern; the source keeps neither
//! record nor file. Live, the VM is never saved: its latest memory and disk arrive through the
//! pre-copy and the running top's live disk copy. A quick migration that fails while the tree
//! arrives (the destination's folder full), or the destination dying at the commit with the
//! tree in (quick) or once the tree is in (live), leaves the source's tree whole and usable and
//! nothing on the destination (after its restart). A shared-nothing migration
//! (`--with-storage --dest-dir DIR`, each vireod its own storage root) carries the tree with
//! the user's base disk, which lands in DIR (and is deleted at the source, with the tree's
//! files, once the VM runs there); the destination's worker killed in its pre-copy
//! leaves the tree at the source and nothing on the destination (DIR empty again); so does the
//! destination's vireod dying once the tree arrived (DIR as it was, after its restart). A disk in
//! none of the checkpoints (added since) travels flattened into DIR beside the tree, the
//! guest's writes during the migration included.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    job, migration_address, progress_of, start_migration, trust_each_other, two_hosts,
    wait_for_end, wait_for_end_growing, wait_for_progress, Storage,
};
use vireod_harness::tmpfs::Tmpfs;
use vireod_harness::tree::checkpoints;
use vireod_harness::two_checkpoints::{
    first_applies, mem_sum, shape, vm_with_two_checkpoints, wait_running,
};
use vireod_harness::Daemon;

fn entries(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default()
}

/// Whether process `pid` ended (or is a zombie) within 10 s.
fn gone(pid: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command's closing parenthesis.
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        if stat.is_empty() || state.starts_with('Z') {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The destination killed and started again without its fault: it knows nothing of VM `m`
/// (record `id`) and has no folder for it.
fn restarted_without_it(b: &mut Daemon, id: impl std::fmt::Display) {
    b.kill9();
    b.env.clear();
    b.restart();
    let (_, line) = b.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let b_folder = b.dir.path().join("state").join("vms").join(id.to_string());
    assert!(!b_folder.exists(), "left: {:?}", entries(&b_folder));
}

/// The source once its VM runs on the destination: no record, its folder gone (bounded wait),
/// its worker gone, the user's base disk kept on shared storage (`base_stays`) and deleted
/// after a shared-nothing migration (it was copied whole).
fn source_let_go(a: &Daemon, a_folder: &Path, a_pid: u64, base_stays: bool) {
    let (_, line) = a.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while a_folder.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!a_folder.exists(), "{:?} left", entries(a_folder));
    assert_eq!(a.dir.path().join("m.vhdx").is_file(), base_stays);
    assert!(gone(a_pid), "the source worker {a_pid} still runs");
}

/// Deleting `second` on `d` merges the VM's child into its frozen file while the same worker
/// runs; the guest's disk pattern is there, and `then`'s console commands succeed after it.
fn second_merges_live(d: &Daemon, second_frozen: &Path, then: &[&str]) {
    let pid = d.worker_pid("m");
    d.ok(&["checkpoint", "rm", "m", "second"]);
    assert_eq!(d.worker_pid("m"), pid);
    assert_eq!(d.vm("m").spec.disks[0].path, second_frozen);
    let mut c = Console::attach(d, "m");
    c.ok("DISK 0 VERIFY 0 64 7");
    for cmd in then {
        c.ok(cmd);
    }
    drop(c);
}

/// The VM as the source had it before a migration meant to fail. Afterwards it must be found
/// exactly so: in one place, here, with the same worker, disk and tree, and the guest's memory
/// and disk pattern as they were.
struct Untouched {
    pid: u64,
    disk: std::path::PathBuf,
    tree: Vec<(uuid::Uuid, String, Option<uuid::Uuid>, i64, bool, bool)>,
    sum: String,
}

impl Untouched {
    fn note(a: &Daemon, sum: &str) -> Untouched {
        Untouched {
            pid: a.worker_pid("m"),
            disk: a.vm("m").spec.disks[0].path.clone(),
            tree: shape(&checkpoints(a, "m")),
            sum: sum.to_owned(),
        }
    }

    fn check(&self, a: &Daemon) {
        assert_eq!(a.vm("m").state.name(), "running");
        assert_eq!(a.worker_pid("m"), self.pid);
        assert_eq!(a.vm("m").spec.disks[0].path, self.disk);
        assert_eq!(shape(&checkpoints(a, "m")), self.tree);
        let mut c = Console::attach(a, "m");
        assert_eq!(mem_sum(&mut c), self.sum);
        c.ok("DISK 0 VERIFY 0 64 7");
    }
}

/// Kills the destination's worker for `m` on `b` and waits for the source's job to fail.
fn kill_destination_worker(a: &Daemon, b: &Daemon, job_id: &str) {
    let destination_pid = b.worker_pid("m");
    // SAFETY: kill(2) of the destination's worker, a process this test's vireod started.
    let killed = unsafe { libc::kill(destination_pid as i32, libc::SIGKILL) };
    assert_eq!(killed, 0);
    let j = wait_for_end(a, job_id, Duration::from_secs(60));
    eprintln!("the job after the destination's worker was killed: {j}");
    assert_eq!(j["state"], "failed", "{j}");
}

/// Waits (bounded) until `b` has no record of `m`, no folder for it (record `id`) and, when
/// given, nothing in `dir`; then asserts each.
fn destination_forgot(b: &Daemon, id: impl std::fmt::Display, dir: Option<&Path>) {
    let b_folder = b.dir.path().join("state").join("vms").join(id.to_string());
    let dir_empty = || dir.is_none_or(|d| entries(d).is_empty());
    let deadline = Instant::now() + Duration::from_secs(30);
    while (b.run(&["vm", "show", "m"]).status.success() || b_folder.exists() || !dir_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, line) = b.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    assert!(!b_folder.exists(), "left: {:?}", entries(&b_folder));
    if let Some(d) = dir {
        assert!(entries(d).is_empty(), "left in DIR: {:?}", entries(d));
    }
}

/// Deleting `second` at the source merges live in the same worker `pid`; the disk pattern is
/// still there.
fn source_tree_merges_live(a: &Daemon, pid: u64) {
    a.ok(&["checkpoint", "rm", "m", "second"]);
    assert_eq!(a.worker_pid("m"), pid);
    let mut c = Console::attach(a, "m");
    c.ok("DISK 0 VERIFY 0 64 7");
}

#[test]
fn a_quick_migration_carries_the_checkpoint_tree() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let tree = checkpoints(&a, "m");
    assert_eq!(tree.len(), 2);
    let id = a.vm("m").id();
    let a_folder = a.dir.path().join("state").join("vms").join(id.to_string());
    assert!(a_folder.join("checkpoints").is_dir());

    let t = Instant::now();
    let said = a.ok(&["vm", "migrate", "m", "--to", &to, "--quick"]);
    eprintln!(
        "quick migration with the tree: {} in {:.0} ms",
        said.trim(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // The source keeps neither the record nor vireod's files of the tree; the user's base
    // disk (the first checkpoint's frozen file) is shared storage and stays.
    let (_, line) = a.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    assert!(!a_folder.exists(), "{:?} left", entries(&a_folder));
    assert!(a.dir.path().join("m.vhdx").is_file());

    // The destination: the same tree, on files in its own folder for the VM.
    wait_running(&b, "m");
    let arrived = checkpoints(&b, "m");
    assert_eq!(shape(&arrived), shape(&tree));
    let b_folder = b.dir.path().join("state").join("vms").join(id.to_string());
    let b_folder = std::fs::canonicalize(b_folder).unwrap();
    let running_on = b.vm("m").spec.disks[0].path.clone();
    assert!(
        running_on.starts_with(&b_folder),
        "{}",
        running_on.display()
    );
    let second = arrived.iter().find(|c| c.name == "second").unwrap();
    assert!(second.disks[0].frozen.starts_with(&b_folder));
    let mut c = Console::attach(&b, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    c.ok("DISK 0 VERIFY 0 64 7");
    drop(c);

    // A delete there merges the VM's child into `second`'s frozen file while it runs.
    second_merges_live(&b, &second.disks[0].frozen, &[]);

    // Applying `first` there: its memory and its disk.
    first_applies(
        &b,
        "m",
        &first_sum,
        &["DISK 0 WRITE 64 8 8", "DISK 0 VERIFY 64 8 8"],
    );
}

#[test]
fn a_quick_migration_failing_while_the_tree_arrives_leaves_it_whole_at_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Root)
    {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let tree = checkpoints(&a, "m");
    // Room for one checkpoint's 32 MiB of memory, not for the second's.
    let vms = b.dir.path().join("state").join("vms");
    let mounted = Tmpfs::mount(&vms, "40M").expect("mounting a tmpfs as root failed");

    let job_id = start_migration(&a, &["m", "--to", &to, "--quick"]);
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("the job's error: {error}");
    assert!(
        error.contains("No space left on device") && error.contains("checkpoints/"),
        "{error}"
    );
    assert!(error.contains("it is restored here"), "{error}");

    // Nothing of it on the destination.
    let (_, line) = b.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !entries(&vms).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(entries(&vms).is_empty(), "left: {:?}", entries(&vms));
    drop(mounted);

    // The source: running on from its saved state, the tree as it was and usable.
    wait_running(&a, "m");
    assert_eq!(shape(&checkpoints(&a, "m")), shape(&tree));
    let mut c = Console::attach(&a, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    c.ok("DISK 0 VERIFY 0 64 7");
    drop(c);
    first_applies(&a, "m", &first_sum, &[]);
}

#[test]
fn a_destination_dying_once_the_tree_arrived_leaves_it_whole_at_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    // A asks B where the VM is for 2 s after the commit's answer is lost (150 s by default).
    let listen = ["--migration-listen", "127.0.0.1:0"];
    let Some(a) = Daemon::start_args(&[listen[0], listen[1], "--migration-answer-wait", "2"])
    else {
        return;
    };
    let a_dir = a.dir.path().to_str().unwrap().to_owned();
    // B dies (abort, as a SIGKILL) at the commit, with every file of the tree in.
    let fault = [("VIREO_CHECKPOINT_FAULT", "migrate-tree-arrived")];
    let Some(mut b) =
        Daemon::start_args_env(&[listen[0], listen[1], "--storage-root", &a_dir], &fault)
    else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let tree = checkpoints(&a, "m");
    let id = a.vm("m").id();

    let job_id = start_migration(&a, &["m", "--to", &to, "--quick"]);
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("the job's error: {error}");
    // Whether the VM runs there cannot be known with B gone: it stays saved here, untouched.
    assert!(error.contains("stays saved here"), "{error}");
    assert_eq!(a.vm("m").state.name(), "saved");
    assert_eq!(shape(&checkpoints(&a, "m")), shape(&tree));

    // B back without the fault: the half-arrived VM and every file it received are gone.
    restarted_without_it(&mut b, id);

    // The source's tree is whole and usable.
    a.ok(&["vm", "start", "m"]);
    wait_running(&a, "m");
    let mut c = Console::attach(&a, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    c.ok("DISK 0 VERIFY 0 64 7");
    drop(c);
    first_applies(&a, "m", &first_sum, &[]);
}

#[test]
fn a_live_migration_carries_the_checkpoint_tree() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let tree = checkpoints(&a, "m");
    let id = a.vm("m").id();
    let a_folder = a.dir.path().join("state").join("vms").join(id.to_string());
    let a_pid = a.worker_pid("m");

    let t = Instant::now();
    let said = a.ok(&["vm", "migrate", "m", "--to", &to]);
    // For docs/migration.md's figures (the CLI's line carries the guest's pause).
    eprintln!(
        "live migration with the tree: {} in {:.0} ms",
        said.trim(),
        t.elapsed().as_secs_f64() * 1e3
    );

    source_let_go(&a, &a_folder, a_pid, true);

    // The destination: the same tree, running on a new child in its own folder whose parent
    // is the arrived `second`; the guest's memory and disk as they were, never rebooted.
    assert_eq!(b.vm("m").state.name(), "running");
    let arrived = checkpoints(&b, "m");
    assert_eq!(shape(&arrived), shape(&tree));
    let b_folder = b.dir.path().join("state").join("vms").join(id.to_string());
    let b_folder = std::fs::canonicalize(b_folder).unwrap();
    let running_on = b.vm("m").spec.disks[0].path.clone();
    assert!(
        running_on.starts_with(&b_folder),
        "{}",
        running_on.display()
    );
    let second = arrived.iter().find(|c| c.name == "second").unwrap();
    assert!(second.disks[0].frozen.starts_with(&b_folder));
    let info = b.ok(&[
        "disk",
        "info",
        running_on.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let parent = info["parent"]["path"]
        .as_str()
        .expect("a differencing child");
    assert_eq!(
        std::fs::canonicalize(parent).unwrap(),
        std::fs::canonicalize(&second.disks[0].frozen).unwrap(),
        "{info}"
    );
    let mut c = Console::attach(&b, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    c.ok("DISK 0 VERIFY 0 64 7");
    c.ok("DISK 0 WRITE 128 8 12");
    drop(c);

    // A delete there merges the VM's child into `second`'s frozen file while it runs.
    second_merges_live(&b, &second.disks[0].frozen, &["DISK 0 VERIFY 128 8 12"]);

    // Applying `first` there: its memory and its disk.
    first_applies(&b, "m", &first_sum, &[]);
}

#[test]
fn a_live_migration_carries_what_the_guest_writes_during_it() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (_, now_sum) = vm_with_two_checkpoints(&a);
    let mut c = Console::attach(&a, "m");

    // Held to 1 MiB/s, the memory pre-copy outlasts the running top's first pass: writes made
    // now reach the destination only as the copy's dirty chunks (its last ones at the
    // switch-over), one of them over data the top already held.
    let job_id = start_migration(&a, &["m", "--to", &to, "--bandwidth", "1M"]);
    // The tree's files (sent by vireod) count first, the worker's bytes after them: the
    // figure only grows, also where the worker's own count takes over.
    wait_for_progress(&a, &job_id, "transferred_bytes");
    let seen = progress_of(&a, &job_id, "transferred_bytes");
    wait_for_progress(&a, &job_id, "disk_bytes_total");
    c.ok("DISK 0 WRITE 32 16 13");
    c.ok("DISK 0 WRITE 4096 64 14");
    c.ok("DISK 0 FLUSH");
    let j = wait_for_end_growing(
        &a,
        &job_id,
        "transferred_bytes",
        seen,
        Duration::from_secs(120),
    );
    assert_eq!(j["state"], "completed", "{j}");
    drop(c);

    let mut c = Console::attach(&b, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    c.ok("DISK 0 VERIFY 0 32 7");
    c.ok("DISK 0 VERIFY 32 16 13");
    c.ok("DISK 0 VERIFY 48 16 7");
    c.ok("DISK 0 VERIFY 4096 64 14");
    drop(c);
    // Applying `second` there drops those writes: they were the top's alone.
    b.ok(&["checkpoint", "apply", "m", "second", "--stop"]);
    b.ok(&["vm", "start", "m"]);
    wait_running(&b, "m");
    let mut c = Console::attach(&b, "m");
    c.ok("DISK 0 VERIFY 0 64 6");
    drop(c);
    b.ok(&["vm", "turn-off", "m"]);
}

#[test]
fn a_destination_dying_once_a_live_migrations_tree_arrived_leaves_it_running_at_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let listen = ["--migration-listen", "127.0.0.1:0"];
    let Some(a) = Daemon::start_args(&listen) else {
        return;
    };
    let a_dir = a.dir.path().to_str().unwrap().to_owned();
    // B dies (abort, as a SIGKILL) with every file of the tree in, before the running top's
    // child is made and before its worker exists.
    let fault = [("VIREO_CHECKPOINT_FAULT", "migrate-live-tree-arrived")];
    let Some(mut b) =
        Daemon::start_args_env(&[listen[0], listen[1], "--storage-root", &a_dir], &fault)
    else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let id = a.vm("m").id();
    let before = Untouched::note(&a, &now_sum);

    let job_id = start_migration(&a, &["m", "--to", &to]);
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap_or_default();
    eprintln!("the job's error: {error}");
    assert!(error.contains("runs on here"), "{error}");

    // The VM never stopped here: same worker, same disk, same tree.
    before.check(&a);

    // B back without the fault: the half-arrived VM and every file it received are gone.
    restarted_without_it(&mut b, id);

    // The source's tree is usable.
    first_applies(&a, "m", &first_sum, &[]);
}

#[test]
fn a_destination_worker_killed_in_a_live_migrations_precopy_leaves_the_tree_at_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Shared) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (_, now_sum) = vm_with_two_checkpoints(&a);
    let id = a.vm("m").id();
    let before = Untouched::note(&a, &now_sum);

    // Held to 1 MiB/s, the memory pre-copy runs for seconds after the tree and the top's copy
    // arrived: the destination's worker dies in it.
    let job_id = start_migration(&a, &["m", "--to", &to, "--bandwidth", "1M"]);
    // The tree's files count as bytes moved too: wait for the worker's own figures (its copy
    // of the running top comes first).
    wait_for_progress(&a, &job_id, "disk_bytes_total");
    let b_folder = b.dir.path().join("state").join("vms").join(id.to_string());
    assert!(
        b_folder.join("checkpoints").is_dir(),
        "the tree is not on the destination during the pre-copy: {:?}",
        entries(&b_folder)
    );
    kill_destination_worker(&a, &b, &job_id);

    // Exactly one place: here, the same worker on the same disk, the tree whole.
    before.check(&a);
    let mut c = Console::attach(&a, "m");
    c.ok("DISK 0 WRITE 128 8 12");
    c.ok("DISK 0 VERIFY 128 8 12");
    drop(c);
    // The destination removed the record, the new child and every arrived file.
    destination_forgot(&b, id, None);

    // The source's tree still merges live.
    source_tree_merges_live(&a, before.pid);
    a.ok(&["vm", "turn-off", "m"]);
}

/// `--with-storage --dest-dir DIR` arguments for `vm migrate m` to `to`, DIR made on `b`
/// (outside A's storage: each vireod has its own root).
fn shared_nothing_args(b: &Daemon, to: &str) -> (std::path::PathBuf, Vec<String>) {
    let dest = b.dir.path().join("moved");
    std::fs::create_dir(&dest).unwrap();
    let args = ["m", "--to", to, "--with-storage", "--dest-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([dest.to_str().unwrap().to_owned()])
        .collect();
    (dest, args)
}

/// Every VHDX in `dir` (and its chain) opens and checks clean, read-only without a lock (the
/// running worker holds the top).
fn all_open(dir: &Path) -> usize {
    let opts = vireo_vhdx::OpenOptions {
        read_only: true,
        no_lock: true,
        ..Default::default()
    };
    let mut n = 0;
    for name in entries(dir) {
        let p = dir.join(name);
        let v = vireo_vhdx::Vhdx::open(&p, &opts)
            .unwrap_or_else(|e| panic!("{} does not open: {e}", p.display()));
        drop(v);
        n += 1;
    }
    n
}

#[test]
fn a_shared_nothing_migration_carries_the_checkpoint_tree() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let tree = checkpoints(&a, "m");
    let id = a.vm("m").id();
    let a_folder = a.dir.path().join("state").join("vms").join(id.to_string());
    let a_pid = a.worker_pid("m");
    let (dest, args) = shared_nothing_args(&b, &to);
    let mut migrate = vec!["vm", "migrate"];
    migrate.extend(args.iter().map(String::as_str));

    let t = Instant::now();
    let said = a.ok(&migrate);
    eprintln!(
        "shared-nothing migration with the tree: {} in {:.0} ms",
        said.trim(),
        t.elapsed().as_secs_f64() * 1e3
    );

    // The source: no record, vireod's files gone, and the user's base disk too (it arrived
    // whole there), which the command names.
    source_let_go(&a, &a_folder, a_pid, false);
    assert!(
        said.lines()
            .any(|l| l.starts_with("source file deleted: ") && l.ends_with("/m.vhdx")),
        "{said}"
    );

    // The destination: the same tree; the base disk arrived in DIR under its name, vireod's
    // files in its own folder, every one of them opening with its chain.
    assert_eq!(b.vm("m").state.name(), "running");
    let arrived = checkpoints(&b, "m");
    assert_eq!(shape(&arrived), shape(&tree));
    let dest = std::fs::canonicalize(dest).unwrap();
    let first = arrived.iter().find(|c| c.name == "first").unwrap();
    assert_eq!(
        std::fs::canonicalize(&first.disks[0].frozen).unwrap(),
        dest.join("m.vhdx")
    );
    assert_eq!(entries(&dest), vec![std::ffi::OsString::from("m.vhdx")]);
    let b_folder = b.dir.path().join("state").join("vms").join(id.to_string());
    let b_folder = std::fs::canonicalize(b_folder).unwrap();
    let running_on = b.vm("m").spec.disks[0].path.clone();
    assert!(
        running_on.starts_with(&b_folder),
        "{}",
        running_on.display()
    );
    assert_eq!(all_open(&dest), 1);
    let in_folder = all_open(&b_folder.join("checkpoints").join("disks"));
    assert!(in_folder >= 2, "{in_folder} disk files in the VM's folder");

    // Never rebooted: the latest memory and disk.
    let mut c = Console::attach(&b, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    c.ok("DISK 0 VERIFY 0 64 7");
    c.ok("DISK 0 WRITE 128 8 12");
    drop(c);

    // A delete there merges the VM's child into `second`'s frozen file while it runs.
    let second = arrived.iter().find(|c| c.name == "second").unwrap();
    second_merges_live(&b, &second.disks[0].frozen, &["DISK 0 VERIFY 128 8 12"]);

    // Applying `first` there: its memory and its disk, on the base disk that arrived.
    first_applies(&b, "m", &first_sum, &[]);
    assert!(dest.join("m.vhdx").is_file());
}

#[test]
fn a_destination_worker_killed_in_a_shared_nothing_migration_leaves_the_tree_at_the_source() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let id = a.vm("m").id();
    let before = Untouched::note(&a, &now_sum);
    let (dest, mut args) = shared_nothing_args(&b, &to);
    args.extend(["--bandwidth".to_owned(), "1M".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Held to 1 MiB/s, the memory pre-copy runs for seconds after the tree (the base disk in
    // DIR) and the top's copy arrived: the destination's worker dies in it.
    let job_id = start_migration(&a, &args);
    wait_for_progress(&a, &job_id, "disk_bytes_total");
    assert!(
        dest.join("m.vhdx").is_file(),
        "the base disk is not in DIR during the pre-copy: {:?}",
        entries(&dest)
    );
    kill_destination_worker(&a, &b, &job_id);

    // Exactly one place: here, the same worker on the same disk, the tree whole.
    before.check(&a);

    // Nothing of it on the destination: no record, no folder, DIR empty again.
    destination_forgot(&b, id, Some(&dest));

    // The source's tree still merges live and applies.
    source_tree_merges_live(&a, before.pid);
    first_applies(&a, "m", &first_sum, &[]);
}

#[test]
fn a_destination_vireod_dying_mid_arrival_of_a_shared_nothing_migration_leaves_dir_as_it_was() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let listen = ["--migration-listen", "127.0.0.1:0"];
    let Some(a) = Daemon::start_args(&listen) else {
        return;
    };
    // B dies (abort, as a SIGKILL) with every file of the tree in: the base disk in DIR.
    let fault = [("VIREO_CHECKPOINT_FAULT", "migrate-live-tree-arrived")];
    let Some(mut b) = Daemon::start_args_env(&listen, &fault) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    let id = a.vm("m").id();
    let before = Untouched::note(&a, &now_sum);
    let (dest, args) = shared_nothing_args(&b, &to);
    // A file that was there before: never the migration's to remove.
    let theirs = dest.join("theirs.vhdx");
    std::fs::write(&theirs, b"not the migration's").unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let job_id = start_migration(&a, &args);
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        b.child.try_wait().unwrap().is_some(),
        "B did not die at the fault point"
    );
    assert!(
        dest.join("m.vhdx").is_file(),
        "the base disk never arrived in DIR: {:?}",
        entries(&dest)
    );

    // Exactly one place: here, the same worker on the same disk, the tree whole.
    before.check(&a);

    // B back without the fault: no record, no folder, DIR as it was before the migration.
    restarted_without_it(&mut b, id);
    assert_eq!(
        entries(&dest),
        vec![std::ffi::OsString::from("theirs.vhdx")]
    );
    assert_eq!(std::fs::read(&theirs).unwrap(), b"not the migration's");

    first_applies(&a, "m", &first_sum, &[]);
}

#[test]
fn a_shared_nothing_migration_copies_a_disk_outside_the_checkpoints_flattened_beside_the_tree() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    trust_each_other(&a, &b);
    let to = migration_address(&b);
    let (first_sum, now_sum) = vm_with_two_checkpoints(&a);
    // Two disks added since the checkpoints, the user's, in none of them: a raw file and a
    // VHDX.
    let data = a.dir.path().join("data.img");
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    a.ok(&["vm", "disk", "add", "m", data.to_str().unwrap()]);
    let logs = a.dir.path().join("logs.vhdx");
    a.ok(&["disk", "create", logs.to_str().unwrap(), "--size", "8M"]);
    a.ok(&["vm", "disk", "add", "m", logs.to_str().unwrap()]);
    let mut c = Console::attach(&a, "m");
    assert_eq!(c.ok("RESCAN"), "OK disks=3 added=2 removed=0");
    c.ok("DISK 1 WRITE 0 64 21");
    c.ok("DISK 1 WRITE 8192 32 22");
    c.ok("DISK 2 WRITE 100 16 31");
    c.ok("DISK 1 FLUSH");
    c.ok("DISK 2 FLUSH");
    let tree = checkpoints(&a, "m");
    let id = a.vm("m").id();
    let a_folder = a.dir.path().join("state").join("vms").join(id.to_string());
    let a_pid = a.worker_pid("m");
    let (dest, mut args) = shared_nothing_args(&b, &to);
    args.extend(["--bandwidth".to_owned(), "1M".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Held to 1 MiB/s, the memory pre-copy outlasts the disks' first pass: these writes reach
    // the destination only as dirty chunks (or the last ones at the switch-over), on both
    // disks, one over data the extra disk's copy already held and one on a new chunk.
    let job_id = start_migration(&a, &args);
    wait_for_progress(&a, &job_id, "disk_bytes_total");
    c.ok("DISK 1 WRITE 16 16 23");
    c.ok("DISK 1 WRITE 20000 8 24");
    c.ok("DISK 0 WRITE 4096 64 14");
    c.ok("DISK 2 WRITE 104 4 32");
    c.ok("DISK 1 FLUSH");
    c.ok("DISK 0 FLUSH");
    c.ok("DISK 2 FLUSH");
    assert_ne!(
        job(&a, &job_id)["state"],
        "completed",
        "the writes came too late"
    );
    let j = wait_for_end(&a, &job_id, Duration::from_secs(120));
    assert_eq!(j["state"], "completed", "{j}");
    drop(c);

    // The source: no record, folder or worker; the base disk and the extra disks deleted (they
    // arrived there), each named in the job.
    source_let_go(&a, &a_folder, a_pid, false);
    let phases = j["migration"]["phases"].to_string();
    for extra in [&data, &logs] {
        assert!(!extra.exists(), "the source's {} is left", extra.display());
        let deleted = format!("source file deleted: {}", extra.display());
        assert!(phases.contains(&deleted), "{phases}");
    }

    // The destination: the same tree; the extra disks flattened into DIR under their names
    // (raw stays raw) beside the base disk, the VM's second and third disks on them.
    assert_eq!(b.vm("m").state.name(), "running");
    let arrived = checkpoints(&b, "m");
    assert_eq!(shape(&arrived), shape(&tree));
    let dest = std::fs::canonicalize(dest).unwrap();
    let mut in_dir = entries(&dest);
    in_dir.sort();
    let want = ["data.img", "logs.vhdx", "m.vhdx"];
    assert_eq!(in_dir, want.map(std::ffi::OsString::from));
    let spec = b.vm("m").spec;
    assert_eq!(spec.disks.len(), 3);
    for (k, name) in [(1, "data.img"), (2, "logs.vhdx")] {
        let on = std::fs::canonicalize(&spec.disks[k].path).unwrap();
        assert_eq!(on, dest.join(name));
    }
    assert_eq!(spec.disks[1].format, Some(vireo_api::DiskFormat::Raw));
    assert_eq!(spec.disks[2].format, Some(vireo_api::DiskFormat::Vhdx));
    assert_eq!(
        std::fs::metadata(dest.join("data.img")).unwrap().len(),
        16 << 20
    );

    // Never rebooted: the latest memory and every disk as the guest wrote it.
    let mut c = Console::attach(&b, "m");
    assert_eq!(mem_sum(&mut c), now_sum);
    assert_eq!(c.ok("RESCAN"), "OK disks=3 added=0 removed=0");
    c.ok("DISK 0 VERIFY 0 64 7");
    c.ok("DISK 0 VERIFY 4096 64 14");
    c.ok("DISK 1 VERIFY 0 16 21");
    c.ok("DISK 1 VERIFY 16 16 23");
    c.ok("DISK 1 VERIFY 32 32 21");
    c.ok("DISK 1 VERIFY 8192 32 22");
    c.ok("DISK 1 VERIFY 20000 8 24");
    c.ok("DISK 2 VERIFY 100 4 31");
    c.ok("DISK 2 VERIFY 104 4 32");
    c.ok("DISK 2 VERIFY 108 8 31");
    c.ok("DISK 1 WRITE 30000 8 25");
    drop(c);

    // The tree works there: a delete merges live (the extra disk untouched), and `first`
    // applies with its memory and disk (its spec has one disk: the extra ones stay in DIR).
    let second = arrived.iter().find(|c| c.name == "second").unwrap();
    let extra = ["DISK 1 VERIFY 8192 32 22", "DISK 1 VERIFY 30000 8 25"];
    second_merges_live(&b, &second.disks[0].frozen, &extra);
    first_applies(&b, "m", &first_sum, &[]);
    assert!(dest.join("data.img").is_file() && dest.join("logs.vhdx").is_file());
}
