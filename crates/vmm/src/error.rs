//! Every way building or running a VM can fail, as one typed error.

use std::io;

/// Errors from creating, loading or running a virtual machine.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("guest memory size must be at least {min_mib} MiB (asked for {asked} bytes)")]
    MemoryTooSmall { asked: u64, min_mib: u64 },
    #[error(
        "guest memory of {asked_mib} MiB is more than this host can back ({limit_mib} MiB of RAM + swap); use a smaller --memory"
    )]
    MemoryTooLarge { asked_mib: u64, limit_mib: u64 },
    #[error("could not allocate guest memory: {0}")]
    MemoryAlloc(String),
    #[error(
        "cannot open /dev/kvm: {0} (is the kvm module loaded, and may this user open /dev/kvm?)"
    )]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    KvmCap(&'static str),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus must be between 1 and {max} (got {asked})")]
    VcpuCount { asked: usize, max: usize },
    #[error("cannot read kernel {path}: {source}")]
    KernelOpen {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("kernel {path} is not a bootable image: {reason}")]
    KernelFormat { path: String, reason: String },
    #[error("cannot read initrd {path}: {source}")]
    InitrdOpen {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}; give the guest more memory")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("boot setup failed: {0}")]
    BootSetup(String),
    /// Dirty logging could not start or be read; the message names what and why.
    #[error("{0}")]
    DirtyLog(String),
    #[error("too many virtio devices ({0}); at most {1} are supported")]
    TooManyDevices(usize, usize),
    #[error("console: {0}")]
    Console(#[source] io::Error),
    #[error("console file {path}: {source}")]
    ConsoleFile {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("console socket {path}: {why}")]
    ConsoleSocket {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("console socket {0} is in use (another process listens on it); choose another path")]
    ConsoleSocketInUse(std::path::PathBuf),
    #[error("cannot start vCPU thread: {0}")]
    Thread(#[source] io::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl VmmError {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { what, source }
    }
}

pub type Result<T> = std::result::Result<T, VmmError>;

/// Why a pause, resume or reset of a running VM ([`crate::VmHandle`]) did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("the VM is not running (it has stopped or is stopping)")]
    NotRunning,
    #[error("only {parked} of {vcpus} vCPUs paused in time; the VM keeps running")]
    PauseTimeout { parked: usize, vcpus: usize },
    #[error("virtio device {device} could not be paused: {source}; the VM keeps running")]
    DevicePause {
        device: usize,
        #[source]
        source: vireo_virtio::PauseError,
    },
    #[error("reset failed: {0}")]
    Reset(String),
}
