//! Test preconditions, checked one way across the workspace.
//!
//! A test that needs something the machine may lack (/dev/kvm, root, network namespaces, qemu-img,
//! ...) calls [`require`] first. What happens when the need is not met:
//! - under CI (`CI=true`) the test **fails**: CI has everything `./setup.sh` installs, so a missing
//!   tool there is a broken setup, never a pass;
//! - elsewhere the test returns early and the skip is appended, with its reason, to the file named
//!   by `VIREO_SKIP_LOG` (`./test.sh` sets it and prints every line at the end), so a skipped test
//!   can never be mistaken for a passing one.
//!
//! ```text
//! if !vireo_testkit::require(Need::QemuImg) { return; }
//! ```
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// /dev/kvm opens read-write.
    Kvm,
    /// Running as root (uid 0).
    Root,
    /// Root, `ip` from iproute2, and `ip netns` works (namespaces can be made).
    Netns,
    /// Root and /dev/net/tun (TAP devices).
    Tap,
    /// `qemu-img` runs.
    QemuImg,
    /// `qemu-io` runs.
    QemuIo,
    /// `qemu-system-x86_64` runs.
    QemuSystem,
    /// `tcpdump` runs.
    Tcpdump,
    /// `iperf3` runs.
    Iperf3,
    /// `setpriv` (util-linux) exists.
    Setpriv,
}

impl Need {
    /// What the need is, for the skip message.
    pub fn describe(self) -> &'static str {
        match self {
            Need::Kvm => "/dev/kvm (read-write)",
            Need::Root => "root",
            Need::Netns => "root and network namespaces (ip netns)",
            Need::Tap => "root and /dev/net/tun",
            Need::QemuImg => "qemu-img",
            Need::QemuIo => "qemu-io",
            Need::QemuSystem => "qemu-system-x86_64",
            Need::Tcpdump => "tcpdump",
            Need::Iperf3 => "iperf3",
            Need::Setpriv => "setpriv",
        }
    }

    /// Whether this machine has it. Cheap enough to call per test.
    pub fn met(self) -> bool {
        match self {
            Need::Kvm => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            Need::Root => is_root(),
            Need::Netns => is_root() && runs("ip", &["netns", "list"]),
            Need::Tap => is_root() && Path::new("/dev/net/tun").exists(),
            Need::QemuImg => runs("qemu-img", &["--version"]),
            Need::QemuIo => runs("qemu-io", &["--version"]),
            Need::QemuSystem => runs("qemu-system-x86_64", &["--version"]),
            Need::Tcpdump => runs("tcpdump", &["--version"]),
            Need::Iperf3 => runs("iperf3", &["--version"]),
            Need::Setpriv => runs("setpriv", &["--version"]),
        }
    }
}

fn is_root() -> bool {
    // The effective uid from /proc, so this crate needs no unsafe libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True under CI, where every precondition is required.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks `need`. Returns true when it is met. When it is not: panics under CI; elsewhere records
/// the skip (see the crate docs) and returns false, and the caller returns early.
pub fn require(need: Need) -> bool {
    if need.met() {
        return true;
    }
    skip(need.describe())
}

/// Checks several needs; the first unmet one decides, as with [`require`].
pub fn require_all(needs: &[Need]) -> bool {
    needs.iter().all(|&n| require(n))
}

/// Records that the current test cannot run, for a reason no [`Need`] covers (e.g. "/dev/kvm is
/// not private to root"). Panics under CI; elsewhere records it and returns false.
pub fn skip(reason: &str) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    let krate = std::env::var("CARGO_CRATE_NAME").unwrap_or_default();
    let line = format!("{krate} {test}: needs {reason}");
    if in_ci() {
        panic!(
            "precondition missing under CI=true: {line} (./setup.sh installs it; CI must have it)"
        );
    }
    eprintln!("SKIPPED {line}");
    if let Ok(path) = std::env::var("VIREO_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            // One write call per line: O_APPEND keeps concurrent tests' lines whole.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_need_that_is_never_met_is_recorded_not_passed() {
        // Runs the check in a child process so CI=true (panic) and the log can both be observed.
        if std::env::var("TESTKIT_CHILD").is_ok() {
            skip("a thing no machine has");
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let dir = std::env::temp_dir().join(format!("testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        let name = "tests::a_need_that_is_never_met_is_recorded_not_passed";
        let out = Command::new(&exe)
            .args([name, "--exact", "--nocapture"])
            .env("TESTKIT_CHILD", "1")
            .env("CI", "false")
            .env("VIREO_SKIP_LOG", &log)
            .output()
            .unwrap();
        assert!(out.status.success());
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("needs a thing no machine has"), "{logged}");
        assert!(logged.contains(name), "{logged}");
        let out = Command::new(&exe)
            .args([name, "--exact"])
            .env("TESTKIT_CHILD", "1")
            .env("CI", "true")
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "under CI a missing precondition must fail"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
