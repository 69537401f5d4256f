//! The control queue of a multiqueue NIC, used for one command only:
//! VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET. A command is one device-readable descriptor (class, command,
//! u16 pair count) and one device-writable ack byte; the probe waits for the answer by polling,
//! so at most one command is ever in flight.

use core::ptr::{read_volatile, write_volatile};

use super::{Error, STALL_TICKS};
use crate::arch::rdtsc;
use crate::arena;
use crate::virtio::mmio::Transport;
use crate::virtio::queue::{Buf, Virtqueue};

const CLASS_MQ: u8 = 4;
const MQ_VQ_PAIRS_SET: u8 = 0;
const ACK_OK: u8 = 0;
/// Where the ack byte sits in the command buffer (its own descriptor).
const ACK_AT: u64 = 8;
/// Written before each command: a device that completes it without writing the ack is refused.
const ACK_UNSET: u8 = 0xff;

pub struct Ctrl {
    queue: Virtqueue,
    buf: u64,
}

impl Ctrl {
    /// Sets up the control queue `index` (2 × the device's max_virtqueue_pairs).
    pub fn new(transport: Transport, index: u16, event_idx: bool) -> Option<Self> {
        let mut queue = Virtqueue::new(transport, index, 4)?;
        if event_idx {
            queue.set_event_idx();
        }
        let buf = arena::alloc(16, 16)?;
        Some(Ctrl { queue, buf })
    }

    /// Asks the device to use the first `n` pairs; Ok once it acknowledged VIRTIO_NET_OK.
    pub fn set_pairs(&mut self, n: u16) -> Result<(), Error> {
        let [lo, hi] = n.to_le_bytes();
        let command = [CLASS_MQ, MQ_VQ_PAIRS_SET, lo, hi];
        let ack = (self.buf + ACK_AT) as *mut u8;
        // SAFETY: `buf` is 16 bytes of arena memory only this queue uses, and no command is in
        // flight (each one is waited for below), so the device is not reading or writing it.
        unsafe {
            for (i, b) in command.iter().enumerate() {
                write_volatile((self.buf as *mut u8).add(i), *b);
            }
            write_volatile(ack, ACK_UNSET);
        }
        let chain = [
            Buf {
                addr: self.buf,
                len: command.len() as u32,
                device_writes: false,
            },
            Buf {
                addr: self.buf + ACK_AT,
                len: 1,
                device_writes: true,
            },
        ];
        let head = self.queue.add(&chain).ok_or(Error::Stalled)?;
        self.queue.publish();
        let start = rdtsc();
        loop {
            match self.queue.pop_used() {
                Some((h, _)) if h == head => break,
                Some(_) => continue,
                None if rdtsc().wrapping_sub(start) > STALL_TICKS => return Err(Error::Stalled),
                None => core::hint::spin_loop(),
            }
        }
        // SAFETY: the device has completed the chain, so it no longer writes the ack byte.
        match unsafe { read_volatile(ack) } {
            ACK_OK => Ok(()),
            _ => Err(Error::Refused),
        }
    }
}
