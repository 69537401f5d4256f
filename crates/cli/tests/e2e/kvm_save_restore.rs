//! `vireo control SOCKET save DIR` and `vireo run --restore DIR`: a probe guest with two vCPUs
//! and a disk is saved mid-workload (the first `vireo run` exits 0), a restore with other
//! options or from a damaged save is refused as bad input (2) before anything runs, and a
//! restore with the same options continues the guest: it answers, its memory and disk are as
//! saved, its workload goes on and disk I/O works.

use crate::common;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vireo_probe_image::ProbeConsole;

const MIB: u64 = 1 << 20;

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vireo did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn kvm_save_then_restore_continues_the_guest() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let save = dir.path().join("saved");
    let sock = dir.path().join("control.sock");
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let (disk_s, sock_s, save_s) = (path(&disk), path(&sock), path(&save));
    let common = ["--memory", "64M", "--vcpus", "2", "--disk", &disk_s];

    let mut opts = common.to_vec();
    opts.extend(["--control", &sock_s]);
    let mut vm = ProbeVm::start(&[], &opts);
    vm.ok("DISK 0 WRITE 0 64 3");
    vm.ok("MEM FILL 16 4 5");
    let sum = vm.ok("MEM SUM 16 4");
    vm.ok("DIRTY START 24 4 0");
    let _ = control_socket(&sock);
    let out = vireo()
        .args(["control", &sock_s, "save", &save_s])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), save_s);
    // The saved VM stops; vireo run says where it went and exits 0.
    assert_eq!(wait_exit(&mut vm.child, T), Some(0));
    assert!(save.join("vm.state").is_file());
    assert_eq!(
        std::fs::metadata(save.join("memory.bin")).unwrap().len(),
        64 * MIB
    );

    // Other options than the saved VM's: refused as bad input, naming what differs.
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_string();
    let mut wrong = vec!["run", "--kernel", &kernel, "--console", "none"];
    wrong.extend(["--memory", "128M", "--vcpus", "2", "--disk", &disk_s]);
    wrong.extend(["--restore", &save_s]);
    let out = run_with_timeout(&wrong, b"", T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("64 MiB") && err.contains(&save_s), "{err}");
    // A damaged save: refused as bad input too.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    let mut state = std::fs::read(save.join("vm.state")).unwrap();
    let at = state.len() - 40;
    state[at] ^= 0x20;
    std::fs::write(damaged.join("vm.state"), state).unwrap();
    std::fs::copy(save.join("memory.bin"), damaged.join("memory.bin")).unwrap();
    let damaged_s = path(&damaged);
    let mut bad = vec!["run", "--kernel", &kernel, "--console", "none"];
    bad.extend(common);
    bad.extend(["--restore", &damaged_s]);
    let out = run_with_timeout(&bad, b"", T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("checksum"), "{err}");
    let missing = path(&dir.path().join("nothing-here"));
    let mut none = vec!["run", "--kernel", &kernel, "--console", "none"];
    none.extend(common);
    none.extend(["--restore", &missing]);
    let out = run_with_timeout(&none, b"", T);
    assert_eq!(out.status.code(), Some(2));

    // The same options: the guest continues where it was saved.
    let mut child = vireo()
        .args(["run", "--kernel", &kernel])
        .args(common)
        .args(["--restore", &save_s])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut console = ProbeConsole::new(stdout, stdin);
    let mut ok = |cmd: &str| match console.command(cmd, T) {
        Ok(a) => a,
        Err(e) => {
            let _ = child.kill();
            panic!("{cmd}: {e}");
        }
    };
    assert_eq!(ok("PING"), "OK PONG");
    // The workload started before the save must run on after the restore. It may have done
    // less than one pass before the save (a loaded host), so give it time to finish one now:
    // at full speed a pass over 4 MiB takes well under a millisecond of guest time.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let stop = ok("DIRTY STOP");
    let passes: u64 = vireo_probe_image::console::field(&stop, "passes")
        .unwrap()
        .parse()
        .unwrap();
    assert!(passes > 0, "{stop}");
    assert_eq!(ok("MEM SUM 16 4"), sum);
    assert!(ok("CPUS").starts_with("OK online=2"));
    ok("DISK 0 VERIFY 0 64 3");
    ok("DISK 0 WRITE 100 64 4");
    ok("DISK 0 VERIFY 100 64 4");
    ok("DISK 0 FLUSH");
    console.send_line("POWEROFF 3").unwrap();
    assert_eq!(wait_exit(&mut child, T), Some(3));
}
