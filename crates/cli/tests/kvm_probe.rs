//! `vireo run` booting the probe guest: READY, several vCPUs, disks (guest→host and host→guest
//! patterns, read-only refusal), and two VMs exchanging frames over TAPs on a bridge.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use vireo_probe_image::{pattern, probe_elf, ProbeConsole, ProbeError};

const T: Duration = Duration::from_secs(60);

/// A running `vireo run` with the probe, driven through its stdin/stdout.
struct ProbeVm {
    child: Child,
    console: ProbeConsole,
}

impl ProbeVm {
    fn start(prefix: &[&str], extra: &[&str]) -> ProbeVm {
        let mut cmd = if prefix.is_empty() {
            vireo()
        } else {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(env!("CARGO_BIN_EXE_vireo"));
            c
        };
        let mut child = cmd
            .args(["run", "--kernel", probe_elf().to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
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

    fn ok(&mut self, cmd: &str) -> String {
        match self.console.command(cmd, T) {
            Ok(a) => a,
            Err(e) => {
                let _ = self.child.kill();
                panic!("{cmd}: {e}");
            }
        }
    }

    /// Powers off with `status` and returns vireo's exit code.
    fn poweroff(mut self, status: u8) -> Option<i32> {
        let _ = self.console.command(&format!("POWEROFF {status}"), T);
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if std::time::Instant::now() > deadline {
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

#[test]
fn kvm_probe_boots_to_ready_on_two_vcpus() {
    if !kvm_usable() {
        return;
    }
    let mut vm = ProbeVm::start(&[], &["--memory", "256M", "--vcpus", "2"]);
    assert_eq!(vm.ok("PING"), "OK PONG");
    let info = vm.ok("INFO");
    assert!(info.contains("mem_mib=256"), "{info}");
    assert_eq!(vm.ok("CPUS"), "OK online=2");
    assert_eq!(vm.poweroff(3), Some(3));
}

#[test]
fn kvm_probe_disks_round_trip_and_read_only_refuses_writes() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    std::fs::File::create(&ro)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // The host writes a pattern the guest will verify: sectors 4096..4160, seed 22.
    let mut host_data = vec![0u8; 64 * 512];
    pattern::fill(&mut host_data, 22, 4096 * 512);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&rw).unwrap();
        f.seek(SeekFrom::Start(4096 * 512)).unwrap();
        f.write_all(&host_data).unwrap();
    }
    let rw_arg = rw.to_str().unwrap().to_string();
    let ro_arg = format!("{},ro", ro.display());
    let mut vm = ProbeVm::start(
        &[],
        &["--memory", "128M", "--disk", &rw_arg, "--disk", &ro_arg],
    );
    assert_eq!(vm.ok("DISK 0 INFO"), "OK sectors=16384 ro=0 blk_size=512");
    assert_eq!(vm.ok("DISK 1 INFO"), "OK sectors=2048 ro=1 blk_size=512");
    vm.ok("DISK 0 WRITE 16 128 11");
    vm.ok("DISK 0 FLUSH");
    vm.ok("DISK 0 VERIFY 4096 64 22");
    match vm.console.command("DISK 1 WRITE 0 8 5", T) {
        Err(ProbeError::Err(msg)) => assert!(msg.starts_with("status="), "{msg}"),
        other => panic!("write to a read-only disk: {other:?}"),
    }
    // The guest's write is in the host file, byte for byte.
    let mut got = vec![0u8; 128 * 512];
    let mut f = std::fs::File::open(&rw).unwrap();
    f.seek(SeekFrom::Start(16 * 512)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert_eq!(pattern::verify(&got, 11, 16 * 512), None);
    assert_eq!(vm.poweroff(0), Some(0));
    // The read-only image is untouched.
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn kvm_probe_uses_a_vhdx_disk() {
    if !kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhdx");
    let opts = vireo_vhdx::CreateOptions {
        size: 16 << 20,
        block_size: 1 << 20,
        ..Default::default()
    };
    drop(vireo_vhdx::Vhdx::create(&path, &opts).unwrap());
    let arg = path.to_str().unwrap().to_string();
    let mut vm = ProbeVm::start(&[], &["--memory", "64M", "--disk", &arg]);
    assert_eq!(vm.ok("DISK 0 INFO"), "OK sectors=32768 ro=0 blk_size=512");
    vm.ok("DISK 0 WRITE 2040 64 9");
    vm.ok("DISK 0 FLUSH");
    vm.ok("DISK 0 VERIFY 2040 64 9");
    assert_eq!(vm.poweroff(0), Some(0));
    // The data is in the VHDX as the format sees it, not at raw offsets of the container.
    let disk = vireo_vhdx::Vhdx::open(&path, &vireo_vhdx::OpenOptions::read_only()).unwrap();
    let mut got = vec![0u8; 64 * 512];
    vireo_block::BlockBackend::read_at(&disk, &mut got, 2040 * 512).unwrap();
    assert_eq!(pattern::verify(&got, 9, 2040 * 512), None);
}
