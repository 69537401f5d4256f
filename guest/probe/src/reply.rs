//! Builds one answer line in a fixed buffer, then sends it in one go.

use core::fmt;

pub const REPLY_MAX: usize = 8300;

pub struct Reply {
    buf: [u8; REPLY_MAX],
    len: usize,
}

impl Reply {
    pub const fn new() -> Self {
        Reply {
            buf: [0; REPLY_MAX],
            len: 0,
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(REPLY_MAX - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    pub fn push_hex(&mut self, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for &b in bytes {
            self.push(&[DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]]);
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for Reply {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}
