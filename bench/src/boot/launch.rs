//! One timed boot of the probe under a VMM: spawn the process with COM1 on its stdio, wait for
//! `PROBE READY`, read its memory use, send `POWEROFF` and reap it. Vireo and QEMU go through
//! exactly the same code; only the command line and the guest-RAM rule differ.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vireo_probe_image::qemu::{debug_exit_status, QemuProbeConfig};
use vireo_probe_image::ProbeConsole;

use super::smaps::{self, GuestRamRule, Mapping, MemoryUse};

/// How /proc shows `vireo`'s guest RAM file, memfd or huge-page tmpfs alike (the end of it).
pub const VIREO_RAM_SUFFIX: &str = "vireo-guest-ram (deleted)";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    Vireo,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Vireo => "vireo",
            Vmm::Qemu => "qemu",
        }
    }
}

/// How to start one VMM on the probe.
pub struct Launcher {
    pub vmm: Vmm,
    program: PathBuf,
    args: Vec<OsString>,
    ram_rule: GuestRamRule,
}

/// What one boot measured.
pub struct Sample {
    /// Process spawn until the `PROBE READY` line was read.
    pub ready: Duration,
    /// `POWEROFF` sent until the process was reaped.
    pub exit: Duration,
    pub memory: MemoryUse,
    /// The mappings, kept for the overhead breakdown.
    pub maps: Vec<Mapping>,
}

impl Launcher {
    pub fn vireo(vireo: &Path, kernel: &Path, memory_mib: u32, vcpus: u32) -> Launcher {
        let args = [
            "run".into(),
            "--kernel".into(),
            kernel.as_os_str().to_owned(),
            "--memory".into(),
            format!("{memory_mib}M").into(),
            "--vcpus".into(),
            vcpus.to_string().into(),
            "--console".into(),
            "stdio".into(),
        ]
        .into();
        Launcher {
            vmm: Vmm::Vireo,
            program: vireo.to_path_buf(),
            args,
            ram_rule: GuestRamRule::PathSuffix(VIREO_RAM_SUFFIX.into()),
        }
    }

    /// QEMU with the probe crate's fastest-booting options (microvm + qboot, see
    /// `vireo_probe_image::qemu::DEFAULT_MACHINE`).
    pub fn qemu(config: &QemuProbeConfig) -> Launcher {
        Launcher {
            vmm: Vmm::Qemu,
            program: config.qemu.clone(),
            args: config.args(),
            ram_rule: GuestRamRule::AnonymousOfSize(u64::from(config.mem_mib) * 1024),
        }
    }

    pub fn ram_rule(&self) -> &GuestRamRule {
        &self.ram_rule
    }

    /// The command line, for the benchmark's header.
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Boots once; every wait is bounded by `timeout` and the process is killed on any failure.
    pub fn boot(&self, timeout: Duration) -> Result<Sample, String> {
        let stderr = tempfile::tempfile().map_err(|e| format!("stderr temp file: {e}"))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(
                stderr
                    .try_clone()
                    .map_err(|e| format!("stderr temp file: {e}"))?,
            );
        let mut vm = Running::new(cmd, stderr)
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))?;
        let result = vm.measure(&self.ram_rule, self.vmm, timeout);
        result.map_err(|e| format!("{e}{}", vm.diagnostics()))
    }
}

/// A spawned VMM; killed and reaped on drop, so a failed or timed-out boot leaves no process.
struct Running {
    child: Child,
    started: Instant,
    console: ProbeConsole,
    stderr: File,
    status: Option<ExitStatus>,
}

impl Running {
    fn new(mut cmd: Command, stderr: File) -> std::io::Result<Running> {
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(Running {
            child,
            started,
            console: ProbeConsole::new(stdout, stdin),
            stderr,
            status: None,
        })
    }

    fn measure(
        &mut self,
        rule: &GuestRamRule,
        vmm: Vmm,
        timeout: Duration,
    ) -> Result<Sample, String> {
        self.console
            .wait_ready(timeout)
            .map_err(|e| format!("waiting for PROBE READY: {e}"))?;
        let ready = self.started.elapsed();

        let pid = self.child.id();
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .map_err(|e| format!("reading /proc/{pid}/smaps: {e}"))?;
        let maps = smaps::parse(&text).map_err(|e| e.to_string())?;
        let memory = smaps::account(&maps, rule).map_err(|e| e.to_string())?;

        let poweroff = Instant::now();
        self.console
            .command("POWEROFF", timeout)
            .map_err(|e| format!("POWEROFF: {e}"))?;
        let status = self.wait_exit(timeout)?;
        let exit = poweroff.elapsed();
        let clean = match vmm {
            Vmm::Vireo => status.code() == Some(0),
            Vmm::Qemu => debug_exit_status(status) == Some(0),
        };
        if !clean {
            return Err(format!("exited with {status} after POWEROFF 0"));
        }
        Ok(Sample {
            ready,
            exit,
            memory,
            maps,
        })
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(500))
                }
                Ok(None) => return Err(format!("still running {timeout:?} after POWEROFF")),
                Err(e) => return Err(format!("waiting for the process: {e}")),
            }
        }
    }

    /// Exit status, the last console lines and stderr, appended to an error message.
    fn diagnostics(&mut self) -> String {
        let mut out = String::new();
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
            }
        }
        match self.status {
            Some(s) => out.push_str(&format!("; process {s}")),
            None => out.push_str("; process was still running (killed)"),
        }
        let lines = &self.console.other_lines;
        if !lines.is_empty() {
            let tail = &lines[lines.len().saturating_sub(5)..];
            out.push_str(&format!("; console: {}", tail.join(" | ")));
        }
        let mut text = String::new();
        if self.stderr.seek(SeekFrom::Start(0)).is_ok() {
            let _ = (&self.stderr).take(64 * 1024).read_to_string(&mut text);
        }
        let text: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if !text.is_empty() {
            let tail = &text[text.len().saturating_sub(5)..];
            out.push_str(&format!("; stderr: {}", tail.join(" | ")));
        }
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
