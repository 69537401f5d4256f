//! `vireo run`: boots one VM in the foreground and exits with the guest's status.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::exit::CliError;
use errors::{restore_error, vhost_user_error, vm_error, worker_error};
use vireo_vmm::vhost_user_net::VhostUserNet;
use vireo_vmm::{ConsoleConfig, RamBacking, RestoreFrom, VirtioSlot, Vm, VmConfig, VmExit};
use vireo_worker::control::{ControlDisk, ControlServer};
use vireo_worker::image::{self, parse_disk, DiskArg};

mod errors;

/// The subcommand's one-line description, shared by both parsers (`main.rs`, `run_only.rs`).
pub const ABOUT: &str =
    "Run one virtual machine in the foreground (no daemon); exits with the guest's status";

const EXIT_CODES: &str = "\
Exit status (once the VM has started, the guest decides):
  0-255  the byte the guest wrote to the power-off port (0xf4)
  0      the guest reset the machine (i8042 0xfe or KVM reset); the VM is stopped, not rebooted
  1      a vCPU failed (triple fault, KVM internal error, failed entry); the message names it
  130    stopped by SIGINT; 143 stopped by SIGTERM (vCPUs stopped, disks flushed)
Before it starts, vireo's own table applies (one line on stderr says why):
  1      the VM could not be built: a disk in use or damaged, a KVM or host failure
  2      bad input: a wrong option, a missing kernel/disk/socket path, an unsupported disk
         format, more vCPUs or memory than this host allows; nothing was changed

Devices appear on the guest kernel command line as virtio_mmio.device=4K@<base>:<irq> entries,
all --disk options first (in order), then all --net options.

With a PVH kernel (an ELF with a PVH note, like the probe) every vCPU starts at the PVH entry,
application processors with EDI=0x56495245 (VIRE) and ESI=vCPU index (docs/probe-protocol.md).
bzImage and plain vmlinux kernels start their application processors themselves (INIT/SIPI).
Guest RAM is on 2 MiB host pages: from the host's hugetlb pool (/proc/sys/vm/nr_hugepages) when
it has a free page for every 2 MiB of the guest, else a private huge-page tmpfs (needs root),
else a memfd of 4 KiB pages. KVM then maps the guest 2 MiB at a time, and each 2 MiB region the
guest touches costs 2 MiB. VIREO_GUEST_RAM=auto (the default) chooses so; =hugetlb insists on the
pool (an error if it is short), =huge skips it, =memfd keeps 4 KiB pages.
Disk reads and writes of raw images and of VHDX's allocated blocks are copies through a shared
mapping of the image file (docs/datapath.md, \"Mapped I/O\"); VIREO_BLK_MMAP=0 uses
preadv/pwritev instead.
Set VIREO_LOG=debug for diagnostics on stderr.

{CONTROL}";

#[derive(clap::Args)]
#[command(after_help = after_help())]
pub struct RunArgs {
    /// Kernel image: an ELF with a PVH note (e.g. the probe guest), a 64-bit vmlinux, or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk loaded high in guest memory (bzImage/vmlinux: boot_params; PVH: module 0).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (virtio device entries are appended).
    #[arg(
        long,
        value_name = "STR",
        default_value = "console=ttyS0 reboot=k panic=1"
    )]
    cmdline: String,
    /// Guest RAM: bytes with an optional K, M, G or T suffix (powers of 1024; fractions like
    /// 1.5G work), a whole number of 4 KiB pages.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_memory)]
    memory: u64,
    /// Number of vCPUs: 1 up to KVM's limit on this host (KVM_CAP_MAX_VCPUS); more than the
    /// host has CPUs works, slower, with a warning.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: usize,
    /// A virtio-blk disk: a VHDX or VHD image (fixed, dynamic; differencing read-only) or a raw
    /// image, recognised by its content. Other image formats (qcow2, VMDK, VDI, ...) are
    /// refused: convert them first. A file with no known signature is raw; ",format=raw"
    /// attaches any file as raw, ",format=vhdx|vhd" insists on that format. ",ro" makes the
    /// disk read-only. ",queues=N" gives it N virtio-blk request queues (1-16, default one per
    /// vCPU), each served by its own host thread; a guest without multiqueue support uses the
    /// first. Repeatable.
    #[arg(
        long,
        value_name = "PATH[,ro][,format=raw|vhd|vhdx][,queues=N]",
        value_parser = parse_disk
    )]
    disk: Vec<DiskArg>,
    /// A virtio-net NIC on a host TAP interface (created if missing) or on a vhost-user-net
    /// backend listening on a Unix socket (e.g. a Vireo switch port), with an optional
    /// unicast MAC address (default: a locally administered one). A TAP NIC offers the guest
    /// checksum and TCP segmentation offloads (the TAP is opened with vnet headers); a guest
    /// that declines them gets finished, MTU-sized frames. ",queues=N" (vhost-user, 1-4,
    /// default 1) offers the guest N receive/transmit queue pairs (multiqueue, if the backend
    /// has them; a Vireo switch port has 4); the guest turns on as many as it wants. A VM
    /// saved with one queue count must be restored with the same. Repeatable.
    #[arg(long, value_name = "tap=NAME|vhost-user=SOCKET[,queues=N][,mac=MAC]", value_parser = parse_net)]
    net: Vec<NetArg>,
    /// Where COM1 goes: "stdio" (output to stdout, input from stdin), "file=PATH" (output
    /// appended), "socket=PATH" or "none". With "socket=PATH" vireo listens on a Unix socket at
    /// PATH (both directions, one client at a time; a stale socket there is replaced, any other
    /// file is refused and left alone; the socket is removed at exit) and holds the guest until
    /// the first client connects, so no output is lost; "socket=PATH,nowait" starts the guest
    /// at once and drops its output until a client connects.
    #[arg(long, value_name = "stdio|file=PATH|socket=PATH[,nowait]|none", default_value = "stdio", value_parser = parse_console)]
    console: ConsoleArg,
    /// A Unix socket to control the running VM through (list disks, merge a differencing
    /// VHDX disk into its parent, resize a disk, while the guest runs); protocol below. Removed
    /// at exit.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Continue a VM saved with `vireo control SOCKET save DIR` instead of booting: its memory
    /// and device state are loaded from DIR. Give the options the saved VM ran with (kernel,
    /// --memory, --vcpus, the same --disk and --net in the same order, the same MACs); a
    /// mismatch is refused before anything runs. The whole memory file is read before the
    /// guest continues (not yet lazily).
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
}

