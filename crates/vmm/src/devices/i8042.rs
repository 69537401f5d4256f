//! The i8042 keyboard controller, only so that the classic reset (0xfe to port 0x64) stops the VM.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::exit::{ExitState, VmExit};

/// Ports 0x60..=0x64 (data at 0x60, command/status at 0x64).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// Turns the controller's reset request into a VM exit.
pub struct ResetTrigger(Arc<ExitState>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(VmExit::Reset);
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(exit: Arc<ExitState>) -> Self {
        I8042(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Offsets 0 (data) and 4 (status) are the controller's registers; 1..3 are unused.
        let v = if offset == 0 || offset == 4 {
            self.0.read(offset as u8)
        } else {
            0xff
        };
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), 0 | 4) = (data.first(), offset) {
            let _ = self.0.write(offset as u8, v);
        }
    }
}
