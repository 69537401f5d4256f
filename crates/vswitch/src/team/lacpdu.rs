//! The LACPDU wire format (IEEE 802.1AX-2008 §5.4.2, version 1): slow-protocols frame to
//! 01:80:c2:00:00:02, EtherType 0x8809, subtype 1. Decoding is strict about everything the
//! state machines read (subtype, TLV types and lengths, total length) and ignores the reserved
//! bytes, as the standard asks of receivers.

use crate::frame::Mac;

pub const SLOW_PROTOCOLS_MAC: Mac = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x02];
pub const ETH_P_SLOW: u16 = 0x8809;
const SUBTYPE_LACP: u8 = 1;
/// Ethernet header (14) + LACPDU (110 bytes: subtype, version, 3 TLVs, terminator, reserved).
pub const LACPDU_FRAME_LEN: usize = 124;

/// Actor/partner state bits.
pub mod state {
    pub const ACTIVITY: u8 = 0x01;
    /// Short timeout: the sender wants LACPDUs every second.
    pub const TIMEOUT: u8 = 0x02;
    pub const AGGREGATION: u8 = 0x04;
    pub const SYNC: u8 = 0x08;
    pub const COLLECTING: u8 = 0x10;
    pub const DISTRIBUTING: u8 = 0x20;
    pub const DEFAULTED: u8 = 0x40;
    pub const EXPIRED: u8 = 0x80;
}

/// One side's information in a LACPDU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LacpInfo {
    pub system_priority: u16,
    pub system: Mac,
    pub key: u16,
    pub port_priority: u16,
    pub port: u16,
    pub state: u8,
}