fn after_help() -> String {
    EXIT_CODES.replace("{CONTROL}", vireo_worker::control::PROTOCOL)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct NetArg {
    backend: NetBackendArg,
    mac: Option<[u8; 6]>,
    /// Queue pairs asked for (vhost-user only).
    queues: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum NetBackendArg {
    Tap(String),
    VhostUser(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ConsoleArg {
    Stdio,
    File(PathBuf),
    Socket { path: PathBuf, wait: bool },
    None,
}

/// Guest RAM as every size option reads it ("256M", "1.5G"; `vireo_worker::size`), in whole
/// 4 KiB pages: KVM maps guest memory by the page, so anything else is refused with the sizes
/// around it.
fn parse_memory(s: &str) -> Result<u64, String> {
    let size = vireo_worker::size::parse_size(s)?;
    const PAGE: u64 = 4096;
    if !size.is_multiple_of(PAGE) {
        let down = size / PAGE * PAGE;
        return Err(format!(
            "--memory {s} is {size} bytes, not a whole number of 4 KiB pages; use {}K or {}K",
            down >> 10,
            (down + PAGE) >> 10
        ));
    }
    Ok(size)
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad =
        || format!("'{s}' is not a MAC address (expected six hex bytes like 52:54:00:12:34:56)");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "MAC {s} is a multicast address; a NIC needs a unicast one (first byte even)"
        ));
    }
    if mac == [0; 6] {
        return Err("MAC 00:00:00:00:00:00 is not a valid NIC address".into());
    }
    Ok(mac)
}

fn parse_net(s: &str) -> Result<NetArg, String> {
    let mut backend = None;
    let mut mac = None;
    let mut queues = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => {
                if name.len() > 15 {
                    return Err(format!("TAP name '{name}' is longer than 15 characters"));
                }
                backend = Some(NetBackendArg::Tap(name.to_string()));
            }
            Some(("vhost-user", path)) if !path.is_empty() => {
                backend = Some(NetBackendArg::VhostUser(PathBuf::from(path)));
            }
            Some(("mac", m)) => mac = Some(parse_mac(m)?),
            Some(("queues", n)) => {
                let max = vireo_vmm::vhost_user_net::MAX_QUEUE_PAIRS;
                queues = match n.parse::<u16>() {
                    Ok(n) if (1..=max).contains(&n) => Some(n),
                    _ => return Err(format!("queues={n}: give a number of queue pairs from 1 to {max}")),
                };
            }
            _ => {
                return Err(format!(
                    "'{part}' is not understood; use tap=NAME or vhost-user=SOCKET[,queues=N], and ,mac=MAC"
                ))
            }
        }
    }
    let backend = backend.ok_or("missing tap=NAME or vhost-user=SOCKET (e.g. --net tap=vireo0)")?;
    if queues.is_some() && matches!(backend, NetBackendArg::Tap(_)) {
        return Err("queues=N is for vhost-user NICs; a TAP NIC has one queue pair".into());
    }
    Ok(NetArg {
        backend,
        mac,
        queues,
    })
}

