use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::state::{DeviceState, StateError};
use crate::GuestMemory;

/// How a device tells the driver that something happened.
pub trait VirtioInterrupt: Send + Sync {
    /// The used ring of `queue` advanced.
    fn notify_queue(&self, queue: u16) -> std::io::Result<()>;
    /// The device configuration changed (e.g. disk resized, link state).
    fn notify_config(&self) -> std::io::Result<()>;
}

/// One queue the driver set up, plus the eventfd the transport signals when the driver kicks it.
pub struct QueueHandle {
    pub queue: Queue,
    pub kick: EventFd,
}

/// Why a device could not start serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("driver set up {got} queues, device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("could not start device worker: {0}")]
    Worker(#[from] std::io::Error),
    #[error("device is already active")]
    AlreadyActive,
}

/// Why a device could not be quiesced for a VM pause.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the device's worker did not reach a request boundary within {0:?}")]
    Timeout(std::time::Duration),
}

/// The VM's shared dirty log while dirty logging is on (live save, migration): a memfd of
/// `size` bytes holding one bit per 4 KiB guest-physical page from address 0 (bit `i % 8` of
/// byte `i / 8` = page `i`, the vhost-user log format). A device whose guest-RAM writes happen
/// in another process (a vhost-user back end) hands it there; the VMM reads and clears it
/// with its own dirty log.
#[derive(Clone, Copy, Debug)]
pub struct DirtyLog<'a> {
    pub fd: std::os::fd::BorrowedFd<'a>,
    pub size: u64,
}

/// Why a device cannot log the pages it writes: a live save or migration of its VM would
/// miss them, so it must not go ahead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DirtyLogError(pub String);

/// A virtio device model. The transport calls these in the order the virtio spec's device
/// initialisation prescribes: features, config, then `activate` once DRIVER_OK is set, and
/// `reset` when the driver writes 0 to the status register.
pub trait VirtioDevice: Send {
    /// Virtio device type (see [`crate::device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (must include [`crate::VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// The subset of [`VirtioDevice::features`] the driver accepted.
    fn ack_features(&mut self, acked: u64);
    /// Reads device-specific configuration space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space (most devices ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` (one per entry of `queue_max_sizes`, in order).
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueHandle>,
    ) -> Result<(), ActivateError>;
    /// Stops serving queues and returns to the pre-activation state. Returns once workers have
    /// stopped touching guest memory.
    fn reset(&mut self);
    /// VM pause: stop taking requests from the queues at a request boundary and return once
    /// the workers are parked (what they had taken is executed and its used-ring entry
    /// published). The default is for devices without that support: they keep working, and
    /// say so in their documentation.
    fn pause(&mut self, _timeout: std::time::Duration) -> Result<(), PauseError> {
        Ok(())
    }
    /// Undoes [`VirtioDevice::pause`]: the workers serve again, including anything queued
    /// while they were parked. Harmless when not paused.
    fn resume(&mut self) {}
    /// Save: the device's own state (docs/vm-state.md). Called while the VM is paused, so an
    /// active device's workers are parked and have reported their ring positions. The default
    /// is for devices that cannot.
    fn save_state(&self) -> Result<DeviceState, StateError> {
        Err(StateError::Unsupported("no save/restore support"))
    }
    /// Restore into a device that is not active: takes the accepted features (and what else the
    /// device keeps) from `state`; the transport then activates it with queues that carry the
    /// saved ring positions. Nothing is changed on an error.
    fn restore_state(&mut self, _state: &DeviceState) -> Result<(), StateError> {
        Err(StateError::Unsupported("no save/restore support"))
    }
    /// Whether `state` would restore into this device, without changing anything: an in-place
    /// apply asks every device before it pauses the VM, since a refusal after the pause ends
    /// the VM. The default (nothing checked early) leaves the refusal to `restore_state`.
    fn check_restore(&self, _state: &DeviceState) -> Result<(), StateError> {
        Ok(())
    }
    /// Before the transport is built for a restore: a device whose queue count is a setting
    /// (virtio-blk's `num_queues`) takes the count `state` was saved with, since the guest's
    /// driver set up exactly those queues. The default is for fixed shapes: nothing to adopt.
    fn adopt_saved_shape(&mut self, _state: &DeviceState) -> Result<(), StateError> {
        Ok(())
    }
    /// Whether another process maps guest RAM for this device (a vhost-user back end): such
    /// a process does not see the pages a lazy restore has not filled yet, so a VM with one
    /// is restored eagerly (docs/vm-state.md, "Lazy restore").
    fn maps_guest_memory(&self) -> bool {
        false
    }
    /// Dirty logging starts: from now until [`VirtioDevice::stop_dirty_log`], every page the
    /// device writes must be marked in `log` or in the VMM's own bitmap. The default suits
    /// devices that write guest RAM only through this process's `GuestMemory`, whose bitmap
    /// the VMM reads already. An error means the device's writes would go unseen.
    fn start_dirty_log(&mut self, _log: DirtyLog<'_>) -> Result<(), DirtyLogError> {
        Ok(())
    }
    /// Dirty logging ended; the device stops marking `log` (best effort: it is not read again).
    fn stop_dirty_log(&mut self) {}
    /// Whether the process that maps guest RAM for this device (see
    /// [`VirtioDevice::maps_guest_memory`]) can wait for the pages a post-copy destination does
    /// not have yet: a vhost-user back end that offers `VHOST_USER_PROTOCOL_F_PAGEFAULT`.
    fn can_postcopy(&self) -> bool {
        !self.maps_guest_memory()
    }
    /// Post-copy starts on this destination (docs/migration.md, "Post-copy"): a device whose
    /// back end maps guest RAM in another process hands over that process's userfaultfd on
    /// its mapping, so the back end's first touch of a page still on the source waits for it
    /// like a vCPU's does. `None` for devices that touch RAM only through this process.
    fn postcopy_listen(&mut self) -> Result<Option<ForeignFaults>, StateError> {
        Ok(None)
    }
    /// Post-copy ended with every page here: the back end stops catching faults.
    fn postcopy_end(&mut self) {}
}

/// Another process's userfaultfd on its own mapping of guest RAM (a vhost-user back end's,
/// handed over by `VHOST_USER_POSTCOPY_ADVISE`): its faults come in that process's addresses.
pub struct ForeignFaults {
    pub uffd: std::fs::File,
    pub maps: ForeignMaps,
}

/// (guest-physical start, length, the other process's address of that start) per region; the
/// device updates it when it sends the back end a new memory table.
pub type ForeignMaps = Arc<std::sync::Mutex<Vec<(u64, u64, u64)>>>;
