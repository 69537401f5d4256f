//! The virtio-mmio transport (virtio 1.2 §4.2.2, version 2): registers, the device status state
//! machine, feature negotiation, queue setup, and interrupt status. Device models plug in through
//! `vireo_virtio::VirtioDevice`; kicks arrive on per-queue eventfds (KVM ioeventfds, so a
//! QueueNotify write never reaches userspace) and interrupts leave through an irqfd.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vireo_virtio::{QueueHandle, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;
use crate::GuestMemory;

/// Size of each device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register (for ioeventfd registration).
pub const QUEUE_NOTIFY: u64 = 0x050;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4f45_5256; // "VREO"
const CONFIG_SPACE: u64 = 0x100;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const QUEUE_RESET: u64 = 0x0c0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Interrupt state shared between the transport (registers) and the device's workers.
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    /// Sets `bit` in InterruptStatus and signals the line, unless `bit` was still set: then
    /// the driver has not acknowledged the last interrupt for that reason, and its handler,
    /// which acknowledges before it looks at the rings or config, will see this one too (the
    /// virtio-mmio line is level-triggered in the spec; the irqfd only carries its rising
    /// edges). Signalling anyway cost a driver that polls and never acknowledges (the probe;
    /// Linux while NAPI-style polling) an eventfd write per completion, each also waking the
    /// kworker through which KVM injects an irqfd into the IOAPIC.
    fn raise(&self, bit: u32) -> std::io::Result<()> {
        if self.status.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            return Ok(());
        }
        self.irq.write(1)
    }

    /// Signals the line once more if any status bit is set: an edge sent before a save may
    /// never have reached the restored guest, and [`MmioInterrupt::raise`] sends none while
    /// the bit stays set.
    fn reassert(&self) -> std::io::Result<()> {
        if self.status.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        self.irq.write(1)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn notify_queue(&self, _queue: u16) -> std::io::Result<()> {
        self.raise(INT_VRING)
    }
    fn notify_config(&self) -> std::io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise(INT_CONFIG)
    }
}

