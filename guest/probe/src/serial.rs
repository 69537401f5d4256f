//! COM1 (16550 at 0x3f8), polled. Every register access is a VM exit (~25 us), so output checks
//! the line status once per FIFO load instead of once per byte.

use crate::arch::{inb, outb};

const DATA: u16 = 0x3f8;
const FCR: u16 = 0x3fa;
const IIR: u16 = 0x3fa;
const LSR: u16 = 0x3fd;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

pub struct Com1 {
    /// Bytes that may be written after one "THR empty" status: 16 with a working FIFO, else 1.
    burst: usize,
}

impl Com1 {
    pub fn init() -> Self {
        outb(FCR, 0x07); // enable and clear both FIFOs
        let fifo = inb(IIR) & 0xc0 == 0xc0;
        Com1 {
            burst: if fifo { 16 } else { 1 },
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(self.burst) {
            while inb(LSR) & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
            for &b in chunk {
                outb(DATA, b);
            }
        }
    }

    pub fn try_read(&mut self) -> Option<u8> {
        if inb(LSR) & LSR_DATA_READY != 0 {
            Some(inb(DATA))
        } else {
            None
        }
    }
}

/// Assembles command lines from COM1 bytes without blocking.
pub struct LineReader {
    buf: [u8; LINE_MAX],
    len: usize,
    overflow: bool,
}

pub const LINE_MAX: usize = 8192;

pub enum Line<'a> {
    Text(&'a [u8]),
    TooLong,
}

impl LineReader {
    pub const fn new() -> Self {
        LineReader {
            buf: [0; LINE_MAX],
            len: 0,
            overflow: false,
        }
    }

    /// Feeds one byte; returns a complete line when `b` ends one.
    pub fn push(&mut self, b: u8) -> Option<Line<'_>> {
        match b {
            b'\n' => {
                let len = core::mem::take(&mut self.len);
                if core::mem::take(&mut self.overflow) {
                    return Some(Line::TooLong);
                }
                let mut line = &self.buf[..len];
                if let [rest @ .., b'\r'] = line {
                    line = rest;
                }
                Some(Line::Text(line))
            }
            _ if self.len < LINE_MAX => {
                self.buf[self.len] = b;
                self.len += 1;
                None
            }
            _ => {
                self.overflow = true;
                None
            }
        }
    }
}