impl LacpInfo {
    /// Same aggregation identity (system, key) — what selection compares.
    pub fn same_system(&self, o: &LacpInfo) -> bool {
        self.system_priority == o.system_priority && self.system == o.system && self.key == o.key
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lacpdu {
    pub actor: LacpInfo,
    pub partner: LacpInfo,
    pub collector_max_delay: u16,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LacpduError {
    #[error("frame of {0} bytes is shorter than a LACPDU (124)")]
    Truncated(usize),
    #[error("not a slow-protocols frame")]
    NotSlowProtocol,
    #[error("slow-protocols subtype {0} is not LACP")]
    NotLacp(u8),
    #[error("LACP version 0")]
    BadVersion,
    #[error("TLV at offset {offset}: type {kind} length {len}, expected type {want_kind} length {want_len}")]
    BadTlv {
        offset: usize,
        kind: u8,
        len: u8,
        want_kind: u8,
        want_len: u8,
    },
}

fn put_info(b: &mut [u8], kind: u8, i: &LacpInfo) {
    b[0] = kind;
    b[1] = 20;
    b[2..4].copy_from_slice(&i.system_priority.to_be_bytes());
    b[4..10].copy_from_slice(&i.system);
    b[10..12].copy_from_slice(&i.key.to_be_bytes());
    b[12..14].copy_from_slice(&i.port_priority.to_be_bytes());
    b[14..16].copy_from_slice(&i.port.to_be_bytes());
    b[16] = i.state;
}

fn get_info(b: &[u8]) -> LacpInfo {
    let be = |o: usize| u16::from_be_bytes([b[o], b[o + 1]]);
    let mut system = [0u8; 6];
    system.copy_from_slice(&b[4..10]);
    LacpInfo {
        system_priority: be(2),
        system,
        key: be(10),
        port_priority: be(12),
        port: be(14),
        state: b[16],
    }
}

impl Lacpdu {
    /// The whole Ethernet frame, sent from `src` (the member's own MAC).
    pub fn encode(&self, src: Mac) -> [u8; LACPDU_FRAME_LEN] {
        let mut f = [0u8; LACPDU_FRAME_LEN];
        f[0..6].copy_from_slice(&SLOW_PROTOCOLS_MAC);
        f[6..12].copy_from_slice(&src);
        f[12..14].copy_from_slice(&ETH_P_SLOW.to_be_bytes());
        f[14] = SUBTYPE_LACP;
        f[15] = 1;
        put_info(&mut f[16..36], 1, &self.actor);
        put_info(&mut f[36..56], 2, &self.partner);
        f[56] = 3;
        f[57] = 16;
        f[58..60].copy_from_slice(&self.collector_max_delay.to_be_bytes());
        // 60..72 reserved, 72..74 terminator (0, 0), 74..124 reserved: already zero.
        f
    }

    /// Parses a received frame (untagged). Any bytes are accepted without panicking.
    pub fn decode(f: &[u8]) -> Result<Lacpdu, LacpduError> {
        if f.len() < 15 || f[12..14] != ETH_P_SLOW.to_be_bytes() {
            return Err(if f.len() < 15 {
                LacpduError::Truncated(f.len())
            } else {
                LacpduError::NotSlowProtocol
            });
        }
        if f[14] != SUBTYPE_LACP {
            return Err(LacpduError::NotLacp(f[14]));
        }
        if f.len() < LACPDU_FRAME_LEN {
            return Err(LacpduError::Truncated(f.len()));
        }
        if f[15] == 0 {
            return Err(LacpduError::BadVersion);
        }
        for (offset, want_kind, want_len) in [(16, 1, 20), (36, 2, 20), (56, 3, 16), (72, 0, 0)] {
            let (kind, len) = (f[offset], f[offset + 1]);
            if kind != want_kind || len != want_len {
                return Err(LacpduError::BadTlv {
                    offset,
                    kind,
                    len,
                    want_kind,
                    want_len,
                });
            }
        }
        Ok(Lacpdu {
            actor: get_info(&f[16..36]),
            partner: get_info(&f[36..56]),
            collector_max_delay: u16::from_be_bytes([f[58], f[59]]),
        })
    }
}

/// Whether a frame is addressed to the slow-protocols group (LACP, marker, OAM): such frames
/// belong to the link, never to the switch.
pub fn is_slow_protocol(f: &[u8]) -> bool {
    f.len() >= 14 && f[0..6] == SLOW_PROTOCOLS_MAC && f[12..14] == ETH_P_SLOW.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lacpdu {
        Lacpdu {
            actor: LacpInfo {
                system_priority: 32768,
                system: [2, 0, 0, 0, 0, 1],
                key: 7,
                port_priority: 255,
                port: 3,
                state: state::ACTIVITY | state::TIMEOUT | state::AGGREGATION,
            },
            partner: LacpInfo::default(),
            collector_max_delay: 0,
        }
    }

    #[test]
    fn round_trips() {
        let f = sample().encode([2, 0, 0, 0, 0, 9]);
        assert!(is_slow_protocol(&f));
        assert_eq!(Lacpdu::decode(&f).unwrap(), sample());
    }

    #[test]
    fn rejects_truncated_and_malformed() {
        let f = sample().encode([2, 0, 0, 0, 0, 9]);
        for n in 0..LACPDU_FRAME_LEN {
            assert!(Lacpdu::decode(&f[..n]).is_err(), "len {n}");
        }
        let mut g = f;
        g[17] = 19;
        assert!(matches!(
            Lacpdu::decode(&g),
            Err(LacpduError::BadTlv { offset: 16, .. })
        ));
        let mut g = f;
        g[14] = 2; // marker protocol
        assert_eq!(Lacpdu::decode(&g), Err(LacpduError::NotLacp(2)));
        let mut g = f;
        g[72] = 5;
        assert!(Lacpdu::decode(&g).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift: deterministic, no extra dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 160) as usize;
            let mut f = sample().encode([2; 6]).to_vec();
            f.resize(n.max(1), 0);
            let i = (x >> 8) as usize % f.len();
            f[i] = (x >> 16) as u8;
            let _ = Lacpdu::decode(&f);
        }
    }
}
