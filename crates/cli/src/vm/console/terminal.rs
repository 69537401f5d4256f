//! Raw mode for an interactive console: every key goes to the guest as typed (Ctrl-C included;
//! vireo itself only watches for Ctrl-] to detach), and the terminal is put back as it was when
//! the guard drops — on detach, error, the daemon closing, or a panic unwinding.
//!
//! Output processing stays on (OPOST|ONLCR), so a guest that ends lines with a bare `\n` does not
//! draw a staircase and vireo's own messages need no `\r`.

use std::os::fd::{AsFd, OwnedFd};

use rustix::termios::{self, OptionalActions, OutputModes, Termios};

pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal `fd` refers to in raw mode until the guard drops.
    pub fn enter(fd: impl AsFd) -> std::io::Result<RawMode> {
        let fd = fd.as_fd().try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        raw.output_modes |= OutputModes::OPOST | OutputModes::ONLCR;
        termios::tcsetattr(&fd, OptionalActions::Now, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing better to do if the terminal is gone; the process is leaving this mode.
        let _ = termios::tcsetattr(&self.fd, OptionalActions::Now, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use rustix::termios::LocalModes;

    #[test]
    fn raw_inside_restored_after() {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap();
        let before = termios::tcgetattr(&slave).unwrap();
        assert!(before
            .local_modes
            .contains(LocalModes::ICANON | LocalModes::ISIG));
        {
            let _raw = RawMode::enter(&slave).unwrap();
            let inside = termios::tcgetattr(&slave).unwrap();
            assert!(!inside
                .local_modes
                .intersects(LocalModes::ICANON | LocalModes::ISIG | LocalModes::ECHO));
            assert!(inside
                .output_modes
                .contains(OutputModes::OPOST | OutputModes::ONLCR));
        }
        let after = termios::tcgetattr(&slave).unwrap();
        assert_eq!(after.local_modes, before.local_modes);
        assert_eq!(after.input_modes, before.input_modes);
        assert_eq!(after.output_modes, before.output_modes);
        // Not a terminal: a clean error, nothing changed.
        let file = tempfile::tempfile().unwrap();
        assert!(RawMode::enter(&file).is_err());
    }
}
