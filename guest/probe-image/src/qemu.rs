//! Boots the probe under QEMU (`-M microvm`, KVM) for end-to-end tests and as the benchmarks'
//! peer baseline: builds the command line, spawns QEMU with the console on stdio and kills it
//! on drop.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::console::ProbeConsole;

/// The qboot firmware: it starts PVH kernels directly and boots faster than SeaBIOS.
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// microvm without ACPI (QEMU then lists the virtio-mmio devices on the kernel command line),
/// option ROMs, RTC or PIC; the PIT stays because the probe calibrates its TSC against it.
/// These were the fastest-booting options measured (examples/boot_time.rs).
pub const DEFAULT_MACHINE: &str =
    "microvm,x-option-roms=off,acpi=off,rtc=off,pic=off,pit=on,isa-serial=on";

#[derive(Clone, Debug)]
pub struct QemuDisk {
    pub path: PathBuf,
    pub read_only: bool,
    /// Reported by `DISK <i> ID` (virtio-blk serial, at most 20 bytes).
    pub serial: Option<String>,
}

#[derive(Clone, Debug)]
pub enum NetBackend {
    /// `-netdev dgram`: raw frames as UDP datagrams from `local` to `remote`.
    Dgram {
        local: SocketAddr,
        remote: SocketAddr,
    },
    /// Any other `-netdev` value, without the `id=` (e.g. `"socket,udp=...,localaddr=..."`).
    Raw(String),
}

#[derive(Clone, Debug)]
pub struct QemuNic {
    pub backend: NetBackend,
    pub mac: Option<[u8; 6]>,
}

#[derive(Clone, Debug)]
pub struct QemuProbeConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    /// Firmware for `-bios`; None keeps QEMU's default (SeaBIOS for microvm), which needs the
    /// option ROMs (drop `x-option-roms=off` from `machine`).
    pub firmware: Option<PathBuf>,
    /// The `-M` value.
    pub machine: String,
    pub mem_mib: u32,
    pub cpus: u32,
    pub disks: Vec<QemuDisk>,
    pub nics: Vec<QemuNic>,
    /// Appended to the kernel command line.
    pub cmdline: Option<String>,
    pub extra_args: Vec<String>,
}

/// `qemu-system-x86_64` from PATH, if installed.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// The status the probe passed to `POWEROFF`, from QEMU's isa-debug-exit exit code
/// (`(status << 1) | 1`, truncated to 8 bits by the OS).
pub fn debug_exit_status(status: ExitStatus) -> Option<u8> {
    let code = status.code()?;
    (code & 1 == 1).then_some((code >> 1) as u8)
}

impl QemuProbeConfig {
    /// The probe from this crate, `mem_mib` of RAM, one vCPU, no devices.
    pub fn new(qemu: impl Into<PathBuf>, mem_mib: u32) -> Self {
        QemuProbeConfig {
            qemu: qemu.into(),
            kernel: crate::probe_elf().to_path_buf(),
            firmware: Path::new(QBOOT).is_file().then(|| PathBuf::from(QBOOT)),
            machine: DEFAULT_MACHINE.to_string(),
            mem_mib,
            cpus: 1,
            disks: Vec::new(),
            nics: Vec::new(),
            cmdline: None,
            extra_args: Vec::new(),
        }
    }

    pub fn disk(mut self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.disks.push(QemuDisk {
            path: path.into(),
            read_only,
            serial: None,
        });
        self
    }

    pub fn nic(mut self, backend: NetBackend, mac: Option<[u8; 6]>) -> Self {
        self.nics.push(QemuNic { backend, mac });
        self
    }

    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(s.into());
        push("-M");
        push(&self.machine);
        push("-enable-kvm");
        push("-cpu");
        push("host,arch-capabilities=off");
        push("-m");
        push(&self.mem_mib.to_string());
        push("-smp");
        push(&self.cpus.to_string());
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ] {
            push(s);
        }
        // The probe speaks modern (version 2) virtio-mmio only.
        push("-global");
        push("virtio-mmio.force-legacy=false");
        push("-device");
        push("isa-debug-exit,iobase=0xf4,iosize=0x04");
        if let Some(cmdline) = &self.cmdline {
            push("-append");
            push(cmdline);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let mut drive = format!("file={},if=none,id=d{i},format=raw", d.path.display());
            if d.read_only {
                drive.push_str(",readonly=on");
            }
            push("-drive");
            push(&drive);
            let mut dev = format!("virtio-blk-device,drive=d{i}");
            if let Some(serial) = &d.serial {
                dev.push_str(&format!(",serial={serial}"));
            }
            push("-device");
            push(&dev);
        }
        for (i, n) in self.nics.iter().enumerate() {
            let backend = match &n.backend {
                NetBackend::Dgram { local, remote } => format!(
                    "dgram,local.type=inet,local.host={},local.port={},remote.type=inet,remote.host={},remote.port={}",
                    local.ip(),
                    local.port(),
                    remote.ip(),
                    remote.port()
                ),
                NetBackend::Raw(s) => s.clone(),
            };
            push("-netdev");
            push(&format!("{backend},id=n{i}"));
            let mut dev = format!("virtio-net-device,netdev=n{i}");
            if let Some(m) = n.mac {
                dev.push_str(&format!(
                    ",mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ));
            }
            push("-device");
            push(&dev);
        }
        if let Some(fw) = &self.firmware {
            a.push("-bios".into());
            a.push(fw.into());
        }
        a.push("-kernel".into());
        a.push(self.kernel.clone().into());
        a.extend(self.extra_args.iter().map(OsString::from));
        a
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(self.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Starts QEMU; the returned probe's console is connected to COM1.
    pub fn spawn(&self) -> io::Result<QemuProbe> {
        let mut child = self.command().spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(QemuProbe {
            child,
            console: ProbeConsole::new(stdout, stdin),
        })
    }
}

/// A running QEMU with the probe; killed when dropped.
pub struct QemuProbe {
    child: Child,
    pub console: ProbeConsole,
}

impl QemuProbe {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for QEMU to exit by itself; None if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for QemuProbe {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_devices_in_order() {
        let cfg = QemuProbeConfig::new("qemu-system-x86_64", 128)
            .disk("/tmp/a.img", false)
            .disk("/tmp/b.img", true)
            .nic(
                NetBackend::Dgram {
                    local: "127.0.0.1:4000".parse().unwrap(),
                    remote: "127.0.0.1:4001".parse().unwrap(),
                },
                Some([2, 0, 0, 0, 0, 1]),
            );
        let args: Vec<String> = cfg
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains(
            "-drive file=/tmp/a.img,if=none,id=d0,format=raw -device virtio-blk-device,drive=d0"
        ));
        assert!(joined.contains("file=/tmp/b.img,if=none,id=d1,format=raw,readonly=on"));
        assert!(joined.contains(
            "local.port=4000,remote.type=inet,remote.host=127.0.0.1,remote.port=4001,id=n0"
        ));
        assert!(joined.contains("virtio-net-device,netdev=n0,mac=02:00:00:00:00:01"));
        assert!(joined.contains("-m 128"));
        assert_eq!(args.last().map(String::as_str), Some(crate::PROBE_ELF));
    }

    #[test]
    fn debug_exit_status_decoding() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(debug_exit_status(ExitStatus::from_raw(7 << 8)), Some(3));
        assert_eq!(debug_exit_status(ExitStatus::from_raw(1 << 8)), Some(0));
        assert_eq!(debug_exit_status(ExitStatus::from_raw(2 << 8)), None);
    }
}
