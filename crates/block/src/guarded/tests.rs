use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{copy, install};

const PAGE: usize = 4096;

/// A two-page shared mapping of a file that has just been cut to one page: its second page
/// raises SIGBUS when touched. The file's first page holds `i * 7` bytes.
struct Cut {
    ptr: *mut u8,
    _file: File,
    _dir: tempfile::TempDir,
}

impl Cut {
    fn new() -> Cut {
        let dir = tempfile::tempdir().unwrap();
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        let data: Vec<u8> = (0..2 * PAGE).map(|i| (i * 7) as u8).collect();
        file.write_all(&data).unwrap();
        // SAFETY: a new shared mapping of our own descriptor, of the file's full length.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        file.set_len(PAGE as u64).unwrap();
        Cut {
            ptr: ptr.cast(),
            _file: file,
            _dir: dir,
        }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        // SAFETY: our own mapping of two pages.
        unsafe { libc::munmap(self.ptr.cast(), 2 * PAGE) };
    }
}

#[test]
fn a_copy_past_the_cut_fails_and_the_process_lives() {
    assert!(install());
    let cut = Cut::new();
    let mut buf = vec![0u8; 2 * PAGE];
    // SAFETY: both ranges are mapped for the whole copy; the second source page faults.
    let ok = unsafe { copy(buf.as_mut_ptr(), cut.ptr, 2 * PAGE) };
    assert!(!ok, "the second page is past the end of the file");
    // SAFETY: as above, inside the file.
    let ok = unsafe { copy(buf.as_mut_ptr(), cut.ptr.add(100), PAGE - 100) };
    assert!(ok);
    let want: Vec<u8> = (100..PAGE).map(|i| (i * 7) as u8).collect();
    assert!(buf[..PAGE - 100] == want[..], "the bytes of the file");
    // And again after a fault: nothing was left broken by the redirect.
    // SAFETY: as above.
    assert!(!unsafe { copy(buf.as_mut_ptr(), cut.ptr.add(PAGE), 1) });
    // SAFETY: as above.
    assert!(unsafe { copy(buf.as_mut_ptr(), cut.ptr, 1) });
    assert_eq!(buf[0], 0);
    // SAFETY: as above, writing into the mapping this time.
    let ok = unsafe { copy(cut.ptr.add(PAGE - 16), buf.as_ptr(), 32) };
    assert!(!ok, "a write across the cut faults too");
}

#[test]
fn copies_of_every_small_length_and_alignment_are_exact() {
    let src: Vec<u8> = (0..300u32).map(|i| (i * 13 + 5) as u8).collect();
    for off in 0..9 {
        for len in 0..260 {
            let mut dst = vec![0xAAu8; 300];
            // SAFETY: both ranges lie inside their vectors.
            assert!(unsafe { copy(dst.as_mut_ptr().add(3), src.as_ptr().add(off), len) });
            assert_eq!(&dst[3..3 + len], &src[off..off + len]);
            assert!(dst[..3].iter().chain(&dst[3 + len..]).all(|&b| b == 0xAA));
        }
    }
}

/// How the child process below was set up before our handler went in.
const CHILD_ENV: &str = "VIREO_GUARDED_TEST_CHILD";

/// Runs `chained_child` in a new process of this test binary with `mode`, returning its status.
/// A handler that loops on the fault (returning without fixing anything re-runs the faulting
/// instruction) would hang it: it gets 60 s, then is killed and the test fails.
fn run_child(mode: &str) -> std::process::ExitStatus {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "guarded::tests::chained_child",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    for _ in 0..600 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(status) = status else {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!("the child ({mode}) did not end within 60 s: a fault loop?");
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        out.contains("guarded copy survived"),
        "the child never got to the foreign fault: {out}\n{err}"
    );
    status
}

/// A SIGBUS outside our copy, with Rust's own handler before ours (it resets the default
/// action and returns), still kills the process with SIGBUS.
#[test]
fn a_sigbus_elsewhere_still_kills_the_process() {
    let status = run_child("std");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    let status = run_child("default");
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

extern "C" fn exit_42(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo for this signal.
    let code = unsafe { (*info).si_code };
    // SAFETY: _exit is async-signal-safe.
    unsafe {
        libc::_exit(if sig == libc::SIGBUS && code == libc::BUS_ADRERR {
            42
        } else {
            43
        })
    }
}

/// A SIGBUS outside our copy reaches the SA_SIGINFO handler that was there before, with the
/// signal's information.
#[test]
fn a_sigbus_elsewhere_reaches_the_previous_handler() {
    let status = run_child("siginfo");
    assert_eq!(status.code(), Some(42), "{status:?}");
}

/// Not a test on its own: the body of the child processes above (ignored, so a normal run
/// does not list it as passed; it does nothing unless `CHILD_ENV` is set).
#[test]
#[ignore = "run by the SIGBUS chaining tests in a child process"]
fn chained_child() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    // SAFETY: zeroed sigaction is valid; filled in per mode.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    match mode.as_str() {
        "std" => {}
        "default" => {
            // SAFETY: setting SIG_DFL.
            unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) };
        }
        "siginfo" => {
            act.sa_sigaction = exit_42 as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            // SAFETY: a valid handler that only calls _exit.
            unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) };
        }
        other => panic!("unknown mode {other}"),
    }
    assert!(install());
    let cut = Cut::new();
    let mut buf = [0u8; 8];
    // SAFETY: both ranges are mapped; the source is past the cut.
    assert!(!unsafe { copy(buf.as_mut_ptr(), cut.ptr.add(PAGE), 8) });
    println!("guarded copy survived");
    // SAFETY: mapped, but past the end of the file: this read raises SIGBUS outside our copy.
    let v = unsafe { std::ptr::read_volatile(cut.ptr.add(PAGE + 8)) };
    println!("the foreign fault did not kill the process ({v})");
    std::process::exit(1);
}
