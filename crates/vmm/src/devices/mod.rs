//! Devices the vCPU threads reach through port I/O or MMIO exits.

pub mod bus;
pub mod i8042;
pub mod poweroff;
pub mod serial;

pub use bus::{Bus, BusDevice};
