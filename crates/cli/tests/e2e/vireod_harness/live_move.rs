//! A running probe VM "r" whose storage moves while it runs (docs/storage-migration.md), and
//! the ways to cut such a move short: vireod dying at a fault point, the worker killed while
//! vireod is down (talked to through its own console socket meanwhile).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vireo_vhdx::{CreateOptions, OpenOptions, Vhdx};

use super::console::Console;
use super::Daemon;

pub const MIB: u64 = 1 << 20;
/// Data in the base disk: enough that copying the frozen files takes a while, so the guest's
/// writes and the refused checkpoint land while the move runs.
pub const BASE_DATA_MIB: u64 = 192;

/// A 256 MiB VHDX with `BASE_DATA_MIB` of non-zero data past the first MiB (the probe's test
/// writes stay in the first MiB).
pub fn base_disk(dir: &Path) -> PathBuf {
    let base = dir.join("r.vhdx");
    let opts = CreateOptions {
        size: 256 * MIB,
        block_size: MIB as u32,
        ..Default::default()
    };
    drop(Vhdx::create(&base, &opts).unwrap());
    let v = Vhdx::open(&base, &OpenOptions::default()).unwrap();
    let chunk = vec![0x5au8; MIB as usize];
    for i in 0..BASE_DATA_MIB {
        v.write(&chunk, (1 + i) * MIB).unwrap();
    }
    v.flush().unwrap();
    base
}

/// A running VM "r" on `base` with two checkpoints; returns the console and the memory sum
/// the first checkpoint keeps.
pub fn running_with_two_checkpoints(d: &Daemon) -> (Console, String) {
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&[
        "vm", "create", "r", "--kernel", &kernel, "--memory", "64M", "--disk", "r.vhdx",
    ]);
    d.ok(&["vm", "start", "r"]);
    let mut c = Console::attach(d, "r");
    c.ok("DISK 0 WRITE 0 64 5");
    c.ok("MEM FILL 16 8 9");
    let sum = c.ok("MEM SUM 16 8");
    d.ok(&["checkpoint", "create", "r", "first"]);
    c.ok("DISK 0 WRITE 64 64 6");
    c.ok("MEM FILL 16 8 10");
    d.ok(&["checkpoint", "create", "r", "second"]);
    c.ok("DISK 0 WRITE 128 64 7");
    (c, sum)
}

/// A started vireod whose VM "r" runs on a base disk with two checkpoints (as
/// [`running_with_two_checkpoints`] makes it, console let go); None where KVM or vireod's
/// preconditions are missing (the testkit fails that under CI).
pub fn daemon_with_two_checkpoints() -> Option<Daemon> {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return None;
    }
    let d = Daemon::start()?;
    base_disk(d.dir.path());
    let (c, _) = running_with_two_checkpoints(&d);
    drop(c);
    Some(d)
}

/// vireod dies (abort, as SIGKILL) at `point` of a running VM's move to `to`; restarted, it
/// has settled the move.
pub fn die_during_move(d: &mut Daemon, point: &str, to: &Path) {
    die_at(d, "r", point, to);
    restart_settled(d, "r");
}

/// vireod dies at `point` of VM `name`'s move to `to` and stays down.
pub fn die_at(d: &mut Daemon, name: &str, point: &str, to: &Path) {
    d.kill9();
    d.restart_env(&[("VIREO_CHECKPOINT_FAULT", point)]);
    let r = d.run(&[
        "vm",
        "move-storage",
        name,
        "--to",
        to.to_str().unwrap(),
        "--no-wait",
    ]);
    eprintln!(
        "move-storage cut short at {point}: {}",
        String::from_utf8_lossy(&r.stdout).trim()
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "vireod did not die at {point}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts vireod again and waits until VM `name`'s move is settled.
pub fn restart_settled(d: &mut Daemon, name: &str) {
    d.restart();
    // Recovery runs at start-up; wait until the intent is gone. An apply is refused during a
    // move before it looks the checkpoint up, so an unknown one tells the two apart.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, line) = d.fails(&["checkpoint", "apply", name, "no-such-checkpoint"]);
        if !line.contains("moving its storage") {
            assert!(line.contains("no checkpoint"), "{line}");
            break;
        }
        assert!(Instant::now() < deadline, "the move was never settled");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM's folder in vireod's state.
pub fn vm_dir(d: &Daemon, name: &str) -> PathBuf {
    let id = d.vm(name).identity.id.to_string();
    d.dir.path().join("state/vms").join(id)
}

/// COM1 of a VM straight from its worker (`<vm-dir>/console.sock`), for while vireod is down.
pub struct WorkerConsole {
    conn: UnixStream,
    lines: BufReader<UnixStream>,
}

impl WorkerConsole {
    /// Connects once vireod's own connection has gone (one client at a time).
    pub fn attach(vm_dir: &Path) -> WorkerConsole {
        let sock = vm_dir.join("console.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(conn) = UnixStream::connect(&sock) {
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let lines = BufReader::new(conn.try_clone().unwrap());
                return WorkerConsole { conn, lines };
            }
            assert!(
                Instant::now() < deadline,
                "no console at {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `command`; the probe's answer must be `OK`.
    pub fn ok(&mut self, command: &str) -> String {
        self.conn
            .write_all(format!("{command}\n").as_bytes())
            .unwrap();
        let mut seen = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.lines.read_line(&mut line).unwrap_or(0);
            assert!(n > 0, "no answer to {command}; saw {seen:?}");
            let line = line.trim().to_owned();
            if line.starts_with("OK") {
                return line;
            }
            assert!(!line.starts_with("ERR"), "{command}: {line}");
            seen.push(line);
        }
    }
}

/// SIGKILL of a process that is not the test's child (a worker whose vireod is gone), then a
/// bounded wait until it is gone (a zombie counts as gone: nobody may reap it here).
pub fn kill9_unrelated(pid: u64) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.trim().chars().next());
        if stat.is_empty() || matches!(state, Some('Z' | 'X')) {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}
