//! The probe's NIC as tests drive it: a marked test frame, and `NET i SEND` / `NET i RECV`
//! (docs/probe-protocol.md) as console calls, so each network test does not carry its own copy
//! of the receive loop.

use std::time::{Duration, Instant};

use crate::console::{decode_hex, encode_hex, ProbeConsole, ProbeError};

/// A 64-byte frame of the local experimental EtherType (0x88b5) whose 50-byte payload is marked
/// by `tag`, so frames of one test tell apart.
pub fn tagged_frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..50u8).map(|i| i ^ tag));
    f
}

/// A UDP/IPv4 frame 10.0.0.2:`flow` → 10.0.0.1:7 whose 4-byte payload is `MQ`, `tag` and the
/// low byte of `flow`. A multiqueue receiver spreads frames by flow (addresses and ports), so
/// frames of different `flow`s exercise different receive queues.
pub fn udp_flow_frame(dst: [u8; 6], src: [u8; 6], flow: u16, tag: u8) -> Vec<u8> {
    let mut f = [dst, src].concat();
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20u16 + 8 + 4).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..20].copy_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&flow.to_be_bytes());
    f.extend_from_slice(&7u16.to_be_bytes());
    f.extend_from_slice(&12u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[b'M', b'Q', tag, flow as u8]);
    f
}

/// (tag, flow) of a frame made by [`udp_flow_frame`].
pub fn parse_udp_flow_frame(f: &[u8]) -> Option<(u8, u16)> {
    (f.len() >= 46 && f[12..14] == [0x08, 0x00] && f[42..44] == *b"MQ")
        .then(|| (f[44], u16::from_be_bytes([f[34], f[35]])))
}

/// How long a console command may take beyond the time the probe was told to wait.
const ANSWER_SLACK: Duration = Duration::from_secs(10);
/// The most frames one receive looks at: bounds the loop when unrelated frames keep coming.
const MAX_FRAMES: usize = 64;

impl ProbeConsole {
    /// NIC `nic` transmits `frame`; an error unless the probe answers `OK`.
    pub fn net_send(&mut self, nic: usize, frame: &[u8]) -> Result<(), ProbeError> {
        let cmd = format!("NET {nic} SEND {}", encode_hex(frame));
        match self.command(&cmd, ANSWER_SLACK)?.as_str() {
            "OK" => Ok(()),
            other => Err(ProbeError::Err(format!("NET SEND answered {other:?}"))),
        }
    }

    /// Receives on NIC `nic` for up to `window`, skipping frames for which `wanted` is false
    /// (a bridge or the host stack may deliver unrelated ones first). True once a wanted frame
    /// arrived; false when the window (or [`MAX_FRAMES`] frames) passed without one.
    pub fn net_receive(
        &mut self,
        nic: usize,
        window: Duration,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Result<bool, ProbeError> {
        let deadline = Instant::now() + window;
        for _ in 0..MAX_FRAMES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let cmd = format!("NET {nic} RECV {}", left.as_millis().max(1));
            let answer = match self.command(&cmd, left + ANSWER_SLACK) {
                Ok(a) => a,
                Err(ProbeError::Err(e)) if e == "timeout" => return Ok(false),
                Err(e) => return Err(e),
            };
            let hex = answer
                .strip_prefix("OK")
                .ok_or_else(|| ProbeError::Err(format!("NET RECV answered {answer:?}")))?;
            if decode_hex(hex.trim()).is_some_and(|got| wanted(&got)) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
