//! Lets code outside a device (the VMM's control plane) raise a config-change interrupt while
//! the transport owns the device: the device publishes its interrupt here while active.

use std::sync::{Arc, Mutex};

use crate::VirtioInterrupt;

/// Shared slot holding the interrupt of an active device.
#[derive(Clone, Default)]
pub(crate) struct ConfigNotifier {
    slot: Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>,
}

impl ConfigNotifier {
    pub fn set(&self, interrupt: Option<Arc<dyn VirtioInterrupt>>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = interrupt;
    }

    /// Tells the driver the config space changed; nothing to do while the device is inactive
    /// (the driver reads the config afresh when it next initialises the device).
    pub fn notify(&self) -> std::io::Result<()> {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(interrupt) => interrupt.notify_config(),
            None => Ok(()),
        }
    }
}
