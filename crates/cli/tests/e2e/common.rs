//! Helpers shared by the `vireo run` end-to-end tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vireo_probe_image::{probe_elf, ProbeConsole};

pub fn vireo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vireo"))
}

/// /dev/kvm usable (a recorded skip without it; fails under CI).
pub fn kvm_usable() -> bool {
    vireo_testkit::require(vireo_testkit::Need::Kvm)
}

/// Writes a tiny PVH kernel made of `code` into `dir`.
pub fn tiny_kernel(dir: &Path, code: &[u8]) -> PathBuf {
    let p = dir.join("tiny.elf");
    std::fs::write(&p, vireo_vmm::test_images::pvh_elf(code)).unwrap();
    p
}

/// Runs `vireo` with `args` and `stdin`, killing it after `timeout`.
pub fn run_with_timeout(args: &[&str], stdin: &[u8], timeout: Duration) -> Output {
    let mut child = vireo()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let out = child.wait_with_output();
        let _ = tx.send(());
        out
    });
    if rx.recv_timeout(timeout).is_err() {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        panic!("vireo {args:?} did not finish within {timeout:?}");
    }
    waiter.join().unwrap().unwrap()
}

/// Runs `ip ARGS`, quietly; true on success.
pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace this test created; deleted (with its bridges and TAPs) when dropped.
pub struct Netns(pub String);

impl Netns {
    /// Creates `name`; None (a recorded skip; fails under CI) without TAP support, iproute2
    /// or root, so the test can return.
    pub fn create(name: String) -> Option<Netns> {
        use vireo_testkit::{require_all, Need};
        if !require_all(&[Need::Tap, Need::Netns]) {
            return None;
        }
        assert!(ip(&["netns", "add", &name]), "ip netns add {name} failed");
        Some(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

// A running `vireo run` with the probe guest, driven through its stdin/stdout.

pub const T: Duration = Duration::from_secs(60);

/// Killed if dropped while still running.
pub struct ProbeVm {
    pub child: Child,
    pub console: ProbeConsole,
}

impl ProbeVm {
    /// Boots the probe with `extra` options, the command prefixed by `prefix` (e.g. `ip netns
    /// exec NS`) when not empty, and waits for READY.
    pub fn start(prefix: &[&str], extra: &[&str]) -> ProbeVm {
        let cmd = if prefix.is_empty() {
            vireo()
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(env!("CARGO_BIN_EXE_vireo"));
            c
        };
        ProbeVm::spawn(cmd, extra)
    }

    /// Boots the probe with the `vireo` binary at `program` (e.g. a copy elsewhere).
    pub fn start_with(program: &Path, extra: &[&str]) -> ProbeVm {
        ProbeVm::spawn(Command::new(program), extra)
    }

    /// Boots the probe with `cmd` (a program with its environment) given the run arguments.
    pub fn start_from(cmd: Command, extra: &[&str]) -> ProbeVm {
        ProbeVm::spawn(cmd, extra)
    }

    fn spawn(mut cmd: Command, extra: &[&str]) -> ProbeVm {
        let mut child = spawn_when_not_busy(
            cmd.args(["run", "--kernel", probe_elf().to_str().unwrap()])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut vm = ProbeVm {
            child,
            console: ProbeConsole::new(stdout, stdin),
        };
        if let Err(e) = vm.console.wait_ready(T) {
            let _ = vm.child.kill();
            panic!("probe did not become ready: {e}");
        }
        vm
    }

    /// Sends `cmd` and returns the guest's answer; kills the VM and panics on an error.
    pub fn ok(&mut self, cmd: &str) -> String {
        match self.console.command(cmd, T) {
            Ok(a) => a,
            Err(e) => {
                let _ = self.child.kill();
                panic!("{cmd}: {e}");
            }
        }
    }

    /// Powers off with `status` and returns vireo's exit code.
    pub fn poweroff(mut self, status: u8) -> Option<i32> {
        let _ = self.console.command(&format!("POWEROFF {status}"), T);
        let deadline = Instant::now() + T;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("vireo did not exit after POWEROFF");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ProbeVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns `cmd`, waiting (bounded) while the kernel says its program is busy (ETXTBSY): a copy
/// of a binary another test thread has just written stays open for writing, for a moment, in
/// any child forked meanwhile, until that child execs.
pub fn spawn_when_not_busy(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + T;
    loop {
        match cmd.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("spawning {cmd:?}: {e}"),
        }
    }
}

/// Connects to a VM's control socket (it appears once the VM runs); answers arrive on the channel.
pub fn control_socket(path: &Path) -> (UnixStream, mpsc::Receiver<String>) {
    let deadline = Instant::now() + T;
    let conn = loop {
        match UnixStream::connect(path) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("control socket {}: {e}", path.display()),
        }
    };
    let (tx, rx) = mpsc::channel();
    let reader = conn.try_clone().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (conn, rx)
}
