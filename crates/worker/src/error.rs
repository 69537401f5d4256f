//! What can go wrong while building a VM's disks and control socket, typed. Every message is
//! one line naming the offending path and, where there is one, what to do. [`WorkerError::
//! is_bad_input`] says whether the user can fix it (a wrong path or option: `vireo run` exits
//! 2) or the host or an image let us down (1).

use std::path::{Path, PathBuf};

use vireo_block::BlockError;
use vireo_vhdx::convert::Format;
use vireo_vhdx::vhd::VhdError;
use vireo_vhdx::VhdxError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// `VIREO_GUEST_RAM` names no backing (`RamBacking::from_env` says which are).
    #[error("{0}")]
    GuestRam(String),
    #[error("disk {}: {source} (give the path of an existing image)", .path.display())]
    DiskMissing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {} is a directory, not a disk image", .path.display())]
    DiskIsDirectory { path: PathBuf },
    #[error("disk {}: cannot read it: {source}", .path.display())]
    DiskUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {}: reading it: {source}", .path.display())]
    DiskRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "disk {shown} is a {name} image, which vireo cannot attach; convert it \
         (qemu-img convert -O vhdx {shown} {stem}.vhdx) or, if it is a raw disk whose \
         data starts like one, add ,format=raw",
        shown = .path.display(),
        stem = .path.with_extension("").display()
    )]
    ForeignFormat { path: PathBuf, name: &'static str },
    #[error(
        "disk {} was given as format={} but it is a {found_name} image; drop format= or \
         give format={}",
        .path.display(),
        .asked.name(),
        .found.name()
    )]
    FormatMismatch {
        path: PathBuf,
        asked: Format,
        found: Format,
        found_name: &'static str,
    },
    #[error("{}", image_message(.path, &.source.to_string(), matches!(.source, BlockError::Locked { .. })))]
    Raw { path: PathBuf, source: BlockError },
    #[error(
        "{}",
        match .source {
            VhdError::DifferencingWrite => format!(
                "disk {shown} is a differencing VHD, which vireo can attach only read-only; add \
                 ,ro or convert it to VHDX (vireo disk convert {shown} {stem}.vhdx)",
                shown = .path.display(),
                stem = .path.with_extension("").display()
            ),
            e => image_message(.path, &e.to_string(), matches!(e, VhdError::Locked { .. })),
        }
    )]
    Vhd { path: PathBuf, source: VhdError },
    #[error("{}", image_message(.path, &.source.to_string(), matches!(.source, VhdxError::Locked { .. })))]
    Vhdx { path: PathBuf, source: VhdxError },
    #[error("control socket {}: {source}", .path.display())]
    ControlSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {}: a file that is not a socket is in the way", .path.display())]
    ControlSocketNotSocket { path: PathBuf },
    #[error("control socket {} is in use by another running VM", .path.display())]
    ControlSocketInUse { path: PathBuf },
    #[error("control socket: {0}")]
    ControlThread(std::io::Error),
    #[error("reading the launch spec {}: {source}", .path.display())]
    SpecRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the launch spec {} is not a valid WorkerLaunch: {source}", .path.display())]
    SpecJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "the launch spec has VM spec version {found}; this worker reads version {want}",
        want = vireo_api::SPEC_VERSION
    )]
    SpecVersion { found: u32 },
    #[error(
        "the launch spec has {nics} NICs but {sockets} NIC sockets; vireod writes one socket per NIC"
    )]
    NicSockets { nics: usize, sockets: usize },
    #[error("NIC {name} (port socket {}): {source}", .socket.display())]
    Nic {
        name: String,
        socket: PathBuf,
        source: vireo_vmm::vhost_user_net::VhostUserNetError,
    },
    #[error(
        "NIC {name} (port socket {}): the switch port gives {got} of the {asked} queue pairs \
         the spec asks for; set the NIC's queues to {got} or fewer (vireo vm nic set --queues)",
        .socket.display()
    )]
    NicPairs {
        name: String,
        socket: PathBuf,
        asked: u16,
        got: u16,
    },
    #[error("socket {}: {source}", .path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {}: a file that is not a socket is in the way", .path.display())]
    SocketInTheWay { path: PathBuf },
    #[error("socket {} is in use: is another worker running for this VM?", .path.display())]
    SocketInUse { path: PathBuf },
    #[error("{0}")]
    Vmm(#[from] vireo_vmm::VmmError),
    #[error("starting the worker's threads: {0}")]
    Thread(std::io::Error),
    #[error("restoring the saved VM from {}: {source}", .dir.display())]
    Restore {
        dir: PathBuf,
        source: vireo_vmm::StateError,
    },
    #[error("incoming migration: {0}")]
    Incoming(String),
    /// A disk's inherited locked file (`WorkerLaunch::inherited_disks`) cannot be used.
    #[error("{0}")]
    Inherited(#[from] vireo_block::handover::HandoverError),
    #[error("the launch spec hands over {0}")]
    InheritedSpec(String),
}

/// A lock error already names the disk and what to do; anything else gets the disk's path.
fn image_message(path: &Path, error: &str, locked: bool) -> String {
    if locked {
        error.to_string()
    } else {
        format!("disk {}: {error}", path.display())
    }
}

impl WorkerError {
    /// True when the input was wrong (nothing changed) rather than the host or an image
    /// failing.
    pub fn is_bad_input(&self) -> bool {
        match self {
            WorkerError::DiskMissing { .. }
            | WorkerError::DiskIsDirectory { .. }
            | WorkerError::DiskUnreadable { .. }
            | WorkerError::ForeignFormat { .. }
            | WorkerError::FormatMismatch { .. }
            | WorkerError::ControlSocket { .. }
            | WorkerError::ControlSocketNotSocket { .. }
            | WorkerError::SpecRead { .. }
            | WorkerError::SpecJson { .. }
            | WorkerError::SpecVersion { .. }
            | WorkerError::NicSockets { .. }
            | WorkerError::NicPairs { .. }
            | WorkerError::Socket { .. }
            | WorkerError::SocketInTheWay { .. }
            | WorkerError::GuestRam(_) => true,
            WorkerError::Vhd { source, .. } => matches!(source, VhdError::DifferencingWrite),
            WorkerError::DiskRead { .. }
            | WorkerError::Raw { .. }
            | WorkerError::Vhdx { .. }
            | WorkerError::ControlSocketInUse { .. }
            | WorkerError::ControlThread(_)
            | WorkerError::SocketInUse { .. }
            | WorkerError::Vmm(_)
            | WorkerError::Nic { .. }
            | WorkerError::Restore { .. }
            | WorkerError::Incoming(_)
            | WorkerError::Inherited(_)
            | WorkerError::InheritedSpec(_)
            | WorkerError::Thread(_) => false,
        }
    }
}
