//! One probe VM under either VMM with COM1 on its stdio; killed and reaped on drop, so a failed
//! measurement leaves no process behind.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vireo_probe_image::qemu::QemuProbeConfig;
use vireo_probe_image::ProbeConsole;

pub const READY: Duration = Duration::from_secs(20);

pub struct Vm {
    child: Child,
    pub console: ProbeConsole,
}

impl Vm {
    pub fn spawn(program: &Path, args: &[OsString]) -> Result<Vm, String> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut vm = Vm {
            child,
            console: ProbeConsole::new(stdout, stdin),
        };
        vm.console
            .wait_ready(READY)
            .map_err(|e| format!("{}: no PROBE READY: {e}", program.display()))?;
        Ok(vm)
    }

    /// `vireo run` with the given extra options (`--disk ...`, `--net ...`).
    pub fn vireo(vireo: &Path, memory_mib: u32, extra: &[String]) -> Result<Vm, String> {
        let mut args: Vec<OsString> = vec![
            "run".into(),
            "--kernel".into(),
            vireo_probe_image::probe_elf().into(),
            "--memory".into(),
            format!("{memory_mib}M").into(),
            "--console".into(),
            "stdio".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        Vm::spawn(vireo, &args)
    }

    pub fn qemu(config: &QemuProbeConfig) -> Result<Vm, String> {
        Vm::spawn(&config.qemu, &config.args())
    }

    /// Sends `line` and returns its `OK` answer; `ERR` answers and timeouts become errors.
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<String, String> {
        self.console
            .command(line, timeout)
            .map_err(|e| format!("`{line}`: {e}"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.console.send_line("POWEROFF");
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=<number>` from an answer line.
pub fn field(answer: &str, key: &str) -> Result<f64, String> {
    vireo_probe_image::console::field(answer, key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("answer `{answer}` has no number {key}="))
}