/// One virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    kicks: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    active: bool,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd that raises its interrupt line (an irqfd).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut kicks = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue size {max}: {e:?}"),
                )
            })?);
            kicks.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt {
                status: AtomicU32::new(0),
                config_generation: AtomicU32::new(0),
                irq,
            }),
            queues,
            kicks,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            active: false,
        })
    }

    /// The per-queue kick eventfds, in queue order, for KVM ioeventfd registration at
    /// `base + QUEUE_NOTIFY` with the queue index as datamatch.
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// Stops the device (its workers stop touching guest memory) and returns to the reset state.
    pub fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.status.store(0, Ordering::SeqCst);
    }

    /// VM pause: the device parks its workers at a request boundary (see
    /// `VirtioDevice::pause`). A device the driver has not activated has nothing running.
    pub fn pause(&mut self, timeout: std::time::Duration) -> Result<(), vireo_virtio::PauseError> {
        if self.active {
            self.device.pause(timeout)?;
        }
        Ok(())
    }

    /// Whether another process maps guest RAM for this device (a vhost-user back end): it
    /// would not see pages a post-copy destination has not received yet.
    pub fn maps_guest_memory(&self) -> bool {
        self.device.maps_guest_memory()
    }

    /// See [`vireo_virtio::VirtioDevice::can_postcopy`].
    pub fn can_postcopy(&self) -> bool {
        self.device.can_postcopy()
    }

    /// See [`vireo_virtio::VirtioDevice::postcopy_listen`].
    pub fn postcopy_listen(
        &mut self,
    ) -> Result<Option<vireo_virtio::ForeignFaults>, vireo_virtio::StateError> {
        self.device.postcopy_listen()
    }

    /// See [`vireo_virtio::VirtioDevice::postcopy_end`].
    pub fn postcopy_end(&mut self) {
        self.device.postcopy_end()
    }

    pub fn resume(&mut self) {
        if self.active {
            self.device.resume();
        }
    }

    /// Dirty logging starts (see `VirtioDevice::start_dirty_log`); also for a device the
    /// driver has not activated yet, which must log from its activation on.
    pub fn start_dirty_log(
        &mut self,
        log: vireo_virtio::DirtyLog<'_>,
    ) -> Result<(), vireo_virtio::DirtyLogError> {
        self.device.start_dirty_log(log)
    }

    pub fn stop_dirty_log(&mut self) {
        self.device.stop_dirty_log()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            reg::STATUS => self.status,
            // No shared memory regions: length all-ones means "absent" (§4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::QUEUE_RESET => 0,
            reg::CONFIG_GENERATION => self.interrupt.config_generation.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let queue_setup_allowed =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                // Features may only change between DRIVER and FEATURES_OK.
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM | reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH
                if queue_setup_allowed =>
            {
                if let Some(q) = self.selected_queue() {
                    if q.ready() {
                        return; // §4.2.2.3: no changes while the queue is enabled
                    }
                    match offset {
                        reg::QUEUE_NUM => q.set_size(value as u16),
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                        reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
                        reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                        reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
                        reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(value)),
                        _ => {}
                    }
                }
            }
            reg::QUEUE_READY if queue_setup_allowed => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                // Reached only when no ioeventfd is registered (tests, or KVM without
                // ioeventfd): forward the kick ourselves.
                if let Some(k) = self.kicks.get(value as usize) {
                    let _ = k.write(1);
                }
            }
            reg::INTERRUPT_ACK => {
                self.interrupt.status.fetch_and(!value, Ordering::SeqCst);
            }
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: ignored write {value:#x} at {offset:#x}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & !self.status & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        // The driver only ever adds bits (§3.1.1); anything else is a driver bug we ignore.
        if value & self.status != self.status {
            tracing::debug!(
                "virtio-mmio: status {:#x} -> {value:#x} clears bits",
                self.status
            );
            return;
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & vireo_virtio::VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver the subset is unacceptable.
                self.status = value & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        self.status = value;
        if new & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut handles = Vec::with_capacity(self.queues.len());
        for (q, kick) in self.queues.iter_mut().zip(&self.kicks) {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&self.mem) {
                tracing::warn!("virtio-mmio: driver set up an invalid queue; device needs reset");
                self.fail();
                return;
            }
            let kick = match kick.try_clone() {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!("virtio-mmio: cloning kick eventfd: {e}");
                    self.fail();
                    return;
                }
            };
            handles.push(QueueHandle {
                queue: copy_queue(q),
                kick,
            });
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let queues = handles.len();
        match self.device.activate(self.mem.clone(), interrupt, handles) {
            Ok(()) => {
                tracing::info!(
                    "virtio-mmio: {} device activated by the driver: {queues} queue(s), \
                     features {:#x}{}",
                    device_name(self.device.device_type()),
                    self.driver_features,
                    if event_idx { ", event index" } else { "" }
                );
                self.active = true;
            }
            Err(e) => {
                tracing::warn!("virtio-mmio: device activation failed: {e}");
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        let _ = self.interrupt.notify_config();
    }
}

/// A queue with the same driver-visible configuration (virtio-queue's `Queue` is not `Clone`;
/// the device gets its own copy while the transport keeps answering register reads).
fn copy_queue(q: &Queue) -> Queue {
    let mut c = Queue::new(q.max_size()).expect("max size already validated");
    c.set_size(q.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (l, h) = split(q.desc_table());
    c.set_desc_table_address(l, h);
    let (l, h) = split(q.avail_ring());
    c.set_avail_ring_address(l, h);
    let (l, h) = split(q.used_ring());
    c.set_used_ring_address(l, h);
    c.set_event_idx(q.event_idx_enabled());
    c.set_ready(q.ready());
    // Zero for a fresh activation; the saved positions after a restore.
    c.set_next_avail(q.next_avail());
    c.set_next_used(q.next_used());
    c
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        // Registers are 32-bit wide and must be read whole (§4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, value);
    }
}

/// The device type's name, for log lines.
pub fn device_name(device_type: u32) -> &'static str {
    match device_type {
        vireo_virtio::device_type::BLOCK => "block",
        vireo_virtio::device_type::NET => "net",
        _ => "unknown",
    }
}

mod state;
#[cfg(test)]
mod tests;
