//! Ethernet MAC addresses as the API spells them: `02:a1:b2:c3:d4:e5`.
//!
//! Vireo generates locally administered unicast addresses (first octet: bit 1 set, bit 0 clear),
//! so they can never collide with a vendor's burned-in address. QEMU's `52:54:00` is locally
//! administered too; we use a different first octet (0x02) so a Vireo VM and a QEMU VM on the
//! same LAN do not draw from the same pool.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The first octet of every MAC Vireo generates: locally administered (0x02), unicast.
pub const VIREO_MAC_FIRST_OCTET: u8 = 0x02;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address from five random bytes (40 bits: a collision among
    /// a host's VMs is improbable, and the store still enforces uniqueness).
    pub fn generate(random: [u8; 5]) -> MacAddr {
        let [a, b, c, d, e] = random;
        MacAddr([VIREO_MAC_FIRST_OCTET, a, b, c, d, e])
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0
    }

    pub fn is_locally_administered(&self) -> bool {
        self.0[0] & 0x02 != 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a MAC address; write six hex octets separated by ':', e.g. 02:00:00:00:00:01"
)]
pub struct BadMac(pub String);

impl FromStr for MacAddr {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| BadMac(s.to_owned()))?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BadMac(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| BadMac(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let mac: MacAddr = "02:a1:B2:c3:d4:e5".parse().unwrap();
        assert_eq!(mac.to_string(), "02:a1:b2:c3:d4:e5");
        for bad in [
            "",
            "02:a1:b2:c3:d4",
            "02:a1:b2:c3:d4:e5:f6",
            "2:a1:b2:c3:d4:e5",
            "zz:00:00:00:00:00",
            "+2:00:00:00:00:00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_addresses_are_locally_administered_unicast() {
        for r in [[0u8; 5], [0xff; 5], [1, 2, 3, 4, 5]] {
            let mac = MacAddr::generate(r);
            assert!(mac.is_unicast() && mac.is_locally_administered(), "{mac}");
        }
        let vendor: MacAddr = "00:1a:2b:3c:4d:5e".parse().unwrap();
        assert!(!vendor.is_locally_administered());
        let multicast: MacAddr = "03:00:00:00:00:01".parse().unwrap();
        assert!(!multicast.is_unicast());
    }
}
