//! A vireod killed with SIGKILL in the middle of creating a VM leaves the complete VM or none.
//!
//! The test binary re-runs itself as the victim (`crash_child`, inert unless CHILD_ENV is set):
//! once stopped by the fault-injection hook between the VM folder and the commit, and in a loop
//! killed at random moments. After each kill the store is reopened and rows and folders must
//! match exactly; every VM the child saw committed must be there.

use crate::common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;
use vireo_hostd::{Store, StoreError};

const CHILD_ENV: &str = "VIREO_HOSTD_CRASH_CHILD";
const DIR_ENV: &str = "VIREO_HOSTD_CRASH_DIR";

/// The victim. `window`: create one VM and stop inside the folder→commit window.
/// `loop`: create VMs forever, printing each committed id.
#[test]
fn crash_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = std::env::var(DIR_ENV).unwrap();
    // With retries, like the parent: a sibling test's fork may hold a copy of the parent's
    // lock descriptor for an instant (see `open`), and CI once caught the child there.
    let mut store = open(Path::new(&dir));
    let pid = std::process::id();
    if mode == "window" {
        store.set_before_commit_hook(|id| {
            println!("IN-WINDOW {id}");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(60));
        });
        store
            .create_vm(&common::spec(&format!("victim-{pid}")))
            .unwrap();
        panic!("the parent should have killed us inside the window");
    }
    // Bounded in count and time: the parent kills us long before, but an orphaned child must
    // still stop by itself.
    let began = Instant::now();
    for i in 0..100_000 {
        if began.elapsed() > Duration::from_secs(120) {
            break;
        }
        let vm = store
            .create_vm(&common::spec(&format!("vm-{pid}-{i}")))
            .unwrap();
        println!("CREATED {}", vm.id());
    }
}

/// Starts the victim; its marker lines arrive on the channel.
fn spawn_child(dir: &Path, mode: &str) -> (Child, mpsc::Receiver<String>) {
    // libtest names it by its module path below the crate: `crash::crash_child`.
    let name = module_path!().split_once("::").map_or("", |(_, m)| m);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .arg(format!("{name}::crash_child"))
        .args(["--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env(DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The value after `prefix` on a line; libtest may have printed `test crash_child ... ` first.
fn marker(line: &str, prefix: &str) -> Option<String> {
    line.split_once(prefix).map(|(_, v)| v.trim().to_owned())
}

fn wait_for(rx: &mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no {prefix} line from the child: {e}"));
        if let Some(value) = marker(&line, prefix) {
            return value;
        }
    }
}

fn kill(mut child: Child) {
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success());
}

/// Opens the store, retrying briefly while it is locked: the sibling tests fork children, and
/// a fork copies every open descriptor, our lock's included, until its exec closes them (they
/// are close-on-exec), so for that instant the lock can look held by someone else.
fn open(dir: &Path) -> Store {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(dir) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            r => return r.unwrap(),
        }
    }
}

/// Reopens the store and checks that VM rows and VM folders are the same set.
fn reopen_consistent(dir: &Path) -> HashSet<Uuid> {
    let store = open(dir);
    let rows: HashSet<Uuid> = store.list().unwrap().iter().map(|v| v.id()).collect();
    let folders: HashSet<Uuid> = std::fs::read_dir(dir.join("vms"))
        .unwrap()
        .map(|e| Uuid::parse_str(e.unwrap().file_name().to_str().unwrap()).unwrap())
        .collect();
    assert_eq!(
        rows, folders,
        "every VM row has its folder and every folder its row"
    );
    rows
}

#[test]
fn killed_between_folder_and_commit_leaves_no_vm() {
    let dir = tempfile::tempdir().unwrap();
    let kept = open(dir.path()).create_vm(&common::spec("kept")).unwrap();
    for _ in 0..3 {
        let (child, rx) = spawn_child(dir.path(), "window");
        let id = Uuid::parse_str(&wait_for(&rx, "IN-WINDOW")).unwrap();
        let folder = dir.path().join("vms").join(id.to_string());
        assert!(folder.is_dir(), "the hook runs after the folder exists");
        kill(child);
        assert!(folder.is_dir(), "the half VM's folder survives the kill");
        let rows = reopen_consistent(dir.path());
        assert!(!folder.exists(), "open removes the uncommitted VM's folder");
        assert_eq!(rows, HashSet::from([kept.id()]));
        let store = open(dir.path());
        assert!(matches!(
            store.get_by_id(id),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.get_by_id(kept.id()).unwrap(), kept);
    }
}

#[test]
fn killed_at_random_moments_leaves_whole_vms() {
    let dir = tempfile::tempdir().unwrap();
    let mut committed = HashSet::new();
    let started = Instant::now();
    for _ in 0..12 {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let (child, rx) = spawn_child(dir.path(), "loop");
        committed.insert(Uuid::parse_str(&wait_for(&rx, "CREATED")).unwrap());
        let jitter = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        std::thread::sleep(Duration::from_micros(u64::from(jitter % 20_000)));
        kill(child);
        committed.extend(
            rx.try_iter()
                .filter_map(|l| marker(&l, "CREATED").map(|s| s.parse::<Uuid>().unwrap())),
        );
        let rows = reopen_consistent(dir.path());
        assert!(
            committed.is_subset(&rows),
            "a VM the child saw committed is missing"
        );
    }
}
