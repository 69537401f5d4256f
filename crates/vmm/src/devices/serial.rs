//! COM1: a vm-superio 16550 whose interrupt is an irqfd, with output written a line at a time
//! and input fed from a reader thread.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::{serial::NoEvents, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::lock;
use super::BusDevice;
use crate::exit::ExitState;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;
const LSR_OFFSET: u64 = 5;
const MAX_PENDING: usize = 4096;

/// Raises the serial interrupt through its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Collects guest output and hands it on a line at a time, so readers of a pipe see whole
/// protocol lines promptly without one write(2) per byte.
pub struct LineOutput {
    inner: Box<dyn Write + Send>,
    pending: Vec<u8>,
}

impl LineOutput {
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        LineOutput {
            inner,
            pending: Vec::with_capacity(256),
        }
    }

    /// Pushes out whatever is pending, complete line or not.
    pub fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // The console is best effort: a closed stdout or socket must not stop the guest.
        let _ = self.inner.write_all(&self.pending);
        let _ = self.inner.flush();
        self.pending.clear();
    }
}

impl Write for LineOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= MAX_PENDING {
            self.flush_pending();
        }
        Ok(buf.len())
    }

    /// vm-superio flushes after every byte; lines are flushed in `write` instead.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, LineOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), LineOutput::new(out)),
        }
    }

    /// Queues input bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.serial.fifo_capacity() == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush_output(&mut self) {
        self.serial.writer_mut().flush_pending();
    }

    /// The UART's registers and receive FIFO (save).
    pub fn registers(&self) -> vm_superio::SerialState {
        self.serial.state()
    }

    /// Loads saved registers and receive FIFO, keeping the interrupt line and the output
    /// (restore). Raises the interrupt if the saved state had one pending.
    pub fn load_registers(&mut self, state: &vm_superio::SerialState) -> Result<(), String> {
        let evt = &self.serial.interrupt_evt().0;
        let (placeholder, irq) = match (evt.try_clone(), evt.try_clone()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Err(format!("cloning the interrupt eventfd: {e}")),
        };
        // Checked before the old device is taken apart, so an error leaves it as it was.
        if state.in_buffer.len() > 64 {
            return Err(format!("{} bytes in a 64-byte FIFO", state.in_buffer.len()));
        }
        let old = std::mem::replace(
            &mut self.serial,
            Serial::new(
                IrqTrigger(placeholder),
                LineOutput::new(Box::new(std::io::sink())),
            ),
        );
        match Serial::from_state(state, IrqTrigger(irq), NoEvents, old.into_writer()) {
            Ok(serial) => {
                self.serial = serial;
                Ok(())
            }
            Err(e) => Err(format!("loading the UART state: {e}")),
        }
    }

    /// Back to the power-on state (registers, FIFOs, pending input dropped), keeping the
    /// interrupt line and the output. What the old guest left unfinished on its last line is
    /// written out first.
    pub fn reset(&mut self) {
        self.flush_output();
        let evt = &self.serial.interrupt_evt().0;
        let (Ok(placeholder), Ok(irq)) = (evt.try_clone(), evt.try_clone()) else {
            tracing::warn!("serial reset: cannot clone the interrupt eventfd; kept as it was");
            return;
        };
        let old = std::mem::replace(
            &mut self.serial,
            Serial::new(
                IrqTrigger(placeholder),
                LineOutput::new(Box::new(std::io::sink())),
            ),
        );
        self.serial = Serial::new(IrqTrigger(irq), old.into_writer());
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == LSR_OFFSET {
            // A guest polling the line status waits for input: show it any unfinished line
            // (a prompt) first.
            self.flush_output();
        }
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, v) {
                tracing::debug!("serial write: {e}");
            }
        }
    }
}

/// Feeds bytes from `input` to the guest until it ends or the VM stops. Waits (does not drop)
/// when the 64-byte FIFO is full, so pasted or piped input arrives whole.
pub fn pump_input(serial: Arc<Mutex<SerialDevice>>, mut input: impl Read, exit: Arc<ExitState>) {
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut done = 0;
        while done < n {
            if exit.is_set() {
                return;
            }
            done += lock(&serial).enqueue_input(&buf[done..n]);
            if done < n {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_goes_out_a_line_at_a_time() {
        let sink = Shared::default();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(sink.clone()));
        for b in b"PROBE READY\npro" {
            dev.write(0, &[*b]);
        }
        assert_eq!(*sink.0.lock().unwrap(), vec![b"PROBE READY\n".to_vec()]);
        let mut lsr = [0u8];
        dev.read(LSR_OFFSET, &mut lsr);
        assert_eq!(sink.0.lock().unwrap().last().unwrap(), b"pro");
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
    }

    #[test]
    fn input_reaches_the_receive_register() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(std::io::sink()),
        )));
        // Enable the received-data interrupt so enqueueing raises it.
        dev.lock().unwrap().write(1, &[0x01]);
        let input: Vec<u8> = (0..200u8).collect();
        let exit = Arc::new(ExitState::default());
        let d2 = dev.clone();
        let pump = std::thread::spawn(move || pump_input(d2, &input[..], exit));
        let mut got = Vec::new();
        for _ in 0..100_000 {
            let mut lsr = [0u8];
            dev.lock().unwrap().read(LSR_OFFSET, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut b = [0u8];
                dev.lock().unwrap().read(0, &mut b);
                got.push(b[0]);
                if got.len() == 200 {
                    break;
                }
            } else {
                std::thread::yield_now();
            }
        }
        pump.join().unwrap();
        assert_eq!(got, (0..200u8).collect::<Vec<_>>());
        assert!(irq.read().unwrap() >= 1);
    }
}
