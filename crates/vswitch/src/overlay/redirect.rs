//! The redirect: how a host that relays a stale sender's packet for a VM that moved away
//! tells that sender where the VM is now (`docs/netvirt.md`, "Stale senders").
//!
//! The message travels on the overlay itself, as an ordinary tunnel packet from the relaying
//! host's PA to the sender's PA in the moved VM's VSID, so it needs no channel besides the
//! one the stale packet came on, and it reaches hosts that no vireod knows about. Its inner
//! frame is from the subnet's gateway MAC with the IEEE local experimental EtherType: no
//! VM can send it (a VM's frames must carry the VM's own MAC), and no VM receives it.
//!
//! Trust is the data plane's: a tunnel packet's outer source PA is what says which host sent
//! it. A redirect can therefore only move an entry that points at the PA it came from — the
//! host that entry names is the one with the authority to say the VM left — in the VSID and
//! routing domain it was sent in, for the MAC the entry already has, to a PA that is not
//! ours. A host on the provider network cannot use it to pull another host's or another
//! tenant's VM towards itself unless it can already send as that host.

use std::net::IpAddr;

use super::policy::{Entry, Origin};
use super::wire::ip_bytes;
use crate::frame::Mac;

/// IEEE 802 local experimental EtherType 1: never a customer protocol on an overlay port.
pub const ETH_P_REDIRECT: u16 = 0x88b5;
const MAGIC: &[u8; 4] = b"VRDR";
const VERSION: u8 = 1;

/// "The VM with `mac` and customer address `ca` is now behind provider address `pa`."
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub ca: IpAddr,
    pub mac: Mac,
    pub pa: IpAddr,
}

/// Why a received redirect changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no policy entry for that CA in the VSID's routing domain")]
    NoEntry,
    #[error("the CA belongs to a port of this switch")]
    LocalCa,
    #[error("the entry is in another virtual subnet")]
    OtherVsid,
    #[error("the entry has another MAC")]
    OtherMac,
    #[error("the entry does not point at the redirect's sender")]
    NotFromCurrentHost,
    #[error("the new PA is one of ours, the sender's, or of another address family")]
    BadTarget,
}

/// The inner frame of a redirect, from (and to) the subnet's gateway MAC.
pub fn build(gw_mac: Mac, r: &Redirect) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&gw_mac);
    f.extend_from_slice(&gw_mac);
    f.extend_from_slice(&ETH_P_REDIRECT.to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.push(VERSION);
    for a in [r.ca, r.pa] {
        let b = ip_bytes(a);
        f.push(b.len() as u8);
        f.extend_from_slice(&b);
    }
    f.extend_from_slice(&r.mac);
    if f.len() < crate::switch::ETH_MIN_FRAME {
        f.resize(crate::switch::ETH_MIN_FRAME, 0);
    }
    f
}

/// Whether an inner frame claims to be a redirect (then it is never customer traffic).
pub fn is_redirect(inner: &[u8]) -> bool {
    inner.get(12..14) == Some(&ETH_P_REDIRECT.to_be_bytes()[..])
}