fn parse_console(s: &str) -> Result<ConsoleArg, String> {
    let (socket, wait) = match s.strip_suffix(",nowait") {
        Some(rest) => (rest, false),
        None => (s, true),
    };
    match socket.split_once('=') {
        Some(("socket", p)) if !p.is_empty() => {
            return Ok(ConsoleArg::Socket {
                path: p.into(),
                wait,
            })
        }
        _ if !wait => return Err(format!("'{s}': only socket=PATH takes ,nowait")),
        _ => {}
    }
    match s.split_once('=') {
        None if s == "stdio" => Ok(ConsoleArg::Stdio),
        None if s == "none" => Ok(ConsoleArg::None),
        Some(("file", p)) if !p.is_empty() => Ok(ConsoleArg::File(p.into())),
        _ => Err(format!(
            "'{s}' is not a console; use stdio, file=PATH, socket=PATH[,nowait] or none"
        )),
    }
}

/// A locally administered unicast MAC, distinct per process and NIC index.
fn default_mac(index: usize) -> [u8; 6] {
    let pid = std::process::id();
    [
        0x52,
        0x54,
        (pid >> 16) as u8,
        (pid >> 8) as u8,
        pid as u8,
        index as u8,
    ]
}

/// More vCPUs than host CPUs works (KVM allows up to its KVM_CAP_MAX_VCPUS, which `Vm::new`
/// enforces) but the vCPUs then take turns, and spinning guests thrash the host: say so once.
fn warn_if_overcommitted(vcpus: usize) {
    let Ok(host) = std::thread::available_parallelism() else {
        return;
    };
    if vcpus > host.get() {
        eprintln!(
            "vireo: warning: --vcpus {vcpus} is more than this host's {host} CPU(s); the vCPUs \
             will share them and run slower"
        );
    }
}

