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
//!
//! [`skip_env`] is the one exception: for a condition no setup can arrange on some machines CI
//! legitimately runs on (e.g. a stock Linux guest needs VMX/SVM, which a KVM-PVM host lacks), it
//! records the skip the same way but never fails. Use it only for facts about the hardware or the
//! host kernel, never for something `./setup.sh` could install.
#![forbid(unsafe_code)]

pub mod cmd;
pub mod smaps;
pub mod tmpfs;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

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
    /// `ping` (iputils-ping) runs.
    Ping,
    /// `ethtool` runs.
    Ethtool,
    /// `setpriv` and `unshare` (util-linux) run: to drop privileges and to change a mount only
    /// inside a private mount namespace.
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
            Need::Ping => "ping (iputils-ping)",
            Need::Ethtool => "ethtool",
            Need::Setpriv => "setpriv and unshare (util-linux)",
        }
    }

    /// Every need, for code that checks or lists them all.
    pub const ALL: [Need; 12] = [
        Need::Kvm,
        Need::Root,
        Need::Netns,
        Need::Tap,
        Need::QemuImg,
        Need::QemuIo,
        Need::QemuSystem,
        Need::Tcpdump,
        Need::Iperf3,
        Need::Ping,
        Need::Ethtool,
        Need::Setpriv,
    ];

    /// Whether this machine has it. Probed once per process: some tests check inside loops, and
    /// what is installed does not change while a test binary runs.
    pub fn met(self) -> bool {
        static MET: [OnceLock<bool>; Need::ALL.len()] =
            [const { OnceLock::new() }; Need::ALL.len()];
        *MET[self as usize].get_or_init(|| self.probe())
    }

    fn probe(self) -> bool {
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
            Need::Ping => runs("ping", &["-V"]),
            Need::Ethtool => runs("ethtool", &["--version"]),
            Need::Setpriv => runs("setpriv", &["--version"]) && runs("unshare", &["--version"]),
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

/// Records that the current test cannot run, for a reason no [`Need`] covers (e.g. "a network
/// namespace (ip netns add failed)"). Panics under CI; elsewhere records it and returns false.
pub fn skip(reason: &str) -> bool {
    let line = format!("{}: needs {reason}", current_test());
    if in_ci() {
        panic!(
            "precondition missing under CI=true: {line} (./setup.sh installs it; CI must have it)"
        );
    }
    record(&line);
    false
}

/// Records that the current test cannot run because of a fact about this machine that no setup
/// can change and that CI may legitimately share (see the crate docs). Never fails, even under
/// CI; the skip is still listed by `./test.sh`. Always returns false.
pub fn skip_env(reason: &str) -> bool {
    record(&format!(
        "{}: needs {reason} [cannot be arranged here; not required under CI]",
        current_test()
    ));
    false
}

/// `package/test-binary test::path`, for the skip line.
fn current_test() -> String {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_string();
    // Cargo sets CARGO_PKG_NAME for the test binaries it runs; the binary's name (minus cargo's
    // hash suffix) says which test file it is.
    let pkg = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| match s.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => s,
        })
        .unwrap_or_default();
    format!("{pkg}/{bin} {test}")
}

/// Prints the skip line and appends it to `VIREO_SKIP_LOG`, once per process: a check inside a
/// loop must not list the same skip thousands of times.
fn record(line: &str) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let first = SEEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(line.to_string());
    if !first {
        return;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs test `name` of this binary again as a child with `env`; its status and the skip log.
    fn child(name: &str, env: &[(&str, &str)]) -> (bool, String) {
        let dir = tempfile_dir();
        let log = dir.join("skips.log");
        let out = Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact"])
            .env("TESTKIT_CHILD", "1")
            .env("VIREO_SKIP_LOG", &log)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        std::fs::remove_dir_all(&dir).unwrap();
        (out.status.success(), logged)
    }

    fn tempfile_dir() -> std::path::PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("testkit-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_need_that_is_never_met_is_recorded_not_passed() {
        if std::env::var("TESTKIT_CHILD").is_ok() {
            // Twice, as a check inside a loop would: listed once.
            skip("a thing no machine has");
            skip("a thing no machine has");
            return;
        }
        let name = "tests::a_need_that_is_never_met_is_recorded_not_passed";
        let (ok, logged) = child(name, &[("CI", "false")]);
        assert!(ok);
        assert_eq!(logged.lines().count(), 1, "{logged}");
        assert!(logged.contains("needs a thing no machine has"), "{logged}");
        assert!(logged.contains(name), "{logged}");
        assert!(logged.contains("vireo-testkit/vireo_testkit "), "{logged}");
        let (ok, _) = child(name, &[("CI", "true")]);
        assert!(!ok, "under CI a missing precondition must fail");
    }

    #[test]
    fn an_environment_skip_is_recorded_but_never_fails() {
        if std::env::var("TESTKIT_CHILD").is_ok() {
            skip_env("hardware this host lacks");
            return;
        }
        let name = "tests::an_environment_skip_is_recorded_but_never_fails";
        for ci in ["false", "true"] {
            let (ok, logged) = child(name, &[("CI", ci)]);
            assert!(ok, "CI={ci}");
            assert!(
                logged.contains("needs hardware this host lacks"),
                "{logged}"
            );
            assert!(logged.contains("not required under CI"), "{logged}");
        }
    }

    #[test]
    fn a_missing_tool_is_not_met() {
        // Runs a probe against a PATH with nothing on it: every tool need must be unmet.
        if std::env::var("TESTKIT_CHILD").is_ok() {
            assert!(!Need::QemuImg.met());
            assert!(!require(Need::QemuImg));
            return;
        }
        let name = "tests::a_missing_tool_is_not_met";
        let empty = tempfile_dir();
        let path = empty.to_str().unwrap().to_string();
        let (ok, logged) = child(name, &[("CI", "false"), ("PATH", &path)]);
        std::fs::remove_dir_all(&empty).unwrap();
        assert!(ok);
        assert!(logged.contains("needs qemu-img"), "{logged}");
    }
}
