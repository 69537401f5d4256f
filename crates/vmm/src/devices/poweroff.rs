//! The power-off port (0xf4, as QEMU's isa-debug-exit): the byte written is the guest's exit
//! status.

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitState, VmExit};

pub const POWEROFF_PORT: u64 = 0xf4;
pub const POWEROFF_LEN: u64 = 4;

pub struct PowerOff {
    exit: Arc<ExitState>,
}

impl PowerOff {
    pub fn new(exit: Arc<ExitState>) -> Self {
        PowerOff { exit }
    }
}

impl BusDevice for PowerOff {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&status) = data.first() {
            self.exit.set(VmExit::PowerOff(status));
        }
    }
}