pub fn execute(args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut devices = Vec::new();
    let mut control_disks = Vec::new();
    for d in &args.disk {
        let image::OpenedDisk { backend, image } = image::open(d).map_err(worker_error)?;
        // The control socket resizes through the device's resizer: the transport owns the
        // device once the VM starts, and the resizer is how a size change reaches the driver.
        let queues = d
            .queues
            .unwrap_or_else(|| u16::try_from(args.vcpus).unwrap_or(u16::MAX));
        let block = vireo_virtio::Block::new(backend.clone()).with_queues(queues);
        control_disks.push(ControlDisk {
            path: d.path.clone(),
            read_only: d.read_only,
            size: backend.size(),
            image,
            resizer: Some(block.resizer()),
        });
        devices.push(VirtioSlot {
            device: Box::new(block),
            flush_on_exit: Some(backend),
        });
    }
    for (i, n) in args.net.iter().enumerate() {
        let mac = n.mac.unwrap_or_else(|| default_mac(i));
        let slot = match &n.backend {
            NetBackendArg::Tap(tap) => VirtioSlot::tap(tap, mac).map_err(|e| {
                CliError::failed(format!(
                    "TAP {tap}: {e} (creating TAP interfaces needs CAP_NET_ADMIN)"
                ))
            })?,
            NetBackendArg::VhostUser(socket) => VirtioSlot {
                device: Box::new(
                    VhostUserNet::connect_with_pairs(socket, mac, n.queues.unwrap_or(1))
                        .map_err(vhost_user_error)?,
                ),
                flush_on_exit: None,
            },
        };
        devices.push(slot);
    }
    let waits_for = match &args.console {
        ConsoleArg::Socket { path, wait: true } => Some(path.clone()),
        _ => None,
    };
    let console = match args.console {
        ConsoleArg::Stdio => ConsoleConfig::Stdio,
        ConsoleArg::File(p) => ConsoleConfig::File(p),
        ConsoleArg::Socket { path, wait } => ConsoleConfig::Socket { path, wait },
        ConsoleArg::None => ConsoleConfig::Null,
    };
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory: args.memory,
        vcpus: args.vcpus,
        devices,
        disk_slots: 0,
        console,
        ram_backing: RamBacking::from_env().map_err(CliError::bad_input)?,
    };
    vireo_vmm::install_termination_handlers().map_err(vm_error)?;
    let vm = match &args.restore {
        None => Vm::new(config).map_err(vm_error)?,
        Some(dir) => {
            let from = RestoreFrom::dir(dir).map_err(|e| restore_error(e, dir))?;
            let vm = Vm::restore(config, &from).map_err(|e| restore_error(e, dir))?;
            // Restored paused; letting it go before `run` starts its vCPUs running.
            vm.handle()
                .resume()
                .map_err(|e| CliError::failed(format!("resuming the restored VM: {e}")))?;
            vm
        }
    };
    warn_if_overcommitted(args.vcpus);
    let control = match &args.control {
        Some(path) => {
            let c = ControlServer::start(path, control_disks).map_err(worker_error)?;
            c.attach_vm(vm.handle());
            Some(c)
        }
        None => {
            drop(control_disks);
            None
        }
    };
    if let Some(path) = waits_for {
        eprintln!(
            "vireo: waiting for a client on console socket {} (the guest starts when one \
             connects; socket=PATH,nowait starts it at once)",
            path.display()
        );
    }
    let exit = vm.run();
    let saved_to = control.as_ref().and_then(|c| c.saved_to());
    if let Some(c) = control {
        c.shutdown();
    }
    let exit = exit.map_err(vm_error)?;
    if let (Some(dir), VmExit::Stopped) = (&saved_to, &exit) {
        eprintln!(
            "vireo: VM saved to {} and stopped; continue it with `vireo run --restore {}` and \
             the same options",
            dir.display(),
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    Ok(match exit {
        VmExit::PowerOff(status) => ExitCode::from(status),
        VmExit::Reset => {
            eprintln!("vireo: the guest reset the machine; VM stopped");
            ExitCode::SUCCESS
        }
        // SIGINT is 2 and SIGTERM 15 on Linux; the statuses are the shell's 128 + signal.
        VmExit::Stopped => match vireo_vmm::termination_signal() {
            Some(15) => ExitCode::from(crate::exit::TERMINATED),
            Some(_) => ExitCode::from(crate::exit::INTERRUPTED),
            None => ExitCode::SUCCESS,
        },
        VmExit::Error(msg) => {
            eprintln!("vireo: VM failed: {msg}");
            ExitCode::from(1)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("256M"), Ok(256 << 20));
        assert_eq!(parse_memory("1.5G"), Ok(3 << 29));
        assert_eq!(parse_memory("1GiB"), Ok(1 << 30));
        assert_eq!(parse_memory("4096"), Ok(4096));
        let e = parse_memory("1000000").unwrap_err();
        assert!(
            e.contains("not a whole number of 4 KiB pages; use 976K or 980K"),
            "{e}"
        );
        assert!(parse_memory("").is_err());
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("-1M").is_err());
        assert!(parse_memory("99999999999T").is_err());
    }

    #[test]
    fn nets_and_macs() {
        let n = parse_net("tap=vt0,mac=52:54:00:aa:bb:0c").unwrap();
        assert_eq!(n.backend, NetBackendArg::Tap("vt0".into()));
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]));
        assert_eq!(parse_net("tap=vt1").unwrap().mac, None);
        assert!(parse_net("mac=52:54:00:aa:bb:0c").is_err());
        assert!(parse_net("tap=vt0,mac=01:00:5e:00:00:01").is_err());
        assert!(parse_net("tap=vt0,mac=52:54:00:aa:bb").is_err());
        assert!(parse_net("tap=vt0,mac=zz:54:00:aa:bb:cc").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        let v = parse_net("vhost-user=/run/sw/p1.sock,mac=52:54:00:aa:bb:0d").unwrap();
        assert_eq!(
            v.backend,
            NetBackendArg::VhostUser("/run/sw/p1.sock".into())
        );
        assert!(parse_net("vhost-user=").is_err());
        assert_eq!(parse_net("vhost-user=/s,queues=2").unwrap().queues, Some(2));
        for bad in [
            "vhost-user=/s,queues=0",
            "vhost-user=/s,queues=5",
            "vhost-user=/s,queues=x",
        ] {
            assert!(parse_net(bad).unwrap_err().contains("from 1 to 4"), "{bad}");
        }
        assert!(parse_net("tap=vt0,queues=2").is_err());
        assert_eq!(default_mac(1)[0] & 1, 0);
    }

    #[test]
    fn consoles() {
        assert_eq!(parse_console("stdio"), Ok(ConsoleArg::Stdio));
        assert_eq!(
            parse_console("file=/tmp/x"),
            Ok(ConsoleArg::File("/tmp/x".into()))
        );
        assert_eq!(
            parse_console("socket=/tmp/s"),
            Ok(ConsoleArg::Socket {
                path: "/tmp/s".into(),
                wait: true
            })
        );
        assert_eq!(
            parse_console("socket=/tmp/s,nowait"),
            Ok(ConsoleArg::Socket {
                path: "/tmp/s".into(),
                wait: false
            })
        );
        assert!(parse_console("stdio,nowait").is_err());
        assert!(parse_console("socket=,nowait").is_err());
        assert!(parse_console("file=").is_err());
        assert!(parse_console("tcp=1").is_err());
    }
}
