//! Pause, resume and reset of a running VM, on its [`VmHandle`] (docs/vmm.md, "Pause, resume
//! and reset"). The vCPU side is `lifecycle.rs`, what a reset puts back is `reset.rs`.

use std::time::Duration;

use super::{lock, VmHandle};
use crate::boot::{self, BootSpec};
use crate::error::{LifecycleError, VmmError};
use crate::exit::VmExit;
use crate::lifecycle::ParkError;
use crate::reset::{self, VmBootState};
use crate::vcpu;

/// How long a pause waits for every vCPU to leave KVM_RUN and park (normally microseconds).
const VCPU_PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a pause waits for each device to finish the request it is executing.
const DEVICE_PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

type Result = std::result::Result<(), LifecycleError>;

impl VmHandle {
    /// Paused by [`VmHandle::pause`] and not resumed since.
    pub fn is_paused(&self) -> bool {
        self.0.control.paused()
    }

    /// Pauses the VM: every vCPU is kicked out of KVM_RUN and parked, then every virtio device
    /// finishes the request it is executing, publishes its used-ring entries and parks.
    /// Returns once all of that has happened. Pausing a paused VM does nothing. A VM whose
    /// vCPUs have not started yet is paused from the start (they park before their first
    /// KVM_RUN). On an error the VM runs on as before.
    pub fn pause(&self) -> Result {
        let _op = lock(&self.0.lifecycle);
        self.pause_locked()
    }

    pub(super) fn pause_locked(&self) -> Result {
        self.pause_vcpus_locked()?;
        self.pause_devices_locked()?;
        tracing::info!("VM paused");
        Ok(())
    }

    /// The first half of a pause: every vCPU out of KVM_RUN and parked (the guest stops
    /// here). Split from the devices' half so a switch-over can time each.
    pub(super) fn pause_vcpus_locked(&self) -> Result {
        if self.0.exit.is_set() {
            return Err(LifecycleError::NotRunning);
        }
        let kick = || {
            for &t in lock(&self.0.vcpu_threads).iter() {
                // SAFETY: the list holds only threads not yet joined (it is emptied, under
                // this lock, before they are), so each pthread_t is valid.
                unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
            }
        };
        match self.0.control.pause_vcpus(VCPU_PAUSE_TIMEOUT, kick) {
            Ok(()) => {}
            Err(ParkError::Released) => return Err(LifecycleError::NotRunning),
            Err(ParkError::Timeout { parked, alive }) => {
                self.0.control.resume_vcpus();
                return Err(LifecycleError::PauseTimeout {
                    parked,
                    vcpus: alive,
                });
            }
        }
        Ok(())
    }

    /// The second half of a pause, with the vCPUs parked: each device finishes the request
    /// it is executing and parks. On an error the VM (devices and vCPUs) runs on.
    pub(super) fn pause_devices_locked(&self) -> Result {
        for (i, t) in self.0.transports.iter().enumerate() {
            if let Err(source) = lock(t).pause(DEVICE_PAUSE_TIMEOUT) {
                for t in &self.0.transports[..=i] {
                    lock(t).resume();
                }
                self.0.control.resume_vcpus();
                return Err(LifecycleError::DevicePause { device: i, source });
            }
        }
        Ok(())
    }

    /// Lets a paused VM run again: devices first (they serve what the guest queued before the
    /// pause and did not get to), then the vCPUs. Resuming a running VM does nothing.
    pub fn resume(&self) -> Result {
        let _op = lock(&self.0.lifecycle);
        self.resume_locked()
    }

    pub(super) fn resume_locked(&self) -> Result {
        if self.0.exit.is_set() {
            return Err(LifecycleError::NotRunning);
        }
        if !self.0.control.paused() {
            return Ok(());
        }
        if self
            .0
            .log_left_on
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            // A migration that did not complete: the guest runs on here, at full speed.
            if let Err(e) = self.0.dirty.stop(&self.0.vm_fd) {
                tracing::warn!("stopping the dirty log a migration left on: {e}");
            }
        }
        for t in &self.0.transports {
            lock(t).resume();
        }
        self.0.control.resume_vcpus();
        tracing::info!("VM resumed");
        Ok(())
    }

    /// A hard reset, like a power cycle without ending the process: the VM is paused, every
    /// device reset, guest RAM wiped and the kernel loaded again from its file, the irqchip,
    /// PIT and every vCPU put back to their boot state; then the VM runs (paused or not
    /// before). Fails without touching the VM when the kernel or initrd cannot be opened or
    /// the VM cannot be paused; a failure after that ends the VM ([`VmExit::Error`]), since
    /// the old guest is gone by then.
    pub fn reset(&self) -> Result {
        let _op = lock(&self.0.lifecycle);
        // A lazy restore still filling RAM would put old pages back after the wipe.
        self.wait_restored();
        if self.0.exit.is_set() {
            return Err(LifecycleError::NotRunning);
        }
        let boot_state = self.0.boot_state.as_ref().map_err(|why| {
            LifecycleError::Reset(format!("the boot state could not be captured: {why}"))
        })?;
        let r = &self.0.reload;
        for (path, what) in [(Some(&r.kernel), "kernel"), (r.initrd.as_ref(), "initrd")] {
            if let Some(path) = path {
                std::fs::File::open(path).map_err(|e| {
                    LifecycleError::Reset(format!("cannot open the {what} {}: {e}", path.display()))
                })?;
            }
        }
        self.pause_locked()?;
        // The wipe below is no guest write: the log would not show what it changed.
        self.stop_tracking();
        match self.reload(boot_state) {
            Ok(()) => {
                self.0.control.resume_vcpus();
                tracing::info!("VM reset: the guest starts again from its boot state");
                Ok(())
            }
            Err(e) => {
                tracing::error!("{e}; the VM stops");
                self.0.exit.set(VmExit::Error(e.to_string()));
                Err(e)
            }
        }
    }

    /// The part of a reset after the pause.
    fn reload(&self, boot_state: &VmBootState) -> Result {
        for t in &self.0.transports {
            lock(t).reset();
        }
        lock(&self.0.serial).reset();
        let failed = |e: VmmError| LifecycleError::Reset(e.to_string());
        reset::wipe_ram(&self.0.ram).map_err(failed)?;
        let r = &self.0.reload;
        boot::load(
            &self.0.ram.memory,
            &BootSpec {
                kernel: &r.kernel,
                initrd: r.initrd.as_deref(),
                cmdline: &r.cmdline,
                ram_size: self.0.ram.size,
            },
        )
        .map_err(failed)?;
        boot::mptable::write(&self.0.ram.memory, r.vcpus).map_err(failed)?;
        boot_state.restore(&self.0.vm_fd).map_err(failed)?;
        match self.0.control.reset_vcpus(VCPU_PAUSE_TIMEOUT) {
            Ok(errors) if errors.is_empty() => Ok(()),
            Ok(errors) => Err(LifecycleError::Reset(errors.join("; "))),
            Err(ParkError::Released) => Err(LifecycleError::NotRunning),
            Err(ParkError::Timeout { parked, alive }) => Err(LifecycleError::Reset(format!(
                "only {parked} of {alive} vCPUs loaded their boot state in time"
            ))),
        }
    }
}
