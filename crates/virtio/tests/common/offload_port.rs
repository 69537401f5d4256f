//! A frame port with checksum/TSO offloads, in memory: what a TAP opened with `IFF_VNET_HDR`
//! is to the device, without needing root. The test queues frames with headers for the device
//! to receive and reads back what it sent and which offloads it asked the port to hand over.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Mutex;

use vireo_netport::{FramePort, Offloads, PortError, VNET_HDR_LEN};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK, EFD_SEMAPHORE};

pub const ALL_OFFLOADS: Offloads = Offloads {
    csum: true,
    tso4: true,
    tso6: true,
};

/// A frame the device sent: its header (`None` for a plain `send`) and bytes.
pub type Sent = (Option<[u8; VNET_HDR_LEN]>, Vec<u8>);

pub struct OffloadPort {
    incoming: Mutex<VecDeque<([u8; VNET_HDR_LEN], Vec<u8>)>>,
    incoming_event: EventFd,
    pub sent: Mutex<Vec<Sent>>,
    /// The last `set_recv_offloads`.
    pub recv_offloads: Mutex<Option<Offloads>>,
}

impl OffloadPort {
    pub fn new() -> Self {
        OffloadPort {
            incoming: Mutex::default(),
            incoming_event: EventFd::new(EFD_NONBLOCK | EFD_SEMAPHORE).unwrap(),
            sent: Mutex::default(),
            recv_offloads: Mutex::default(),
        }
    }

    /// Queues a frame for the device to receive.
    pub fn push(&self, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) {
        self.incoming
            .lock()
            .unwrap()
            .push_back((hdr, frame.to_vec()));
        self.incoming_event.write(1).unwrap();
    }
}

impl FramePort for OffloadPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        self.sent.lock().unwrap().push((None, frame.to_vec()));
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        let mut hdr = [0; VNET_HDR_LEN];
        let got = self.recv_vnet(&mut hdr, buf)?;
        assert_eq!(
            hdr, [0; VNET_HDR_LEN],
            "an offloaded frame on a plain receive"
        );
        Ok(got)
    }

    fn rx_fd(&self) -> RawFd {
        self.incoming_event.as_raw_fd()
    }

    fn name(&self) -> &str {
        "offload"
    }

    fn offloads(&self) -> Offloads {
        ALL_OFFLOADS
    }

    fn send_vnet(&self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> Result<(), PortError> {
        self.sent.lock().unwrap().push((Some(*hdr), frame.to_vec()));
        Ok(())
    }

    fn recv_vnet(
        &self,
        hdr: &mut [u8; VNET_HDR_LEN],
        buf: &mut [u8],
    ) -> Result<Option<usize>, PortError> {
        let Some((h, frame)) = self.incoming.lock().unwrap().pop_front() else {
            return Ok(None);
        };
        let _ = self.incoming_event.read();
        if frame.len() > buf.len() {
            return Err(PortError::TooLong {
                len: frame.len(),
                cap: buf.len(),
            });
        }
        *hdr = h;
        buf[..frame.len()].copy_from_slice(&frame);
        Ok(Some(frame.len()))
    }

    fn set_recv_offloads(&self, wanted: Offloads) -> Result<(), PortError> {
        *self.recv_offloads.lock().unwrap() = Some(wanted);
        Ok(())
    }
}
