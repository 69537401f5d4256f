//! The virtio-mmio (version 2, "modern") register interface.

use crate::arch::{mmio_read32, mmio_read8, mmio_write32};

pub const MAGIC_VALUE: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const MAGIC: u32 = 0x7472_6976; // "virt"
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;
const STATUS_NEEDS_RESET: u32 = 64;

pub const F_VERSION_1: u64 = 1 << 32;

pub const DEVICE_NET: u32 = 1;
pub const DEVICE_BLK: u32 = 2;

#[derive(Clone, Copy)]
pub struct Transport {
    pub base: u64,
}

/// What a slot holds: nothing, a modern device of some type, or a device this probe cannot use.
pub enum Probe {
    Empty,
    Device(u32),
    Legacy(u32),
}

impl Transport {
    pub fn probe(base: u64) -> Probe {
        if mmio_read32(base + MAGIC_VALUE) != MAGIC {
            return Probe::Empty;
        }
        let id = mmio_read32(base + DEVICE_ID);
        if id == 0 {
            return Probe::Empty;
        }
        if mmio_read32(base + VERSION) != 2 {
            return Probe::Legacy(id);
        }
        Probe::Device(id)
    }

    fn read(&self, reg: u64) -> u32 {
        mmio_read32(self.base + reg)
    }

    fn write(&self, reg: u64, v: u32) {
        mmio_write32(self.base + reg, v)
    }

    /// Resets the device and negotiates `wanted & offered` (VERSION_1 is required).
    /// Returns the accepted features, or None if the device refused them.
    pub fn begin_init(&self, wanted: u64) -> Option<u64> {
        self.write(STATUS, 0);
        self.write(STATUS, STATUS_ACKNOWLEDGE);
        self.write(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(DEVICE_FEATURES_SEL, sel);
            offered |= (self.read(DEVICE_FEATURES) as u64) << (32 * sel);
        }
        let accepted = offered & (wanted | F_VERSION_1);
        if accepted & F_VERSION_1 == 0 {
            self.fail();
            return None;
        }
        for sel in 0..2u32 {
            self.write(DRIVER_FEATURES_SEL, sel);
            self.write(DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
        }
        self.write(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if self.read(STATUS) & STATUS_FEATURES_OK == 0 {
            self.fail();
            return None;
        }
        Some(accepted)
    }

    /// Set up and running: DRIVER_OK, and neither FAILED nor DEVICE_NEEDS_RESET.
    pub fn driver_ok(&self) -> bool {
        self.read(STATUS) & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET)
            == STATUS_DRIVER_OK
    }

    pub fn fail(&self) {
        self.write(STATUS, STATUS_FAILED);
    }

    pub fn finish_init(&self) {
        self.write(
            STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    pub fn queue_max(&self, index: u32) -> u32 {
        self.write(QUEUE_SEL, index);
        self.read(QUEUE_NUM_MAX)
    }

    /// Programs queue `index` (selected by `queue_max`) with its three rings and enables it.
    pub fn setup_queue(&self, index: u32, size: u16, desc: u64, avail: u64, used: u64) {
        self.write(QUEUE_SEL, index);
        self.write(QUEUE_NUM, size as u32);
        self.write(QUEUE_DESC_LOW, desc as u32);
        self.write(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, avail as u32);
        self.write(QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, used as u32);
        self.write(QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write(QUEUE_READY, 1);
    }

    pub fn notify(&self, index: u16) {
        self.write(QUEUE_NOTIFY, index as u32);
    }

    pub fn config_read8(&self, offset: u64) -> u8 {
        mmio_read8(self.base + CONFIG + offset)
    }

    pub fn config_read32(&self, offset: u64) -> u32 {
        self.read(CONFIG + offset)
    }

    pub fn config_read64(&self, offset: u64) -> u64 {
        self.config_read32(offset) as u64 | (self.config_read32(offset + 4) as u64) << 32
    }

    /// A 64-bit config field read consistently (virtio 1.2 §4.2.2.2): its two halves are two
    /// accesses, so a change between them (an online resize) is caught by ConfigGeneration
    /// and the read retried; after a bounded number of tries the last value is returned.
    pub fn config_read64_consistent(&self, offset: u64) -> u64 {
        let mut value = 0;
        for _ in 0..16 {
            let before = self.read(CONFIG_GENERATION);
            value = self.config_read64(offset);
            if self.read(CONFIG_GENERATION) == before {
                break;
            }
        }
        value
    }
}