fn addr(f: &[u8], at: &mut usize) -> Option<IpAddr> {
    let len = *f.get(*at)? as usize;
    let b = f.get(*at + 1..*at + 1 + len)?;
    *at += 1 + len;
    match len {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

/// Parses a redirect's inner frame strictly: magic, version, 4- or 16-byte addresses.
pub fn parse(inner: &[u8]) -> Option<Redirect> {
    if !is_redirect(inner) || inner.get(14..18)? != MAGIC || *inner.get(18)? != VERSION {
        return None;
    }
    let mut at = 19;
    let ca = addr(inner, &mut at)?;
    let pa = addr(inner, &mut at)?;
    let mac: Mac = inner.get(at..at + 6)?.try_into().ok()?;
    Some(Redirect { ca, mac, pa })
}

/// Whether the redirect `r`, tunnelled in `vsid` from `from_pa`, may move `entry` (this
/// host's entry for `r.ca` in the routing domain of `vsid`), and if so the entry moved to
/// `r.pa`. `ours` tells our own PAs.
pub fn judge(
    entry: Option<&Entry>,
    vsid: u32,
    from_pa: IpAddr,
    r: &Redirect,
    ours: impl Fn(IpAddr) -> bool,
) -> Result<Entry, Refusal> {
    let e = entry.ok_or(Refusal::NoEntry)?;
    if matches!(e.origin, Origin::Port(_)) {
        return Err(Refusal::LocalCa);
    }
    if e.vsid != vsid {
        return Err(Refusal::OtherVsid);
    }
    if e.mac != r.mac {
        return Err(Refusal::OtherMac);
    }
    if e.pa != from_pa {
        return Err(Refusal::NotFromCurrentHost);
    }
    if ours(r.pa) || r.pa == from_pa || r.pa.is_ipv4() != from_pa.is_ipv4() {
        return Err(Refusal::BadTarget);
    }
    Ok(Entry { pa: r.pa, ..*e })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PortId;

    const MAC: Mac = [2, 0, 0, 0, 0, 7];
    const GW: Mac = [2, 0xff, 0, 0, 100, 1];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn entry(pa: &str) -> Entry {
        Entry {
            vsid: 100,
            mac: MAC,
            pa: ip(pa),
            origin: Origin::Policy,
        }
    }

    fn moved_to(pa: &str) -> Redirect {
        Redirect {
            ca: ip("10.0.0.7"),
            mac: MAC,
            pa: ip(pa),
        }
    }

    fn none(_: IpAddr) -> bool {
        false
    }

    #[test]
    fn round_trips_over_both_families_and_refuses_damage() {
        for (ca, pa) in [("10.0.0.7", "192.0.2.2"), ("fd00::7", "2001:db8::2")] {
            let r = Redirect {
                ca: ip(ca),
                mac: MAC,
                pa: ip(pa),
            };
            let f = build(GW, &r);
            assert!(f.len() >= crate::switch::ETH_MIN_FRAME);
            assert_eq!(parse(&f), Some(r));
            // Cut anywhere inside the message: nothing.
            let end = 19 + 2 * (1 + ip_bytes(r.ca).len()) + 6;
            for n in 0..end {
                assert_eq!(parse(&f[..n]), None, "cut at {n}");
            }
            for at in [12, 14, 18, 19] {
                let mut bad = f.clone();
                bad[at] ^= 0x40;
                assert_eq!(parse(&bad), None, "flipped byte {at}");
            }
        }
    }

    #[test]
    fn the_host_the_entry_names_may_move_it() {
        let e = entry("192.0.2.1");
        assert_eq!(
            judge(Some(&e), 100, ip("192.0.2.1"), &moved_to("192.0.2.2"), none),
            Ok(entry("192.0.2.2"))
        );
    }

    #[test]
    fn a_forged_redirect_from_another_host_is_refused() {
        let e = entry("192.0.2.1");
        // An attacker at .66 pulling the VM towards itself.
        assert_eq!(
            judge(
                Some(&e),
                100,
                ip("192.0.2.66"),
                &moved_to("192.0.2.66"),
                none
            ),
            Err(Refusal::NotFromCurrentHost)
        );
    }

    #[test]
    fn another_subnet_or_tenant_or_mac_is_refused() {
        let e = entry("192.0.2.1");
        let from = ip("192.0.2.1");
        // Sent in another VSID (another subnet, or another tenant's with the same CA).
        assert_eq!(
            judge(Some(&e), 200, from, &moved_to("192.0.2.2"), none),
            Err(Refusal::OtherVsid)
        );
        let mut other = moved_to("192.0.2.2");
        other.mac = [2, 0, 0, 0, 0, 9];
        assert_eq!(
            judge(Some(&e), 100, from, &other, none),
            Err(Refusal::OtherMac)
        );
        assert_eq!(
            judge(None, 100, from, &moved_to("192.0.2.2"), none),
            Err(Refusal::NoEntry)
        );
    }

    #[test]
    fn local_vms_and_silly_targets_are_refused() {
        let from = ip("192.0.2.1");
        let mut local = entry("192.0.2.1");
        local.origin = Origin::Port(PortId(3));
        assert_eq!(
            judge(Some(&local), 100, from, &moved_to("192.0.2.2"), none),
            Err(Refusal::LocalCa)
        );
        let e = entry("192.0.2.1");
        let ours = |a: IpAddr| a == ip("192.0.2.9");
        for to in ["192.0.2.9", "192.0.2.1", "2001:db8::2"] {
            assert_eq!(
                judge(Some(&e), 100, from, &moved_to(to), ours),
                Err(Refusal::BadTarget),
                "{to}"
            );
        }
    }
}
