//! Which of `vireo run`'s own errors are bad input (2: the user can fix the command line or a
//! file it names) and which are failures (1: the host or an image let us down). The guest's
//! own status is separate: see `EXIT_CODES` in `run.rs`.

use vireo_vmm::vhost_user_net::VhostUserNetError;
use vireo_vmm::{StateError, VmmError};
use vireo_worker::WorkerError;

use crate::exit::CliError;

/// Classifies an error opening a disk or the control socket (vireo-worker says which are the
/// user's to fix); the message is the error's own line.
pub fn worker_error(e: WorkerError) -> CliError {
    if e.is_bad_input() {
        CliError::bad_input(e.to_string())
    } else {
        CliError::failed(e.to_string())
    }
}

/// Classifies an error from building or running the VM.
pub fn vm_error(e: VmmError) -> CliError {
    let message = e.to_string();
    match e {
        VmmError::MemoryTooSmall { .. }
        | VmmError::MemoryTooLarge { .. }
        | VmmError::KvmOpen(_)
        | VmmError::NoVcpus
        | VmmError::VcpuCount { .. }
        | VmmError::KernelOpen { .. }
        | VmmError::KernelFormat { .. }
        | VmmError::InitrdOpen { .. }
        | VmmError::InitrdTooLarge { .. }
        | VmmError::Cmdline(_)
        | VmmError::TooManyDevices(..)
        | VmmError::ConsoleFile { .. }
        | VmmError::ConsoleSocket { .. } => CliError::bad_input(message),
        VmmError::MemoryAlloc(_)
        | VmmError::KvmApiVersion(_)
        | VmmError::KvmCap(_)
        | VmmError::Kvm { .. }
        | VmmError::BootSetup(_)
        | VmmError::DirtyLog(_)
        | VmmError::Console(_)
        | VmmError::ConsoleSocketInUse(_)
        | VmmError::Thread(_)
        | VmmError::Io(_) => CliError::failed(message),
    }
}

/// Classifies an error restoring a saved VM (`--restore DIR`): a missing, foreign, damaged or
/// mismatching save is the user's to fix (2: give the right directory or the same options as
/// the saved VM); KVM or I/O failing underneath is a failure (1).
pub fn restore_error(e: StateError, dir: &std::path::Path) -> CliError {
    let message = format!("--restore {}: {e}", dir.display());
    match e {
        StateError::Vm(e) => {
            let mut c = vm_error(e);
            c.message = format!("--restore {}: {}", dir.display(), c.message);
            c
        }
        StateError::BadMagic { .. }
        | StateError::UnsupportedVersion { .. }
        | StateError::Truncated { .. }
        | StateError::Checksum { .. }
        | StateError::Corrupt { .. }
        | StateError::Decode { .. } => CliError::bad_input(message),
        StateError::Mismatch(_) | StateError::Device { .. } => CliError::bad_input(format!(
            "{message} (give the options the saved VM ran with: --memory, --vcpus, the same \
             --disk and --net in the same order, the same MACs)"
        )),
        StateError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            CliError::bad_input(format!(
                "{message} (is DIR a directory written by `vireo control SOCKET save DIR`?)"
            ))
        }
        StateError::NotPaused
        | StateError::NotRunning
        | StateError::Kvm(_)
        | StateError::Vcpus(_)
        | StateError::Checkpoint(_)
        | StateError::Io { .. } => CliError::failed(message),
    }
}

/// A vhost-user socket nobody listens on is a wrong path; a backend that misbehaves is a failure.
pub fn vhost_user_error(e: VhostUserNetError) -> CliError {
    match e {
        VhostUserNetError::Connect { .. } => CliError::bad_input(format!(
            "{e} (is the switch port's backend running at that path?)"
        )),
        e => CliError::failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{BAD_INPUT, FAILED};

    #[test]
    fn input_errors_are_2_and_host_failures_1() {
        assert_eq!(vm_error(VmmError::NoVcpus).status, BAD_INPUT);
        let e = VmmError::KernelFormat {
            path: "k".into(),
            reason: "x".into(),
        };
        assert_eq!(vm_error(e).status, BAD_INPUT);
        assert_eq!(vm_error(VmmError::KvmCap("irqfd")).status, FAILED);
        assert_eq!(
            vm_error(VmmError::MemoryAlloc("mmap".into())).status,
            FAILED
        );
    }
}
