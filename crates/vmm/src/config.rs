//! What one VM is made of, as the CLI (or later the daemon) fills it in.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use crate::memory::RamBacking;
use vireo_block::BlockBackend;
use vireo_virtio::VirtioDevice;

/// Where COM1 goes.
#[derive(Debug)]
pub enum ConsoleConfig {
    /// Output to stdout, input from stdin.
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// A Unix socket the VMM listens on; one client at a time gets output and sends input.
    /// With `wait` the vCPUs start only once the first client has connected.
    Socket { path: PathBuf, wait: bool },
    /// Both directions over an already-connected stream (in-process users and tests).
    Stream(UnixStream),
    /// Discarded.
    Null,
}

/// A virtio device plus, for disks, the backend to flush when the VM stops.
pub struct VirtioSlot {
    pub device: Box<dyn VirtioDevice>,
    pub flush_on_exit: Option<Arc<dyn BlockBackend>>,
}

/// A complete VM description.
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Command line as given; virtio-mmio device entries are appended.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub vcpus: usize,
    /// Virtio devices in command-line order: all disks first, then all NICs.
    pub devices: Vec<VirtioSlot>,
    /// Disk slots in all: those the boot disks do not fill are reserved empty for hot add
    /// (`VmHandle::attach_disk`), listed right after the boot disks. 0: none reserved.
    pub disk_slots: usize,
    pub console: ConsoleConfig,
    /// What backs guest RAM (2 MiB pages by default; `RamBacking::from_env` reads the
    /// operator's override).
    pub ram_backing: RamBacking,
}

impl VmConfig {
    /// A VM with no devices and the console discarded.
    pub fn new(kernel: impl Into<PathBuf>, memory: u64, vcpus: usize) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            memory,
            vcpus,
            devices: Vec::new(),
            disk_slots: 0,
            console: ConsoleConfig::Null,
            ram_backing: RamBacking::default(),
        }
    }
}

impl VirtioSlot {
    /// A virtio-blk disk over `backend` (flushed when the VM stops).
    pub fn block(backend: Arc<dyn BlockBackend>) -> Self {
        VirtioSlot {
            device: Box::new(vireo_virtio::Block::new(backend.clone())),
            flush_on_exit: Some(backend),
        }
    }

    /// A virtio-net NIC with address `mac` on `port`.
    pub fn net(port: Arc<dyn vireo_netport::FramePort>, mac: [u8; 6]) -> Self {
        VirtioSlot {
            device: Box::new(vireo_virtio::Net::new(port, mac)),
            flush_on_exit: None,
        }
    }

    /// A virtio-net NIC on the host TAP interface `name` (created if missing, set up), with
    /// virtio-net headers so the guest may use checksum and TSO offloads; the device tells
    /// the TAP what the guest takes when the driver starts it.
    pub fn tap(name: &str, mac: [u8; 6]) -> Result<Self, vireo_netport::PortError> {
        let tap = vireo_netport::TapPort::open_offload(name)?;
        tap.set_up()?;
        Ok(Self::net(Arc::new(tap), mac))
    }
}
